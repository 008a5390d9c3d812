"""Per-image scores on disk, appended as they are computed, so a killed evaluation resumes where it stopped.

One JSON line per image in ``<run dir>/scores/scores.rank<R>.jsonl`` (one file per DDP rank: appends from
several processes to one file can interleave on network file systems). A line holds the image name, the
fingerprint of everything that defines its scores (benchmark, method, weights, metric settings), the
signature (size, mtime) of the restored file it scored, the per-image scores and the set-level features
(FID's Inception features, base64 float32), so the set-level metrics of a resumed run cover every image.

On resume, a record is reused only if its fingerprint matches and the runner finds the content digests it
carries (restored image, GT) unchanged: a changed config, a re-restored image or a GT rewritten in place is scored
again, never answered from stale lines. A line cut short by a kill is ignored, and the next append starts on a
fresh line (appending to the torn line would make the next record unreadable too).

The same store keeps the provenance of restored images (``stem="restored"``): which LR digest and device each
``images/<benchmark>/<name>.png`` was made from.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ScoreStore", "decode_features", "encode_features", "file_signature"]

log = logging.getLogger(__name__)


def file_signature(path: str | os.PathLike) -> list[int]:
    """(size in bytes, mtime in ns): changes whenever the file is rewritten."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def encode_features(features: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, str]]:
    """``{"fid": {"sr": (D,) tensor}}`` -> base64 of little-endian float32 (exact round trip)."""
    return {
        metric: {
            role: base64.b64encode(vec.detach().cpu().numpy().astype("<f4").tobytes()).decode()
            for role, vec in roles.items()
        }
        for metric, roles in features.items()
    }


def decode_features(encoded: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, np.ndarray]]:
    return {
        metric: {role: np.frombuffer(base64.b64decode(b), dtype="<f4") for role, b in roles.items()}
        for metric, roles in encoded.items()
    }


class ScoreStore:
    """Append-only JSONL of per-image records for one run directory."""

    def __init__(
        self, directory: str | os.PathLike, fingerprint: str, rank: int = 0, stem: str = "scores"
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.stem = stem
        self.path = self.directory / f"{stem}.rank{rank}.jsonl"
        self._tail_checked = False

    def load(self) -> dict[str, dict[str, Any]]:
        """Records of this fingerprint from every rank's file (the world size may have changed since)."""
        records: dict[str, dict[str, Any]] = {}
        stale = broken = 0
        for path in sorted(self.directory.glob(f"{self.stem}.rank*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        broken += 1  # the last line of a killed run
                        continue
                    if record.get("fingerprint") != self.fingerprint:
                        stale += 1
                        continue
                    records[record["name"]] = record
        if stale:
            log.warning(
                f"{stale} {self.stem} record(s) in '{self.directory}' come from another configuration "
                "(fingerprint differs): ignored, those images are scored again"
            )
        if broken:
            log.info(f"ignored {broken} incomplete {self.stem} line(s) (a run was interrupted while writing)")
        return records

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = [json.dumps({**r, "fingerprint": self.fingerprint}, allow_nan=True) + "\n" for r in records]
        if not lines:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._tail_checked:
            self._drop_torn_tail()
            self._tail_checked = True
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def _drop_torn_tail(self) -> None:
        """Cut a last line left without its newline by a kill, so the next record starts a line of its own."""
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return
            fh.truncate(data.rfind(b"\n") + 1)
