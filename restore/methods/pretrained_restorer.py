"""A released restoration network as an evaluation method: the GAN / regression columns of SR tables.

``python eval.py benchmark=realsr method=spandrel method.weights=${paths.weights_dir}/RealESRGAN_x4plus.pth``
scores Real-ESRGAN, BSRGAN, SwinIR-GAN, Real-ESRNet, ... from their published files: spandrel
(chaiNNer-org/spandrel) detects the architecture and its scale from the state dict
(:class:`restore.models.reference.SpandrelRestorer`), so a new baseline is a weights file, not code. The table
column is named after the file (``RealESRGAN_x4plus``). The weights manifest (``python -m restore.weights list``)
lists the usual files with their URLs and digests.

The network runs on the LR at its own scale; a benchmark scale that differs from the network's resizes the LR
first (bicubic) so that the output has the benchmark's size, as the reference branch of DreamClear does.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from restore.models.reference import SpandrelRestorer

__all__ = ["PretrainedRestorer"]


class PretrainedRestorer(nn.Module):
    """``restore(lq) -> sr`` at ``scale`` with a frozen network loaded from ``weights`` (see the module doc).

    Args:
        weights: a ``.pth`` / ``.ckpt`` / ``.safetensors`` state dict in any layout spandrel detects.
        scale: output size / LR size (the benchmark's).

    The network runs in float32 (Real-ESRGAN's ``inference_realesrgan.py`` defaults to fp16 on CUDA for speed;
    float32 is the exact reference for a table).
    """

    #: The weights come from ``weights``, not from a train.py checkpoint.
    requires_weights = False

    def __init__(self, weights: str | os.PathLike, scale: int = 4) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        self.restorer = SpandrelRestorer.from_file(weights)
        self.scale = scale

    @property
    def evaluation_note(self) -> str | None:
        """Said next to the numbers when the network is not applied at its own scale."""
        if self.restorer.scale == self.scale:
            return None
        return (
            f"{self.restorer.architecture} x{self.restorer.scale} run on the LR resized by "
            f"{self.scale / self.restorer.scale:g} (bicubic) for x{self.scale}"
        )

    @torch.no_grad()
    def restore(self, lq: Tensor) -> Tensor:
        return self.restorer(lq, (lq.shape[-2] * self.scale, lq.shape[-1] * self.scale))

    def forward(self, lq: Tensor) -> Tensor:
        return self.restore(lq)

    def extra_repr(self) -> str:
        return (
            f"architecture={self.restorer.architecture}, scale={self.scale}, source={self.restorer.source!r}"
        )
