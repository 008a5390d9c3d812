"""Read network weights saved by BasicSR-family code (BasicSR, Real-ESRGAN, SwinIR releases).

Their ``.pth`` files are dicts ``{"params": ..., "params_ema": ...}`` (one or both); ``params_ema`` holds the
EMA weights that the papers report, so it is the default. Some third-party files are a bare state dict.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = ["load_basicsr_state_dict"]


def load_basicsr_state_dict(
    path: str | os.PathLike, param_key: str | None = "params_ema"
) -> dict[str, torch.Tensor]:
    """State dict from a BasicSR checkpoint, taken from ``param_key`` (``None``: the file is a bare state dict).

    A missing ``param_key`` falls back to the other BasicSR key only when it is the only one present, so a
    file with both keys never silently yields the non-EMA weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file '{path}' does not exist (download it into `paths.weights_dir`)"
        )
    ckpt = load_checkpoint_file(
        path, written_by="BasicSR (a Real-ESRGAN / ESRGAN release)", fix="download the release again"
    )
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{path}' holds a {type(ckpt).__name__}, not a state dict")
    wrappers = [k for k in ("params_ema", "params") if isinstance(ckpt.get(k), dict)]
    if param_key is None or not wrappers:
        if wrappers:
            raise ValueError(f"'{path}' wraps its weights under {wrappers}; pass one of them as param_key")
        return ckpt
    if param_key in ckpt:
        return ckpt[param_key]
    if len(wrappers) == 1:
        return ckpt[wrappers[0]]
    raise KeyError(f"'{path}' has no '{param_key}' entry; it has {sorted(ckpt)}")
