"""The Real-ESRGAN second-order degradation as one batched, device-agnostic module.

Reference: Real-ESRGAN (Wang et al., ICCVW 2021) §3.2; official code xinntao/Real-ESRGAN
``realesrgan/data/realesrgan_dataset.py`` (kernels) + ``realesrgan/models/realesrgan_model.py``
(``feed_data``) on BasicSR's ops. cswry/SeeSR ``utils_data/make_paired_data.py``, qyp2000/XPSR
``utils_data/make_train.py`` and shallowdream204/DreamClear ``tools/make_paired_data.py`` use the same
numbers (docs/references.md).

Usage::

    deg = RealESRGANDegradation.from_preset("realesrgan")       # configs/degradation/realesrgan.yaml
    out = deg(hq, generator=torch.Generator(hq.device).manual_seed(0))
    out.lq   # (B, 3, H/4, W/4), quantised to 1/255 steps
    out.gt   # USM-sharpened hq (the training target), or hq when usm_sharpen_gt is False

Random draws and their granularity (as in ``realesrgan_model.py``'s ``feed_data``). By default
(``per_sample=False``) the draws follow the reference exactly: kernels, noise strengths, gray flags and
JPEG qualities are per sample, while the resize direction/scale/mode, Gaussian-vs-Poisson choice,
second-blur coin and final-stage order are drawn once per batch (a batch must keep one spatial size).
Real-ESRGAN decorrelates batches afterwards with a 180-pair pool. ``per_sample=True`` draws *everything*
per sample and degrades the samples one by one: the per-image marginal distribution is unchanged, but a
small batch (SeeSR/StableSR train with 2–6 images per GPU and no pool) then no longer shares one resize
scale and one noise family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from restore.data.degradation.filtering import USMSharpen, blur_per_sample
from restore.data.degradation.jpeg import JPEGCompression
from restore.data.degradation.kernels import (
    KernelBatch,
    KernelSpec,
    sample_blur_kernels,
    sample_final_sinc_kernels,
)
from restore.data.degradation.noise import add_noise, gaussian_noise, poisson_noise

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
_DEFAULT_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_DEFAULT_TYPE_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


@dataclass(frozen=True)
class DegradationConfig:
    """Options in BasicSR/Real-ESRGAN names. Defaults: Real-ESRGAN x4plus
    (xinntao/Real-ESRGAN ``options/train_realesrgan_x4plus.yml``; identical in SeeSR's
    ``utils_data/make_paired_data.py``)."""

    scale: int = 4
    # first degradation stage
    resize_prob: Sequence[float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: Sequence[float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Sequence[float] = (1.0, 30.0)
    poisson_scale_range: Sequence[float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Sequence[float] = (30.0, 95.0)
    kernel_list: Sequence[str] = _DEFAULT_TYPES
    kernel_prob: Sequence[float] = _DEFAULT_TYPE_PROBS
    sinc_prob: float = 0.1
    blur_sigma: Sequence[float] = (0.2, 3.0)
    betag_range: Sequence[float] = (0.5, 4.0)
    betap_range: Sequence[float] = (1.0, 2.0)
    # second degradation stage
    second_blur_prob: float = 0.8
    resize_prob2: Sequence[float] = (0.3, 0.4, 0.3)
    resize_range2: Sequence[float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Sequence[float] = (1.0, 25.0)
    poisson_scale_range2: Sequence[float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Sequence[float] = (30.0, 95.0)
    kernel_list2: Sequence[str] = _DEFAULT_TYPES
    kernel_prob2: Sequence[float] = _DEFAULT_TYPE_PROBS
    sinc_prob2: float = 0.1
    blur_sigma2: Sequence[float] = (0.2, 1.5)
    betag_range2: Sequence[float] = (0.5, 4.0)
    betap_range2: Sequence[float] = (1.0, 2.0)
    # final stage
    final_sinc_prob: float = 0.8
    # around the pipeline
    usm_sharpen_gt: bool = True  # LR is synthesised from the USM'd GT, which is also the L1 target
    round_output: bool = True  # lq = round(255·lq)/255 (Real-ESRGAN yes; StableSR clamps only)
    per_sample: bool = False  # see module docstring

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, f.name, tuple(value))  # YAML lists -> hashable tuples
        for name in ("resize_prob", "resize_prob2"):
            probs = getattr(self, name)
            if len(probs) != 3 or min(probs) < 0 or sum(probs) <= 0:
                raise ValueError(f"{name} must be three non-negative weights (up, down, keep), got {probs}")
        for name in ("resize_range", "resize_range2"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= 1 <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= 1 <= high, got {(lo, hi)}")
        if self.scale < 1:
            raise ValueError(f"scale must be a positive integer, got {self.scale}")

    def kernel_spec(self, stage: int) -> KernelSpec:
        suffix = "" if stage == 1 else "2"
        return KernelSpec(
            kernel_list=getattr(self, f"kernel_list{suffix}"),
            kernel_prob=getattr(self, f"kernel_prob{suffix}"),
            sinc_prob=getattr(self, f"sinc_prob{suffix}"),
            blur_sigma=getattr(self, f"blur_sigma{suffix}"),
            betag_range=getattr(self, f"betag_range{suffix}"),
            betap_range=getattr(self, f"betap_range{suffix}"),
        )


@dataclass
class StageParams:
    """Draws of one degradation stage. Tensors are per sample (B,), plain values per batch."""

    resize_direction: str  # "up" | "down" | "keep"
    resize_scale: float
    resize_mode: str
    gaussian: bool  # Gaussian (True) or Poisson noise
    noise_sigma: Tensor  # Gaussian σ on the 0..255 scale
    poisson_scale: Tensor
    gray_noise: Tensor  # 0/1
    jpeg_quality: Tensor


@dataclass
class DegradationParams:
    """Every random choice of one call except the noise fields themselves."""

    kernel1: KernelBatch
    kernel2: KernelBatch
    sinc: KernelBatch
    stage1: StageParams
    stage2: StageParams
    second_blur: bool
    final_resize_mode: str
    sinc_then_jpeg: bool  # final order (a): resize → sinc → JPEG; else (b): JPEG → resize → sinc
    extras: dict = field(default_factory=dict)


class DegradationOutput(NamedTuple):
    lq: Tensor  # (B, 3, H/scale, W/scale)
    gt: Tensor  # training target: USM-sharpened input, or the input itself


def _rand(generator: torch.Generator | None, device: torch.device, n: int = 1) -> Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def _choice(generator, device, probs: Sequence[float]) -> int:
    cdf = torch.cumsum(torch.tensor(probs, dtype=torch.float64, device=device) / sum(probs), 0)
    return min(int(torch.searchsorted(cdf, _rand(generator, device), right=True).item()), len(probs) - 1)


class RealESRGANDegradation(torch.nn.Module):
    """Real-ESRGAN second-order degradation of a float batch ``hq`` (B, 3, H, W) in [0, 1].

    Build from keyword options (``DegradationConfig`` names), a preset name, or a Hydra config. Runs
    wherever ``hq`` lives (move the module with ``.to(device)``), always without gradients.
    """

    def __init__(self, **options) -> None:
        super().__init__()
        valid = {f.name for f in fields(DegradationConfig)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"unknown degradation option(s) {unknown}; valid options: {sorted(valid)}")
        self.config = DegradationConfig(**options)
        self.usm = USMSharpen()
        self.jpeg = JPEGCompression()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RealESRGANDegradation:
        """Build from ``configs/degradation/<name>.yaml`` (e.g. ``realesrgan``, ``stablesr_mild``)."""
        from omegaconf import OmegaConf

        from restore import CONFIG_DIR

        path = Path(CONFIG_DIR) / "degradation" / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise FileNotFoundError(f"no degradation preset {name!r} ({path}); available: {available}")
        options = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        options.pop("_target_", None)
        options.update(overrides)
        return cls(**options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

    # ------------------------------------------------------------------ random draws
    def _stage_params(self, batch: int, stage: int, generator, device) -> StageParams:
        c = self.config
        suffix = "" if stage == 1 else "2"
        direction = ("up", "down", "keep")[_choice(generator, device, getattr(c, f"resize_prob{suffix}"))]
        lo, hi = getattr(c, f"resize_range{suffix}")
        u = float(_rand(generator, device).item())
        scale = {"up": 1 + (hi - 1) * u, "down": lo + (1 - lo) * u, "keep": 1.0}[direction]
        mode = RESIZE_MODES[int(torch.randint(3, (1,), generator=generator, device=device).item())]
        gaussian = bool(_rand(generator, device).item() < getattr(c, f"gaussian_noise_prob{suffix}"))
        s_lo, s_hi = getattr(c, f"noise_range{suffix}")
        p_lo, p_hi = getattr(c, f"poisson_scale_range{suffix}")
        q_lo, q_hi = getattr(c, f"jpeg_range{suffix}")
        return StageParams(
            resize_direction=direction,
            resize_scale=scale,
            resize_mode=mode,
            gaussian=gaussian,
            noise_sigma=s_lo + (s_hi - s_lo) * _rand(generator, device, batch),
            poisson_scale=p_lo + (p_hi - p_lo) * _rand(generator, device, batch),
            gray_noise=(_rand(generator, device, batch) < getattr(c, f"gray_noise_prob{suffix}")).double(),
            jpeg_quality=q_lo + (q_hi - q_lo) * _rand(generator, device, batch),
        )

    def sample_params(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> DegradationParams:
        """Draw all per-batch and per-sample choices for a batch of ``batch`` images."""
        device = torch.device(device) if device is not None else (generator.device if generator else "cpu")
        c = self.config
        kernel1 = sample_blur_kernels(batch, c.kernel_spec(1), generator, device)
        kernel2 = sample_blur_kernels(batch, c.kernel_spec(2), generator, device)
        sinc = sample_final_sinc_kernels(batch, c.final_sinc_prob, generator, device)
        stage1 = self._stage_params(batch, 1, generator, device)
        second_blur = bool(_rand(generator, device).item() < c.second_blur_prob)
        stage2 = self._stage_params(batch, 2, generator, device)
        final_mode = RESIZE_MODES[int(torch.randint(3, (1,), generator=generator, device=device).item())]
        sinc_then_jpeg = bool(_rand(generator, device).item() < 0.5)
        return DegradationParams(
            kernel1, kernel2, sinc, stage1, stage2, second_blur, final_mode, sinc_then_jpeg
        )

    # ------------------------------------------------------------------ deterministic application
    def _noise_and_jpeg(self, out: Tensor, p: StageParams, generator) -> Tensor:
        if p.gaussian:
            noise = gaussian_noise(out, p.noise_sigma, p.gray_noise, generator)
        else:
            noise = poisson_noise(out, p.poisson_scale, p.gray_noise, generator)
        out = add_noise(out, noise)
        return self.jpeg(torch.clamp(out, 0, 1), p.jpeg_quality.to(out.dtype))

    def apply(
        self, hq: Tensor, params: DegradationParams, generator: torch.Generator | None = None
    ) -> DegradationOutput:
        """Degrade ``hq`` with fixed ``params``; only the noise fields are drawn (from ``generator``)."""
        c = self.config
        h, w = hq.shape[-2:]
        gt = self.usm(hq) if c.usm_sharpen_gt else hq
        # stage 1: blur → resize (scale factor of the input) → noise → JPEG
        out = blur_per_sample(gt, params.kernel1.kernels.to(hq), params.kernel1.sizes)
        s1 = params.stage1
        if s1.resize_scale != 1.0:  # every mode is the identity at scale 1
            out = F.interpolate(out, scale_factor=s1.resize_scale, mode=s1.resize_mode)
        out = self._noise_and_jpeg(out, s1, generator)
        # stage 2: optional blur → resize relative to the final LR size → noise (JPEG comes in the final stage)
        if params.second_blur:
            out = blur_per_sample(out, params.kernel2.kernels.to(hq), params.kernel2.sizes)
        s2 = params.stage2
        size2 = (int(h / c.scale * s2.resize_scale), int(w / c.scale * s2.resize_scale))
        out = F.interpolate(out, size=size2, mode=s2.resize_mode)
        if s2.gaussian:
            noise = gaussian_noise(out, s2.noise_sigma, s2.gray_noise, generator)
        else:
            noise = poisson_noise(out, s2.poisson_scale, s2.gray_noise, generator)
        out = add_noise(out, noise)
        # final stage, in random order: (a) resize → sinc → JPEG or (b) JPEG → resize → sinc
        lr_size = (h // c.scale, w // c.scale)
        quality = s2.jpeg_quality.to(out.dtype)
        if params.sinc_then_jpeg:
            out = F.interpolate(out, size=lr_size, mode=params.final_resize_mode)
            out = blur_per_sample(out, params.sinc.kernels.to(hq), params.sinc.sizes)
            out = self.jpeg(torch.clamp(out, 0, 1), quality)
        else:
            out = self.jpeg(torch.clamp(out, 0, 1), quality)
            out = F.interpolate(out, size=lr_size, mode=params.final_resize_mode)
            out = blur_per_sample(out, params.sinc.kernels.to(hq), params.sinc.sizes)
        out = torch.clamp(out, 0, 1)
        if c.round_output:
            out = torch.round(out * 255.0) / 255.0
        return DegradationOutput(lq=out, gt=gt)

    # ------------------------------------------------------------------ entry point
    @torch.no_grad()
    def forward(self, hq: Tensor, generator: torch.Generator | None = None) -> DegradationOutput:
        if hq.ndim != 4 or hq.shape[1] != 3:
            raise ValueError(f"expected an RGB batch (B, 3, H, W) in [0, 1], got shape {tuple(hq.shape)}")
        if not hq.is_floating_point():
            raise TypeError(f"expected a float tensor in [0, 1], got {hq.dtype}; divide uint8 images by 255")
        h, w = hq.shape[-2:]
        if h % self.config.scale or w % self.config.scale:
            raise ValueError(f"HR size {h}x{w} is not divisible by scale {self.config.scale}; crop it first")
        self.check_input_size(h, w)
        device = generator.device if generator is not None else hq.device
        params = self.draw(hq.shape[0], generator, device)
        if len(params) == 1:
            return self.apply(hq, params[0], generator)
        outs = [self.apply(hq[i : i + 1], p, generator) for i, p in enumerate(params)]
        return DegradationOutput(lq=torch.cat([o.lq for o in outs]), gt=torch.cat([o.gt for o in outs]))

    def draw(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> list[DegradationParams]:
        """The parameter sets of one call: one for the whole batch (reference granularity), or one per
        sample when ``per_sample`` is set (then every per-batch choice is drawn per image)."""
        if self.config.per_sample:
            return [self.sample_params(1, generator, device) for _ in range(batch)]
        return [self.sample_params(batch, generator, device)]

    def check_input_size(self, h: int, w: int) -> None:
        """Reflect padding needs every blurred image larger than the kernel radius: the HR input (USM,
        radius 25), the stage-1 output (blur 2, radius 10) and the LR output (final sinc, radius 10)."""
        c = self.config
        side = min(h, w)
        if side <= 25 or math.floor(side * c.resize_range[0]) <= 10 or side // c.scale <= 10:
            need = max(26, math.ceil(11 / c.resize_range[0]), 11 * c.scale)
            raise ValueError(
                f"HR crops of {h}x{w} px are too small for this degradation (reflect padding of the blur "
                f"kernels needs every blurred intermediate image > 10 px): use crops of at least {need} px."
            )
