"""Writing a file atomically: readers see the old file or the new one, never half of one, and no temp is left.

A write goes to a temporary file in the destination's folder (same file system, so ``os.replace`` is an atomic
rename) and is renamed into place only when complete. Any exception, ``KeyboardInterrupt`` included, removes
the temporary file (``try/finally``). A process killed by SIGTERM/SIGKILL runs no ``finally``: its temporary
file is left behind, so temporary names carry the writer's host and pid
(``.<name>.<host>-<pid>.tmp``, hidden, so image listings never see it), and the first atomic write of a process
into a folder removes the temporary files of processes that no longer run on this host. Files of other hosts
(a shared file system) are never touched: their pids mean nothing here.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "remove_stale_temp_files", "temp_path"]

# `.partial`: torch.hub.download_url_to_file writes through `<our temp>.<uuid hex>.partial` (restore.weights)
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.tmp(\.[0-9a-f]{32}\.partial)?$"
)
#: Folders already swept by this process (sweeping once is enough: later temps of dead writers are rare).
_swept: set[Path] = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file a write of ``path`` by this process goes through (same folder, hidden)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.tmp")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers on this host left in ``folder`` when killed; returns them."""
    folder = Path(folder)
    host, removed = _host(), []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _pid_running(pid):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on normal exit it replaces ``path``.

    Parent folders are created. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _swept:
        remove_stale_temp_files(folder)
        _swept.add(folder)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module doc); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module doc); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
