"""Tiled VAE encode/decode for a diffusers ``AutoencoderKL``, with GroupNorm statistics shared by all tiles.

Official code: cswry/SeeSR ``utils/vaehook.py`` with ``test_seesr.py``'s sizes (encoder tiles <= 1024 px
with 32 px padding, decoder tiles <= 224 latent px with 11 px padding, GroupNorm statistics estimated across
all tiles, bypassed when the image fits one tile), a port of the Tiled VAE of
pkuliyi2015/multidiffusion-upscaler-for-automatic1111; SUPIR's copy (Fanghua-Yu/SUPIR
``SUPIR/utils/tilevae.py``) uses 512 px / 64 latent px tiles.

Splitting: each axis is cut into ``ceil(size / tile)`` equal *core* intervals (encoder cores aligned to the
VAE's downsampling factor, 8 for SD); a tile is its core plus ``pad`` pixels of context on each side, clipped
at the image border (so border tiles see the same zero padding as the whole image). Each tile goes through
the network, its core is cut out of the result and written into the output.

Why GroupNorm needs care: every ResNet block and the mid-block attention normalise with mean/var over the
*whole* feature map. Per-tile statistics give every tile its own brightness/contrast (visible seams). With
``sync_group_norm=True`` the tiles run in lockstep through the network, layer by layer:

1. the encoder/decoder is flattened into a list of steps, built from diffusers' own submodules (convs,
   activations, up/downsamplers and attention are called as modules; only ``ResnetBlock2D``'s short forward
   is re-expressed as steps, to expose its two GroupNorms);
2. each tile runs up to the next GroupNorm and reports, per sample and group, the count, mean and variance
   of its **core** region at that layer's resolution (the padding is excluded, so overlapping context is not
   counted twice);
3. these are merged (Chan's parallel mean/variance formula, float32) into the statistics of the whole map;
4. every tile applies that GroupNorm with the merged statistics and its own affine weights, and runs on to
   the next GroupNorm. For the attention's GroupNorm the attention module is called with its ``group_norm``
   temporarily replaced by a fixed-statistics equivalent.

Between GroupNorms the tiles' activations (and a ResNet block's pending shortcut input) can be parked on
``park_device`` (e.g. ``"cpu"``) so that the accelerator holds one tile at a time: without parking the tiles'
activations together are as large as the whole image's at one layer.

What remains different from the untiled network (so "close", not equal):

- the mid-block self-attention attends within a tile only (global attention is what tiling avoids);
- a tile's core is exact only up to the layer where the network's receptive field outgrows ``pad``; the
  official pads (32 px encoder, 11 latent px decoder) are smaller than the SD VAE's receptive field.

Without the attention and with ``pad`` at least the receptive field, the synchronised result equals the
untiled one to float rounding (tested). The official ``vaehook.py`` estimates the statistics across all tiles
with a two-pass task queue (not reproduced step by step here); counting each tile's core once gives the whole
map's statistic whenever the cores are exact. The official code also rounds tile sizes to multiples of 32;
here cores align to the downsampling factor (with synced statistics the split hardly matters).
``sync_group_norm=False`` runs the stock encoder/decoder on each tile (plain tiling, per-tile statistics).

Supported: diffusers ``Encoder``/``Decoder`` with ``DownEncoderBlock2D``/``UpDecoderBlock2D`` blocks, a
``UNetMidBlock2D`` and ``norm_type="group"`` (SD 1.x/2.x/XL, sd-vae-ft-ema); anything else raises
``NotImplementedError`` in sync mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from torch import Tensor, nn

__all__ = ["TiledAutoencoderKL", "split_axis", "tiled_decode", "tiled_encode"]


# --------------------------------------------------------------------------------------------------- splitting
def split_axis(size: int, tile: int, pad: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """``(core_start, core_end, box_start, box_end)`` per tile along one axis.

    Cores partition ``[0, size)`` into ``ceil(size / tile)`` near-equal parts whose starts are multiples of
    ``align``; boxes add ``pad`` on each side, clipped to ``[0, size)``.
    """
    tile = max(align, tile // align * align)
    count = math.ceil(size / tile)
    core = math.ceil(size / count / align) * align
    spans = []
    for start in range(0, size, core):
        end = min(start + core, size)
        spans.append((start, end, max(0, start - pad), min(size, end + pad)))
    return spans


# ---------------------------------------------------------------------------------------------- group norm
def _group_norm_with_stats(x: Tensor, gn: nn.GroupNorm, mean: Tensor, var: Tensor) -> Tensor:
    """``gn(x)`` but with given per-(sample, group) ``mean``/``var`` of shape ``(B, G)``; any ``(B, C, ...)``."""
    b, c = x.shape[:2]
    grouped = x.reshape(b, gn.num_groups, -1).float()
    normed = (grouped - mean[..., None]) * torch.rsqrt(var[..., None] + gn.eps)
    out = normed.reshape(x.shape)
    if gn.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        out = out * gn.weight.float().reshape(shape) + gn.bias.float().reshape(shape)
    return out.to(x.dtype)


class _FixedStatsGroupNorm(nn.Module):
    """Stand-in for an attention block's GroupNorm that uses merged statistics."""

    def __init__(self, gn: nn.GroupNorm, mean: Tensor, var: Tensor) -> None:
        super().__init__()
        self.gn, self.mean, self.var = gn, mean, var

    def forward(self, x: Tensor) -> Tensor:
        return _group_norm_with_stats(x, self.gn, self.mean, self.var)


