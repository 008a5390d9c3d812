"""Text prompts / tags kept beside a dataset in a JSONL side-file, looked up by dataset key.

Prompts are pre-computed (captioner or tagger run once) instead of being produced inside the data
pipeline, so training and evaluation see exactly the same text. Format, one JSON object per line::

    {"path": "0001.png", "prompt": "a red car on a street", "tags": ["car", "street"]}

``path`` is the image path relative to the dataset root, i.e. the dataset's ``key``. Any other field
can be selected with ``key=`` (``"prompt"``, ``"tags"``, ``"caption"``...); list values (tag lists) are
joined with ``", "``. Blank lines are ignored. :meth:`PromptTable.record` returns every text field of an
entry at once (XPSR's ``highlevel`` and ``lowlevel`` prompts of one image).

Lookup first matches the normalised relative path exactly; failing that it falls back to the file
stem (``"sub/0001.png"`` finds an entry ``"0001.jpg"``) provided that stem is unique in the side-file.
The fallback lets one side-file serve an LR folder and its GT folder when extensions differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["MISSING_POLICIES", "PromptNotFoundError", "PromptTable"]

MISSING_POLICIES = ("error", "empty")


class PromptNotFoundError(KeyError):
    """No prompt for an image; the message names the image and the side-file."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _normalise(path: str) -> str:
    """'./a\\b.png' -> 'a/b.png': keys compare equal whatever the separator or a leading './'."""
    return "/".join(p for p in path.replace("\\", "/").split("/") if p not in ("", "."))


def _stem(path: str) -> str:
    return PurePosixPath(path).stem


