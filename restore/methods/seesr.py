"""SeeSR stage 2: ControlNet + Representation Cross-Attention on a frozen SD-2-base prior, prompted by DAPE.

SeeSR (Wu et al., CVPR 2024); official: ``cswry/SeeSR: train_seesr.py`` (training), ``test_seesr.py``
+ ``pipelines/pipeline_seesr.py`` (inference); networks in :mod:`restore.models.seesr`.

Training: the ControlNet reads the bicubic-x4 LR in [0, 1] (:class:`~restore.methods.controlnet_sr.ControlNetSR`);
the frozen DAPE turns that LR into RAM tokens ``[B, 145, 512]`` that every RCA block of the ControlNet and the UNet
attends to; the text prompt is the image's tags, replaced by "" with p=0.5. Trainable: the whole ControlNet and the
UNet's ``image_attentions``; the loss is the epsilon MSE.

Where the training tags come from: the official trainer reads tags that ``make_tags.py`` wrote for the GT with
the original RAM. Here a ``prompt`` side-file (``data.train.prompts``) plays that role; without one the tags are
made on the fly by the frozen DAPE from the GT (``tags_from: gt``), which the maintainer calls equivalent
("original RAM ≈ DAPE on GT", cswry/SeeSR#11), or from the LR (``tags_from: lq``, as at inference).

Inference: DAPE on the raw LR gives the tags and the RAM tokens; the prompt is ``f"{tags}, {user_prompt}," +
added_prompt`` (the official string, stray commas included) against the negative prompt, sampled by
:func:`restore.sampling.sampler.sample` (DDPM 50 leading steps, CFG 5.5, start from the LR latent noised to
t=999, Gaussian latent tiles, tiled VAE, AdaIN colour fix).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from restore.data.precomputed_inputs import precomputed
from restore.methods.controlnet_sr import ControlNetSR
from restore.methods.latent_diffusion import build, plain_dict
from restore.models.priors import LatentPrior, TextCondition
from restore.models.seesr import RCA_ATTR, build_seesr_trainable, representation_tokens
from restore.sampling.sampler import SamplingSettings

__all__ = ["SeeSR", "load_official_seesr"]

log = logging.getLogger(__name__)

TAG_SOURCES = ("gt", "lq")


class SeeSR(ControlNetSR):
    """SeeSR (Wu et al., CVPR 2024) as a :class:`~restore.methods.controlnet_sr.ControlNetSR`.

    Args:
        prior: the frozen SD prior (or a factory); RCA is attached to its UNet here unless already present.
        dape: the frozen DAPE tagger (:func:`restore.models.dape.load_dape`), or a factory returning it.
        scale: upscaling factor (SeeSR: 4).
        controlnet: keyword arguments of ``ControlNetModel.from_unet`` (e.g. the conditioning-embedding widths;
            the defaults are diffusers' = the official 16/32/96/256).
        conditioning_scale: multiplier of the ControlNet residuals (official ``--conditioning_scale`` 1.0).
        tags_from: training tags when the batch has no ``prompt``: ``"gt"`` or ``"lq"`` (see the module doc).
        user_prompt / added_prompt / negative_prompt: inference prompt parts (``test_seesr.py`` defaults in the
            config).
        sampling: :class:`restore.sampling.sampler.SamplingSettings` or a mapping of its fields.
        pretrained: an official SeeSR folder (``unet/`` and ``controlnet/`` in the diffusers layout) to load the
            RCA and ControlNet weights from; trained runs load with ``ckpt_path`` instead.
        **kwargs: :class:`~restore.methods.latent_diffusion.LatentDiffusionSR` arguments (optimizer, EMA,
            null_prompt_prob, ...).
    """

    hparams_ignore = ("dape",)

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
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
        dape_module = build(dape)
        prior_module = build(prior)
        trainable = build_seesr_trainable(
            prior_module.unet, int(dape_module.token_dim), **plain_dict(controlnet or {})
        )
        super().__init__(
            prior_module,
            trainable,
            scale=scale,
            conditioning_scale=conditioning_scale,
            sampling=sampling,
            trainable_prior_modules=(RCA_ATTR,),
            frozen={"dape": dape_module},
            **kwargs,
        )
        if pretrained is not None:
            load_official_seesr(self, pretrained)

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
        """The official prompt string: ``f"{tags}, {user_prompt}," + added_prompt``."""
        return f"{tags}, {self.hparams.user_prompt}," + self.hparams.added_prompt

    #: the tags' source changes the text the precomputed features encode
    precomputed_settings = ("tags_from",)

    def training_inputs(self, batch: Mapping[str, Any], lr_up: Tensor) -> dict[str, Any]:
        """RAM tokens of the upsampled LR, and DAPE's tags when the batch has no prompts; with precomputed inputs
        the stored tokens (and no tags: the text features are stored too), so DAPE does not run."""
        tokens = precomputed(batch, "ram_tokens")
        if tokens is not None:
            return {"ram_tokens": tokens}
        extra: dict[str, Any] = {"ram_tokens": self.ram_tokens(lr_up)}
        if not batch.get("prompt"):
            extra["prompt"] = self.tags(batch["gt"] if self.hparams.tags_from == "gt" else lr_up)
        return extra

    def condition_for_training(self, text: TextCondition, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"text": text, "tokens": batch["ram_tokens"]}

    def precompute_inputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The base's (GT moments, features of the prompt or of DAPE's tags) plus the RAM tokens of the LR."""
        return {**super().precompute_inputs(batch), "ram_tokens": batch["ram_tokens"]}

    def side_inputs(self, condition: Mapping[str, Any]) -> AbstractContextManager:
        """The RAM tokens for the RCA blocks of the ControlNet and of the UNet."""
        return representation_tokens((self.controlnet, self.prior.unet), condition["tokens"])

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def restore(self, lq: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Super-resolve ``lq`` ``[B, 3, h, w]`` in [0, 1] to ``[B, 3, scale*h, scale*w]`` (``test_seesr.py``)."""
        # DAPE reads the raw LR (resized to its own input size), not the upscaled one
        tokens = self.ram_tokens(lq)
        prompts = [self.inference_prompt(tags) for tags in self.tags(lq)]
        cond = {"text": self.prior.encode_text(prompts), "tokens": tokens}
        uncond = {"text": self.prior.encode_text([self.hparams.negative_prompt] * len(lq)), "tokens": tokens}
        return self.sample_restored(lq, cond, uncond, self.sampling, generator)


def load_official_seesr(module: SeeSR, folder: str | os.PathLike) -> None:
    """Load a released SeeSR folder (``preset/models/seesr`` with ``unet/`` and ``controlnet/``) into ``module``:
    the ControlNet and the UNet's RCA, with key sets checked to equal ours exactly."""
    module.load_release(folder, RCA_ATTR, "SeeSR")
