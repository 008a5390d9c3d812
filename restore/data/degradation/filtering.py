"""Spatial filtering for the degradation: per-sample blur and USM sharpening.

Semantics follow BasicSR's ``filter2D`` / ``USMSharp`` (XPixelGroup/BasicSR
``basicsr/utils/img_process_util.py``): cross-correlation (no kernel flip) with reflect-101 borders (torch
``reflect`` == OpenCV ``BORDER_REFLECT_101``).

Where the time goes (profile in BENCHMARKS.md, "Real-ESRGAN degradation"): BasicSR's USM convolves the HR
batch twice with a dense 51x51 kernel, most of its pipeline's time on CPU. The Gaussian is separable, so we
filter rows then columns; on CPU OpenCV's SIMD ``sepFilter2D`` does that ~50x faster than a dense ``conv2d``
with the same values (to float32 rounding), on GPU two 1-D convolutions. Per-sample blur kernels are
zero-padded to 21x21 by the reference; convolving with the non-zero support and a matching reflect pad gives
the same values (reflection does not depend on the pad width), so a batch is blurred with kernels cropped to
its largest support, and a batch of identity pulses is skipped.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _check_reflect_size(img: Tensor, pad: int, what: str) -> None:
    h, w = img.shape[-2:]
    if pad >= h or pad >= w:
        raise ValueError(
            f"{what}: image of {h}x{w} px is too small for reflect padding of {pad} px; "
            "use larger HR crops (Real-ESRGAN uses 400, SeeSR/StableSR 512)."
        )


def filter2d(img: Tensor, kernel: Tensor) -> Tensor:
    """BasicSR ``filter2D``: reflect-pad by k//2 and cross-correlate with a (1|B, k, k) kernel."""
    k = kernel.shape[-1]
    if k % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {k}")
    b, c, h, w = img.shape
    _check_reflect_size(img, k // 2, "filter2d")
    padded = F.pad(img.contiguous(), (k // 2,) * 4, mode="reflect")
    kernel = kernel.to(img.dtype)
    if kernel.shape[0] == 1:
        out = F.conv2d(padded.view(b * c, 1, h + k - 1, w + k - 1), kernel.view(1, 1, k, k))
        return out.view(b, c, h, w)
    weight = kernel.view(b, 1, k, k).repeat_interleave(c, dim=0)
    out = F.conv2d(padded.view(1, b * c, h + k - 1, w + k - 1), weight, groups=b * c)
    return out.view(b, c, h, w)


def blur_per_sample(img: Tensor, kernels: Tensor, sizes: Tensor) -> Tensor:
    """Blur sample i with its own kernel; equals ``filter2d(img, kernels)`` on the zero-padded kernels.

    All kernels are cropped to the largest true support in the batch (see module docstring) and applied
    in one grouped convolution, which on CPU is ~5x faster than one call per sample; a batch of identity
    pulses (support 1) is returned as is.
    """
    full = kernels.shape[-1]
    support = int(sizes.max().item())
    if support <= 1:
        return img
    lo = (full - support) // 2
    return filter2d(img, kernels[:, lo : lo + support, lo : lo + support])


def gaussian_kernel_1d(size: int, sigma: float = 0.0) -> Tensor:
    """OpenCV ``getGaussianKernel``: σ = 0.3·((size−1)/2 − 1) + 0.8 when ``sigma <= 0`` (σ = 8 for 51)."""
    return torch.from_numpy(cv2.getGaussianKernel(size, sigma).astype(np.float32).reshape(-1))


def separable_blur(img: Tensor, kernel_1d: Tensor) -> Tensor:
    """Blur every channel with the outer product of ``kernel_1d`` with itself (reflect-101 borders)."""
    k = kernel_1d.numel()
    _check_reflect_size(img, k // 2, "separable_blur")
    if img.device.type == "cpu" and img.dtype == torch.float32:
        taps = kernel_1d.numpy().astype(np.float32)
        src = img.contiguous().numpy()
        dst = np.empty_like(src)
        for i in range(src.shape[0]):
            for j in range(src.shape[1]):
                dst[i, j] = cv2.sepFilter2D(src[i, j], -1, taps, taps, borderType=cv2.BORDER_REFLECT_101)
        return torch.from_numpy(dst)
    b, c, h, w = img.shape
    taps = kernel_1d.to(device=img.device, dtype=img.dtype)
    x = F.pad(img.contiguous(), (k // 2,) * 4, mode="reflect").view(b * c, 1, h + k - 1, w + k - 1)
    x = F.conv2d(x, taps.view(1, 1, k, 1))
    x = F.conv2d(x, taps.view(1, 1, 1, k))
    return x.view(b, c, h, w)


class USMSharpen(torch.nn.Module):
    """Unsharp masking of the GT (BasicSR ``USMSharp``, applied first in Real-ESRGAN's ``feed_data``).

    ``blur`` = Gaussian(radius 51, σ 8) of I; ``mask`` = |I − blur|·255 > threshold; ``soft`` = same
    blur of the mask; ``out = soft·clip(I + weight·(I − blur), 0, 1) + (1 − soft)·I``.
    Defaults are BasicSR's (radius 50 → 51, weight 0.5, threshold 10).
    """

    def __init__(self, radius: int = 50, sigma: float = 0.0) -> None:
        super().__init__()
        if radius % 2 == 0:
            radius += 1
        self.register_buffer("kernel_1d", gaussian_kernel_1d(radius, sigma), persistent=False)

    def forward(self, img: Tensor, weight: float = 0.5, threshold: float = 10.0) -> Tensor:
        blur = separable_blur(img, self.kernel_1d)
        residual = img - blur
        mask = (torch.abs(residual) * 255 > threshold).to(img.dtype)
        soft_mask = separable_blur(mask, self.kernel_1d)
        sharp = torch.clamp(img + weight * residual, 0, 1)
        return soft_mask * sharp + (1 - soft_mask) * img
