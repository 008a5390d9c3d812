"""Improved DDPM with learned-range variance (Nichol & Dhariwal 2021), as PixArt-α and DreamClear train and sample.

The official code is ``openai/improved-diffusion``, copied into ``PixArt-alpha/PixArt-alpha: diffusion/model/
{gaussian_diffusion,respace,diffusion_utils}.py`` and again into DreamClear. What it does, in our words:

- **Schedule.** Everything is computed in float64 from the betas (PixArt: linear 1e-4 -> 0.02 over 1000 steps)
  and rounded once to the tensors' dtype when used; diffusers' schedulers compute in float32, which near t=0
  moves the last samples of a 50-step chain by ~1e-5 (``docs/diffusion_core.md``).
- **Respacing** (:func:`space_timesteps`): keep ``round(i (T-1)/(n-1))`` of each section (``"50"`` -> 0, 20, 41,
  ..., 979, 999, the same steps as diffusers' ``timestep_spacing="linspace"``); the kept chain has betas
  ``1 - abar[t_k] / abar[t_{k-1}]``, and the network still sees the original timestep ``t_k``.
- **Learned range** (:meth:`LearnedRangeSchedule.p_mean_variance`): the output is ``[eps, v]`` (2C channels);
  ``log var = frac log(beta_k) + (1 - frac) log(posterior var, clipped)`` with ``frac = (v + 1) / 2``, where the
  clipped posterior log-variance at k=0 is that of k=1.
- **Loss** (:meth:`LearnedRangeSchedule.vlb_bits`): MSE on eps plus the variational bound term in bits per
  dimension, computed with the mean detached (only the variance learns from it): KL(q(x_{t-1}|x_t, x_0) ||
  p(x_{t-1}|x_t)) for t>0, the discretised-Gaussian decoder NLL (bins of 2/255, tanh approximation of the normal
  CDF) for t=0. PixArt's ``IDDPM`` uses plain ``MSE`` loss type (no rescaling), so ``loss = mse + vb``.
- **Fixed small variance** (``variance="fixed_small"``): an eps-only network sampled with the posterior variance.
  This is LDM's DDPM sampler after ``register_schedule(given_betas=respaced betas)``, as StableSR samples
  (``IceClear/StableSR: scripts/sr_val_ddpm_text_T_vqganfin_old.py``, 200 of 1000 steps, the network given the
  original timestep).
- **Sampling** (:meth:`LearnedRangeSchedule.p_sample`): ancestral, ``x_{k-1} = mean + exp(log var / 2) z``, no
  noise at k=0, ``clip_denoised=False`` (DreamClear).

Checked against the official PixArt-α code (tests/fixtures/iddpm_official.npz, see tests/test_iddpm.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LearnedRangeSchedule", "betas_from_config", "space_timesteps"]


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original timesteps an iDDPM respacing keeps, ascending.

    ``section_counts``: ``"50"`` (one section), ``"10,15,20"`` (the T steps split into near-equal sections, the
    first ``T % n`` one longer, each strided evenly), or ``"ddimN"`` (integer stride giving exactly N steps).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {wanted} steps of {num_timesteps} with an integer stride")
        counts = [int(x) for x in section_counts.split(",")]
    else:
        counts = [int(x) for x in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """Float64 betas of a diffusers scheduler config (``linear``, ``scaled_linear`` or ``trained_betas``)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    start, end = float(config["beta_start"]), float(config["beta_end"])
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":  # numpy's linspace, as the official iDDPM / PixArt code
        return torch.from_numpy(np.linspace(start, end, n, dtype=np.float64))
    if schedule == "scaled_linear":  # torch's, as sgm (SDXL, SUPIR) makes it
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    raise ValueError(
        f"beta_schedule {schedule!r} is not supported here (linear, scaled_linear, trained_betas)"
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of data in [-1, 1] quantised to 2/255 bins under N(mean, exp(log_scale)^2), elementwise."""
    centered = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class LearnedRangeSchedule:
    """A Gaussian diffusion chain (the full one or a respaced one) with learned-range variance, in float64.

    ``timesteps``: the original timestep of every index of this chain (``range(T)`` for the full chain); the
    network is called with these. Index tensors ``k`` address this chain.
    """

    def __init__(self, betas: Tensor, timesteps: Sequence[int] | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-d tensor in (0, 1]")
        self.betas = betas
        self.timesteps = torch.as_tensor(
            list(range(len(betas))) if timesteps is None else list(timesteps), dtype=torch.long
        )
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.alphas_cumprod = abar
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_variance = posterior_variance
        # the variance at k=0 is 0: its log is taken from k=1 (needs at least two steps)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        )
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LearnedRangeSchedule:
        """The full chain of a diffusers scheduler config (:func:`betas_from_config`)."""
        return cls(betas_from_config(config))

    def __len__(self) -> int:
        return len(self.betas)

    def respaced(self, kept: Sequence[int]) -> LearnedRangeSchedule:
        """The chain of the kept original timesteps (ascending), e.g. :func:`space_timesteps` (1000, "50")."""
        kept = sorted(int(t) for t in kept)
        abar = self.alphas_cumprod[kept]
        previous = torch.cat([abar.new_ones(1), abar[:-1]])
        return LearnedRangeSchedule(1.0 - abar / previous, timesteps=self.timesteps[kept].tolist())

    # ------------------------------------------------------------------ coefficients
    @staticmethod
    def _at(values: Tensor, k: Tensor, like: Tensor) -> Tensor:
        """``values[k]`` rounded once to ``like``'s dtype, shaped to broadcast over ``like``."""
        k = torch.as_tensor(k, device="cpu").long().reshape(-1)
        out = values[k].to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x_start: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """``sqrt(abar_k) x_0 + sqrt(1 - abar_k) noise``."""
        return (
            self._at(self.sqrt_alphas_cumprod, k, x_start) * x_start
            + self._at(self.sqrt_one_minus_alphas_cumprod, k, x_start) * noise
        )

    def q_posterior(self, x_start: Tensor, x_t: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{k-1} | x_k, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, k, x_t) * x_start
            + self._at(self.posterior_mean_coef2, k, x_t) * x_t
        )
        return mean, self._at(self.posterior_log_variance_clipped, k, x_t)

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, k: Tensor, variance: str = "learned_range"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log variance, predicted x_0) of p(x_{k-1} | x_k), no clipping of x_0.

        ``variance="learned_range"``: the output is ``[eps, v]`` and the log variance interpolates between the
        clipped posterior's and beta's; ``"fixed_small"``: the output is eps and the variance the posterior's
        (LDM's ``posterior_log_variance_clipped``, equal to this one wherever noise is added, i.e. k > 0).
        """
        channels = x_t.shape[1]
        if variance == "fixed_small":
            if model_output.shape[1] != channels:
                raise ValueError(
                    f"fixed_small variance needs {channels} output channels, got {model_output.shape[1]}"
                )
            eps = model_output
            log_variance = self._at(self.posterior_log_variance_clipped, k, x_t).expand_as(x_t)
        elif variance == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned-range variance needs 2 x {channels} output channels (eps, v), got {model_output.shape[1]}"
                )
            eps, v = model_output[:, :channels], model_output[:, channels:]
            min_log = self._at(self.posterior_log_variance_clipped, k, x_t)
            max_log = self._at(self.log_betas, k, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            raise ValueError(f"variance must be 'learned_range' or 'fixed_small', got {variance!r}")
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, k, x_t) * x_t - (
            self._at(self.sqrt_recipm1_alphas_cumprod, k, x_t) * eps
        )
        mean, _ = self.q_posterior(pred_x0, x_t, k)
        return mean, log_variance, pred_x0

    def p_sample(
        self, model_output: Tensor, x_t: Tensor, k: int, noise: Tensor | None, variance: str = "learned_range"
    ) -> Tensor:
        """One ancestral step from index ``k`` (``noise`` is ignored, and may be ``None``, at k=0)."""
        index = torch.full((x_t.shape[0],), int(k), dtype=torch.long)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, index, variance)
        if k == 0:
            return mean
        if noise is None:
            raise ValueError("p_sample needs noise for k > 0")
        return mean + torch.exp(0.5 * log_variance) * noise

    # ------------------------------------------------------------------ training
    def vlb_bits(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, k: Tensor) -> Tensor:
        """The variational-bound term per sample ``[B]``, in bits per dimension: KL for k>0, decoder NLL for k=0.

        Pass the output with the eps half detached (``cat([eps.detach(), v])``) for the training loss, as the
        official ``training_losses``: the mean is learned from the MSE only.
        """
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, k)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, k)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
        nll = _mean_flat(nll) / math.log(2.0)
        k = torch.as_tensor(k, device=kl.device).reshape(-1)
        return torch.where(k == 0, nll, kl)
