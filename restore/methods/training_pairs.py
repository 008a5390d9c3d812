"""LR/GT training pairs synthesised on the device from HR-only batches, shared by every training method.

The data pipeline yields ``{"hq": ...}`` batches; a method's ``degradation`` (e.g. the Real-ESRGAN one) turns
them into ``lq`` / ``gt`` after the transfer to the device, with the method's per-rank generator
(:class:`restore.methods.rank_generator.RankGenerator`), so a resumed run draws what an uninterrupted one would.
Paired batches (already holding ``lq`` and ``gt``) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PairPool", "add_synthesised_pairs", "degrade_on_device", "upsampled_lr"]


def degrade_on_device(
    degradation: nn.Module | None, hq: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(lq, gt)`` of the HR batch ``hq`` on its device, in float32 (blur/JPEG tables stay fp32 under AMP)."""
    if degradation is None:
        raise RuntimeError(
            "the batch holds only 'hq' images, so LR inputs must be synthesised, but the method has no "
            "degradation: keep the `degradation` config group (e.g. degradation=realesrgan) or use paired data"
        )
    deg = degradation.to(hq.device)
    with torch.autocast(device_type=hq.device.type, enabled=False):
        out = deg(hq.float(), generator=generator)
    return out.lq, out.gt


def add_synthesised_pairs(module: L.LightningModule, batch: dict[str, Any]) -> dict[str, Any]:
    """The body of a method's ``on_after_batch_transfer``: while training, add ``lq``/``gt`` to HR-only batches.

    ``module`` must have ``degradation`` and ``generator`` (a ``RankGenerator``) attributes.
    """
    if not ("lq" in batch and "gt" in batch) and module.trainer.training:
        hq = batch["hq"]
        lq, gt = degrade_on_device(module.degradation, hq, module.generator.get(module, hq.device))
        batch = {**batch, "lq": lq, "gt": gt}
    return batch


def upsampled_lr(lq: Tensor, gt: Tensor) -> Tensor:
    """The ControlNet condition of SeeSR / XPSR training: ``lq`` bicubic-upsampled to ``gt``'s size, clamped to
    [0, 1], float32 (SeeSR's ``sr_bicubic`` in ``train_seesr.py``; XPSR's ``LR/`` stored at 512² by
    ``utils_data/make_train.py``)."""
    return F.interpolate(lq.float(), size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


class PairPool:
    """Real-ESRGAN's training-pair pool (``_dequeue_and_enqueue``), which decorrelates the pairs of a batch: the
    degradation draws its kernels and resize/noise/JPEG choices once per batch.

    While the pool fills, batches pass through and are stored; once full, each batch is swapped against a random
    ``len(batch)`` pairs of the shuffled pool (official: ``xinntao/Real-ESRGAN realesrgan/models/
    realesrgan_model.py``; StableSR ``ldm/models/diffusion/ddpm.py``, ``queue_size`` 180). ``size`` must be a
    multiple of the batch size. The pool lives on the batch's device and is not checkpointed (180 pairs at 512^2
    are ~1 GB in float32): a resumed run refills it from the batches it sees.
    """

    def __init__(self, size: int = 180) -> None:
        if size < 1:
            raise ValueError(f"the pair pool size must be >= 1, got {size}")
        self.size = size
        self.lq: Tensor | None = None
        self.gt: Tensor | None = None
        self.filled = 0

    def __call__(self, lq: Tensor, gt: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b = len(lq)
        if self.size % b:
            raise ValueError(f"the pair pool size ({self.size}) must be a multiple of the batch size ({b})")
        if self.lq is None or self.lq.shape[1:] != lq.shape[1:] or self.gt.shape[1:] != gt.shape[1:]:
            self.lq = lq.new_empty((self.size, *lq.shape[1:]))
            self.gt = gt.new_empty((self.size, *gt.shape[1:]))
            self.filled = 0
        if self.filled < self.size:
            self.lq[self.filled : self.filled + b] = lq
            self.gt[self.filled : self.filled + b] = gt
            self.filled += b
            return lq, gt
        order = torch.randperm(self.size, generator=generator, device=generator.device).to(lq.device)
        self.lq, self.gt = self.lq[order], self.gt[order]
        out_lq, out_gt = self.lq[:b].clone(), self.gt[:b].clone()
        self.lq[:b], self.gt[:b] = lq, gt
        return out_lq, out_gt
