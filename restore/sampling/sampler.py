"""The sampling loop of the latent diffusion SR methods: method-agnostic, stepper-agnostic.

The split: a method supplies ``denoise(latents, t, condition, spatial)`` (its networks on a latent tile; ``spatial``
holds the tile's crops of the named spatial conditions) and a :class:`SamplingInputs` (conditions, spatial
conditions, the start and colour references, the decoder, which latent channels CFG guides); the settings choose
the stepper (:mod:`restore.sampling.steppers`: diffusers schedulers, respaced iDDPM, EDM); this module owns the
start latent, the latent tiling, classifier-free guidance, the (tiled) VAE and the colour fix.

Order of operations (SeeSR's ``test_seesr.py`` / ``pipeline_seesr.py``, which the other methods follow):

1. the start latent: ``start_reference`` (an image in [0, 1], e.g. SeeSR's upscaled LR, DreamClear's reference
   restoration) encoded by the VAE (a posterior sample, or its mode with ``start_encoding="mode"``) and noised to
   ``start_timestep`` by the stepper (``start="lr"``; XPSR's double noising ``"lr_double"``), or pure noise
   (``start="noise"``, SUPIR);
2. every step: the stepper's model input; the latent is cut into tiles (SeeSR's area rule, Gaussian blend; one
   tile when it fits), each tile with its crops of the spatial conditions goes through CFG (``denoise`` on the
   doubled ``[uncond, cond]`` batch; only ``guided_channels`` are guided, the rest come from the conditional
   half; learned-variance channels are never guided), the blended output drives the stepper on the full latent;
3. decode (``inputs.decode``, default the VAE, tiled with GroupNorm sync and bypassed when the latent fits one
   tile) to [0, 1] and colour fix against ``color_reference`` (AdaIN by default).

:func:`upscale_for_sampling` and :func:`super_resolve` give SeeSR's resize rules around this (the LR resized so
that its short side reaches ``process_size / upscale``, x upscale, snapped to multiples of 8; the result resized
back to exactly ``upscale`` x the input).

Randomness comes from one generator (``settings.seed`` when none is passed), drawn in this order: the VAE
posterior sample, the start noise (twice for ``lr_double``), then the stepper's per-step noise. The official
scripts' draws (and so their bits) are not reproduced, only the distributions.

Numerics: the latent and the stepper arithmetic stay in float32 whatever the networks run in (the model output is
cast to it before each step); the decoded image and the colour fix are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from restore.sampling.color_fix import adain_color_fix, wavelet_color_fix
from restore.sampling.guidance import cfg_denoise
from restore.sampling.lre import encode_lr_latent
from restore.sampling.steppers import DIFFUSERS_SCHEDULERS, STEPPERS, build_scheduler, build_stepper
from restore.sampling.tiled_vae import TiledAutoencoderKL
from restore.sampling.tiling import area_exceeds_tile, tiled_apply

__all__ = [
    "COLOR_FIXES",
    "SCHEDULERS",
    "STARTS",
    "VARIANCES",
    "Denoiser",
    "SamplingInputs",
    "SamplingSettings",
    "apply_color_fix",
    "build_scheduler",
    "decode_latents",
    "resize_bicubic",
    "sample",
    "super_resolve",
    "upscale_for_sampling",
]

#: ``SamplingSettings.scheduler`` choices: the diffusers schedulers, ``iddpm`` and ``edm``.
SCHEDULERS = STEPPERS
#: Start latents: the noised reference latent (``lr``, SeeSR's LRE), XPSR's double noising (``lr_double``),
#: pure noise (``noise``).
STARTS = ("lr", "lr_double", "noise")
#: How the start reference is encoded: a posterior sample (SeeSR, XPSR) or the mode (DreamClear).
START_ENCODINGS = ("sample", "mode")
#: Variances of the respaced ancestral sampler (``scheduler="iddpm"``).
VARIANCES = ("learned_range", "fixed_small")
#: Colour fixes against the colour reference (SeeSR ``--align_method``: adain | wavelet | nofix).
COLOR_FIXES = ("adain", "wavelet", "none")


def _check_choice(key: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of: {', '.join(choices)}")


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling options; every default is SeeSR's official test default (``cswry/SeeSR: test_seesr.py``).

    XPSR (``qyp2000/XPSR: configs/xpsr_test.yaml``): ``num_steps=20, guidance_scale=4.5, start="lr_double",
    second_timestep=800, latent_tile=320, latent_tile_overlap=8``. DreamClear: ``scheduler="iddpm",
    num_steps=50, guidance_scale=4.5, start_encoding="mode"``. SUPIR: ``scheduler="edm"`` with the EDM fields.
    """

    #: stepper: ``ddpm`` | ``ddim`` | ``dpmsolver++`` | ``sde-dpmsolver++`` | ``unipc`` (diffusers, from the
    #: prior's scheduler config; SeeSR: DDPM) | ``iddpm`` (respaced, learned variance) | ``edm`` (Euler with churn, SUPIR)
    scheduler: str = "ddpm"
    #: ``--num_inference_steps 50``: DDPM "leading" t = 981, 961, ..., 1
    num_steps: int = 50
    #: ``--guidance_scale 5.5``; 1.0 runs the conditional batch only
    guidance_scale: float = 5.5
    #: ``--start_point lr`` (LRE); ``lr_double`` = XPSR; ``noise`` = pure noise
    start: str = "lr"
    #: pipeline default 999 (``--start_steps`` is not passed through): ``lr`` noises to it; steps above skip
    start_timestep: int = 999
    #: ``lr_double`` only: the second noise level (XPSR ``added_noise_level`` 800); ignored otherwise
    second_timestep: int | None = None
    #: ``sample`` (a VAE posterior draw, SeeSR) | ``mode`` (DreamClear) for the start reference's latent
    start_encoding: str = "sample"
    #: ``--align_method adain``; ``wavelet`` | ``none``
    color_fix: str = "adain"
    #: ``--latent_tiled_size 96`` / ``--latent_tiled_overlap 4`` (latent px; tiles when h * w > tile**2)
    latent_tile: int = 96
    latent_tile_overlap: int = 4
    #: centre the Gaussian tile window on both axes; false keeps the official half-pixel asymmetry
    #: (:func:`~restore.sampling.tiling.gaussian_tile_weights`), for parity with every released sampler
    symmetric_tile_weights: bool = False
    #: ``iddpm`` only: ``learned_range`` (the network outputs eps and v: PixArt, DreamClear) | ``fixed_small``
    #: (eps only, the posterior variance: LDM's DDPM sampler with respaced betas, StableSR)
    variance: str = "learned_range"
    #: ``--vae_encoder_tiled_size 1024`` (px) / ``--vae_decoder_tiled_size 224`` (latent px)
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    #: ``--process_size 512`` / ``--upscale 4`` (see :func:`upscale_for_sampling`)
    process_size: int = 512
    upscale: int = 4
    #: diffusers steppers: SD's scheduler configs give "leading" (``None`` keeps the prior config's)
    timestep_spacing: str | None = "leading"
    #: ``dpmsolver++`` / ``sde-dpmsolver++`` / ``unipc``: Karras noise levels (SUPIR's 8-step DPM++ 2M variant)
    karras_sigmas: bool = False
    #: ``edm`` only: churn (SUPIR ``s_churn`` 5), its noise scale (``s_noise`` 1.01) and sigma range
    s_churn: float = 0.0
    s_noise: float = 1.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    #: the CFG scale at sigma_max, ramped linearly to ``guidance_scale`` at sigma 0 (SUPIR ``spt_linear_CFG``;
    #: edm: at the churned sigma, diffusers steppers: at the step's sigma); ``None`` = a constant scale
    guidance_scale_start: float | None = None
    #: ``edm`` only: restoration guidance strength tau (SUPIR ``s_stage1``; <= 0 = off) and the sigma_next
    #: below which it stops (``restore_cfg_s_tmin`` 0.05)
    restoration_guidance: float = 0.0
    restoration_guidance_min_sigma: float = 0.05
    #: seed of the generator when :func:`sample` gets none (official: None = unseeded)
    seed: int | None = None
    #: tqdm bar over the steps (not an official option)
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("start", self.start, STARTS)
        _check_choice("start_encoding", self.start_encoding, START_ENCODINGS)
        _check_choice("color_fix", self.color_fix, COLOR_FIXES)
        _check_choice("variance", self.variance, VARIANCES)
        if self.variance != "learned_range" and self.scheduler != "iddpm":
            raise ValueError(f"variance={self.variance!r} belongs to scheduler=iddpm, not {self.scheduler!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.start == "lr_double" and self.second_timestep is None:
            raise ValueError("start='lr_double' needs second_timestep (XPSR: 800)")
        if self.start == "lr_double" and self.scheduler not in DIFFUSERS_SCHEDULERS:
            raise ValueError(
                f"start='lr_double' is XPSR's start for the diffusers schedulers, not {self.scheduler}"
            )
        if self.latent_tile_overlap >= self.latent_tile:
            raise ValueError(f"latent_tile_overlap ({self.latent_tile_overlap}) must be < latent_tile")
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")


class Denoiser(Protocol):
    """The method's model call: the network output for latent tile(s) ``latents`` ``[n, C, h, w]``.

    ``condition`` is the method's ``cond`` (or, under CFG, ``uncond`` and ``cond`` concatenated: batch
    ``[uncond, cond]``); ``spatial`` holds the matching crops of the spatial conditions (doubled under CFG);
    ``t`` is the stepper's network timestep (a 0-d tensor).
    """

    def __call__(
        self, latents: Tensor, t: Tensor, condition: Any, spatial: Mapping[str, Tensor]
    ) -> Tensor: ...


@dataclass
class SamplingInputs:
    """What a method hands the loop for one batch (see the module doc).

    ``spatial``: named conditions at any integer multiple of the latent size (an LR image at 8x, a latent at
    1x), each cropped per tile. ``start_reference`` / ``color_reference``: images in [0, 1] at the output size
    (``None``: pure-noise start / no colour fix). ``start_latent``: the start reference already encoded (scaled
    latent), when the method needs that very draw elsewhere too (StableSR's encoder reads it); it replaces the
    loop's own encoding. ``decode``: scaled latents -> image in [0, 1] (default: the
    prior's VAE). ``guidance_reference``: the latent of EDM's restoration guidance. ``guided_channels``: CFG on
    channels ``[:k]`` only (DreamClear's DiT: 3). ``image_size`` / ``batch_size``: the output's, when no
    reference image gives them. ``before_step(i, sigma)``: called before step ``i``'s network calls with the
    step's noise level (before churn), for the method's per-step settings (SUPIR's control-scale ramp).
    """

    cond: Any
    uncond: Any = None
    spatial: Mapping[str, Tensor] = field(default_factory=dict)
    start_reference: Tensor | None = None
    start_latent: Tensor | None = None
    color_reference: Tensor | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    guidance_reference: Tensor | None = None
    guided_channels: int | None = None
    image_size: tuple[int, int] | None = None
    batch_size: int | None = None
    before_step: Callable[[int, float], None] | None = None

    def output_shape(self) -> tuple[int, int, int]:
        """``(batch, H, W)`` of the restored images."""
        for image in (self.start_reference, self.color_reference):
            if image is not None:
                if image.ndim != 4 or image.shape[1] != 3:
                    raise ValueError(f"reference images must be (B, 3, H, W), got {tuple(image.shape)}")
                return int(image.shape[0]), int(image.shape[-2]), int(image.shape[-1])
        if self.image_size is None or self.batch_size is None:
            raise ValueError(
                "SamplingInputs needs a start/colour reference image or image_size and batch_size"
            )
        return int(self.batch_size), int(self.image_size[0]), int(self.image_size[1])


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

    As ``cswry/SeeSR: test_seesr.py``: if either side is below ``process_size // scale`` the LR is resized by
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


# ------------------------------------------------------------------------------------------------- sample
def _guided_tile(
    latent_tile: Tensor,
    *,
    denoise: Denoiser,
    t: Tensor,
    cond: Any,
    uncond: Any,
    scale: float,
    guided_channels: int | None,
    **spatial: Tensor,
) -> Tensor:
    # CFG per tile, as the official pipelines: the spatial crops ride along with the condition, so they are
    # doubled with the batch (the ControlNet sees the same LR for both halves)
    def call(latents: Tensor, timestep: Tensor, pair: tuple[Any, Mapping[str, Tensor]]) -> Tensor:
        return denoise(latents, timestep, pair[0], pair[1])

    un = None if uncond is None else (uncond, spatial)
    return cfg_denoise(call, latent_tile, t, (cond, spatial), un, scale, guided_channels)


@torch.no_grad()
def sample(
    denoise: Denoiser,
    inputs: SamplingInputs,
    vae: Any,
    scheduler: Any,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Restore one batch: images ``(B, 3, H, W)`` in ``[0, 1]`` (H, W multiples of the VAE's factor).

    ``vae``: the prior's ``AutoencoderKL`` (wrapped in a :class:`TiledAutoencoderKL` with the settings' tiles;
    pass a wrapper to choose other tiling). ``scheduler``: the prior's training scheduler or its config (the
    stepper is built from it). ``generator``: default a CPU generator seeded with ``settings.seed``. See the
    module doc for the order of operations.
    """
    settings = settings or SamplingSettings()
    if settings.guidance_scale != 1.0 and inputs.uncond is None:
        raise ValueError(f"guidance_scale={settings.guidance_scale} needs an uncond (negative) condition")
    batch, height, width = inputs.output_shape()
    vae = _tiled_vae(vae, settings)
    factor = _vae_factor(vae)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {(height, width)} is not a multiple of {factor}; use upscale_for_sampling"
        )
    if generator is None and settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed)
    device = next(
        (
            x.device
            for x in (inputs.start_reference, inputs.color_reference, *inputs.spatial.values())
            if x is not None
        ),
        torch.device("cpu"),
    )

    stepper = build_stepper(settings, scheduler, device, inputs.guidance_reference)
    shape = (batch, int(vae.config.latent_channels), height // factor, width // factor)
    reference = None
    if settings.start != "noise":
        if inputs.start_latent is not None:
            reference = inputs.start_latent.float()
            if tuple(reference.shape) != shape:
                raise ValueError(f"start_latent has shape {tuple(reference.shape)}, the output needs {shape}")
        elif inputs.start_reference is None:
            raise ValueError(f"start={settings.start!r} needs a start reference image (or start='noise')")
        else:
            reference = encode_lr_latent(
                vae, inputs.start_reference, generator, sample=settings.start_encoding == "sample"
            ).float()
    latents = stepper.start(reference, shape, generator, device)
    guided_channels = inputs.guided_channels
    if guided_channels is None:
        guided_channels = shape[1]  # learned-variance channels (if any) are never guided

    for i in tqdm(
        range(stepper.num_steps), desc="sampling", unit="step", leave=False, disable=not settings.progress
    ):
        if inputs.before_step is not None:
            inputs.before_step(i, stepper.noise_level(i))
        model_input, t = stepper.model_input(latents, i, generator)
        tile_fn = partial(
            _guided_tile,
            denoise=denoise,
            t=t,
            cond=inputs.cond,
            uncond=inputs.uncond,
            scale=stepper.guidance_scale(i, settings.guidance_scale),
            guided_channels=guided_channels,
        )
        output = tiled_apply(
            tile_fn,
            model_input,
            settings.latent_tile,
            settings.latent_tile_overlap,
            weights="gaussian",
            crop_conditions=inputs.spatial,
            needs_tiling=area_exceeds_tile,
            symmetric=settings.symmetric_tile_weights,
        )
        latents = stepper.step(output.to(latents.dtype), i, latents, generator)

    image = inputs.decode(latents) if inputs.decode is not None else decode_latents(vae, latents)
    if inputs.color_reference is None:
        return image
    return apply_color_fix(image, inputs.color_reference.float(), settings.color_fix)


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
    """SeeSR's whole test path for an LR batch ``lq`` ``(B, 3, h, w)`` in ``[0, 1]``: ``(B, 3, h*s, w*s)``.

    :func:`upscale_for_sampling` -> :func:`sample` with ``lr_up`` as the spatial condition ``image``, the start
    and the colour reference -> :func:`resize_bicubic` to ``(h * s, w * s)`` with ``s = settings.upscale`` (the
    colour fix happens before that final resize, as in ``test_seesr.py``).
    """
    settings = settings or SamplingSettings()
    lr_up, size = upscale_for_sampling(lq, settings.upscale, settings.process_size)
    inputs = SamplingInputs(
        cond, uncond, spatial={"image": lr_up}, start_reference=lr_up, color_reference=lr_up
    )
    return resize_bicubic(sample(denoise, inputs, vae, scheduler, settings, generator), size)
