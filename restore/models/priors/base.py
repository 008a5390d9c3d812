"""The one interface every frozen latent text-to-image prior offers the methods and the sampler.

A prior (SD-1/2 :mod:`.sd`, SDXL :mod:`.sdxl`, PixArt-α :mod:`.pixart`) is the VAE with its latent scaling, the
denoiser (a diffusers ``UNet2DConditionModel`` or ``PixArtTransformer2DModel``), the text encoder(s) behind
:meth:`LatentPrior.encode_text`, the prior's null condition, and the noise schedule it was trained with
(``noise_scheduler``: a diffusers ``DDPMScheduler`` whose config carries the ``prediction_type`` and, for learned
variance, ``variance_type="learned_range"``). A method never calls the denoiser with family-specific keyword
arguments: :meth:`LatentPrior.denoiser_kwargs` turns a :class:`~.text.TextCondition` into them (SD:
``encoder_hidden_states``; SDXL: plus ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids``; PixArt: plus the
``encoder_attention_mask`` and its resolution / aspect-ratio micro-conditions), so the same kwargs also drive a
ControlNet copy of the denoiser, and :meth:`LatentPrior.predict` runs the frozen denoiser with them.

The denoiser keeps the diffusers attribute name of its family (``unet`` / ``transformer``), so checkpoint keys of
modules trained inside it read ``prior.unet.…`` as they always did.

Null condition (what classifier-free guidance and prompt dropout use), per family as its official training code:

- SD-1/2: the encoded empty prompt ``""`` (dropout replaces the prompt text before encoding);
- SDXL: zeros for the hidden states and the pooled embedding (``force_zeros_for_empty_prompt``; the ``sgm``
  conditioner zeroes dropped embeddings), the size conditions kept;
- PixArt-α: its learned null caption embedding (``y_embedder.y_embedding``), with the prompt's attention mask.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from restore.models.priors.loading import freeze, load_parts, offline_default
from restore.models.priors.text import (
    MissingTextFeaturesError,
    TextCache,
    TextCondition,
    TextFeatureStore,
    null_mask,
    unique,
)

__all__ = ["LatentPrior"]


class LatentPrior(nn.Module):
    """Base of the frozen priors. Subclasses set :attr:`denoiser_name` and implement :meth:`run_text_encoder`,
    :meth:`null_condition`, :meth:`denoiser_kwargs` and :attr:`has_text_encoder`.

    Args:
        vae: the diffusers ``AutoencoderKL`` (``None`` for a text-only prior, e.g. to precompute features).
        noise_scheduler: the training noise schedule (``DDPMScheduler``).
        source: where the weights came from (a folder or hub id; ``None`` for in-code models). Methods do not
            write the prior into their checkpoints and name this source when it must be reloaded.
        text_features: a folder of precomputed features (:class:`~.text.TextFeatureStore`) read before running
            the text encoder; prompts missing there are encoded (or refused when no encoder is loaded).
        text_cache_size: keep the features of up to this many prompts in memory (LRU); 0 = off.
    """

    #: attribute holding the denoiser (diffusers pipeline naming: ``unet`` or ``transformer``)
    denoiser_name: ClassVar[str] = "unet"
    #: the null prompt *text* where the null condition is an encoded prompt (SD); ``None`` otherwise
    null_prompt: ClassVar[str | None] = None
    #: the diffusers folder layout, part -> subfolder (what :meth:`load_parts` reads, :meth:`save_pretrained`
    #: writes)
    subfolders: ClassVar[Mapping[str, str]] = {}
    #: what each subfolder must hold, for the error message of a missing part
    expected_files: ClassVar[Mapping[str, str]] = {}
    #: the parts ``load_text_encoder=False`` leaves out
    text_encoder_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(
        self,
        vae: nn.Module | None,
        noise_scheduler: Any,
        source: str | None = None,
        text_features: str | os.PathLike | None = None,
        text_cache_size: int = 0,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.source = source
        self.text_cache = TextCache(text_cache_size)
        self.text_features = (
            None if text_features is None else TextFeatureStore(text_features, self.text_encoder_id)
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_parts(
        cls,
        source: str,
        classes: Mapping[str, tuple[type, Mapping[str, Any]]],
        subfolders: Mapping[str, str] | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        load_text_encoder: bool = True,
        load_denoiser: bool = True,
    ) -> dict[str, Any]:
        """``{part: part_class.from_pretrained(source, subfolder=..., **kwargs)}`` for ``classes`` (part ->
        (class, kwargs)), networks frozen. ``subfolders`` overrides entries of the layout;
        ``local_files_only=None`` follows ``HF_HUB_OFFLINE``; ``load_text_encoder`` / ``load_denoiser=False``
        leave the text encoder(s) / the denoiser and the VAE out. A part that cannot be found raises
        :class:`~.loading.PriorNotFoundError` naming the source, the expected layout and ``HF_HOME``."""
        skip = set() if load_text_encoder else set(cls.text_encoder_parts)
        if not load_denoiser:
            skip |= {"vae", cls.denoiser_name}
        offline = offline_default(local_files_only)
        common = {"revision": revision, "local_files_only": offline}
        loaders = {
            name: partial(_from_pretrained, part_cls, source, {**kwargs, **common})
            for name, (part_cls, kwargs) in classes.items()
            if name not in skip
        }
        folders = {**cls.subfolders, **(subfolders or {})}
        parts = load_parts(source, loaders, folders, cls.expected_files, offline)
        for part in parts.values():
            if isinstance(part, nn.Module):
                freeze(part)
        return parts

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the parts in the diffusers folder layout (what ``from_pretrained`` reads)."""
        for name, sub in self.subfolders.items():
            part = self.noise_scheduler if name == "scheduler" else getattr(self, name, None)
            if part is not None:
                part.save_pretrained(os.path.join(directory, sub))

    # ------------------------------------------------------------------ parts
    @property
    def denoiser(self) -> nn.Module:
        """The frozen denoiser (``self.unet`` / ``self.transformer``)."""
        return getattr(self, self.denoiser_name)

    @property
    def text_encoder_id(self) -> str:
        """Names the text encoding (source and family) in precomputed-feature manifests."""
        return f"{type(self).__name__}:{self.source or 'in-code'}"

    @property
    def has_text_encoder(self) -> bool:
        """Whether prompts can be encoded here (not only read from precomputed features)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ VAE
    @property
    def scaling_factor(self) -> float:
        """Latent scaling of the VAE (0.18215 for SD-1/2 and PixArt's sd-vae-ft-ema, 0.13025 for SDXL)."""
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """Latent shift of the VAE (``None`` in the configs of these priors, i.e. 0)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for all of them)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(
        self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> Tensor:
        """``[0, 1]`` images -> scaled latents ``(z - shift) x scaling`` (float32): a posterior sample drawn from
        ``generator`` (LDM training), or its mode with ``sample=False`` (DreamClear's conditions)."""
        return self.latents_from_moments(self.encode_moments(images), generator, sample)

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images -> the VAE posterior's moments ``[B, 2C, h, w]`` (mean and log-variance, in the VAE's
        dtype): what :meth:`latents_from_moments` samples from, storable ahead of training."""
        vae = self.vae
        return vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.parameters

    def latents_from_moments(
        self, moments: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> Tensor:
        """Scaled latents from posterior moments: the draw :meth:`encode_images` makes (diffusers'
        ``DiagonalGaussianDistribution``, the same generator call), so stored moments train exactly as the
        on-the-fly VAE does."""
        posterior = DiagonalGaussianDistribution(moments)
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    # ------------------------------------------------------------------ schedule
    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``: what the denoiser was trained to output."""
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def variance_type(self) -> str | None:
        """``learned_range`` when the denoiser also outputs its variance (PixArt: 8 = 2 x 4 channels)."""
        return getattr(self.noise_scheduler.config, "variance_type", None)

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in ("learned", "learned_range")

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_text(
        self, prompts: Sequence[str], null: Tensor | Sequence[bool] | None = None
    ) -> TextCondition:
        """The condition of ``prompts``; rows flagged in ``null`` get the prior's null condition instead (prompt
        dropout in training, see the module doc). On the prior's device."""
        prompts = list(prompts)
        flags = null_mask(null, len(prompts))
        if self.null_prompt is not None:  # SD: the null condition is the encoded null prompt
            prompts = [self.null_prompt if f else p for p, f in zip(prompts, flags, strict=True)]
            flags = [False] * len(prompts)
        condition = self._encode(prompts)
        added = self.added_conditions(len(prompts), condition.hidden_states.device)
        if added:
            condition = dataclasses.replace(condition, added=added)
        if not any(flags):
            return condition
        mask = torch.tensor(flags, device=condition.hidden_states.device)
        return condition.where(mask, self.null_condition(len(prompts), like=condition))

    def null_condition(self, n: int, like: TextCondition | None = None) -> TextCondition:
        """The prior's null condition for ``n`` rows (``like``: a condition of the same batch whose attention
        mask / size conditions the null rows keep, where the family does that)."""
        raise NotImplementedError

    def added_conditions(self, n: int, device: torch.device) -> dict[str, Tensor]:
        """The per-sample conditions every call gets beside the text (SDXL's ``time_ids``, PixArt's resolution
        and aspect ratio): settings of the prior, not features of the prompt (so never stored or cached)."""
        return {}

    def _encode(self, prompts: list[str]) -> TextCondition:
        """The prompts' text features through the cache, the precomputed features and the encoder, in that
        order."""
        cache, store = self.text_cache, self.text_features
        if cache.size == 0 and store is None:
            return self._run_encoder(prompts)
        found: dict[str, TextCondition] = {}
        for prompt in unique(prompts):
            if prompt in cache:
                found[prompt] = cache.get(prompt)
            elif store is not None and (row := store.read(prompt)) is not None:
                found[prompt] = row.to(self.device)
        missing = [p for p in unique(prompts) if p not in found]
        if missing:
            encoded = self._run_encoder(missing)
            for i, prompt in enumerate(missing):
                found[prompt] = encoded.rows(i)
        if cache.size:
            for prompt in unique(prompts):
                if prompt not in cache:
                    cache.put(prompt, found[prompt])
            for prompt in prompts:
                if prompt in cache:
                    cache.get(prompt)  # most recently used last
        out = TextCondition.cat([found[p] for p in prompts])
        cache.trim()
        return out

    def _run_encoder(self, prompts: list[str]) -> TextCondition:
        if not self.has_text_encoder:
            where = f" in {self.text_features.directory}" if self.text_features is not None else ""
            raise MissingTextFeaturesError(
                f"{len(prompts)} prompt(s) have no precomputed text features{where} and this prior was loaded "
                f"without its text encoder, e.g. {prompts[0]!r}. Fix: compute them with `python "
                "scripts/precompute_text_features.py --prior <prior config> --prompts <jsonl> --out <dir>`, or "
                "load the text encoder (prior.load_text_encoder=true)"
            )
        return self.run_text_encoder(prompts)

    def run_text_encoder(self, prompts: list[str]) -> TextCondition:
        """Encode ``prompts`` with the text encoder(s) (no cache, no side-files)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ denoiser
    def denoiser_kwargs(self, text: TextCondition) -> dict[str, Any]:
        """Keyword arguments of a diffusers denoiser (or ControlNet) call carrying ``text``."""
        raise NotImplementedError

    def predict(self, latents: Tensor, timesteps: Tensor, text: TextCondition, **kwargs: Any) -> Tensor:
        """The frozen denoiser's output for noisy ``latents`` at ``timesteps`` with ``text`` (plus ``kwargs`` such
        as ControlNet residuals): epsilon / v, and the variance channels where the prior learned them."""
        call = {**self.denoiser_kwargs(text), **kwargs}
        return self.denoiser(latents, timestep=timesteps, return_dict=False, **call)[0]

    @property
    def device(self) -> torch.device:
        first = next(
            itertools.chain(self.parameters(), self.buffers()), None
        )  # lazily: the first tensor only
        return torch.device("cpu") if first is None else first.device


def _from_pretrained(part_cls: type, source: str, kwargs: Mapping[str, Any], subfolder: str) -> Any:
    return part_cls.from_pretrained(source, subfolder=subfolder, **kwargs)
