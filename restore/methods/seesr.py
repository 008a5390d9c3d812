"""SeeSR stage 2: ControlNet + Representation Cross-Attention on a frozen SD-2-base prior, prompted by DAPE.

Spec: ``../shared/specs/seesr_xpsr.md`` §1.2 (RCA in the UNet), §1.3 (ControlNet), §1.5 (training step and
recipe), §1.7 (inference), §1.8 (released checkpoint layout).

Training (§1.5): the ControlNet reads the bicubic-x4 LR in [0, 1]; the frozen DAPE turns that LR into RAM
tokens ``[B, 145, 512]`` that every RCA block of the ControlNet and the UNet attends to; the text prompt is
the image's tags, replaced by "" with p=0.5. Trainable: the whole ControlNet and the UNet's
``image_attentions``; the loss is the base class's epsilon MSE.

Where the training tags come from: the official trainer reads tags that ``make_tags.py`` wrote for the GT
with the original RAM (§1.6). Here a ``prompt`` side-file (``data.train.prompts``) plays that role; without
one the tags are made on the fly by the frozen DAPE from the GT (``tags_from: gt``), which the maintainer
calls equivalent ("original RAM ≈ DAPE on GT", #11), or from the LR (``tags_from: lq``, as at inference).

Inference (§1.7): DAPE on the raw LR gives the tags and the RAM tokens; the prompt is
``f"{tags}, {user_prompt}," + added_prompt`` (the official string, stray commas included) against the
negative prompt, sampled by :func:`restore.sampling.sampler.sample` (DDPM 50 leading steps, CFG 5.5, start
from the LR latent noised to t=999, Gaussian latent tiles, tiled VAE, AdaIN colour fix).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from restore.methods.checkpoints import load_controlnet_release
from restore.methods.latent_diffusion import LatentDiffusionSR, plain_dict
from restore.methods.training_pairs import upsampled_lr
from restore.models.priors import FrozenPrior
from restore.models.rca import (
    RCA_ATTR,
    add_representation_cross_attention,
    has_representation_cross_attention,
    representation_tokens,
    seesr_controlnet_from_unet,
)
from restore.sampling.sampler import SamplingSettings

__all__ = ["SeeSR", "load_official_seesr"]

log = logging.getLogger(__name__)

TAG_SOURCES = ("gt", "lq")


class SeeSR(LatentDiffusionSR):
    """SeeSR (Wu et al., CVPR 2024) as a :class:`LatentDiffusionSR`.

    Args:
        prior: the frozen SD prior (or a factory); RCA is attached to its UNet here unless already present.
        dape: the frozen DAPE tagger (:func:`restore.models.dape.load_dape`), or a factory returning it.
        scale: upscaling factor (SeeSR: 4).
        controlnet: keyword arguments of ``ControlNetModel.from_unet`` (e.g. the conditioning-embedding widths;
            the defaults are diffusers' = the official 16/32/96/256, spec §1.3).
        conditioning_scale: multiplier of the ControlNet residuals (official ``--conditioning_scale`` 1.0).
        tags_from: training tags when the batch has no ``prompt``: ``"gt"`` or ``"lq"`` (see the module doc).
        user_prompt / added_prompt / negative_prompt: inference prompt parts (spec §1.7 defaults in the config).
        sampling: :class:`restore.sampling.sampler.SamplingSettings` or a mapping of its fields.
        pretrained: an official SeeSR folder (``unet/`` and ``controlnet/`` in the diffusers layout, §1.8) to
            load the RCA and ControlNet weights from; trained runs load with ``ckpt_path`` instead.
        **kwargs: :class:`LatentDiffusionSR` arguments (optimizer, EMA, null_prompt_prob, ...).
    """

    trainable_prior_modules = (RCA_ATTR,)
    hparams_ignore = ("dape",)

    def __init__(
        self,
        prior: FrozenPrior | Callable[[], FrozenPrior],
        dape: nn.Module | Callable[[], nn.Module],
        scale: int = 4,
        controlnet: Mapping[str, Any] | None = None,
        conditioning_scale: float = 1.0,
        tags_from: str = "gt",
        user_prompt: str = "",
        added_prompt: str = "clean, high-resolution, 8k",
        negative_prompt: str = "dotted, noise, blur, lowres, smooth",
        sampling: SamplingSettings | Mapping[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if tags_from not in TAG_SOURCES:
            raise ValueError(f"tags_from must be one of {TAG_SOURCES}, got {tags_from!r}")
        dape_module = dape if isinstance(dape, nn.Module) else dape()
        self._token_dim = int(dape_module.token_dim)
        self._controlnet_kwargs = plain_dict(controlnet or {})
        super().__init__(prior, **kwargs)
        self.register_frozen("dape", dape_module)
        settings = sampling if isinstance(sampling, SamplingSettings) else None
        if settings is None:  # the upscale factor is the method's: one number, not two to keep equal
            settings = SamplingSettings(**{"upscale": scale, **plain_dict(sampling or {})})
        if settings.upscale != scale:
            raise ValueError(f"sampling.upscale={settings.upscale} differs from the method's scale={scale}")
        self.sampling = settings
        if pretrained is not None:
            load_official_seesr(self, pretrained)

    # ------------------------------------------------------------------ modules
    def build_trainable(self, prior: FrozenPrior) -> nn.ModuleDict:
        """RCA on the prior UNet (frozen base, trainable ``image_attentions``) and its ControlNet copy (§1.3)."""
        if not has_representation_cross_attention(prior.unet):
            add_representation_cross_attention(prior.unet, cross_attention_dim=self._token_dim)
        controlnet = seesr_controlnet_from_unet(prior.unet, **self._controlnet_kwargs)
        return nn.ModuleDict({"controlnet": controlnet})

    @property
    def controlnet(self) -> nn.Module:
        return self.trainable["controlnet"]

    @property
    def scale(self) -> int:
        """Upscaling factor (must equal the degradation's and the benchmark's)."""
        return int(self.hparams.scale)

    # ------------------------------------------------------------------ conditions
    def ram_tokens(self, images: Tensor) -> Tensor:
        """RAM image embeddings of ``images`` in [0, 1] (any size; DAPE resizes to its input size), fp32."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            return self.dape.image_embeds(self.dape.preprocess(images.float()))

    def tags(self, images: Tensor) -> list[str]:
        """DAPE's tags of ``images`` in [0, 1], one ``"a, b, c"`` string per image."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            embeds = self.dape.image_embeds(self.dape.preprocess(images.float()))
            return list(self.dape.generate_tags(embeds))

    def inference_prompt(self, tags: str) -> str:
        """The official prompt string (spec §1.7): ``f"{tags}, {user_prompt}," + added_prompt``."""
        return f"{tags}, {self.hparams.user_prompt}," + self.hparams.added_prompt

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "gt" not in batch or "lq" not in batch:
            return batch
        gt, lq = batch["gt"], batch["lq"]
        # The ControlNet condition: the LR bicubic-upsampled to the GT size, [0, 1] (§1.5 `sr_bicubic`).
        lr_up = upsampled_lr(lq, gt)
        extra: dict[str, Any] = {"lr_up": lr_up, "ram_tokens": self.ram_tokens(lr_up)}
        if not batch.get("prompt"):
            extra["prompt"] = self.tags(gt if self.hparams.tags_from == "gt" else lr_up)
        return {**batch, **extra}

    def predict_noise(
        self, noisy_latents: Tensor, timesteps: Tensor, text_embeddings: Tensor, batch: dict[str, Any]
    ) -> Tensor:
        return self.denoise(
            noisy_latents,
            timesteps,
            {"text": text_embeddings, "tokens": batch["ram_tokens"]},
            batch["lr_up"],
        )

    def denoise(self, latents: Tensor, t: Tensor, condition: Mapping[str, Tensor], image: Tensor) -> Tensor:
        """ControlNet(LR image) -> residuals -> UNet, both with the text and the RAM tokens (§1.2, §1.3)."""
        unet = self.prior.unet
        with representation_tokens((self.controlnet, unet), condition["tokens"]):
            down, mid = self.controlnet(
                latents,
                t,
                encoder_hidden_states=condition["text"],
                controlnet_cond=image.to(latents.dtype),
                conditioning_scale=self.hparams.conditioning_scale,
                return_dict=False,
            )
            return unet(
                latents,
                t,
                encoder_hidden_states=condition["text"],
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def restore(self, lq: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, scale*h, scale*w]`` (spec §1.7)."""
        # DAPE reads the raw LR (resized to its own input size), not the upscaled one (§1.7).
        tokens = self.ram_tokens(lq)
        prompts = [self.inference_prompt(tags) for tags in self.tags(lq)]
        cond = {"text": self.encode_prompts(prompts), "tokens": tokens}
        uncond = {"text": self.encode_prompts([self.hparams.negative_prompt] * len(lq)), "tokens": tokens}
        return self.sample_restored(lq, cond, uncond, self.sampling, generator)

    def forward(self, lq: Tensor) -> Tensor:
        return self.restore(lq)


def load_official_seesr(module: SeeSR, folder: str | os.PathLike) -> None:
    """Load a released SeeSR folder (``unet/``, ``controlnet/``; spec §1.8) into ``module``: the ControlNet
    and the UNet's RCA, with key sets checked to equal ours exactly (:func:`load_controlnet_release`)."""
    load_controlnet_release(module.controlnet, module.prior.unet, folder, RCA_ATTR, "SeeSR")
