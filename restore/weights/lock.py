"""Pinned sha256 digests of fetched weight files: ``weights.lock.json`` next to the files it pins.

Many published weights have no published hash (manifest ``sha256: null``). The first fetch of such a file
computes its sha256 and pins it in the lock file of the folder it lands in (trust on first use, as pip's
``--require-hashes`` lock files or ``cargo``'s ``Cargo.lock``); every later fetch and every load through
:func:`restore.weights.checkpoint_file.load_checkpoint_file` compares against the pin, so a file that changes
upstream or on disk is refused instead of silently used. The lock travels with the cache folder when it is
copied to an offline machine. A load re-hashes only when the file's size or modification time differ from the
ones recorded at pinning (hashing a multi-GB checkpoint on every load would cost seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from restore.atomic_write import atomic_write_text

__all__ = [
    "LOCK_FILE",
    "WeightsVerificationError",
    "check_pinned",
    "pin",
    "pinned_sha256",
    "read_pins",
    "sha256_file",
    "unpin",
]

LOCK_FILE = "weights.lock.json"
_FORMAT = "restore.weights.lock/v1"


class WeightsVerificationError(ValueError):
    """A weight file does not match the manifest's hash or the one pinned when it was first fetched."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that pins the weight file at ``path``."""
    return Path(path).parent / LOCK_FILE


def read_pins(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "size", "mtime_ns", "url", "pinned"}}`` of ``folder``'s lock file ({} if none)."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsVerificationError(
            f"'{path}' is not a weights lock file ({err}); delete it and re-fetch the files of '{folder}' to "
            "pin them again"
        ) from None
    return dict(files)


def pinned_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 pinned for the weight file at ``path``, or None."""
    entry = read_pins(Path(path).parent).get(Path(path).name)
    return None if entry is None else str(entry["sha256"])


def _write(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"format": _FORMAT, "files": dict(sorted(files.items()))}, indent=1) + "\n"
    atomic_write_text(folder / LOCK_FILE, text)


def pin(path: str | os.PathLike, sha256: str, url: str = "") -> None:
    """Record ``sha256`` (and the file's size and mtime) as the pin of the installed file at ``path``."""
    path = Path(path)
    files = read_pins(path.parent)
    stat = path.stat()
    files[path.name] = {
        "sha256": sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "url": url,
        "pinned": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write(path.parent, files)


def unpin(path: str | os.PathLike) -> bool:
    """Forget the pin of the file at ``path``; True when there was one."""
    path = Path(path)
    files = read_pins(path.parent)
    if files.pop(path.name, None) is None:
        return False
    _write(path.parent, files)
    return True


def mismatch_message(path: Path, actual: str, expected: str) -> str:
    """Why a file failing its pin is refused, and the two ways out."""
    return (
        f"'{path}': sha256 {actual} does not match {expected} pinned in '{lock_path(path)}' when it was first "
        f"fetched. Delete the file and run `python -m restore.weights fetch {path.name}` to download it again; "
        f"if the file changed upstream on purpose, add --repin to pin the new hash"
    )


def check_pinned(path: str | os.PathLike) -> None:
    """Raise :class:`WeightsVerificationError` when the file at ``path`` has a pin it does not match.

    Files without a pin pass. The hash is recomputed only when size or mtime differ from the pinned ones.
    """
    path = Path(path)
    entry = read_pins(path.parent).get(path.name)
    if entry is None:
        return
    stat = path.stat()
    if stat.st_size == entry.get("size") and stat.st_mtime_ns == entry.get("mtime_ns"):
        return
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise WeightsVerificationError(mismatch_message(path, actual, entry["sha256"]))
