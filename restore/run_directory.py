"""A training run directory belongs to one run at a time and to one configuration.

- :class:`RunDirectoryLock`: ``<run dir>/.restore.lock`` (pid, host, SLURM job id, process start time) while a
  run is alive. A second run into the same directory is refused with the holder's pid and host, instead of both
  writing ``checkpoints/`` and one silently replacing the other's files. A lock whose process is gone (same
  host, pid dead or reused) or that belongs to this very SLURM job (``scontrol requeue`` / submitit requeues it
  into the same directory) is taken over.
- :func:`check_config_record`: the first start records its composed config in ``config_history/0.yaml``. A later
  start in the same directory (auto-resume from ``last.ckpt``) with a different config is refused, listing the
  changed keys, unless ``resume_with_changed_config=true``; then the new config is recorded as the next entry,
  so the history keeps both. Hydra rewrites ``.hydra/config.yaml`` before any of this runs: on a refusal it is
  put back to the recorded config, so the directory's record never describes a run that did not happen.

Only global rank 0 does any of this (the other DDP/SLURM ranks start the same script into the same directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "CONFIG_HISTORY",
    "LOCK_FILE",
    "ChangedConfigError",
    "RunDirectoryBusy",
    "RunDirectoryLock",
    "check_config_record",
    "config_changes",
    "guard_run_directory",
    "is_global_rank_zero",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".restore.lock"
CONFIG_HISTORY = "config_history"
#: Keys that name how to start, not what is trained: changing them is not a changed run.
IGNORED_KEYS = ("ckpt_path", "resume_with_changed_config")


class RunDirectoryBusy(RuntimeError):
    """Another live run holds the directory; the message names it and the way out."""


class ChangedConfigError(ValueError):
    """A run directory is resumed with another config than the one it was started with."""


# ---------------------------------------------------------------------------------------------- lock
def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _process_start(pid)
    return start is None or now is None or now == start


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "process_start": _process_start(os.getpid()),
        "started": datetime.now().isoformat(timespec="seconds"),
    }


class RunDirectoryLock:
    """Context manager holding ``<run dir>/.restore.lock`` for the life of a training run."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.me = _this_process()
        self.held = False

    def __enter__(self) -> RunDirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed and creation retried; a racing starter may win
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                why = self._stale_reason(holder)
                if why is None:
                    raise RunDirectoryBusy(self._busy_message(holder)) from None
                log.warning(f"run directory '{self.run_dir}': taking over the lock of {_who(holder)} ({why})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.me, fh)
            self.held = True
            return
        raise RunDirectoryBusy(self._busy_message(self._read()))

    def release(self) -> None:
        if not self.held:
            return
        holder = self._read()
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # unreadable or cut short by a kill while being written
        return data if isinstance(data, dict) else {}

    def _stale_reason(self, holder: Mapping[str, Any]) -> str | None:
        """Why the holder can be ignored, or ``None`` when it may still be running."""
        if not holder:
            return "the lock file is empty or unreadable: its writer died while writing it"
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"]:
            return f"SLURM job {job} was requeued: this is its next start"
        if holder.get("host") == self.me["host"]:
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _alive(pid, holder.get("process_start")):
                return "that process has ended"
        return None

    def _busy_message(self, holder: Mapping[str, Any]) -> str:
        return (
            f"run directory '{self.run_dir}' is in use by {_who(holder)}: two runs in one directory would "
            "overwrite each other's checkpoints. Start this one elsewhere (another hydra.run.dir), or wait for "
            f"that run to end. If it is gone (its machine crashed), delete '{self.path}' and start again"
        )


def _who(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "an unknown process"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("slurm_job_id"):
        text += f" (SLURM job {holder['slurm_job_id']})"
    if holder.get("started"):
        text += f", started {holder['started']}"
    return text


# ---------------------------------------------------------------------------------------------- config
def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs (lists compared whole), ignoring :data:`IGNORED_KEYS`."""
    a, b = dict(_flatten(old)), dict(_flatten(new))
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in IGNORED_KEYS:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changes.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return changes


def _history(run_dir: Path) -> list[Path]:
    folder = run_dir / CONFIG_HISTORY
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.yaml") if p.stem.isdigit()), key=lambda p: int(p.stem))


def _hydra_record_dir(run_dir: Path) -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    subdir = HydraConfig.get().output_subdir
    return None if subdir is None else run_dir / subdir


def _record(run_dir: Path, config: DictConfig, index: int) -> Path:
    folder = run_dir / CONFIG_HISTORY
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index}.yaml"
    path.write_text(OmegaConf.to_yaml(config), encoding="utf-8")
    hydra_dir = _hydra_record_dir(run_dir)
    if hydra_dir is not None and (hydra_dir / "overrides.yaml").is_file():
        shutil.copyfile(hydra_dir / "overrides.yaml", folder / f"{index}.overrides.yaml")
    return path


def check_config_record(cfg: DictConfig, run_dir: str | os.PathLike, allow_change: bool = False) -> None:
    """Record the config of the first start; refuse (or, allowed, record) a later start with another config."""
    run_dir = Path(run_dir)
    history = _history(run_dir)
    current = OmegaConf.to_container(cfg, resolve=False)
    if not history:
        _record(run_dir, cfg, 0)
        return
    latest = history[-1]
    recorded = OmegaConf.to_container(OmegaConf.load(latest), resolve=False)
    changes = config_changes(recorded, current)
    if not changes:
        return
    shown = "; ".join(changes[:10]) + (f"; and {len(changes) - 10} more" if len(changes) > 10 else "")
    if not allow_change:
        _restore_hydra_record(run_dir, latest)
        raise ChangedConfigError(
            f"run directory '{run_dir}' was started with another config ({latest}); this start changes {shown}. "
            "Resuming it would mix two configurations in one run. Start a new run (another hydra.run.dir), or, "
            "to continue this one with the new values on purpose, add resume_with_changed_config=true "
            f"(both configs stay in {run_dir / CONFIG_HISTORY})"
        )
    entry = _record(run_dir, cfg, int(latest.stem) + 1)
    log.warning(
        f"resuming '{run_dir}' with a changed config (resume_with_changed_config=true): {shown}. "
        f"Recorded as {entry}; the earlier config stays in {latest}"
    )


def _restore_hydra_record(run_dir: Path, latest: Path) -> None:
    """Put Hydra's ``.hydra/config.yaml`` (and overrides) back to the recorded run's, which Hydra has just
    replaced with the refused start's."""
    hydra_dir = _hydra_record_dir(run_dir)
    if hydra_dir is None or not hydra_dir.is_dir():
        return
    shutil.copyfile(latest, hydra_dir / "config.yaml")
    overrides = latest.with_name(f"{latest.stem}.overrides.yaml")
    if overrides.is_file():
        shutil.copyfile(overrides, hydra_dir / "overrides.yaml")


# ---------------------------------------------------------------------------------------------- entry
def is_global_rank_zero() -> bool:
    """Rank 0 of a DDP/SLURM job, from the environment the launchers set (before any trainer exists)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return (_get_rank() or 0) == 0


def guard_run_directory(cfg: DictConfig, run_dir: str | os.PathLike) -> RunDirectoryLock | None:
    """Take the directory's lock, then check the config record (rank 0 only; other ranks get ``None``).

    The caller releases the returned lock when the run ends (``finally``).
    """
    if not is_global_rank_zero():
        return None
    run_dir = Path(run_dir)
    lock = RunDirectoryLock(run_dir)
    try:
        lock.acquire()
    except RunDirectoryBusy:
        history = _history(run_dir)
        if history:  # Hydra has just overwritten the live run's .hydra/config.yaml with this refused start's
            _restore_hydra_record(run_dir, history[-1])
        raise
    try:
        check_config_record(cfg, run_dir, bool(cfg.get("resume_with_changed_config", False)))
    except BaseException:
        lock.release()
        raise
    return lock
