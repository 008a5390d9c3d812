"""What a training step does with a NaN/inf loss: stop with a message naming the step, or skip it."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["skip_nonfinite_loss"]


def skip_nonfinite_loss(module: L.LightningModule, loss: Tensor, batch_idx: int, skip: bool) -> bool:
    """True when the step must be skipped (``skip`` and a non-finite loss); raises when not ``skip``.

    The decision is reduced across ranks, so every rank raises or skips together instead of one of them
    hanging in the next collective.
    """
    nonfinite = module.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
    if not nonfinite:
        return False
    msg = (
        f"non-finite training loss ({loss.item()}) at global step {module.global_step} "
        f"(epoch {module.current_epoch}, batch {batch_idx}, on this or another rank)"
    )
    if not skip:
        raise FloatingPointError(
            f"{msg}. Training stopped; lower the learning rate, check the data, or set "
            "method.skip_nonfinite_loss=true to skip such steps"
        )
    rank_zero_warn(f"{msg}: step skipped (method.skip_nonfinite_loss=true)")
    return True
