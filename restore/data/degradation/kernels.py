"""Blur-kernel synthesis for the Real-ESRGAN degradation, batched in torch.

Reference: Real-ESRGAN (Wang et al., ICCVW 2021) §3.1 (blur) and §3.3 (sinc filters); official code
XPixelGroup/BasicSR ``basicsr/data/degradations.py`` (``random_mixed_kernels`` / ``circular_lowpass_kernel``)
and the dataset-side kernel sampling of xinntao/Real-ESRGAN ``realesrgan/data/realesrgan_dataset.py``
(docs/references.md). BasicSR builds one kernel
at a time in numpy inside each Dataset worker; here a whole batch is built at once on any device from a
``torch.Generator``. Kernels are computed in float64 (as numpy does) and returned as float32, zero-padded
to ``MAX_KERNEL_SIZE`` x ``MAX_KERNEL_SIZE`` like the reference, plus each kernel's true support size so
that the blur can skip the zero border.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy import special
from torch import Tensor

#: Real-ESRGAN draws the support uniformly from these odd sizes (hard-coded there; ``blur_kernel_size``
#: options in its YAML files are ignored).
KERNEL_SIZES: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
MAX_KERNEL_SIZE = 21

#: Kernel families of ``random_mixed_kernels``, in BasicSR's naming.
KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


@dataclass(frozen=True)
class KernelSpec:
    """Distribution of one blur kernel (one Real-ESRGAN stage), in BasicSR option names."""

    kernel_list: Sequence[str]
    kernel_prob: Sequence[float]
    sinc_prob: float
    blur_sigma: Sequence[float]
    betag_range: Sequence[float]
    betap_range: Sequence[float]


@dataclass
class KernelBatch:
    """Per-sample kernels and the parameters they were built from (kept for tests and debugging)."""

    kernels: Tensor  # (B, 21, 21) float32, each sums to 1
    sizes: Tensor  # (B,) int64 true support size (odd, 7..21); 1 for the identity pulse
    is_sinc: Tensor  # (B,) bool
    kernel_type: Tensor  # (B,) int64 index into KERNEL_TYPES (meaningless where is_sinc)
    sigma_x: Tensor  # (B,) float64
    sigma_y: Tensor
    theta: Tensor
    beta: Tensor
    omega: Tensor  # sinc cutoff (meaningless where not is_sinc)


def _offsets(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Integer grid centred at zero; ``x`` varies along columns as in numpy's ``meshgrid``."""
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64, device=device)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _support_mask(sizes: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """(B, K, K) mask of the centred ``size x size`` window of each kernel."""
    half = (sizes.to(torch.float64) // 2).view(-1, 1, 1)
    return (xx.abs() <= half) & (yy.abs() <= half)


def _quadratic_form(sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """``[x y] Σ⁻¹ [x y]ᵀ`` with ``Σ = R(θ) diag(σx², σy²) R(θ)ᵀ`` (BasicSR ``sigma_matrix2``)."""
    c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    inv_x2 = 1.0 / sigma_x.view(-1, 1, 1) ** 2
    inv_y2 = 1.0 / sigma_y.view(-1, 1, 1) ** 2
    # Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ
    a = c * c * inv_x2 + s * s * inv_y2
    b = c * s * (inv_x2 - inv_y2)
    d = s * s * inv_x2 + c * c * inv_y2
    return a * xx * xx + 2 * b * xx * yy + d * yy * yy


def _exp_no_denormals(x: Tensor) -> Tensor:
    """``exp(x)`` with results below ~1e-304 set to 0.

    Narrow Gaussians underflow to denormals in their tails (σ = 0.2 at 10 px gives exp(−1250)), and
    denormal arithmetic is ~100x slower on x86 CPUs; the values differ from numpy's by < 1e-300.
    """
    return torch.where(x > -700.0, torch.exp(x.clamp(min=-700.0)), torch.zeros_like(x))


def mixed_kernels(
    kernel_type: Tensor,
    sizes: Tensor,
    sigma_x: Tensor,
    sigma_y: Tensor,
    theta: Tensor,
    beta: Tensor,
    pad_to: int = MAX_KERNEL_SIZE,
) -> Tensor:
    """Gaussian / generalized Gaussian / plateau kernels for given parameters, (B, pad_to, pad_to) float64.

    Isotropic types ignore ``sigma_y`` and ``theta`` (σy = σx, θ = 0), as BasicSR does.
    Each kernel is normalised over its ``size x size`` support and zero elsewhere.
    """
    xx, yy = _offsets(pad_to, sizes.device)
    isotropic = (kernel_type % 2 == 0).view(-1)  # iso, generalized_iso, plateau_iso sit at even indices
    sy = torch.where(isotropic, sigma_x, sigma_y)
    th = torch.where(isotropic, torch.zeros_like(theta), theta)
    q = _quadratic_form(sigma_x, sy, th, xx, yy)
    b = beta.view(-1, 1, 1)
    family = (kernel_type // 2).view(-1, 1, 1)  # 0 gaussian, 1 generalized, 2 plateau
    kernel = torch.where(
        family == 0,
        _exp_no_denormals(-0.5 * q),
        torch.where(family == 1, _exp_no_denormals(-0.5 * q.pow(b)), 1.0 / (q.pow(b) + 1.0)),
    )
    kernel = kernel * _support_mask(sizes, xx, yy)
    return kernel / kernel.sum(dim=(1, 2), keepdim=True)


def _bessel_j1(x: Tensor) -> Tensor:
    """Bessel J1 via scipy (what BasicSR uses): ``torch.special.bessel_j1`` is only ~1e-8 accurate.

    A batch needs B·441 values, so the host round trip costs nothing measurable even on GPU.
    """
    return torch.from_numpy(special.j1(x.detach().cpu().numpy())).to(x.device)


def circular_lowpass_kernels(omega: Tensor, sizes: Tensor, pad_to: int = MAX_KERNEL_SIZE) -> Tensor:
    """2-D circular low-pass ("sinc", jinc) kernels ``ω J1(ω r) / (2π r)``, centre ``ω²/(4π)``.

    BasicSR ``circular_lowpass_kernel``; (B, pad_to, pad_to) float64, normalised over each support.
    """
    xx, yy = _offsets(pad_to, sizes.device)
    r = torch.sqrt(xx * xx + yy * yy)
    w = omega.view(-1, 1, 1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = w * _bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r == 0, w * w / (4 * math.pi), kernel)
    kernel = kernel * _support_mask(sizes, xx, yy)
    return kernel / kernel.sum(dim=(1, 2), keepdim=True)


def pulse_kernels(batch: int, device: torch.device, pad_to: int = MAX_KERNEL_SIZE) -> Tensor:
    """Identity kernels (a centred unit impulse), used when the final sinc filter is not applied."""
    k = torch.zeros(batch, pad_to, pad_to, dtype=torch.float64, device=device)
    k[:, pad_to // 2, pad_to // 2] = 1.0
    return k


def _uniform(n: int, low: float, high: Tensor | float, generator: torch.Generator | None, device) -> Tensor:
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return low + (high - low) * u


def _two_sided_beta(n: int, beta_range: Sequence[float], generator, device) -> Tensor:
    """β ~ U(lo, 1) with p 0.5 else U(1, hi): BasicSR's rule (so β = 1 exactly half the time if hi = 1)."""
    lo, hi = float(beta_range[0]), float(beta_range[1])
    below = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < 0.5
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return torch.where(below, lo + (1.0 - lo) * u, 1.0 + (hi - 1.0) * u)


def _categorical(n: int, probs: Sequence[float], generator, device) -> Tensor:
    """Draw indices with ``probs`` (normalised like python's ``random.choices`` weights)."""
    p = torch.tensor([float(x) for x in probs], dtype=torch.float64, device=device)
    cdf = torch.cumsum(p / p.sum(), 0)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(probs) - 1)


def sample_blur_kernels(
    batch: int, spec: KernelSpec, generator: torch.Generator | None = None, device=None
) -> KernelBatch:
    """Draw one Real-ESRGAN blur kernel per sample (as ``RealESRGANDataset.__getitem__`` does per stage).

    Size ~ U{7..21 odd}; with ``sinc_prob`` a circular low-pass kernel with ω ~ U(π/3, π) for sizes < 13
    else U(π/5, π); otherwise a ``random_mixed_kernels`` draw: family ~ Categorical(kernel_prob),
    σx, σy ~ U(blur_sigma), θ ~ U(−π, π), β by the two-sided rule with ``betag_range`` (generalized)
    or ``betap_range`` (plateau). All parameters are drawn for every sample and then selected, which
    keeps the call vectorised without changing any marginal distribution.
    """
    device = torch.device(device) if device is not None else (generator.device if generator else "cpu")
    unknown = set(spec.kernel_list) - set(KERNEL_TYPES)
    if unknown:
        raise ValueError(f"unknown kernel types {sorted(unknown)}; valid: {list(KERNEL_TYPES)}")
    if len(spec.kernel_list) != len(spec.kernel_prob):
        raise ValueError("kernel_list and kernel_prob must have the same length")

    size_table = torch.tensor(KERNEL_SIZES, device=device)
    sizes = size_table[torch.randint(len(KERNEL_SIZES), (batch,), generator=generator, device=device)]
    is_sinc = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) < spec.sinc_prob
    omega_low = torch.where(sizes < 13, math.pi / 3, math.pi / 5).to(torch.float64)
    omega = omega_low + (math.pi - omega_low) * torch.rand(
        batch, generator=generator, device=device, dtype=torch.float64
    )

    choice = _categorical(batch, spec.kernel_prob, generator, device)
    type_index = torch.tensor([KERNEL_TYPES.index(t) for t in spec.kernel_list], device=device)
    kernel_type = type_index[choice]
    s_lo, s_hi = float(spec.blur_sigma[0]), float(spec.blur_sigma[1])
    sigma_x = _uniform(batch, s_lo, s_hi, generator, device)
    sigma_y = _uniform(batch, s_lo, s_hi, generator, device)
    theta = _uniform(batch, -math.pi, math.pi, generator, device)
    beta_g = _two_sided_beta(batch, spec.betag_range, generator, device)
    beta_p = _two_sided_beta(batch, spec.betap_range, generator, device)
    family = kernel_type // 2
    beta = torch.where(family == 1, beta_g, torch.where(family == 2, beta_p, torch.ones_like(beta_g)))

    kernels = torch.where(
        is_sinc.view(-1, 1, 1),
        circular_lowpass_kernels(omega, sizes),
        mixed_kernels(kernel_type, sizes, sigma_x, sigma_y, theta, beta),
    )
    return KernelBatch(
        kernels=kernels.float(),
        sizes=sizes,
        is_sinc=is_sinc,
        kernel_type=kernel_type,
        sigma_x=sigma_x,
        sigma_y=sigma_y,
        theta=theta,
        beta=beta,
        omega=omega,
    )


def sample_final_sinc_kernels(
    batch: int, final_sinc_prob: float, generator: torch.Generator | None = None, device=None
) -> KernelBatch:
    """Final sinc filter (as ``RealESRGANDataset``): with ``final_sinc_prob`` a circular low-pass kernel of
    size ~ U{7..21 odd} and ω ~ U(π/3, π) (no size-dependent range), else a 21x21 unit impulse."""
    device = torch.device(device) if device is not None else (generator.device if generator else "cpu")
    apply = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) < final_sinc_prob
    size_table = torch.tensor(KERNEL_SIZES, device=device)
    sizes = size_table[torch.randint(len(KERNEL_SIZES), (batch,), generator=generator, device=device)]
    omega = _uniform(batch, math.pi / 3, math.pi, generator, device)
    kernels = torch.where(
        apply.view(-1, 1, 1), circular_lowpass_kernels(omega, sizes), pulse_kernels(batch, device)
    )
    nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
    return KernelBatch(
        kernels=kernels.float(),
        sizes=torch.where(apply, sizes, torch.ones_like(sizes)),
        is_sinc=apply,
        kernel_type=torch.full((batch,), -1, device=device),
        sigma_x=nan,
        sigma_y=nan,
        theta=nan,
        beta=nan,
        omega=omega,
    )
