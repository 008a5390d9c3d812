"""Steppers: the update rule of one sampling run, chosen by ``SamplingSettings.scheduler``.

The loop in :mod:`restore.sampling.sampler` is the same for all of them: start latent, then per step the model
input (:meth:`Stepper.model_input`), the guided prediction blended over tiles, and :meth:`Stepper.step`. A stepper
is built fresh for every run (multistep solvers keep state).

- :class:`DiffusersStepper` (``ddpm`` | ``ddim`` | ``dpmsolver++`` | ``unipc``): a diffusers scheduler built from the
  prior's scheduler config, as SeeSR / XPSR / StableSR sample; the start latent is the reference latent noised
  with DDPM's ``add_noise`` (SeeSR's LR embedding start, XPSR's double noising) or pure noise.
- :class:`IDDPMStepper` (``iddpm``): respaced improved-DDPM ancestral sampling with the learned variance
  (:mod:`restore.diffusion.iddpm`), as DreamClear (PixArt-α) samples: 50 respaced steps, the network sees the
  original timestep.
- :class:`EDMStepper` (``edm``): Euler with churn on SD's discrete sigmas, an optional linear CFG ramp and
  restoration guidance toward a reference latent, as SUPIR's ``RestoreEDMSampler`` (:mod:`restore.diffusion.edm`).
  Per step (sigma -> sigma_next): ``sigma_hat = sigma (1 + gamma)`` with ``gamma = min(s_churn / n, sqrt(2) - 1)``
  where ``s_tmin <= sigma <= s_tmax``; ``x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) n``; the network runs at
  ``x_hat c_in`` with the timestep of the discrete sigma nearest ``sigma_hat`` (whose ``c_in`` / ``c_out`` it
  uses); CFG scale ``(start - s) sigma_hat / 14.6146 + s`` when ramped; ``D = x_hat - sigma_q eps``; if
  ``sigma_next > 0.05`` and ``tau > 0``: ``D -= (D - z_ref) (sigma / 14.6146)^tau``; Euler
  ``x = x_hat + (sigma_next - sigma_hat) (x_hat - D) / sigma_hat``. Checked against the official code
  (tests/fixtures/edm_official.npz). Blending the network output over tiles before this (linear) step equals
  SUPIR's blending of the stepped tiles with one shared churn noise field.

Learned variance: a model output with twice the latent channels carries ``[eps, v]``; only :class:`IDDPMStepper`
uses ``v``, the others take the epsilon half (as diffusers' PixArt pipeline does).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from restore.diffusion.edm import SUPIR_SIGMA_MAX, DiscreteSigmas
from restore.diffusion.iddpm import LearnedRangeSchedule, betas_from_config, space_timesteps
from restore.sampling.lre import double_noised_start, noised_start, start_timestep_index

if TYPE_CHECKING:
    from restore.sampling.sampler import SamplingSettings

__all__ = [
    "DIFFUSERS_SCHEDULERS",
    "STEPPERS",
    "DiffusersStepper",
    "EDMStepper",
    "IDDPMStepper",
    "Stepper",
    "build_scheduler",
    "build_stepper",
]

#: diffusers sampler name -> (class, fixed overrides). ``dpmsolver++`` is DPM-Solver++ multistep.
DIFFUSERS_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    # the stochastic variant (eta 1): SUPIR's RestoreDPMPP2MSampler (8 steps, Karras sigmas)
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}
#: every ``SamplingSettings.scheduler`` choice
STEPPERS = (*DIFFUSERS_SCHEDULERS, "iddpm", "edm")


class Stepper(Protocol):
    """One sampling run's update rule (see the module doc)."""

    #: number of network evaluations (steps) of this run
    num_steps: int

    def start(
        self,
        reference: Tensor | None,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """The float32 start latent on ``device``: from the encoded reference latent, or noise when ``reference``
        is None."""
        ...

    def model_input(self, x: Tensor, i: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(network input, network timestep)`` of step ``i`` for the current latent ``x``."""
        ...

    def noise_level(self, i: int) -> float:
        """The noise level sigma = sqrt((1 - abar) / abar) of step ``i`` (before any churn)."""
        ...

    def guidance_scale(self, i: int, scale: float) -> float:
        """The CFG scale of step ``i`` (``scale`` = the configured one), after :meth:`model_input`."""
        ...

    def step(self, output: Tensor, i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The latent after step ``i`` from the (guided, blended) network ``output``."""
        ...


def _config_of(scheduler: Any) -> Any:
    return scheduler.config if hasattr(scheduler, "config") else scheduler


def _epsilon_half(output: Tensor, x: Tensor) -> Tensor:
    """Drop learned-variance channels: the first half of a ``2C``-channel output."""
    return output[:, : x.shape[1]] if output.shape[1] == 2 * x.shape[1] else output


def _ramped_scale(start: float | None, end: float, sigma: float) -> float:
    """SUPIR's linear ramp (``LinearCFG``): ``start`` at sigma_max (14.6146), ``end`` at sigma 0; constant ``end``
    when ``start`` is None."""
    if start is None:
        return end
    return (start - end) * sigma / SUPIR_SIGMA_MAX + end


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float32 standard normal on ``device`` (drawn on the generator's device, as diffusers does)."""
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def build_scheduler(
    name: str, scheduler: Any, timestep_spacing: str | None = "leading", karras_sigmas: bool = False
) -> Any:
    """A fresh diffusers ``name`` scheduler from ``scheduler`` (the prior's scheduler or its config).

    ``timestep_spacing=None`` keeps the config's. Note that diffusers' "leading" differs between classes: DDPM /
    DDIM 20 steps = 951 ... 1, DPM-Solver / UniPC 941 ... 48. ``karras_sigmas``: the Karras et al. (2022) noise
    levels between the schedule's extremes (DPM-Solver / UniPC only).
    """
    if name not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not one of: {', '.join(DIFFUSERS_SCHEDULERS)}")
    cls, fixed = DIFFUSERS_SCHEDULERS[name]
    overrides = dict(fixed)
    if timestep_spacing is not None:
        overrides["timestep_spacing"] = timestep_spacing
    if cls is DPMSolverMultistepScheduler:  # it would cut a learned-variance output to 3 channels (pixel IF)
        overrides["variance_type"] = None
    if karras_sigmas:
        if cls not in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
            raise ValueError(f"karras_sigmas belongs to the DPM-Solver / UniPC steppers, not {name!r}")
        overrides["use_karras_sigmas"] = True
    return cls.from_config(_config_of(scheduler), **overrides)


def _sigma_of_timestep(alphas_cumprod: Tensor, t: Tensor | int) -> float:
    abar = float(alphas_cumprod[int(t)])
    return math.sqrt((1.0 - abar) / abar)


# ---------------------------------------------------------------------------------------------- diffusers
class DiffusersStepper:
    """A diffusers scheduler driving the loop (see the module doc); steps above ``start_timestep`` are skipped."""

    def __init__(self, settings: SamplingSettings, scheduler: Any, device: torch.device) -> None:
        self.settings = settings
        self.config = _config_of(scheduler)
        sampler = build_scheduler(
            settings.scheduler, scheduler, settings.timestep_spacing, settings.karras_sigmas
        )
        sampler.set_timesteps(settings.num_steps, device=device)
        first = start_timestep_index(sampler, settings.start_timestep)
        if first and hasattr(sampler, "set_begin_index"):  # multistep solvers index their sigmas from here
            sampler.set_begin_index(first * sampler.order)
        self.scheduler = sampler
        self._first = first
        self.timesteps = sampler.timesteps[first:]
        self.num_steps = len(self.timesteps)
        self._generator_kwarg = "generator" in _parameters(sampler.step)

    def start(
        self,
        reference: Tensor | None,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        settings = self.settings
        if reference is None:
            return _randn(shape, generator, device) * self.scheduler.init_noise_sigma
        # noising always uses DDPM's add_noise on the same config: sqrt(a_t) z + sqrt(1 - a_t) eps at any t
        # (the multistep solvers' add_noise only knows their own timesteps)
        forward = DDPMScheduler.from_config(self.config)
        num_train = int(forward.config.num_train_timesteps)
        for key in ("start_timestep", "second_timestep"):
            t = getattr(settings, key)
            if t is not None and not 0 <= t < num_train:
                raise ValueError(f"{key}={t} is outside the prior's timesteps 0..{num_train - 1}")
        reference = reference.float()
        if settings.start == "lr":
            return noised_start(forward, reference, settings.start_timestep, generator)
        assert settings.second_timestep is not None  # checked by SamplingSettings
        return double_noised_start(
            forward, reference, int(self.timesteps[0]), settings.second_timestep, generator
        )

    def model_input(self, x: Tensor, i: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        t = self.timesteps[i]
        return self.scheduler.scale_model_input(x, t), t

    def noise_level(self, i: int) -> float:
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) > len(self.scheduler.timesteps):  # sigma-space solvers (Karras)
            return float(sigmas[self._first + i])
        return _sigma_of_timestep(self.scheduler.alphas_cumprod, self.timesteps[i])

    def guidance_scale(self, i: int, scale: float) -> float:
        return _ramped_scale(self.settings.guidance_scale_start, scale, self.noise_level(i))

    def step(self, output: Tensor, i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if getattr(self.scheduler.config, "variance_type", None) not in ("learned", "learned_range"):
            output = _epsilon_half(output, x)
        kwargs = {"generator": generator} if self._generator_kwarg else {}
        return self.scheduler.step(output.to(x.dtype), self.timesteps[i], x, return_dict=False, **kwargs)[0]


def _parameters(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


# ---------------------------------------------------------------------------------------------- iDDPM
class IDDPMStepper:
    """Respaced improved-DDPM ancestral sampling with learned-range variance (see the module doc)."""

    def __init__(self, settings: SamplingSettings, scheduler: Any) -> None:
        self.settings = settings
        self.full = LearnedRangeSchedule(betas_from_config(_config_of(scheduler)))
        self.chain = self.full.respaced(space_timesteps(len(self.full), str(settings.num_steps)))
        # descending chain indices; steps above start_timestep are skipped (as the diffusers steppers)
        self.indices = [
            k
            for k in reversed(range(len(self.chain)))
            if int(self.chain.timesteps[k]) <= settings.start_timestep
        ]
        if not self.indices:
            raise ValueError(f"no respaced timestep is at or below start_timestep={settings.start_timestep}")
        self.num_steps = len(self.indices)

    def start(
        self,
        reference: Tensor | None,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        noise = _randn(shape, generator, device)
        if reference is None:
            return noise
        if self.settings.start != "lr":
            raise ValueError(f"scheduler=iddpm supports start=lr or noise, got {self.settings.start!r}")
        t = torch.full((shape[0],), int(self.settings.start_timestep), dtype=torch.long)
        return self.full.q_sample(reference.float(), t, noise)

    def model_input(self, x: Tensor, i: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        return x, self.chain.timesteps[self.indices[i]].to(x.device)

    def noise_level(self, i: int) -> float:
        return _sigma_of_timestep(self.full.alphas_cumprod, self.chain.timesteps[self.indices[i]])

    def guidance_scale(self, i: int, scale: float) -> float:
        return scale

    def step(self, output: Tensor, i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        channels = x.shape[1]
        learned = self.settings.variance == "learned_range"
        if learned and output.shape[1] != 2 * channels:
            raise ValueError(
                f"scheduler=iddpm with variance=learned_range samples with the learned variance of priors that "
                f"output it (PixArt-α: 2 x {channels} channels); this network outputs {output.shape[1]}: use "
                "variance=fixed_small (LDM's respaced DDPM, StableSR) or scheduler=ddpm"
            )
        if not learned and output.shape[1] != channels:
            raise ValueError(
                f"variance=fixed_small takes an eps-only output ({channels} channels), got {output.shape[1]}"
            )
        k = self.indices[i]
        noise = None if k == 0 else _randn(tuple(x.shape), generator, x.device)
        return self.chain.p_sample(output.to(x.dtype), x, k, noise, variance=self.settings.variance)


# ---------------------------------------------------------------------------------------------- EDM
class EDMStepper:
    """Euler-EDM with churn, linear CFG ramp and restoration guidance (SUPIR; see the module doc).

    ``guidance_reference``: the latent restoration guidance pulls toward (SUPIR: the stage-1 latent), needed when
    ``settings.restoration_guidance > 0``.
    """

    def __init__(
        self, settings: SamplingSettings, scheduler: Any, guidance_reference: Tensor | None = None
    ) -> None:
        config = _config_of(scheduler)
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("scheduler=edm drives epsilon priors (the SD / SDXL scalings)")
        self.settings = settings
        abar = torch.cumprod(1.0 - betas_from_config(config), dim=0)
        self.discrete = DiscreteSigmas(abar)
        self.sigmas, _ = self.discrete.chain(settings.num_steps)
        self.num_steps = settings.num_steps
        self.gamma = min(settings.s_churn / self.num_steps, math.sqrt(2.0) - 1.0)
        if settings.restoration_guidance > 0 and guidance_reference is None:
            raise ValueError(
                "restoration_guidance > 0 needs a guidance reference latent (SUPIR: the stage-1 latent) in the "
                "sampling inputs"
            )
        self.reference = guidance_reference
        self._state: tuple[Tensor, Tensor, Tensor] | None = None  # (x_hat, sigma_hat, sigma_q) of this step

    def start(
        self,
        reference: Tensor | None,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        noise = _randn(shape, generator, device)
        sigma_max = self.sigmas[0]
        if reference is None:  # the VP noise at sigma_max, in EDM's unscaled space
            return noise * torch.sqrt(1.0 + sigma_max**2)
        if self.settings.start != "lr":
            raise ValueError(f"scheduler=edm supports start=lr or noise, got {self.settings.start!r}")
        return reference.float() + sigma_max * noise

    def _gamma(self, sigma: float) -> float:
        s = self.settings
        return self.gamma if s.s_tmin <= sigma <= s.s_tmax else 0.0

    def model_input(self, x: Tensor, i: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        sigma = self.sigmas[i]
        gamma = self._gamma(float(sigma))
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            noise = _randn(tuple(x.shape), generator, x.device) * self.settings.s_noise
            x = x + noise * (sigma_hat**2 - sigma**2) ** 0.5
        sigma_q, index = self.discrete.quantize(sigma_hat)
        self._state = (x, sigma_hat, sigma_q)
        _, _, c_in = DiscreteSigmas.scalings(sigma_q)
        return x * c_in.to(x.device), index.to(x.device)

    def noise_level(self, i: int) -> float:
        return float(self.sigmas[i])

    def guidance_scale(self, i: int, scale: float) -> float:
        assert self._state is not None, "model_input() comes first"
        return _ramped_scale(self.settings.guidance_scale_start, scale, float(self._state[1]))  # at sigma_hat

    def step(self, output: Tensor, i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        assert self._state is not None, "model_input() comes first"
        x_hat, sigma_hat, sigma_q = self._state
        self._state = None
        eps = _epsilon_half(output, x).to(x.dtype)
        _, c_out, _ = DiscreteSigmas.scalings(sigma_q)
        denoised = x_hat + eps * c_out.to(x.device)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        tau = self.settings.restoration_guidance
        if tau > 0 and sigma_next > self.settings.restoration_guidance_min_sigma:
            reference = self.reference.to(device=x.device, dtype=x.dtype)
            denoised = denoised - (denoised - reference) * (sigma / SUPIR_SIGMA_MAX) ** tau
        derivative = (x_hat - denoised) / sigma_hat
        return x_hat + derivative * (sigma_next - sigma_hat)


def build_stepper(
    settings: SamplingSettings,
    scheduler: Any,
    device: torch.device | str = "cpu",
    guidance_reference: Tensor | None = None,
) -> Stepper:
    """The stepper of ``settings.scheduler`` for the prior's ``scheduler`` (or its config), on ``device``."""
    name = settings.scheduler
    if name not in STEPPERS:
        raise ValueError(f"scheduler={name!r} is not one of: {', '.join(STEPPERS)}")
    edm_only = {
        "s_churn": settings.s_churn != 0.0,
        "restoration_guidance": settings.restoration_guidance > 0,
    }
    used = [k for k, on in edm_only.items() if on]
    if used and name != "edm":
        raise ValueError(
            f"{', '.join(used)} belong to scheduler=edm (SUPIR's sampler), not scheduler={name!r}"
        )
    if name == "iddpm":
        if settings.guidance_scale_start is not None:
            raise ValueError(
                "guidance_scale_start (the linear CFG ramp) is not available with scheduler=iddpm"
            )
        return IDDPMStepper(settings, scheduler)
    if name == "edm":
        return EDMStepper(settings, scheduler, guidance_reference)
    return DiffusersStepper(settings, scheduler, torch.device(device))
