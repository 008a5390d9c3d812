"""What a latent diffusion method is trained to predict, and its loss terms, from the prior's noise schedule.

- ``epsilon``: the noise (LDM / SD; SeeSR, XPSR, StableSR): ``diffusion = MSE(eps_hat, eps)`` on
  ``x_t = scheduler.add_noise(x_0, eps, t)`` (diffusers' DDPM, as the official diffusers-based trainers).
- ``v_prediction``: ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (``scheduler.get_velocity``).
- learned-range variance (PixArt-α, DreamClear): the output is ``[eps, v]``; ``diffusion`` = MSE on eps and
  ``vlb`` = the variational-bound term in bits with the mean detached (:mod:`restore.diffusion.iddpm`), on
  ``x_t`` of the float64 iDDPM schedule, as ``training_losses`` of the official ``IDDPM``.

Terms are returned by name, unweighted; the method sums them with its ``loss_weights`` and logs each.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from restore.diffusion.iddpm import LearnedRangeSchedule

__all__ = ["PREDICTION_TYPES", "VARIANCE_TYPES", "DiffusionObjective"]

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: diffusers ``variance_type`` values: fixed variances (nothing to learn) or ``learned_range``.
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")


class DiffusionObjective:
    """Noising, target and loss terms for one prior schedule (a diffusers ``DDPMScheduler``)."""

    def __init__(self, scheduler: Any, prediction_type: str, variance_type: str | None = None) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.learned_variance = variance_type == "learned_range"
        if self.learned_variance and prediction_type != "epsilon":
            raise ValueError("learned-range variance is trained with epsilon prediction (improved DDPM)")
        self.iddpm = LearnedRangeSchedule.from_config(scheduler.config) if self.learned_variance else None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x_t`` of the forward process at ``timesteps``."""
        if self.iddpm is not None:
            return self.iddpm.q_sample(latents, timesteps, noise)
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """epsilon: the noise; v_prediction: ``sqrt(a_t) eps - sqrt(1 - a_t) x0`` (``scheduler.get_velocity``)."""
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def losses(
        self, output: Tensor, latents: Tensor, noisy: Tensor, noise: Tensor, timesteps: Tensor
    ) -> dict[str, Tensor]:
        """The named loss terms (float32 whatever the autocast dtype)."""
        target = self.target(latents, noise, timesteps)
        if self.iddpm is None:
            if output.shape != target.shape:
                raise ValueError(
                    f"the network output {tuple(output.shape)} does not match the target {tuple(target.shape)}; "
                    "a prior with learned variance needs variance_type='learned_range'"
                )
            return {"diffusion": F.mse_loss(output.float(), target.float())}
        channels = latents.shape[1]
        if output.shape[1] != 2 * channels:
            raise ValueError(
                f"learned-range variance needs 2 x {channels} output channels, got {output.shape[1]}"
            )
        eps, v = output[:, :channels].float(), output[:, channels:].float()
        frozen = torch.cat([eps.detach(), v], dim=1)  # the bound trains the variance only
        vlb = self.iddpm.vlb_bits(frozen, latents.float(), noisy.float(), timesteps)
        return {"diffusion": F.mse_loss(eps, target.float()), "vlb": vlb.mean()}
