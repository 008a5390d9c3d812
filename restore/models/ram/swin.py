"""RAM's Swin Transformer image encoder (``visual_encoder``), with the official parameter names.

Reference: Swin Transformer (Liu et al., ICCV 2021) as RAM configures it
(``ram/configs/swin/config_swinL_384.json``: embed 192, depths 2/2/18/2, heads 6/12/24/48, window 12, patch 4,
vision width 1536) and runs it (cswry/SeeSR ``ram/models/swin_transformer.py``: output
``[B, 1 + (S/32)^2, C]``, the average-pooled token first, then the spatial tokens; ``[B, 145, 1536]`` at
384 px).

Why not ``timm.models.SwinTransformer``: timm renames and reorders what RAM's checkpoint holds (patch merging
moved to the start of the next stage, a different channel order of the merged 2x2 patches, a classifier head,
NHWC outputs), so every load and every LoRA key would need a two-way converter. This module is small and is
built so that ``state_dict()`` has exactly the official keys (``patch_embed.proj``, ``layers.{s}.blocks.{b}.attn
.qkv``, ``layers.{s}.downsample.reduction``, ``norm``, ...). timm's building blocks (``Mlp``, ``DropPath``,
initialisers, the relative-position-table resize) are reused.

Differences from the official module that change no number: the derived buffers ``relative_position_index``
and ``attn_mask`` are not persistent (the official loader deletes them from checkpoints and recomputes them),
and attention runs through ``F.scaled_dot_product_attention`` with the relative-position bias and the shift
mask as an additive mask (the official code adds them before a softmax; same values up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SwinTransformer", "WindowAttention", "relative_position_index", "resize_relative_position_tables"]

#: Additive mask between tokens of different regions in a shifted window (official value).
_SHIFT_MASK_VALUE = -100.0


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B * nW, window * window, C]`` (row-major windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, window * window, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """``[window^2, window^2]`` index into the ``(2 window - 1)^2`` relative-position table (Swin's layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """``[nW, window^2, window^2]`` additive mask (0 / -100) of the cyclically shifted windows."""
    regions = torch.zeros(1, h, w, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in bounds for ws in bounds):
        regions[:, hs, ws, :] = i
    ids = window_partition(regions, window).squeeze(-1)  # nW, window^2
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, _SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative-position bias (keys as the official)."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """``[heads, window^2, window^2]`` bias gathered from the table."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B * nW, N, C]``; ``mask``: ``[nW, N, N]`` additive (shifted windows) or None."""
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias().unsqueeze(0)  # 1, heads, N, N
        if mask is not None:
            # Fold the windows into the head axis so that the per-window mask broadcasts over the batch.
            nw = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(bias.dtype)).reshape(1, nw * heads, n, n)
            q, k, v = (t.reshape(bw // nw, nw * heads, n, c // heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.reshape(bw, heads, n, c // heads).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class SwinBlock(nn.Module):
    """Pre-norm Swin block: (shifted) window attention + MLP, each with a residual and stochastic depth."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        if resolution <= window:  # official: no partition (and no shift) when one window covers the map
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        r, win, shift = self.resolution, self.window, self.shift
        h = self.norm1(x).view(b, r, r, c)
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, win), self.attn_mask), win, r, r)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(h.reshape(b, length, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (official order: (0,0), (1,0), (0,1), (1,1)) -> LayerNorm -> Linear 4C->2C."""

    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """One resolution of the encoder: ``blocks`` (even: plain windows, odd: shifted) then ``downsample``."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, dp)
            for i, dp in enumerate(drop_path)
        )
        assert len(self.blocks) == depth
        self.downsample = PatchMerging(resolution, dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution to ``embed_dim`` channels, then LayerNorm."""

    def __init__(self, image_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"the Swin encoder takes {self.image_size}x{self.image_size} inputs, got "
                f"{tuple(x.shape[-2:])}: resize with RAM.preprocess first"
            )
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """RAM's Swin encoder: ``[B, 3, S, S]`` (ImageNet-normalised) -> ``[B, 1 + (S/32)^2, num_features]``.

    Token 0 is the mean of the final spatial tokens (the official ``avgpool``), tokens 1.. the final
    ``(S/32)^2`` tokens in row-major order, all after the final LayerNorm. No absolute position embedding
    (official ``ape=False``), no dropout (``drop_rate=attn_drop_rate=0``); stochastic depth grows linearly
    from 0 to ``drop_path_rate`` over all blocks (official: 0.1).
    """

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 4,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        if image_size % (patch_size * 2 ** (len(depths) - 1)):
            raise ValueError(f"image_size {image_size} is not divisible by the total stride")
        self.image_size = image_size
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(image_size, patch_size, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        resolution = image_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            first = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    dim=embed_dim * 2**i,
                    resolution=resolution // 2**i,
                    depth=depth,
                    num_heads=heads,
                    window=window_size,
                    mlp_ratio=mlp_ratio,
                    drop_path=rates[first : first + depth],
                    downsample=i < len(depths) - 1,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(_init_weights)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: 1 pooled + the final spatial grid (145 for Swin-L 384)."""
        side = self.layers[-1].blocks[0].resolution
        return 1 + side * side

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (less memory when the LoRA trains)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def _init_weights(module: nn.Module) -> None:
    # Official init: truncated normal (std 0.02) Linear weights with zero bias, LayerNorm 1 / 0.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resize_relative_position_tables(state: dict[str, Tensor], target: dict[str, Tensor]) -> list[str]:
    """Resize ``*.relative_position_bias_table`` entries of ``state`` in place to the shapes in ``target``
    (both keyed alike, e.g. the model's ``state_dict()``).

    The official loader interpolates a checkpoint's tables when its window differs from the model's (BEiT's
    geometric-progression bicubic resize, ``interpolate_relative_pos_embed``); timm's
    ``resize_rel_pos_bias_table`` is the same method. A no-op for RAM Swin-L 384 (window 12 in both).
    Returns the resized keys.
    """
    from timm.layers import resize_rel_pos_bias_table

    resized = []
    for key, value in state.items():
        if not key.endswith("relative_position_bias_table") or key not in target:
            continue
        shape = tuple(target[key].shape)
        if tuple(value.shape) == shape:
            continue
        side = int(round(shape[0] ** 0.5))
        window = (side + 1) // 2
        state[key] = resize_rel_pos_bias_table(value.float(), (window, window), shape).to(value.dtype)
        resized.append(key)
    return resized
