"""EDM-style sampling on a discrete-time epsilon prior (SD / SDXL), as SUPIR's restoration-guided sampler does.

Karras et al. 2022 (EDM) write a diffusion as ``x = x_0 + sigma n``; a VP epsilon model is used through the
scalings ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_out = -sigma``, ``c_skip = 1``. SUPIR runs the ``sgm`` code of SDXL
(``Fanghua-Yu/SUPIR: sgm/modules/diffusionmodules/{discretizer,denoiser,denoiser_scaling,sampling}.py``):

- the 1000 discrete sigmas ``sqrt((1 - abar) / abar)`` (the ratio rounded to float32 before the square root) of
  the float64 betas; a sampling chain of n steps takes the timesteps ``int(linspace(999, 0, n, endpoint=False))``
  (diffusers' "trailing" spacing), descending sigmas, then a final 0;
- the denoiser snaps any sigma to the nearest discrete one and calls the network with that index;
- the sampler's Euler step with "churn" evaluates the network at the churned point (diffusers'
  ``EulerDiscreteScheduler`` evaluates it before churning, so it cannot reproduce this): see
  :class:`restore.sampling.steppers.EDMStepper`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["SUPIR_SIGMA_MAX", "DiscreteSigmas"]

#: The sigma_max that SUPIR hard-codes in its linear-CFG ramp and restoration guidance (the true maximum of SD's
#: schedule is 14.614641): kept for parity, so the weights at the first step are exactly the official ones.
SUPIR_SIGMA_MAX = 14.6146


class DiscreteSigmas:
    """The discrete sigmas of a VP schedule (from its ``alphas_cumprod``, float64), float32 as ``sgm`` makes them."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        #: ``[T]`` ascending: ``sigmas[t]`` is the noise level of timestep t
        self.sigmas = ((1.0 - abar) / abar).to(torch.float32).sqrt()

    def __len__(self) -> int:
        return len(self.sigmas)

    def chain(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """``(sigmas [n + 1] descending with a final 0, timesteps [n] descending)`` of an n-step chain."""
        n = len(self.sigmas)
        if not 1 <= num_steps <= n:
            raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
        timesteps = np.linspace(n - 1, 0, num_steps, endpoint=False).astype(int)  # descending, int() floors
        t = torch.from_numpy(timesteps.copy()).long()
        return torch.cat([self.sigmas[t], self.sigmas.new_zeros(1)]), t

    def index(self, sigma: Tensor | float) -> Tensor:
        """The timestep whose sigma is nearest ``sigma`` (elementwise, int64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        return (
            (sigma.reshape(1, -1) - self.sigmas.to(sigma.device)[:, None])
            .abs()
            .argmin(dim=0)
            .view(sigma.shape)
        )

    def quantize(self, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(nearest discrete sigma, its timestep index)``."""
        idx = self.index(sigma)
        return self.sigmas.to(idx.device)[idx], idx

    @staticmethod
    def scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` of an epsilon network at ``sigma``: ``(1, -sigma, 1 / sqrt(sigma^2 + 1))``."""
        return torch.ones_like(sigma), -sigma, 1.0 / (sigma**2 + 1.0) ** 0.5
