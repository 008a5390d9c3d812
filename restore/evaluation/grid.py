"""Side-by-side comparison grids: one row per image, one labelled column per variant (LR, methods, GT).

Used by the demo and the evaluation report. Every panel is resized (nearest, so pixels stay visible) to
a common height before tiling, so LR inputs can sit next to x4 outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from restore.data.image_io import write_image

_LABEL_HEIGHT = 22
_GAP = 4


def _as_uint8_hwc(img: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu()
        img = img.permute(1, 2, 0).numpy() if img.ndim == 3 and img.shape[0] in (1, 3) else img.numpy()
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def comparison_grid(
    rows: Sequence[Sequence[np.ndarray | torch.Tensor]],
    column_labels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    panel_height: int = 256,
) -> np.ndarray:
    """Tile ``rows`` (each a list of HWC numpy or CHW tensor images in [0, 1]) into one float image."""
    if not rows or any(len(r) != len(column_labels) for r in rows):
        raise ValueError("every row needs exactly one image per column label")
    font = ImageFont.load_default()
    panels: list[list[Image.Image]] = []
    for row in rows:
        resized = []
        for img in row:
            pil = Image.fromarray(_as_uint8_hwc(img))
            width = max(1, round(pil.width * panel_height / pil.height))
            resized.append(pil.resize((width, panel_height), Image.Resampling.NEAREST))
        panels.append(resized)
    col_widths = [max(r[c].width for r in panels) for c in range(len(column_labels))]
    label_w = 0 if row_labels is None else 8 + max(int(font.getlength(t)) for t in row_labels)
    width = label_w + sum(col_widths) + _GAP * (len(col_widths) + 1)
    height = _LABEL_HEIGHT + len(rows) * (panel_height + _GAP) + _GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = label_w + _GAP
    for label, w in zip(column_labels, col_widths):
        draw.text((x + 2, 5), label, fill=(0, 0, 0), font=font)
        x += w + _GAP
    for r, row in enumerate(panels):
        y = _LABEL_HEIGHT + r * (panel_height + _GAP)
        if row_labels is not None:
            draw.text((4, y + panel_height // 2 - 6), row_labels[r], fill=(0, 0, 0), font=font)
        x = label_w + _GAP
        for panel, w in zip(row, col_widths):
            canvas.paste(panel, (x, y))
            x += w + _GAP
    return np.asarray(canvas, dtype=np.float32) / 255.0


def save_comparison_grid(path: str | Path, *args, overwrite: bool = False, **kwargs) -> Path:
    """:func:`comparison_grid` written as PNG (refuses to overwrite unless ``overwrite``)."""
    return write_image(path, comparison_grid(*args, **kwargs), overwrite=overwrite)
