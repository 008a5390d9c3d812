"""DreamClear: a dual-branch ControlFormer with Mixture of Adaptive Modulators on a frozen PixArt-α.

DreamClear (Ai et al., NeurIPS 2024); official: ``shallowdream204/DreamClear: train_dreamclear.py`` +
``configs/DreamClear/DreamClear_Train.py`` (training), ``test.py`` + ``DreamClear_Test.py`` (inference); networks in
:mod:`restore.models.dreamclear`, reference restorers in :mod:`restore.models.reference`.

Training (the base step with PixArt's objective: epsilon MSE + the VLB term of the learned variance): the LR
bicubic-upsampled to the GT size and the frozen reference restorer's output are encoded (posterior *mode*, the GT
latent a posterior sample), and condition the two branches; the caption (a prompt side-file, LLaVA captions of
the reference output in the official data) is dropped to PixArt's learned null caption with p=0.5.

Inference (``test.py``): the output size is the LR x upscale, raised so that its short side is at least
``min_size`` (1024) and snapped to multiples of 64 (PIL bicubic); the reference restorer runs on the LR; the
caption comes from the benchmark's prompt side-file (field ``caption``), from the captioner run on the reference
output, or is ``default_prompt``; sampling: respaced iDDPM 50 steps, CFG 4.5 against the null caption (only
latent channels 0-2 guided, as the official ``forward_with_cfg``), start from the reference latent noised to
t=999, 128-latent tiles with overlap 32, wavelet colour fix against the reference; the result is resized back
to LR x upscale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from restore.methods.captions import CaptionFallback
from restore.methods.controlnet_sr import sampling_settings
from restore.methods.latent_diffusion import LatentDiffusionSR, build
from restore.models.dreamclear import DreamClearControlFormer, official_to_ours
from restore.models.priors import LatentPrior, TextCondition
from restore.sampling.sampler import SamplingInputs, SamplingSettings, resize_bicubic
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = ["CAPTION_RECORD", "DreamClear", "dreamclear_output_size", "load_official_dreamclear"]

#: The prompt side-file field read at inference (``restore(lq, prompts=[record])``).
CAPTION_RECORD = "caption"


def dreamclear_output_size(
    lq_size: Sequence[int], upscale: int, min_size: int, multiple: int
) -> tuple[int, int]:
    """The sampling size of ``test.py``: LR x upscale, scaled up so that the short side is at least ``min_size``,
    each side rounded to a multiple of ``multiple`` (64)."""
    h, w = (int(s) * upscale for s in lq_size)
    ratio = max(1.0, min_size / min(h, w))
    h, w = int(h * ratio), int(w * ratio)
    return max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)


class DreamClear(LatentDiffusionSR):
    """DreamClear (Ai et al., NeurIPS 2024) as a :class:`~restore.methods.latent_diffusion.LatentDiffusionSR`.

    Args:
        prior: the frozen PixArt-α prior (or a factory); the ControlFormer copies its DiT.
        reference: the frozen reference restorer (:mod:`restore.models.reference`) or a factory.
        scale: upscaling factor (4).
        num_experts / modulation / cross_batch_attn: :class:`~restore.models.dreamclear.DreamClearControlFormer`.
        min_size / size_multiple: the inference resize rule (official 1024 / 64).
        cfg_channels: latent channels classifier-free guidance applies to (official 3; ``None``: all).
        default_prompt: the caption when neither a side-file record nor a captioner gives one.
        null_caption: condition every image on the learned null caption instead (no captioner, no side-file):
            the "null prompt" row of Tab. 4.
        captioner: an MLLM captioner (or a factory, built on first use) captioning the reference output.
        sampling: :class:`~restore.sampling.sampler.SamplingSettings` fields (``upscale`` = ``scale``).
        pretrained: the released ``DreamClear-1024.pth`` (official layout) to load.
        **kwargs: :class:`~restore.methods.latent_diffusion.LatentDiffusionSR` arguments.
    """

    takes_prompts = True
    hparams_ignore = ("reference", "captioner")

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        reference: nn.Module | Callable[[], nn.Module],
        scale: int = 4,
        num_experts: int = 3,
        modulation: str = "moam",
        cross_batch_attn: bool = False,
        min_size: int = 1024,
        size_multiple: int = 64,
        cfg_channels: int | None = 3,
        default_prompt: str = "",
        null_caption: bool = False,
        captioner: Any = None,
        sampling: SamplingSettings | Mapping[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        prior_module = build(prior)
        reference_module = build(reference)
        controlformer = DreamClearControlFormer(
            prior_module.transformer,
            num_experts=num_experts,
            modulation=modulation,
            cross_batch_attn=cross_batch_attn,
        )
        super().__init__(
            prior_module,
            nn.ModuleDict({"controlformer": controlformer}),
            frozen={"reference": reference_module},
            **kwargs,
        )
        self.sampling = sampling_settings(sampling, scale)
        self._captions = CaptionFallback(captioner, default_prompt, CAPTION_RECORD)
        if pretrained is not None:
            load_official_dreamclear(self, pretrained)

    @property
    def controlformer(self) -> DreamClearControlFormer:
        return self.trainable["controlformer"]

    @property
    def scale(self) -> int:
        return int(self.hparams.scale)

    # ------------------------------------------------------------------ conditions
    def condition_latents(self, lq: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """The reference image at ``size`` and the latents (posterior mode) of the upsampled LR and of it."""
        with torch.no_grad():
            reference = self.reference(lq, size)
            lr_up = resize_bicubic(lq.float(), size)  # PIL's bicubic, as the official sr_bicubic images
            return {
                "reference": reference,
                "lq_latent": self.prior.encode_images(lr_up, sample=False),
                "ref_latent": self.prior.encode_images(reference, sample=False),
            }

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "gt" not in batch or "lq" not in batch:
            return batch
        return {**batch, **self.condition_latents(batch["lq"], tuple(batch["gt"].shape[-2:]))}

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor:
        spatial = {"lq_latent": batch["lq_latent"], "ref_latent": batch["ref_latent"]}
        return self.denoise(noisy_latents, timesteps, text, spatial)

    def denoise(
        self, latents: Tensor, t: Tensor, condition: TextCondition, spatial: Mapping[str, Tensor]
    ) -> Tensor:
        """The DiT with both branches on a latent (tile), its caption and the tile's LQ / reference latents."""
        return self.controlformer(
            self.prior.transformer,
            latents,
            t,
            lq_latent=spatial["lq_latent"],
            ref_latent=spatial["ref_latent"],
            **self.prior.denoiser_kwargs(condition),
        )

    # ------------------------------------------------------------------ inference
    def captions(self, reference: Tensor, prompts: Sequence[Mapping[str, str]] | None) -> list[str]:
        """Per image: the record's ``caption``, else the captioner's caption of the reference, else the default.

        Only the images without a record are captioned (in one batch), so a side-file covering part of a test
        set costs the MLLM only the rest.
        """
        return self._captions(len(reference), prompts, lambda missing: reference[missing], self.device)

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        prompts: Sequence[Mapping[str, str]] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, scale*h, scale*w]`` (``test.py``)."""
        hp = self.hparams
        size = dreamclear_output_size(lq.shape[-2:], self.scale, hp.min_size, hp.size_multiple)
        conditions = self.condition_latents(lq, size)
        reference = conditions["reference"]
        if hp.null_caption:
            cond = uncond = self.prior.null_condition(len(lq))
        else:
            cond = self.prior.encode_text(self.captions(reference, prompts))
            uncond = self.prior.null_condition(len(lq), like=cond)
        inputs = SamplingInputs(
            cond,
            uncond,
            spatial={"lq_latent": conditions["lq_latent"], "ref_latent": conditions["ref_latent"]},
            start_reference=reference,
            color_reference=reference,
            guided_channels=hp.cfg_channels,
        )
        image = self.sample(inputs, self.sampling, generator)
        return resize_bicubic(image, (lq.shape[-2] * self.scale, lq.shape[-1] * self.scale))


def load_official_dreamclear(module: DreamClear, path: str | os.PathLike) -> None:
    """Load the released ``DreamClear-1024.pth`` (official layout; ``state_dict`` entry) into ``module``: every
    trained tensor, with zero missing / unexpected keys; the frozen PixArt in the file (``base_model.*``) is checked
    to map onto the prior's DiT key for key and left to the prior's own weights."""
    from restore.methods.checkpoints import CheckpointMismatchError

    ckpt = load_checkpoint_file(
        path,
        written_by="DreamClear (DreamClear-1024.pth)",
        fix="pass the released file (method.pretrained)",
        mmap=True,
    )
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    trained, base = official_to_ours(state)
    expected = module.controlformer.state_dict()
    missing, unexpected = sorted(set(expected) - set(trained)), sorted(set(trained) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}) trained keys: is it a DreamClear checkpoint for this configuration (num_experts, "
            "modulation, the prior's depth and width)?"
        )
    module.controlformer.load_state_dict(trained, strict=True)
    foreign = sorted(set(base) - set(module.prior.transformer.state_dict()))
    if foreign:
        raise CheckpointMismatchError(
            f"{path}: base_model keys with no place in the prior's DiT: {foreign[:3]}"
        )
