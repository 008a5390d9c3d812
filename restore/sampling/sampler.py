"""The sampling loop of the ControlNet-style latent SR methods (SeeSR, XPSR): method-agnostic.

Spec: ``../shared/specs/seesr_xpsr.md`` §1.7 (SeeSR ``test_seesr.py`` + ``pipeline_seesr.py``: defaults and order
of operations), §2.6 (XPSR ``test.py``: the options a second method needs), §6 (timesteps, sqrt(alpha_bar)).

The split: a method supplies ``denoise(latents, t, condition, image)`` (its ControlNet + UNet on a latent tile)
and the condition structures (text embeddings, RAM tokens, ...); this module owns the scheduler, the start
latent, the latent tiling, classifier-free guidance, the (tiled) VAE and the colour fix. Order of operations,
as the official scripts (:func:`super_resolve` runs all of it):

1. :func:`upscale_for_sampling`: an LR whose short side is below ``process_size // upscale`` is first resized
   so that its short side equals that; then it is resized x ``upscale``; then resized to the largest multiple
   of 8 below (a resample, not a crop). The result ``lr_up`` in ``[0, 1]`` is both the ControlNet's image and
   the colour reference.
2. :func:`sample` on ``lr_up``:

   a. a fresh sampling scheduler (:func:`build_scheduler`, from the prior's scheduler config) with
      ``num_steps`` steps; steps with ``t > start_timestep`` are skipped;
   b. the start latent (:func:`start_latents`): ``lr`` = the LR latent noised to ``start_timestep`` (SeeSR's
      LRE, t=999), ``lr_double`` = noised to the first step run and again to ``second_timestep`` (XPSR,
      951 -> 800), ``noise`` = pure noise;
   c. every step: the latent is cut into tiles (SeeSR's area rule, Gaussian blend; one tile when it fits),
      each tile with its 8x crop of ``lr_up`` goes through CFG (``denoise`` on the doubled
      ``[uncond, cond]`` batch), the blended prediction drives ``scheduler.step`` on the full latent;
   d. decode (tiled VAE with GroupNorm sync, bypassed when the latent fits one tile) to ``[0, 1]`` and colour
      fix against ``lr_up`` (AdaIN by default).

3. :func:`resize_bicubic` to ``(h * upscale, w * upscale)``.

Randomness comes from one generator (``settings.seed`` when none is passed), drawn in this order: the VAE
posterior sample, the start noise (twice for ``lr_double``), then the scheduler's per-step noise (DDPM). The
official SeeSR script samples the posterior without its generator; the draws (and so the bits) of the official
scripts are not reproduced, only the distributions.

Numerics: the latent and the scheduler arithmetic stay in float32 whatever the networks run in (the model
output is cast to it before each step); the decoded image and the colour fix are float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from restore.sampling.color_fix import adain_color_fix, wavelet_color_fix
from restore.sampling.guidance import cfg_denoise
from restore.sampling.lre import double_noised_start, encode_lr_latent, noised_start, start_timestep_index
from restore.sampling.tiled_vae import TiledAutoencoderKL
from restore.sampling.tiling import area_exceeds_tile, tiled_apply

__all__ = [
    "COLOR_FIXES",
    "SCHEDULERS",
    "STARTS",
    "Denoiser",
    "SamplingSettings",
    "apply_color_fix",
    "build_scheduler",
    "decode_latents",
    "resize_bicubic",
    "sample",
    "start_latents",
    "super_resolve",
    "upscale_for_sampling",
]

#: Sampler name -> (diffusers class, fixed overrides). ``dpmsolver++`` is DPM-Solver++ multistep.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}
#: Start latents: SeeSR's LRE (``lr``), XPSR's double noising (``lr_double``), pure noise (``noise``).
STARTS = ("lr", "lr_double", "noise")
#: Colour fixes against ``lr_up`` (SeeSR ``--align_method``: adain | wavelet | nofix).
COLOR_FIXES = ("adain", "wavelet", "none")


def _check_choice(key: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of: {', '.join(choices)}")


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling options; every default is SeeSR's official test default (spec §1.7).

    XPSR (spec §2.6): ``num_steps=20, guidance_scale=4.5, start="lr_double", second_timestep=800,
    latent_tile=320, latent_tile_overlap=8`` (the rest as here).
    """

    #: ``ddpm`` | ``ddim`` | ``dpmsolver++`` | ``unipc``; built from the prior's scheduler config (SeeSR: DDPM).
    scheduler: str = "ddpm"
    #: ``--num_inference_steps 50``: DDPM "leading" t = 981, 961, ..., 1.
    num_steps: int = 50
    #: ``--guidance_scale 5.5``; 1.0 runs the conditional batch only.
    guidance_scale: float = 5.5
    #: ``--start_point lr`` (LRE); ``lr_double`` = XPSR; ``noise`` = pure noise.
    start: str = "lr"
    #: pipeline default 999 (``--start_steps`` is not passed through): ``lr`` noises to it; steps above skip.
    start_timestep: int = 999
    #: ``lr_double`` only: the second noise level (XPSR ``added_noise_level`` 800); ignored otherwise.
    second_timestep: int | None = None
    #: ``--align_method adain``; ``wavelet`` | ``none``.
    color_fix: str = "adain"
    #: ``--latent_tiled_size 96`` / ``--latent_tiled_overlap 4`` (latent px; tiles when h * w > tile**2).
    latent_tile: int = 96
    latent_tile_overlap: int = 4
    #: ``--vae_encoder_tiled_size 1024`` (px) / ``--vae_decoder_tiled_size 224`` (latent px).
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    #: ``--process_size 512`` / ``--upscale 4`` (see :func:`upscale_for_sampling`).
    process_size: int = 512
    upscale: int = 4
    #: SD's scheduler configs give "leading" (``None`` keeps whatever the prior's config says).
    timestep_spacing: str | None = "leading"
    #: seed of the generator when :func:`sample` gets none (official: None = unseeded).
    seed: int | None = None
    #: tqdm bar over the steps (not an official option).
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("start", self.start, STARTS)
        _check_choice("color_fix", self.color_fix, COLOR_FIXES)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.start == "lr_double" and self.second_timestep is None:
            raise ValueError("start='lr_double' needs second_timestep (XPSR: 800)")
        if self.latent_tile_overlap >= self.latent_tile:
            raise ValueError(f"latent_tile_overlap ({self.latent_tile_overlap}) must be < latent_tile")
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")


