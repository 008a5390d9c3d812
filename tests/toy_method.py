"""A method defined outside the package, as docs/adding_a_method.md builds it: an LR-concatenation adaptor.

The LR image, bicubic-upsampled to the output size and encoded by the prior's VAE, is concatenated to the noisy
latent; a zero-initialised 3x3 convolution maps the pair to a residual added to the noisy latent, and the frozen
denoiser of whichever prior (SD, SDXL, PixArt-α) predicts from there. At initialisation the method is the prior
unchanged. Its config is tests/configs/method/toy_concat.yaml; tests/test_adding_a_method.py trains it with
train.py and scores it with eval.py on the three tiny priors, with no line of it in the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restore.methods.latent_diffusion import LatentDiffusionSR, build, plain_dict
from restore.models.priors import LatentPrior, TextCondition
from restore.sampling.sampler import SamplingInputs, SamplingSettings, resize_bicubic


class LRConcatAdaptor(LatentDiffusionSR):
    """Noisy latent + conv(concat(noisy latent, LR latent)) into the frozen prior's denoiser."""

    def __init__(
        self,
        prior: LatentPrior | Callable[[], LatentPrior],
        scale: int = 4,
        prompt: str = "a photo",
        sampling: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        prior = build(prior)
        channels = prior.latent_channels
        adaptor = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(adaptor.weight)
        nn.init.zeros_(adaptor.bias)
        super().__init__(prior, nn.ModuleDict({"adaptor": adaptor}), **kwargs)
        self.sampling = SamplingSettings(**{"upscale": scale, **plain_dict(sampling or {})})

    def lr_latent(self, lq: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The LR bicubic-upsampled to ``size`` in [0, 1], and its latent (the posterior mode)."""
        lr_up = F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return lr_up, self.prior.encode_images(lr_up, sample=False)

    def predict(
        self, noisy_latents: Tensor, timesteps: Tensor, text: TextCondition, batch: Mapping[str, Any]
    ) -> Tensor:
        _, lr_latent = self.lr_latent(batch["lq"], tuple(batch["gt"].shape[-2:]))
        return self.denoise(noisy_latents, timesteps, text, {"lr_latent": lr_latent})

    def denoise(
        self, latents: Tensor, t: Tensor, condition: TextCondition, spatial: Mapping[str, Tensor]
    ) -> Tensor:
        pair = torch.cat([latents, spatial["lr_latent"].to(latents.dtype)], dim=1)
        return self.prior.predict(latents + self.trainable["adaptor"](pair), t, condition)

    @torch.no_grad()
    def restore(self, lq: Tensor, generator: torch.Generator | None = None) -> Tensor:
        h, w = lq.shape[-2:]
        s = self.sampling.upscale
        lr_up, lr_latent = self.lr_latent(lq, (h * s // 8 * 8, w * s // 8 * 8))
        cond = self.prior.encode_text([self.hparams.prompt] * len(lq))
        uncond = self.prior.null_condition(len(lq), like=cond)
        inputs = SamplingInputs(
            cond, uncond, spatial={"lr_latent": lr_latent}, start_reference=lr_up, color_reference=lr_up
        )
        return resize_bicubic(self.sample(inputs, self.sampling, generator), (h * s, w * s))
