"""Gaussian and Poisson (shot) noise with BasicSR's batch semantics (XPixelGroup/BasicSR
``basicsr/data/degradations.py``, ``random_add_{gaussian,poisson}_noise_pt``).

Both functions take per-sample parameters and draw the noise fields from ``generator`` (the global torch
RNG when None) **in the same order and shapes as BasicSR**, so with equal RNG state the outputs are
equal to BasicSR's ``add_gaussian_noise_pt`` / ``add_poisson_noise_pt``. That includes two quirks kept
on purpose because they are part of the reference distribution:

* gray Gaussian noise is one (H, W) field shared by the whole batch, scaled per sample;
* the colour field is always drawn, and the gray field is drawn for all samples when any sample is gray.

The only change is speed: BasicSR counts the distinct 8-bit levels of each sample with ``torch.unique``
(a sort, the second most expensive step of its pipeline); a 256-bin histogram gives the same count.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms.functional import rgb_to_grayscale


def gaussian_noise(
    img: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Noise field N(0, 1)·σ/255 per pixel, (B, C, H, W); ``sigma`` and ``gray`` (0/1) are (B,)."""
    b, c, h, w = img.shape
    sigma = sigma.to(img).view(b, 1, 1, 1)
    gray = gray.to(img).view(b, 1, 1, 1)
    use_gray = bool(gray.sum() > 0)
    if use_gray:
        noise_gray = (
            torch.randn(h, w, generator=generator, dtype=img.dtype, device=img.device) * sigma / 255.0
        )
    noise = torch.randn(b, c, h, w, generator=generator, dtype=img.dtype, device=img.device) * sigma / 255.0
    if use_gray:
        noise = noise * (1 - gray) + noise_gray * gray
    return noise


def count_levels(img: Tensor) -> Tensor:
    """Number of distinct 8-bit levels per sample (over all channels) of ``round(255·img)``, (B,) int64.

    Equal to ``len(torch.unique(clamp(round(255·img), 0, 255)[i]))`` without sorting.
    """
    b = img.shape[0]
    levels = torch.clamp((img * 255.0).round(), 0, 255).to(torch.int64).view(b, -1)
    offset = torch.arange(b, device=img.device).view(b, 1) * 256
    hist = torch.bincount((levels + offset).view(-1), minlength=256 * b).view(b, 256)
    return (hist > 0).sum(dim=1)


def _shot_noise(img: Tensor, generator: torch.Generator | None) -> Tensor:
    """Poisson(img_q·v)/v − img_q with img_q the 8-bit-quantised image and v = 2^ceil(log2(#levels))."""
    b = img.shape[0]
    quantised = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
    vals = torch.exp2(torch.ceil(torch.log2(count_levels(quantised).to(torch.float64))))
    vals = vals.to(img.dtype).view(b, 1, 1, 1)
    return torch.poisson(quantised * vals, generator=generator) / vals - quantised


def poisson_noise(
    img: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Shot-noise field, (B, C, H, W), scaled by ``scale`` (B,); gray (0/1, (B,)) uses the luma image."""
    b, c, h, w = img.shape
    gray = gray.to(img).view(b, 1, 1, 1)
    use_gray = bool(gray.sum() > 0)
    if use_gray:
        noise_gray = _shot_noise(rgb_to_grayscale(img, num_output_channels=1), generator).expand(b, c, h, w)
    noise = _shot_noise(img, generator)
    if use_gray:
        noise = noise * (1 - gray) + noise_gray * gray
    return noise * scale.to(img).view(b, 1, 1, 1)


def add_noise(img: Tensor, noise: Tensor) -> Tensor:
    """Add a noise field and clip to [0, 1] (no rounding: Real-ESRGAN rounds only at the very end)."""
    return torch.clamp(img + noise, 0, 1)
