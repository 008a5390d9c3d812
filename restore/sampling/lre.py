"""LR-embedding (LRE) start: begin sampling from the noised latent of the LR image instead of pure noise.

SeeSR (Wu et al., CVPR 2024) calls it the LR embedding (``cswry/SeeSR: pipelines/pipeline_seesr.py``); XPSR
(``qyp2000/XPSR: test.py``) noises twice; DreamClear (``--lre``, from its SwinIR reference latent) and StableSR
(t=999) start the same way. SUPIR starts from pure noise.

- SeeSR: ``z = vae.encode(2*LR - 1).sample() * 0.18215``; ``x_T = add_noise(z, eps, t=999)``
  (``= 0.0683 z + 0.9977 eps`` for SD's scaled-linear betas) and the loop skips scheduler steps with
  ``t > 999`` (none for 50 "leading" DDPM steps: 981 ... 1).
- XPSR: the encoded latent is noised to ``t1 = timesteps[0] = 951`` and the *result* noised again to
  ``t2 = 800`` (``added_noise_level``), with fresh noise each time; denoising still starts at t=951. The
  effective start is ``sqrt(a951) sqrt(a800) z + noise`` = ``0.0173 z`` + noise of std ~1.0, i.e. far noisier
  than the t=951 marginal the first step assumes. :func:`double_noised_start` reproduces this.

``vae`` is anything with ``encode(x).latent_dist`` and ``config.scaling_factor`` (a diffusers ``AutoencoderKL``
or :class:`restore.sampling.tiled_vae.TiledAutoencoderKL`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

__all__ = ["double_noised_start", "encode_lr_latent", "noised_start", "start_timestep_index"]


def _vae_dtype(vae: Any) -> torch.dtype:
    dtype = getattr(vae, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(vae.parameters()).dtype


def encode_lr_latent(
    vae: Any, lr_up: Tensor, generator: torch.Generator | None = None, sample: bool = True
) -> Tensor:
    """Scaled VAE latent of the (upscaled) LR image ``lr_up`` in ``[0, 1]``, ``(B, 3, H, W)``.

    ``sample=True`` draws from the posterior with ``generator`` (SeeSR, XPSR); ``sample=False`` takes its mode
    (DreamClear). The result is ``(z - shift_factor) * scaling_factor`` in the VAE's dtype; ``shift_factor`` is
    applied only for VAEs whose config sets one (SD's is ``None``, scaling 0.18215).
    """
    x = (2.0 * lr_up - 1.0).to(_vae_dtype(vae))
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


def _timesteps_for(latent: Tensor, timestep: int | Tensor) -> Tensor:
    # One timestep per batch element, as diffusers pipelines pass them to add_noise.
    t = torch.as_tensor(timestep, device=latent.device).long().flatten()
    if t.numel() == 1:
        t = t.expand(latent.shape[0])
    if t.numel() != latent.shape[0]:
        raise ValueError(f"{t.numel()} timesteps for a batch of {latent.shape[0]}")
    return t


def noised_start(
    scheduler: Any, latent: Tensor, timestep: int | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``scheduler.add_noise(latent, noise, t)`` with ``noise ~ N(0, I)`` drawn from ``generator``.

    For DDPM/DDIM schedulers this is ``sqrt(a_t) z + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``.
    """
    noise = randn_tensor(latent.shape, generator=generator, device=latent.device, dtype=latent.dtype)
    return scheduler.add_noise(latent, noise, _timesteps_for(latent, timestep))


def double_noised_start(
    scheduler: Any,
    latent: Tensor,
    t1: int | Tensor,
    t2: int | Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """XPSR's start: noise ``latent`` to ``t1``, then noise that result again to ``t2`` (fresh noise each time).

    The two noise tensors are drawn from ``generator`` in that order. With XPSR's settings (``t1`` = first of
    20 leading steps = 951, ``t2`` = 800) the result is ``0.0173 z`` plus noise of std ~0.9999; the caller
    still starts denoising at ``t1`` (``qyp2000/XPSR: test.py``).
    """
    once = noised_start(scheduler, latent, t1, generator)
    return noised_start(scheduler, once, t2, generator)


def start_timestep_index(scheduler: Any, t_start: int) -> int:
    """Index of the first step of ``scheduler.timesteps`` to run when starting at ``t_start``.

    SeeSR's loop skips every step with ``t > t_start``; the timesteps descend, so the steps run are
    ``scheduler.timesteps[index:]``. Call after ``scheduler.set_timesteps``.
    """
    timesteps = scheduler.timesteps
    if timesteps is None or len(timesteps) == 0:
        raise ValueError("scheduler has no timesteps; call set_timesteps first")
    skipped = [i for i, t in enumerate(timesteps.tolist()) if t > t_start]
    # A step above t_start after one below would mean non-descending timesteps: refuse rather than guess.
    if skipped != list(range(len(skipped))):
        raise ValueError(f"timesteps are not descending around t_start={t_start}: {timesteps.tolist()}")
    if len(skipped) == len(timesteps):
        raise ValueError(f"every timestep is above t_start={t_start}: {timesteps.tolist()}")
    return len(skipped)
