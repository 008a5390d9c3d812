"""Loading a method's trained weights for evaluation (``eval.py method=... ckpt_path=...``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["MethodWeightsError", "load_method_weights"]

log = logging.getLogger(__name__)


class MethodWeightsError(ValueError):
    """The method has no usable weights; the message names the option that provides them."""


def load_method_weights(module: nn.Module, ckpt_path: str | os.PathLike | None, method: str) -> None:
    """Load a train.py (Lightning) checkpoint into ``module``, strictly.

    Without ``ckpt_path`` the module must have been built with released weights (``pretrained=<file>``,
    loaded by its constructor); a randomly initialised network is refused, since its scores mean nothing.
    """
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise MethodWeightsError(
                f"ckpt_path={ckpt_path} is not a train.py (Lightning) checkpoint; for released network weights "
                f"use method.module.pretrained=<file> instead"
            )
        module.load_state_dict(ckpt["state_dict"], strict=True)
        log.info(f"loaded weights from {path} (global step {ckpt.get('global_step')})")
    elif not getattr(getattr(module, "hparams", {}), "get", lambda _k: None)("pretrained"):
        raise MethodWeightsError(
            f"method `{method}` needs trained weights: pass ckpt_path=<run dir>/checkpoints/last.ckpt (from "
            "train.py) or method.module.pretrained=<released weights file>; evaluating a randomly initialised "
            "network is meaningless"
        )
