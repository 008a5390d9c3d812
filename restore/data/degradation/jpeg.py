"""Batched JPEG round trip with per-sample float quality, matching BasicSR's ``DiffJPEG``
(XPixelGroup/BasicSR ``basicsr/utils/diffjpeg.py``).

Pipeline: RGB·255 → YCbCr (JFIF, +128 chroma) → 4:2:0 by 2x2 averaging → 8x8 DCT-II → divide by the
standard tables × quality factor → round → multiply back → inverse DCT → chroma upsampling by pixel
repetition → RGB → clamp [0, 255] / 255. Inputs are zero-padded bottom/right to a multiple of 16 and
cropped back. Quirks of the reference kept on purpose (they shape the training distribution):

* the quantisation tables are scaled by the float factor but neither rounded nor clamped to [1, 255]
  (libjpeg does both);
* the tables are the transposed standard tables (DiffJPEG's layout), i.e. the horizontal and vertical
  frequency steps are swapped relative to libjpeg.

The 2-D DCT is one (N, 64) x (64, 64) matrix product with the Kronecker DCT basis, quantisation tables
broadcast per sample; outputs are contiguous NCHW (BasicSR's are channels-last strided, which breaks its
own ``filter2D`` on recent torch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-T T.81 Annex K tables, as printed (row = vertical frequency).
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TOP_LEFT = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56, 99), (47, 66, 99, 99))

_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
_YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def quality_to_factor(quality: Tensor) -> Tensor:
    """IJG scaling: 50/q for q < 50, else (200 − 2q)/100; float qualities allowed."""
    return torch.where(quality < 50, 50.0 / quality, (200.0 - 2.0 * quality) / 100.0)


def _dct_matrix() -> Tensor:
    """Orthonormal 8-point DCT-II matrix C[u, x] = c(u)·cos((2x+1)uπ/16)."""
    c = torch.empty(8, 8, dtype=torch.float64)
    for u in range(8):
        scale = math.sqrt(1 / 8) if u == 0 else math.sqrt(2 / 8)
        for x in range(8):
            c[u, x] = scale * math.cos((2 * x + 1) * u * math.pi / 16)
    return c


class JPEGCompression(torch.nn.Module):
    """``forward(img, quality)`` with img (B, 3, H, W) in [0, 1] and quality a float or (B,) tensor."""

    def __init__(self) -> None:
        super().__init__()
        dct = _dct_matrix()
        # vec(C X Cᵀ) = (C ⊗ C) vec(X) for row-major vec: one GEMM for all blocks.
        self.register_buffer("dct_2d", torch.kron(dct, dct).T.float().contiguous(), persistent=False)
        self.register_buffer("idct_2d", torch.kron(dct, dct).float().contiguous(), persistent=False)
        luma = torch.tensor(_LUMA_TABLE, dtype=torch.float32).T
        chroma = torch.full((8, 8), 99.0)
        chroma[:4, :4] = torch.tensor(_CHROMA_TOP_LEFT, dtype=torch.float32).T
        self.register_buffer("luma_table", luma.reshape(64), persistent=False)
        self.register_buffer("chroma_table", chroma.reshape(64), persistent=False)
        self.register_buffer("rgb_to_ycbcr", torch.tensor(_RGB_TO_YCBCR).T.contiguous(), persistent=False)
        self.register_buffer("ycbcr_to_rgb", torch.tensor(_YCBCR_TO_RGB).T.contiguous(), persistent=False)

    def _code_plane(self, plane: Tensor, table: Tensor) -> Tensor:
        """Quantise-dequantise one (B, H, W) plane in the DCT domain; ``table`` is (B, 64)."""
        b, h, w = plane.shape
        blocks = plane.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 64)
        coeffs = torch.matmul(blocks - 128.0, self.dct_2d)
        table = table.unsqueeze(1)
        coeffs = torch.round(coeffs / table) * table
        blocks = torch.matmul(coeffs, self.idct_2d) + 128.0
        return blocks.view(b, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h, w)

    @torch.no_grad()
    def forward(self, img: Tensor, quality: Tensor | float) -> Tensor:
        b, c, h, w = img.shape
        if c != 3:
            raise ValueError(f"JPEG expects RGB input (B, 3, H, W), got {tuple(img.shape)}")
        quality = torch.as_tensor(quality, dtype=img.dtype, device=img.device).expand(b)
        factor = quality_to_factor(quality).view(b, 1)
        pad_h, pad_w = (-h) % 16, (-w) % 16
        x = F.pad(img, (0, pad_w, 0, pad_h), mode="constant", value=0.0) * 255.0
        ycc = torch.einsum("bchw,cd->bdhw", x, self.rgb_to_ycbcr)
        y = ycc[:, 0]
        cb = F.avg_pool2d(ycc[:, 1:2] + 128.0, 2).squeeze(1)
        cr = F.avg_pool2d(ycc[:, 2:3] + 128.0, 2).squeeze(1)
        y = self._code_plane(y, self.luma_table * factor)
        cb = self._code_plane(cb, self.chroma_table * factor)
        cr = self._code_plane(cr, self.chroma_table * factor)
        chroma = torch.stack([cb, cr], dim=1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) - 128.0
        ycc = torch.cat([y.unsqueeze(1), chroma], dim=1)
        rgb = torch.einsum("bchw,cd->bdhw", ycc, self.ycbcr_to_rgb)
        rgb = torch.clamp(rgb, 0, 255) / 255.0
        return rgb[:, :, :h, :w].contiguous()
