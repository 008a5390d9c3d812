"""Colour correction of a diffusion output against a reference image (AdaIN and wavelet).

Official code: cswry/SeeSR ``utils/wavelet_color_fix.py``, the same file as IceClear/StableSR
``scripts/wavelet_color_fix.py`` (copied by XPSR, DreamClear and SUPIR; docs/references.md). The same two
functions serve every method; only the reference differs: SeeSR/XPSR/StableSR use the bicubic-upscaled LR,
DreamClear the SwinIR output, SUPIR the stage-1 decode.

- AdaIN: each channel of ``image`` is shifted/scaled so that its spatial mean and std equal the reference's.
  The std is ``sqrt(unbiased variance + eps)`` for both images, as in the official code.
- Wavelet: an à-trous ("with holes") decomposition with the 3x3 kernel ``[1,2,1]^T [1,2,1] / 16`` at dilation
  ``2^i`` (``i = 0..levels-1``) and replicate padding. ``low`` is the result of the ``levels`` successive blurs,
  ``high = x - low`` (the sum of the per-level detail bands telescopes to that). The output keeps the high
  frequencies of ``image`` and takes the low frequencies of ``reference``.

Both clamp to ``[0, 1]`` (images are in ``[0, 1]``) and work on ``(B, 3, H, W)`` batches on any device. Half
precision inputs are computed in float32 (the blur's sums and the variance lose digits in fp16/bf16, and some
backends lack bf16 kernels for the padding) and returned in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adain_color_fix", "wavelet_blur", "wavelet_color_fix", "wavelet_decompose"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_pair(image: Tensor, reference: Tensor, same_size: bool) -> None:
    if image.ndim != 4 or reference.ndim != 4:
        raise ValueError(
            f"expected (B, C, H, W) tensors, got {tuple(image.shape)} and {tuple(reference.shape)}"
        )
    if image.shape[:2] != reference.shape[:2]:
        raise ValueError(f"batch/channels differ: {tuple(image.shape)} vs {tuple(reference.shape)}")
    if same_size and image.shape[-2:] != reference.shape[-2:]:
        raise ValueError(
            f"wavelet colour fix needs equal sizes: {tuple(image.shape)} vs {tuple(reference.shape)}"
        )


def _channel_mean_std(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2, unbiased=True) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(image: Tensor, reference: Tensor, eps: float = 1e-5, clamp: bool = True) -> Tensor:
    """Match the per-channel mean/std of ``image`` to those of ``reference`` (both ``(B, C, H, W)``).

    The sizes may differ (statistics are spatial means). ``clamp=False`` skips the final clamp to ``[0, 1]``.
    """
    _check_pair(image, reference, same_size=False)
    dtype = _compute_dtype(image)
    x, ref = image.to(dtype), reference.to(dtype)
    mean_x, std_x = _channel_mean_std(x, eps)
    mean_r, std_r = _channel_mean_std(ref, eps)
    out = (x - mean_x) / std_x * std_r + mean_r
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(image.dtype)


def wavelet_blur(x: Tensor, dilation: int) -> Tensor:
    """One à-trous level: 3x3 ``[[1,2,1],[2,4,2],[1,2,1]]/16`` blur with taps ``dilation`` apart, replicate pad."""
    channels = x.shape[1]
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(k1, k1) / 16.0).expand(channels, 1, 3, 3)
    padded = F.pad(x, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_decompose(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """``(high, low)`` with ``low`` = ``levels`` cascaded blurs at dilations 1, 2, 4, ... and ``high = x - low``."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    low = x
    for i in range(levels):
        low = wavelet_blur(low, 2**i)
    return x - low, low


def wavelet_color_fix(image: Tensor, reference: Tensor, levels: int = 5, clamp: bool = True) -> Tensor:
    """High frequencies of ``image`` + low frequencies of ``reference`` (same ``(B, C, H, W)`` shape)."""
    _check_pair(image, reference, same_size=True)
    dtype = _compute_dtype(image)
    high, _ = wavelet_decompose(image.to(dtype), levels)
    _, low = wavelet_decompose(reference.to(dtype), levels)
    out = high + low
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(image.dtype)