class _StatsMerger:
    """Running per-(sample, group) count/mean/M2 over tiles (Chan et al.'s pairwise update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor, num_groups: int) -> None:
        grouped = x.reshape(x.shape[0], num_groups, -1).float()
        n = grouped.shape[-1]
        if n == 0:
            return
        var, mean = torch.var_mean(grouped, dim=-1, correction=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.mean is not None and self.m2 is not None, "no tile reported statistics"
        return self.mean, self.m2 / self.count


# ------------------------------------------------------------------------------------------------ program
@dataclass
class _Step:
    """One step of the flattened network. ``norm`` is set for steps that need merged GroupNorm statistics."""

    kind: str  # "module" | "push" | "residual" | "norm" | "attention"
    module: nn.Module | None = None
    norm: nn.GroupNorm | None = None
    scale: float = 1.0

    def run(self, x: Tensor, stash: list[Tensor], stats: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.kind == "module":
            return self.module(x)
        if self.kind == "push":
            stash.append(x)
            return x
        if self.kind == "residual":
            shortcut = stash.pop()
            if self.module is not None:
                shortcut = self.module(shortcut)
            return (shortcut + x) / self.scale
        assert stats is not None and self.norm is not None
        if self.kind == "norm":
            return _group_norm_with_stats(x, self.norm, *stats)
        with _swapped_group_norm(self.module, _FixedStatsGroupNorm(self.norm, *stats)):
            return self.module(x)


@contextmanager
def _swapped_group_norm(attn: nn.Module, replacement: nn.Module) -> Iterator[None]:
    original = attn.group_norm
    attn.group_norm = replacement
    try:
        yield
    finally:
        attn.group_norm = original


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"GroupNorm sync does not support {what}; use sync_group_norm=False")


def _group_norm(module: nn.Module, where: str) -> nn.GroupNorm:
    if not isinstance(module, nn.GroupNorm):
        raise _unsupported(f"{type(module).__name__} as the normalisation of {where}")
    return module


def _resnet_steps(block: nn.Module) -> list[_Step]:
    # Mirrors ResnetBlock2D.forward for the VAE case (no temb, no up/downsampling inside the block).
    if type(block) is not ResnetBlock2D:
        raise _unsupported(type(block).__name__)
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise _unsupported("a ResnetBlock2D with up/downsampling or a time embedding")
    return [
        _Step("push"),
        _Step("norm", norm=_group_norm(block.norm1, "a ResNet block")),
        _Step("module", block.nonlinearity),
        _Step("module", block.conv1),
        _Step("norm", norm=_group_norm(block.norm2, "a ResNet block")),
        _Step("module", block.nonlinearity),
        _Step("module", block.dropout),
        _Step("module", block.conv2),
        _Step("residual", block.conv_shortcut, scale=block.output_scale_factor),
    ]


def _attention_steps(attn: nn.Module | None) -> list[_Step]:
    if attn is None:
        return []
    if not isinstance(attn, Attention) or attn.spatial_norm is not None:
        raise _unsupported(f"the attention {type(attn).__name__}")
    if attn.group_norm is None:
        return [_Step("module", attn)]
    return [_Step("attention", attn, norm=_group_norm(attn.group_norm, "the mid-block attention"))]


def _mid_steps(mid: nn.Module) -> list[_Step]:
    if type(mid) is not UNetMidBlock2D:
        raise _unsupported(type(mid).__name__)
    steps = _resnet_steps(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        steps += _attention_steps(attn) + _resnet_steps(resnet)
    return steps


def _sampler_steps(block: nn.Module, kinds: tuple[type, ...]) -> list[_Step]:
    if type(block) not in kinds:
        raise _unsupported(type(block).__name__)
    steps = [s for resnet in block.resnets for s in _resnet_steps(resnet)]
    samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or []
    return steps + [_Step("module", s) for s in samplers]


def _head_steps(coder: nn.Module) -> list[_Step]:
    return [
        _Step("norm", norm=_group_norm(coder.conv_norm_out, "the output head")),
        _Step("module", coder.conv_act),
        _Step("module", coder.conv_out),
    ]


def _encoder_program(encoder: nn.Module) -> list[_Step]:
    steps = [_Step("module", encoder.conv_in)]
    for block in encoder.down_blocks:
        steps += _sampler_steps(block, (DownEncoderBlock2D,))
    return steps + _mid_steps(encoder.mid_block) + _head_steps(encoder)


def _decoder_program(decoder: nn.Module) -> list[_Step]:
    steps = [_Step("module", decoder.conv_in)] + _mid_steps(decoder.mid_block)
    for block in decoder.up_blocks:
        steps += _sampler_steps(block, (UpDecoderBlock2D,))
    return steps + _head_steps(decoder)


# --------------------------------------------------------------------------------------------- execution
@dataclass
class _Tile:
    core: tuple[int, int, int, int]  # y0, y1, x0, x1 in input coordinates
    box: tuple[int, int, int, int]  # padded crop, same convention
    x: Tensor
    stash: list[Tensor] = field(default_factory=list)

    def core_of(self, y: Tensor) -> Tensor:
        """The core region of ``y``, an activation of this tile at any resolution."""
        (cy0, cy1, cx0, cx1), (by0, by1, bx0, bx1) = self.core, self.box
        sy, sx = y.shape[-2] / (by1 - by0), y.shape[-1] / (bx1 - bx0)
        bounds = [(cy0 - by0) * sy, (cy1 - by0) * sy, (cx0 - bx0) * sx, (cx1 - bx0) * sx]
        if any(b != int(b) for b in bounds):
            raise ValueError(f"tile {self.box} does not map onto a {tuple(y.shape[-2:])} activation")
        y0, y1, x0, x1 = (int(b) for b in bounds)
        return y[..., y0:y1, x0:x1]


def _run_tiled(
    program: Sequence[_Step], x: Tensor, tile: int, pad: int, align: int, park_device: Any
) -> Tensor:
    h, w = x.shape[-2:]
    device = x.device
    park = torch.device(park_device) if park_device is not None else device
    tiles = []
    for cy0, cy1, by0, by1 in split_axis(h, tile, pad, align):
        for cx0, cx1, bx0, bx1 in split_axis(w, tile, pad, align):
            tiles.append(_Tile((cy0, cy1, cx0, cx1), (by0, by1, bx0, bx1), x[..., by0:by1, bx0:bx1]))
    # Lockstep: every tile runs to the next GroupNorm, then the merged statistics are applied to all.
    pending: tuple[_Step, tuple[Tensor, Tensor]] | None = None
    start = 0
    while True:
        stop = next((i for i in range(start, len(program)) if program[i].norm is not None), len(program))
        merger = _StatsMerger() if stop < len(program) else None
        for t in tiles:
            y, stash = t.x.to(device), [s.to(device) for s in t.stash]
            if pending is not None:
                y = pending[0].run(y, stash, pending[1])
            for step in program[start:stop]:
                y = step.run(y, stash, None)
            if merger is not None:
                merger.add(t.core_of(y), program[stop].norm.num_groups)
            t.x, t.stash = y.to(park), [s.to(park) for s in stash]
        if merger is None:
            break
        pending = (program[stop], merger.result())
        start = stop + 1
    return _stitch(tiles, h, w, device)


def _stitch(tiles: Sequence[_Tile], h: int, w: int, device: torch.device) -> Tensor:
    first = tiles[0]
    scale = first.x.shape[-2] / (first.box[1] - first.box[0])
    out = first.x.new_zeros((*first.x.shape[:-2], round(h * scale), round(w * scale)), device=device)
    for t in tiles:
        y0, y1, x0, x1 = (round(v * scale) for v in t.core)
        out[..., y0:y1, x0:x1] = t.core_of(t.x).to(device)
    return out


def _plain_program(coder: nn.Module) -> list[_Step]:
    return [_Step("module", coder)]


def _downscale_factor(vae: nn.Module) -> int:
    return 2 ** sum(1 for b in vae.encoder.down_blocks if getattr(b, "downsamplers", None))


def _fits(x: Tensor, tile: int, pad: int) -> bool:
    # As SeeSR's utils/vaehook.py: tiling is bypassed when the input is at most tile + 2 * pad on both sides.
    return max(x.shape[-2:]) <= tile + 2 * pad


# ------------------------------------------------------------------------------------------------- public
def tiled_encode(
    vae: nn.Module,
    images: Tensor,
    tile: int = 1024,
    pad: int = 32,
    sync_group_norm: bool = True,
    park_device: torch.device | str | None = None,
) -> Tensor:
    """Posterior parameters ``quant_conv(encoder(images))`` of ``images`` in ``[-1, 1]``, ``(B, 3, H, W)``.

    ``H`` and ``W`` must be multiples of the VAE's downsampling factor when tiling applies; ``tile`` is rounded
    down and ``pad`` up to it. Wrap the result in ``DiagonalGaussianDistribution`` for sample/mode.
    """
    factor = _downscale_factor(vae)
    x = images.to(vae.dtype)
    if _fits(x, tile, pad):
        h = vae.encoder(x)
    else:
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE factor {factor}")
        pad = math.ceil(pad / factor) * factor
        program = _encoder_program(vae.encoder) if sync_group_norm else _plain_program(vae.encoder)
        h = _run_tiled(program, x, tile, pad, factor, park_device)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def tiled_decode(
    vae: nn.Module,
    latents: Tensor,
    tile: int = 224,
    pad: int = 11,
    sync_group_norm: bool = True,
    park_device: torch.device | str | None = None,
) -> Tensor:
    """``decoder(post_quant_conv(latents))`` for *unscaled* latents (divide by ``scaling_factor`` first)."""
    z = latents.to(vae.dtype)
    # post_quant_conv is 1x1: applying it to the whole latent before tiling is exact and cheap.
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    if _fits(z, tile, pad):
        return vae.decoder(z)
    program = _decoder_program(vae.decoder) if sync_group_norm else _plain_program(vae.decoder)
    return _run_tiled(program, z, tile, pad, 1, park_device)


class TiledAutoencoderKL:
    """An ``AutoencoderKL`` look-alike whose ``encode``/``decode`` tile (what :mod:`.lre` and samplers call).

    ``encode(x).latent_dist`` and ``decode(z).sample`` behave as diffusers' (inputs in ``[-1, 1]``, latents
    unscaled); ``config``, ``dtype``, ``device`` and ``parameters()`` are the wrapped VAE's.
    """

    def __init__(
        self,
        vae: nn.Module,
        encoder_tile: int = 1024,
        encoder_pad: int = 32,
        decoder_tile: int = 224,
        decoder_pad: int = 11,
        sync_group_norm: bool = True,
        park_device: torch.device | str | None = None,
    ) -> None:
        self.vae = vae
        self.encoder_tile, self.encoder_pad = encoder_tile, encoder_pad
        self.decoder_tile, self.decoder_pad = decoder_tile, decoder_pad
        self.sync_group_norm = sync_group_norm
        self.park_device = park_device

    @property
    def config(self) -> Any:
        return self.vae.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.vae.parameters()

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        moments = tiled_encode(
            self.vae, x, self.encoder_tile, self.encoder_pad, self.sync_group_norm, self.park_device
        )
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        sample = tiled_decode(
            self.vae, z, self.decoder_tile, self.decoder_pad, self.sync_group_norm, self.park_device
        )
        return DecoderOutput(sample=sample) if return_dict else (sample,)