class PromptTable:
    """Read-only mapping dataset key -> text, loaded from a JSONL side-file.

    ``missing="error"`` (default) raises :class:`PromptNotFoundError` for an image without an entry or
    without the requested field; ``missing="empty"`` returns ``""`` (the unconditional prompt) instead.
    """

    def __init__(self, path: str | os.PathLike, key: str = "prompt", missing: str = "error"):
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
        self.path = Path(path)
        self.key = key
        self.missing = missing
        if not self.path.is_file():
            raise FileNotFoundError(_missing_file_message(self.path, key))
        self._records: dict[str, tuple[int, dict[str, Any]]] = {}
        stems: dict[str, list[str]] = {}
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: invalid JSON ({err.msg}): {line.strip()[:80]!r}") from err
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    raise ValueError(
                        f'{where}: expected an object with a string field "path", got {line.strip()[:80]!r}'
                    )
                rel = _normalise(record["path"])
                if rel in self._records:
                    raise ValueError(
                        f"{where}: duplicate entry for '{rel}' (first at line {self._records[rel][0]})"
                    )
                self._records[rel] = (lineno, record)
                stems.setdefault(_stem(rel), []).append(rel)
        self._by_stem = {s: paths[0] for s, paths in stems.items() if len(paths) == 1}
        self._ambiguous_stems = {s for s, paths in stems.items() if len(paths) > 1}

    def __len__(self) -> int:
        return len(self._records)

    def texts(self) -> list[str]:
        """The ``key`` field of every entry that has it, in file order (e.g. to precompute text features)."""
        return [
            _as_text(record[self.key], f"{self.path}:{lineno}", self.key)
            for lineno, record in self._records.values()
            if record.get(self.key) is not None
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}', key={self.key!r}, entries={len(self)})"

    def _resolve(self, image_key: str) -> str | None:
        rel = _normalise(image_key)
        if rel in self._records:
            return rel
        return self._by_stem.get(_stem(rel))

    def __contains__(self, image_key: object) -> bool:
        if not isinstance(image_key, str):
            return False
        rel = self._resolve(image_key)
        return rel is not None and self.key in self._records[rel][1]

    def _no_entry_message(self, image_key: str) -> str:
        hint = ""
        if _stem(_normalise(image_key)) in self._ambiguous_stems:
            hint = " (its file stem matches several entries, so the stem fallback was not used)"
        return (
            f"no prompt for image '{image_key}' in side-file '{self.path}'{hint}; add a line "
            f'{{"path": "{_normalise(image_key)}", "{self.key}": "..."}} or use missing="empty"'
        )

    def __getitem__(self, image_key: str) -> str:
        rel = self._resolve(image_key)
        if rel is None:
            if self.missing == "empty":
                return ""
            raise PromptNotFoundError(self._no_entry_message(image_key))
        lineno, record = self._records[rel]
        if self.key not in record:
            if self.missing == "empty":
                return ""
            raise PromptNotFoundError(
                f"entry for image '{image_key}' in side-file '{self.path}' (line {lineno}) has no field "
                f"'{self.key}'; fields present: {sorted(record)}"
            )
        return _as_text(record[self.key], f"{self.path}:{lineno}", self.key)

    def has_record(self, image_key: str) -> bool:
        """Whether ``image_key`` has an entry at all (whatever its fields), after the stem fallback."""
        return self._resolve(image_key) is not None

    def record(self, image_key: str) -> dict[str, str]:
        """Every text field of the entry for ``image_key``: ``{"highlevel": "...", "lowlevel": "..."}``.

        String and list fields are returned (lists joined with ``", "`` as for ``key=``); ``path`` and
        fields of other types (numbers, objects: metadata, not text) are left out. Lookup and the missing
        policy are those of ``table[image_key]``: no entry raises :class:`PromptNotFoundError`, or with
        ``missing="empty"`` returns ``{}`` (the method then falls back to its unconditional prompts).
        """
        rel = self._resolve(image_key)
        if rel is None:
            if self.missing == "empty":
                return {}
            raise PromptNotFoundError(self._no_entry_message(image_key))
        lineno, record = self._records[rel]
        where = f"{self.path}:{lineno}"
        return {
            name: _as_text(value, where, name)
            for name, value in record.items()
            if name != "path" and isinstance(value, (str, list))
        }

    def get(self, image_key: str, default: str | None = None) -> str | None:
        """Like ``dict.get``: ``default`` instead of an error when there is no text for ``image_key``."""
        rel = self._resolve(image_key)
        if rel is None or self.key not in self._records[rel][1]:
            return default
        return self[image_key]

    def missing_keys(self, image_keys: Iterable[str]) -> list[str]:
        """The keys among ``image_keys`` without text."""
        return [k for k in image_keys if k not in self]

    def require(self, image_keys: Iterable[str], shown: int = 5) -> None:
        """Fail at dataset construction, not hours into training, when images lack text.

        No-op with ``missing="empty"``. Raises :class:`PromptNotFoundError` naming the first few
        images without text and the side-file.
        """
        if self.missing == "empty":
            return
        missing = self.missing_keys(image_keys)
        if missing:
            head = ", ".join(repr(k) for k in missing[:shown])
            more = f" (and {len(missing) - shown} more)" if len(missing) > shown else ""
            raise PromptNotFoundError(
                f"{len(missing)} image(s) have no '{self.key}' in side-file '{self.path}': {head}{more}; "
                'add them, or set missing="empty" to use an empty prompt for them'
            )


#: The side-file fields scripts/extract_prompts.py fills without a ``=SOURCE`` (its DEFAULT_SOURCES); XPSR reads
#: highlevel and lowlevel together (configs/experiment/xpsr*.yaml prompt_key).
_EXTRACTABLE_FIELDS = ("highlevel", "lowlevel", "tags", "highlevel_gt", "lowlevel_gt", "tags_gt")
_XPSR_FIELDS = ("highlevel", "lowlevel")


def _missing_file_message(path: Path, key: str) -> str:
    """Which command writes the missing side-file ``path`` whose field ``key`` is read."""
    if key in _XPSR_FIELDS:
        fields = " ".join(f"--field {name}" for name in _XPSR_FIELDS)
    elif key in _EXTRACTABLE_FIELDS:
        fields = f"--field {key}"
    else:
        fields = f"--field {key}=<llava15_7b | qinstruct | dape | tiny_llava | captioner.yaml>"
    return (
        f"prompt side-file '{path}' does not exist; write it with "
        f"`python scripts/extract_prompts.py --input <the dataset's image folder> {fields} --out {path}` "
        f"(for the scikit-image photos of data=samples, as experiment=xpsr_tiny trains on, offline: "
        f"`python scripts/extract_prompts.py --input-embedded --tiny {fields} --out {path}`), or point the "
        "data config's `prompts` at an existing file (format: data/README.md)"
    )


def _as_text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    raise ValueError(f"{where}: field '{key}' must be a string or a list of strings, got {value!r}")
