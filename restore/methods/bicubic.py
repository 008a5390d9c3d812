"""Bicubic upsampling: the trivial baseline column of every SR table (``eval.py method=bicubic``).

It has no weights and implements the evaluation interface every method offers:
``restore(lq: (B, 3, h, w) in [0, 1]) -> (B, 3, h * scale, w * scale)``.

Two conventions exist, both exact here (magnifying involves no antialiasing):

- ``kernel="opencv"``: cubic ``a = -0.75``, borders replicated = OpenCV ``INTER_CUBIC`` = PyTorch's bicubic,
  the baseline of BasicSR and of the diffusion-SR repos' Python scripts;
- ``kernel="matlab"``: Keys cubic ``a = -0.5``, borders mirrored = MATLAB ``imresize`` (and BasicSR's
  ``matlab_functions.imresize``), the baseline of tables computed in MATLAB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BicubicUpsampler"]


def _cubic(x: Tensor, a: float) -> Tensor:
    ax = x.abs()
    near = ((a + 2) * ax - (a + 3)) * ax * ax + 1
    far = ((a * ax - 5 * a) * ax + 8 * a) * ax - 4 * a
    return torch.where(ax <= 1, near, torch.where(ax < 2, far, torch.zeros_like(ax)))


def _upsample_matrix(n: int, scale: int, a: float, dtype: torch.dtype) -> Tensor:
    """(n * scale, n) interpolation matrix with MATLAB's border rule (taps outside mirrored: -1 -> 0)."""
    out = torch.arange(n * scale, dtype=torch.float64)
    center = (out + 0.5) / scale - 0.5
    left = torch.floor(center) - 1
    taps = left[:, None] + torch.arange(4, dtype=torch.float64)
    weights = _cubic(center[:, None] - taps, a)
    weights = weights / weights.sum(dim=1, keepdim=True)
    index = taps.long()
    index = torch.where(index < 0, -index - 1, index)
    index = torch.where(index > n - 1, 2 * n - 1 - index, index).clamp(0, n - 1)
    matrix = torch.zeros(n * scale, n, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights)
    return matrix.to(dtype)


KERNELS = ("opencv", "matlab")


class BicubicUpsampler(nn.Module):
    """Bicubic ×``scale`` upsampling in the ``kernel`` convention (see module doc); output clamped to [0, 1]."""

    requires_weights = False

    def __init__(self, scale: int = 4, kernel: str = "opencv") -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.scale = scale
        self.kernel = kernel

    @torch.no_grad()
    def restore(self, lq: Tensor) -> Tensor:
        if self.kernel == "opencv":
            sr = F.interpolate(lq, scale_factor=self.scale, mode="bicubic", align_corners=False)
        else:
            h, w = lq.shape[-2:]
            rows = _upsample_matrix(h, self.scale, -0.5, torch.float64).to(lq.device)
            cols = _upsample_matrix(w, self.scale, -0.5, torch.float64).to(lq.device)
            sr = (rows @ lq.double() @ cols.T).to(lq.dtype)
        return sr.clamp(0, 1)

    def forward(self, lq: Tensor) -> Tensor:
        return self.restore(lq)