class Denoiser(Protocol):
    """The method's model call: output (eps or v) for latent tile(s) ``latents`` ``[n, 4, h, w]``.

    ``condition`` is the method's ``cond`` (or, under CFG, ``concat_conditions(uncond, cond)``: batch
    ``[uncond, cond]``); ``image`` is the matching crop of ``lr_up`` in ``[0, 1]``, ``[n, 3, 8h, 8w]``
    (doubled under CFG); ``t`` a 0-d timestep tensor.
    """

    def __call__(self, latents: Tensor, t: Tensor, condition: Any, image: Tensor) -> Tensor: ...


# ------------------------------------------------------------------------------------------------- resizing
def resize_bicubic(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, *size)``: PIL's bicubic (``Image.resize`` default), clamped to ``[0, 1]``.

    PyTorch's antialiased bicubic is PIL's filter (a=-0.5, support widened when shrinking): equal to a PIL
    float ("F") resize to ~1e-5. PIL's 8-bit path (what the official scripts use) also rounds and clips
    between its horizontal and vertical passes; that is not reproduced. Computed in float32.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    x = image.float()
    out = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0).to(image.dtype)


def upscale_for_sampling(
    lq: Tensor, scale: int = 4, process_size: int = 512
) -> tuple[Tensor, tuple[int, int]]:
    """The condition image ``lr_up`` for an LR batch ``lq`` ``(B, 3, h, w)`` and the final size ``(h*s, w*s)``.

    As ``test_seesr.py`` (spec §1.7): if either side is below ``process_size // scale`` the LR is resized by
    ``r = (process_size // scale) / min(h, w)`` to ``(int(r h), int(r w))``; then resized x ``scale``; then to
    ``(H // 8 * 8, W // 8 * 8)``; each a PIL-bicubic resize (:func:`resize_bicubic`). E.g. 50x70 -> 128x179
    -> 512x716 -> 512x712; 128x200 -> 512x800.
    """
    if lq.ndim != 4:
        raise ValueError(f"expected an LR batch (B, C, h, w), got shape {tuple(lq.shape)}")
    h, w = (int(s) for s in lq.shape[-2:])
    x = lq
    short = process_size // scale
    if min(h, w) < short:
        ratio = short / min(h, w)
        x = resize_bicubic(x, (int(ratio * h), int(ratio * w)))
    x = resize_bicubic(x, (x.shape[-2] * scale, x.shape[-1] * scale))
    target = (x.shape[-2] // 8 * 8, x.shape[-1] // 8 * 8)
    if min(target) == 0:
        raise ValueError(f"LR {h}x{w} x{scale} is smaller than 8 px on a side; raise process_size")
    return resize_bicubic(x, target), (h * scale, w * scale)


# ------------------------------------------------------------------------------------------------ scheduler
def _config_of(scheduler: Any) -> Mapping[str, Any]:
    return scheduler.config if hasattr(scheduler, "config") else scheduler


def build_scheduler(name: str, scheduler: Any, timestep_spacing: str | None = "leading") -> Any:
    """A fresh ``name`` scheduler from ``scheduler`` (the prior's scheduler or its config).

    Fresh per call: multistep solvers keep per-run state. ``timestep_spacing=None`` keeps the config's. Note
    that diffusers' "leading" differs between classes: DDPM/DDIM 20 steps = 951 ... 1, DPM-Solver/UniPC
    941 ... 48.
    """
    _check_choice("scheduler", name, SCHEDULERS)
    cls, fixed = SCHEDULERS[name]
    overrides = dict(fixed)
    if timestep_spacing is not None:
        overrides["timestep_spacing"] = timestep_spacing
    return cls.from_config(_config_of(scheduler), **overrides)


def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# --------------------------------------------------------------------------------------------------- VAE
def _tiled_vae(vae: Any, settings: SamplingSettings) -> Any:
    if isinstance(vae, TiledAutoencoderKL):  # the caller chose its own tiling
        return vae
    return TiledAutoencoderKL(
        vae, encoder_tile=settings.vae_encoder_tile, decoder_tile=settings.vae_decoder_tile
    )


def _vae_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(vae: Any, latents: Tensor) -> Tensor:
    """Scaled latents -> image in ``[0, 1]`` (float32): ``decode(z / scaling_factor [+ shift_factor])``."""
    z = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    image = vae.decode(z.to(vae.dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0.0, 1.0)


def apply_color_fix(image: Tensor, reference: Tensor, method: str) -> Tensor:
    """``adain`` | ``wavelet`` colour fix of ``image`` against ``reference`` (same size), or ``none``."""
    _check_choice("color_fix", method, COLOR_FIXES)
    if method == "none":
        return image
    ref = reference.to(image.dtype)
    return adain_color_fix(image, ref) if method == "adain" else wavelet_color_fix(image, ref)


# ------------------------------------------------------------------------------------------------- start
def start_latents(
    vae: Any,
    lr_up: Tensor,
    scheduler: Any,
    first_timestep: int,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The float32 start latent for ``settings.start`` (spec §1.7 "LRE start", §2.6 "Start latent").

    ``scheduler`` is the sampling scheduler (for ``init_noise_sigma``); noising always uses DDPM's
    ``add_noise`` on the same config, i.e. ``sqrt(a_t) z + sqrt(1 - a_t) eps`` at any t (the multistep
    solvers' ``add_noise`` only knows their own timesteps). ``first_timestep`` is the first step that runs
    (XPSR's t1).
    """
    if settings.start == "noise":
        f = _vae_factor(vae)
        shape = (lr_up.shape[0], vae.config.latent_channels, lr_up.shape[-2] // f, lr_up.shape[-1] // f)
        noise = randn_tensor(shape, generator=generator, device=lr_up.device, dtype=torch.float32)
        return noise * scheduler.init_noise_sigma
    forward = DDPMScheduler.from_config(_config_of(scheduler))
    num_train = int(forward.config.num_train_timesteps)
    for key in ("start_timestep", "second_timestep"):
        t = getattr(settings, key)
        if t is not None and not 0 <= t < num_train:
            raise ValueError(f"{key}={t} is outside the prior's timesteps 0..{num_train - 1}")
    latent = encode_lr_latent(vae, lr_up, generator).float()
    if settings.start == "lr":
        return noised_start(forward, latent, settings.start_timestep, generator)
    assert settings.second_timestep is not None  # checked by SamplingSettings
    return double_noised_start(forward, latent, first_timestep, settings.second_timestep, generator)


# ------------------------------------------------------------------------------------------------- sample
def _guided_tile(
    latent_tile: Tensor,
    image: Tensor,
    *,
    denoise: Denoiser,
    t: Tensor,
    cond: Any,
    uncond: Any,
    scale: float,
) -> Tensor:
    # CFG per tile, as the official pipeline: the LR crop rides along with the condition, so it is doubled
    # with the batch (the ControlNet sees the same LR for both halves, spec §1.7 "CFG").
    def call(latents: Tensor, timestep: Tensor, pair: tuple[Any, Tensor]) -> Tensor:
        return denoise(latents, timestep, pair[0], pair[1])

    un = None if uncond is None else (uncond, image)
    return cfg_denoise(call, latent_tile, t, (cond, image), un, scale)


@torch.no_grad()
def sample(
    denoise: Denoiser,
    cond: Any,
    uncond: Any,
    lr_up: Tensor,
    vae: Any,
    scheduler: Any,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Restore ``lr_up`` ``(B, 3, H, W)`` in ``[0, 1]`` (H, W multiples of 8): image ``(B, 3, H, W)`` in ``[0, 1]``.

    ``cond``/``uncond``: the method's condition structures (batch B; ``uncond`` may be ``None`` only at
    ``guidance_scale == 1``). ``vae``: the prior's ``AutoencoderKL`` (wrapped in a :class:`TiledAutoencoderKL`
    with the settings' tiles; pass a wrapper to choose other tiling). ``scheduler``: the prior's scheduler or
    its config (a fresh one of ``settings.scheduler`` is built from it). ``generator``: default a CPU
    generator seeded with ``settings.seed``. The output is colour-fixed against ``lr_up``; see the module doc
    for the order of operations.
    """
    settings = settings or SamplingSettings()
    if settings.guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={settings.guidance_scale} needs an uncond (negative) condition")
    if lr_up.ndim != 4 or lr_up.shape[1] != 3:
        raise ValueError(f"lr_up must be (B, 3, H, W), got {tuple(lr_up.shape)}")
    vae = _tiled_vae(vae, settings)
    factor = _vae_factor(vae)
    if lr_up.shape[-2] % factor or lr_up.shape[-1] % factor:
        raise ValueError(
            f"lr_up size {tuple(lr_up.shape[-2:])} is not a multiple of {factor}; use upscale_for_sampling"
        )
    if generator is None and settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed)

    sampler = build_scheduler(settings.scheduler, scheduler, settings.timestep_spacing)
    sampler.set_timesteps(settings.num_steps, device=lr_up.device)
    first = start_timestep_index(sampler, settings.start_timestep)
    if first and hasattr(sampler, "set_begin_index"):  # multistep solvers index their sigmas from here
        sampler.set_begin_index(first * sampler.order)
    timesteps = sampler.timesteps[first:]
    latents = start_latents(vae, lr_up, sampler, int(timesteps[0]), settings, generator)
    step_kwargs = {"generator": generator} if _accepts(sampler.step, "generator") else {}

    for t in tqdm(timesteps, desc="sampling", unit="step", leave=False, disable=not settings.progress):
        model_input = sampler.scale_model_input(latents, t)
        tile_fn = partial(
            _guided_tile,
            denoise=denoise,
            t=t,
            cond=cond,
            uncond=uncond,
            scale=settings.guidance_scale,
        )
        pred = tiled_apply(
            tile_fn,
            model_input,
            settings.latent_tile,
            settings.latent_tile_overlap,
            weights="gaussian",
            crop_conditions={"image": lr_up},
            needs_tiling=area_exceeds_tile,
        )
        latents = sampler.step(pred.to(latents.dtype), t, latents, return_dict=False, **step_kwargs)[0]

    image = decode_latents(vae, latents)
    return apply_color_fix(image, lr_up.float(), settings.color_fix)


def super_resolve(
    denoise: Denoiser,
    cond: Any,
    uncond: Any,
    lq: Tensor,
    vae: Any,
    scheduler: Any,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The whole official test path for an LR batch ``lq`` ``(B, 3, h, w)`` in ``[0, 1]``: ``(B, 3, h*s, w*s)``.

    :func:`upscale_for_sampling` -> :func:`sample` -> :func:`resize_bicubic` to ``(h * s, w * s)`` with
    ``s = settings.upscale`` (spec §1.7: the colour fix happens before that final resize).
    """
    settings = settings or SamplingSettings()
    lr_up, size = upscale_for_sampling(lq, settings.upscale, settings.process_size)
    image = sample(denoise, cond, uncond, lr_up, vae, scheduler, settings, generator)
    return resize_bicubic(image, size)
