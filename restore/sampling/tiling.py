"""Latent tiling: run a denoiser on overlapping latent tiles and blend the predictions with Gaussian weights.

As ``cswry/SeeSR: pipelines/pipeline_seesr.py``; StableSR's canvas (``IceClear/StableSR: ldm/models/diffusion/
ddpm.py`` ``p_mean_variance_canvas``), DreamClear's ``forward_with_cfg_tile`` and SUPIR's tiled sampler use the same
Gaussian weights, which come from albarji/mixture-of-diffusers.

SeeSR's rule, the default here:

- tile only if the latent's **area** exceeds ``tile**2`` (``h * w > tile**2``; a 64x128 latent is not tiled at
  ``tile=96`` although its width exceeds 96). The rule is the ``needs_tiling`` parameter;
  :func:`side_exceeds_tile` is the per-side alternative;
- the tile is square with side ``min(tile, h, w)``; tiles step by ``tile - overlap`` and the last row/column is
  snapped to the border (:func:`tile_positions`);
- every tile sees the matching crop of the spatial conditions (the LR image at 8x the latent coordinates);
- the per-tile predictions are weighted by :func:`gaussian_tile_weights` and divided by the summed weights.

Per-method settings (latent px): SeeSR tile 96 / overlap 4 (Gaussian), XPSR 320 / 8, StableSR 64 / 32,
DreamClear 128 / 32. SUPIR blends ``x_{t-1}`` instead of eps with the same machinery (``fn`` is any map from a
latent tile to a same-size tile).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "area_exceeds_tile",
    "gaussian_tile_weights",
    "side_exceeds_tile",
    "tile_positions",
    "tiled_apply",
]


def tile_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of length ``size``.

    Stride ``tile - overlap``; the last tile is moved back to end exactly at ``size``; a single tile at 0 when
    ``size <= tile``. E.g. ``(128, 64, 32) -> [0, 32, 64]``, ``(128, 96, 4) -> [0, 32]``.
    """
    if tile <= 0 or size <= 0:
        raise ValueError(f"size and tile must be positive, got size={size}, tile={tile}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    count = math.ceil((size - tile) / stride) + 1
    return [min(i * stride, size - tile) for i in range(count)]


def gaussian_tile_weights(
    h: int,
    w: int,
    var: float = 0.01,
    symmetric: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(h, w)`` blending window ``outer(wy, wx)`` in normalised coordinates (mixture-of-diffusers).

    ``wx(i) = exp(-((i - (w - 1) / 2) / w)**2 / (2 var)) / sqrt(2 pi var)``, ``wy(j)`` likewise but centred at
    ``h / 2``, not ``(h - 1) / 2``: the official code (mixture-of-diffusers, copied by SeeSR, StableSR,
    DreamClear, SUPIR) has this half-pixel asymmetry, kept by default for parity. ``symmetric=True`` centres
    both axes at ``(n - 1) / 2``.
    """
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)
    mid_y = (h - 1) / 2 if symmetric else h / 2
    norm = math.sqrt(2.0 * math.pi * var)
    wx = torch.exp(-(((xs - (w - 1) / 2) / w) ** 2) / (2.0 * var)) / norm
    wy = torch.exp(-(((ys - mid_y) / h) ** 2) / (2.0 * var)) / norm
    return torch.outer(wy, wx).to(device=device, dtype=dtype)


def area_exceeds_tile(h: int, w: int, tile: int) -> bool:
    """SeeSR's rule: tile when ``h * w > tile**2``."""
    return h * w > tile * tile


def side_exceeds_tile(h: int, w: int, tile: int) -> bool:
    """Tile when either side exceeds ``tile``."""
    return h > tile or w > tile


def _condition_scale(name: str, cond: Tensor, h: int, w: int) -> int:
    ch, cw = cond.shape[-2:]
    if ch % h or cw % w or ch // h != cw // w:
        raise ValueError(
            f"condition '{name}' of size {ch}x{cw} is not an integer multiple of the latent {h}x{w}"
        )
    return ch // h


def tiled_apply(
    fn: Callable[..., Tensor],
    latents: Tensor,
    tile: int,
    overlap: int,
    weights: Literal["gaussian", "uniform"] = "gaussian",
    crop_conditions: Mapping[str, Tensor] | None = None,
    needs_tiling: Callable[[int, int, int], bool] = area_exceeds_tile,
    var: float = 0.01,
    symmetric: bool = False,
) -> Tensor:
    """``fn(latents, **crop_conditions)`` computed tile by tile and blended.

    ``fn(latent_tile, **condition_tiles)`` must return a tensor with the tile's spatial size (its channels may
    differ, e.g. eps with learned variance). Each entry of ``crop_conditions`` is cropped at the tile's
    coordinates times its scale, inferred from its size (an LR image 8x the latent is cropped at 8x);
    non-spatial conditions (text embeddings, the timestep) belong in ``fn``'s closure. When
    ``needs_tiling(h, w, tile)`` is false, ``fn`` runs once on the whole input. Blending accumulates in at least
    float32 and returns ``fn``'s dtype.
    """
    if weights not in ("gaussian", "uniform"):
        raise ValueError(f"weights must be 'gaussian' or 'uniform', got {weights!r}")
    conditions = dict(crop_conditions or {})
    h, w = latents.shape[-2:]
    if not needs_tiling(h, w, tile):
        return fn(latents, **conditions)
    size = min(tile, h, w)
    scales = {name: _condition_scale(name, c, h, w) for name, c in conditions.items()}
    # Weights and sums in at least float32: the Gaussian's edge values (~1e-5 of the centre) vanish in fp16.
    acc_dtype = torch.promote_types(latents.dtype, torch.float32)
    if weights == "gaussian":
        window = gaussian_tile_weights(size, size, var, symmetric, device=latents.device, dtype=acc_dtype)
    else:
        window = torch.ones(size, size, device=latents.device, dtype=acc_dtype)
    out: Tensor | None = None
    weight_sum = torch.zeros(h, w, device=latents.device, dtype=acc_dtype)
    out_dtype = latents.dtype
    for y0 in tile_positions(h, size, overlap):
        for x0 in tile_positions(w, size, overlap):
            crops = {
                name: c[..., y0 * s : (y0 + size) * s, x0 * s : (x0 + size) * s]
                for (name, c), s in zip(conditions.items(), scales.values())
            }
            pred = fn(latents[..., y0 : y0 + size, x0 : x0 + size], **crops)
            if pred.shape[-2:] != (size, size):
                raise ValueError(
                    f"fn returned spatial size {tuple(pred.shape[-2:])} for a {size}x{size} tile"
                )
            if out is None:
                out_dtype = pred.dtype
                out_acc = torch.promote_types(pred.dtype, acc_dtype)
                out = torch.zeros((*pred.shape[:-2], h, w), device=pred.device, dtype=out_acc)
            out[..., y0 : y0 + size, x0 : x0 + size] += pred * window
            weight_sum[y0 : y0 + size, x0 : x0 + size] += window
    assert out is not None  # at least one tile always runs
    return (out / weight_sum).to(out_dtype)
