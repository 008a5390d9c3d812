"""Reading a checkpoint file with ``torch.load``, failing with restore's own message on a file that is not one.

On a corrupt, truncated or foreign file ``torch.load`` raises errors whose text advises re-running with
``weights_only=False``, which would execute arbitrary code from an untrusted file. Every checkpoint read in
restore goes through :func:`load_checkpoint_file`, which replaces those errors with a
:class:`CheckpointFileError` naming the file, what should have written it and what to do, and checks the file
against the hash pinned at its fetch (:mod:`restore.weights.lock`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from restore.weights.lock import check_pinned

__all__ = ["CheckpointFileError", "check_checkpoint_file", "load_checkpoint_file"]

_PICKLE_PROTOCOL_OPCODE = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)


class CheckpointFileError(ValueError):
    """A file given as a checkpoint cannot be read as one; the message names the file and the fix."""


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a torch.save file: a complete zip archive, or a pickle (legacy format)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == bytes([_PICKLE_PROTOCOL_OPCODE])


_NOT_TORCH = "it is not a complete torch.save file (neither a zip archive nor a pickle: truncated or foreign)"


def _reason(path: Path, err: Exception, weights_only: bool) -> str:
    if not _is_torch_file(path):
        return _NOT_TORCH
    if weights_only and type(err).__name__ == "UnpicklingError":
        return "it holds Python objects besides tensors, which restore does not unpickle from a weights file"
    return f"it is truncated or corrupt ({type(err).__name__})"


def check_checkpoint_file(
    path: str | os.PathLike, *, written_by: str, fix: str = "check the path, or fetch the file again"
) -> None:
    """Cheap check, without loading, that ``path`` can be a checkpoint: for files that another library loads
    (Lightning's ``trainer.fit(ckpt_path=...)``), whose errors would relay torch's advice (module doc)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; {fix}")
    check_pinned(path)
    if not _is_torch_file(path):
        raise CheckpointFileError(
            f"'{path}' is not a checkpoint written by {written_by}: {_NOT_TORCH}; {fix}"
        )


def load_checkpoint_file(
    path: str | os.PathLike,
    *,
    written_by: str,
    fix: str = "check the path, or fetch the file again",
    weights_only: bool = True,
    mmap: bool = False,
) -> Any:
    """``torch.load(path, map_location="cpu")`` with restore's errors (module doc).

    ``written_by`` says what makes such a file (e.g. "train.py (a Lightning checkpoint)"), ``fix`` what to do
    instead. ``weights_only=False`` is for official checkpoints that pickle more than tensors (trusted files;
    the caller says why). ``mmap`` reads tensors lazily and falls back to a full read for torch's legacy
    (non-zip) format, which cannot be memory-mapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; {fix}")
    check_pinned(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
        except RuntimeError:
            if not mmap or zipfile.is_zipfile(path):
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except OSError:
        raise  # unreadable for the OS (permissions, I/O): its own message is the right one
    except Exception as err:
        # `from None`: torch's text (advising weights_only=False) must not reach the user
        raise CheckpointFileError(
            f"'{path}' is not a checkpoint written by {written_by}: {_reason(path, err, weights_only)}; {fix}"
        ) from None
