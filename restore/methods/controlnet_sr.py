"""ControlNet-conditioned SR on a frozen SD prior: what SeeSR and XPSR share.

A trainable ControlNet copy of the prior UNet (``restore/models/controlnet.py``) reads the LR image
bicubic-upsampled to the output size, in [0, 1]; its residuals (x ``conditioning_scale``) enter the frozen UNet;
both see the same text condition (``cswry/SeeSR: train_seesr.py``, ``qyp2000/XPSR: train.py``). A method adds
its modules on either network and their extra inputs:

- :meth:`ControlNetSR.training_inputs`: what it adds to a training batch (SeeSR: RAM tokens and tags);
- :meth:`ControlNetSR.condition_for_training`: its condition of a training step from the encoded prompt;
- :meth:`ControlNetSR.side_inputs`: the context that hands its hooked modules their extra inputs for one call.

Inference (:meth:`ControlNetSR.sample_restored`) is SeeSR's test path: :func:`restore.sampling.sampler.
upscale_for_sampling`, the sampling loop with ``lr_up`` as the ControlNet image, the start and the colour
reference, then the resize to exactly ``scale`` x the input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from restore.methods.checkpoints import load_controlnet_release
from restore.methods.latent_diffusion import LatentDiffusionSR, plain_dict
from restore.methods.training_pairs import upsampled_lr
from restore.models.priors import LatentPrior, TextCondition
from restore.sampling.sampler import SamplingInputs, SamplingSettings, resize_bicubic, upscale_for_sampling

__all__ = ["ControlNetSR", "sampling_settings"]


def sampling_settings(sampling: SamplingSettings | Mapping[str, Any] | None, scale: int) -> SamplingSettings:
    """Sampling settings whose ``upscale`` is the method's scale (one number, not two to keep equal)."""
    if isinstance(sampling, SamplingSettings):
        settings = sampling
    else:
        settings = SamplingSettings(**{"upscale": scale, **plain_dict(sampling or {})})
    if settings.upscale != scale:
        raise ValueError(f"sampling.upscale={settings.upscale} differs from the method's scale={scale}")
    return settings


class ControlNetSR(LatentDiffusionSR):
    """Base of the ControlNet-style methods (see the module doc).

    Args:
        prior: the frozen SD prior (or a factory); the method has already attached its modules to the UNet.
        trainable: ``{"controlnet": ...}`` (and whatever else trains).
        scale: upscaling factor (must equal the degradation's and the benchmark's).
        conditioning_scale: multiplier of the ControlNet residuals (official 1.0).
        sampling: the inference settings or a mapping of their fields (``upscale`` defaults to ``scale`` and
            must equal it).
        **kwargs: :class:`LatentDiffusionSR` arguments.
    """

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        trainable: nn.ModuleDict,
        scale: int = 4,
        conditioning_scale: float = 1.0,
        sampling: SamplingSettings | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(prior, trainable, **kwargs)
        self.sampling = sampling_settings(sampling, scale)

    @property
    def controlnet(self) -> nn.Module:
        return self.trainable["controlnet"]

    @property
    def scale(self) -> int:
        """Upscaling factor (must equal the degradation's and the benchmark's)."""
        return int(self.hparams.scale)

    # ------------------------------------------------------------------ hooks of the methods
    def training_inputs(self, batch: Mapping[str, Any], lr_up: Tensor) -> dict[str, Any]:
        """Entries the method adds to a training batch (after ``lr_up``); none here."""
        return {}

    def condition_for_training(self, text: TextCondition, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The condition :meth:`denoise` gets in a training step; here the encoded prompt alone."""
        return {"text": text}

    def side_inputs(self, condition: Mapping[str, Any]) -> AbstractContextManager:
        """Context giving the method's hooked modules their extra inputs of one call; none here."""
        return nullcontext()

    # ------------------------------------------------------------------ training
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "gt" not in batch or "lq" not in batch:
            return batch
        # the ControlNet condition: the LR bicubic-upsampled to the GT size, [0, 1] (`sr_bicubic` of the trainers)
        lr_up = upsampled_lr(batch["lq"], batch["gt"])
        with_lr = {**batch, "lr_up": lr_up}
        return {**with_lr, **self.training_inputs(with_lr, lr_up)}

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor:
        condition = self.condition_for_training(text, batch)
        return self.denoise(noisy_latents, timesteps, condition, {"image": batch["lr_up"]})

    def denoise(self, latents: Tensor, t: Tensor, condition: Any, spatial: Mapping[str, Tensor]) -> Tensor:
        """ControlNet(LR image) -> residuals -> UNet, both with the text condition and the method's side inputs."""
        text: TextCondition = condition["text"]
        with self.side_inputs(condition):
            down, mid = self.controlnet(
                latents,
                t,
                controlnet_cond=spatial["image"].to(latents.dtype),
                conditioning_scale=self.hparams.conditioning_scale,
                return_dict=False,
                **self.prior.denoiser_kwargs(text),
            )
            return self.prior.predict(
                latents, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
            )

    # ------------------------------------------------------------------ inference
    def sample_restored(
        self,
        lq: Tensor,
        cond: Any,
        uncond: Any,
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Upscale ``lq`` for sampling, sample with ``lr_up`` as ControlNet image, start and colour reference,
        and resize to exactly ``scale`` x the input (colour fix before)."""
        lr_up, out_size = upscale_for_sampling(lq, settings.upscale, settings.process_size)
        inputs = SamplingInputs(
            cond, uncond, spatial={"image": lr_up}, start_reference=lr_up, color_reference=lr_up
        )
        return resize_bicubic(self.sample(inputs, settings, generator), out_size)

    def load_release(self, folder: str | os.PathLike, unet_modules: str, method: str) -> None:
        """Load a released ``unet/`` + ``controlnet/`` folder: the ControlNet and the UNet's ``unet_modules``,
        with key sets checked to equal ours exactly (:func:`load_controlnet_release`)."""
        load_controlnet_release(self.controlnet, self.prior.unet, folder, unet_modules, method)
