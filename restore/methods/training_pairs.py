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

__all__ = ["add_synthesised_pairs", "degrade_on_device", "upsampled_lr"]


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
    if module.trainer.training and not ("lq" in batch and "gt" in batch):
        hq = batch["hq"]
        lq, gt = degrade_on_device(module.degradation, hq, module.generator.get(module, hq.device))
        batch = {**batch, "lq": lq, "gt": gt}
    return batch


def upsampled_lr(lq: Tensor, gt: Tensor) -> Tensor:
    """The ControlNet condition of SeeSR / XPSR training: ``lq`` bicubic-upsampled to ``gt``'s size, clamped to
    [0, 1], float32 (SeeSR's ``sr_bicubic`` in ``train_seesr.py``; XPSR's ``LR/`` stored at 512² by
    ``utils_data/make_train.py``)."""
    return F.interpolate(lq.float(), size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
