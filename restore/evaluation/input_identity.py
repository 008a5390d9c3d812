"""Content identity of the files an evaluation reads: what a rerun checks before it reuses anything.

A run directory is named by its configuration (:mod:`restore.evaluation.fingerprint`), but the files behind a
configuration can change in place: ``prepare_testsets.py --overwrite`` rewrites a benchmark's LR/GT folders, a
user re-exports a folder of restored images. So every restored image and every score record carries the sha256
of the inputs it was made from, and a rerun reuses it only when those digests still match.

Hashing a test set on every rerun would cost seconds per GB; :class:`ContentDigests` caches each digest under the
file's (size, mtime, ctime in ns, inode). The ctime is what makes this safe: a file rewritten in place with its
old size and mtime put back (``cp -p``, ``touch -r``, ``rsync -t``) still gets a new ctime, which no user call can
set, so a cached digest is only ever used for the bytes it was computed from (git's index uses the same fields). The cache is a JSON file per rank in the run directory
(``cache/digests.rank<R>.json``), written atomically; a lost or torn cache only costs a re-hash.

:func:`dataset_identity` folds the digests of a whole test set into one id: tables and reports compare runs only
when they scored the same files (:func:`restore.evaluation.results.check_same_datasets`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from restore.atomic_write import atomic_write_text
from restore.evaluation.fingerprint import file_digest

__all__ = ["ContentDigests", "dataset_identity", "describe_changes"]

log = logging.getLogger(__name__)

CACHE_DIR = "cache"


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class ContentDigests:
    """sha256 of files, cached by their stat signature in ``<run dir>/cache/digests.rank<R>.json``
    (``run_dir=None``: in memory only).

    Every rank reads all ranks' caches (the world size may change between runs) and writes its own.
    """

    def __init__(self, run_dir: str | os.PathLike | None, rank: int = 0) -> None:
        self.directory = None if run_dir is None else Path(run_dir) / CACHE_DIR
        self.path = None if self.directory is None else self.directory / f"digests.rank{rank}.json"
        self._entries: dict[str, list] = {}
        self._dirty = False
        if self.directory is not None and self.directory.is_dir():
            for cache in sorted(self.directory.glob("digests.rank*.json")):
                try:
                    entries = json.loads(cache.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    log.info(f"ignoring unreadable digest cache '{cache}' (the files are hashed again)")
                    continue
                if isinstance(entries, dict):
                    self._entries.update(entries)

    def digest(self, path: str | os.PathLike) -> str:
        """The file's sha256 (from the cache when its size, mtime and inode are unchanged)."""
        resolved = Path(path).resolve()
        key = str(resolved)
        stat = _stat_key(resolved)
        cached = self._entries.get(key)
        if isinstance(cached, list) and len(cached) == 2 and cached[0] == stat:
            return str(cached[1])
        value = file_digest(resolved)
        self._entries[key] = [stat, value]
        self._dirty = True
        return value

    def save(self) -> None:
        """Write this rank's cache (atomically); a no-op when nothing was hashed."""
        if self.path is None or not self._dirty:
            return
        atomic_write_text(self.path, json.dumps(self._entries, sort_keys=True))
        self._dirty = False


def dataset_identity(entries: Iterable[tuple[str, str, str | None]], scale: int) -> str:
    """One id for a test set: sha256 over its (name, LR digest, GT digest) triples in name order and its scale.

    Two runs with the same id restored and scored byte-identical inputs, wherever the folders live.
    """
    digest = hashlib.sha256(f"scale={int(scale)}\n".encode())
    for name, lr, gt in sorted(entries):
        digest.update(f"{name}\t{lr}\t{gt or '-'}\n".encode())
    return digest.hexdigest()[:16]


def describe_changes(reasons: Mapping[str, int]) -> str:
    """``{"LR changed": 2, "new": 1}`` -> ``"LR changed: 2, new: 1"`` (zero counts left out)."""
    return ", ".join(f"{why}: {n}" for why, n in reasons.items() if n)
