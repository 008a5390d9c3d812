"""The ``results.json`` format written by the evaluation runner: finding, loading and checking it.

One file per (method, benchmark) run. The table and report code read these files only through
:func:`load_results`, so a run that wrote something odd (a hand-edited file, an older runner, a crash
mid-write) is rejected here with the file name and the field at fault, instead of turning into a
silently wrong number in a paper table.

The check is a small hand-written schema (no dependency): required fields and their types, metric
names that agree between ``metrics``, ``aggregate`` and the per-image scores, and unique image names.
Unknown extra fields are allowed so that newer runners stay readable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "RESULTS_FILENAME",
    "RESULTS_FORMAT",
    "ResultsFormatError",
    "dedupe_results",
    "finite",
    "find_results_files",
    "load_results",
    "load_results_file",
    "result_source",
    "validate_all",
    "validate_results",
]

RESULTS_FORMAT = "restore.results/v1"
RESULTS_FILENAME = "results.json"
#: Key added to each loaded result: the file it came from (for error messages and the report footer).
SOURCE_KEY = "_source"
METRIC_KINDS = ("fr", "nr", "set")


class ResultsFormatError(ValueError):
    """A results file (or in-memory result) does not follow ``restore.results/v1``; names the culprit."""


def result_source(result: Mapping[str, Any], index: int | None = None) -> str:
    """Where a result came from: its file when loaded from disk, else ``results[index]``."""
    src = result.get(SOURCE_KEY)
    if src:
        return str(src)
    return f"results[{index}]" if index is not None else "<in-memory result>"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_score(value: Any, where: str, fail) -> None:
    # null (and NaN, which Python's json writes for a failed metric) mean "no value"; both show as "–".
    if value is not None and not _is_number(value):
        fail(f"{where} must be a number or null, got {value!r}")


def validate_results(data: Any, source: str = "<in-memory result>") -> dict[str, Any]:
    """Check one parsed results object; return a shallow copy with optional fields filled in.

    Raises :class:`ResultsFormatError` naming ``source`` and the problem. Enforced:

    - a JSON object with ``format == "restore.results/v1"``;
    - ``method``, ``benchmark``: non-empty strings; ``scale``: positive integer;
    - ``metrics``: object of ``name -> {"lower_better": bool, "kind": "fr"|"nr"|"set", ...}``;
    - ``aggregate``: object whose keys are all in ``metrics``, values number or null;
    - ``per_image``: list of objects with a unique non-empty string ``name``, string ``sr`` and ``lr``,
      ``gt`` string or null, and ``scores`` whose keys are non-set metrics of ``metrics``;
    - optional (defaults in brackets): ``num_images`` [len(per_image) + len(skipped)], ``num_scored``
      [len(per_image)] (non-negative integers, ``num_scored <= num_images``), ``skipped`` [[]] (objects
      with ``name`` and ``reason``), ``missing_metrics`` [{}] (name -> reason string), ``settings`` [{}],
      ``created`` [null] (ISO 8601 string), ``overrides`` [{}] (the Hydra overrides that vary across the
      sweep the run belongs to: key -> value string), ``job_num`` [null] (the run's job number in that
      sweep, non-negative integer), ``note`` [null] (what a reader must know next to the method's numbers,
      e.g. that its prior is a tiny random one; a string), ``dataset`` [null] (``{"id": ..., "lr_dir": ...,
      "gt_dir": ...}``: the content identity of the scored test set, :func:`check_same_datasets`).
    """

    def fail(problem: str) -> None:
        raise ResultsFormatError(f"{source}: {problem}")

    if not isinstance(data, Mapping):
        fail(f"expected a JSON object at the top level, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != RESULTS_FORMAT:
        fail(f"'format' must be {RESULTS_FORMAT!r}, got {fmt!r} (not a results file of this framework?)")
    for key in ("method", "benchmark", "scale", "metrics", "aggregate", "per_image"):
        if key not in data:
            fail(f"required field {key!r} is missing")
    for key in ("method", "benchmark"):
        if not isinstance(data[key], str) or not data[key].strip():
            fail(f"{key!r} must be a non-empty string, got {data[key]!r}")
    scale = data["scale"]
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        fail(f"'scale' must be a positive integer, got {scale!r}")

    metrics = data["metrics"]
    if not isinstance(metrics, Mapping):
        fail(f"'metrics' must be an object of metric name -> spec, got {type(metrics).__name__}")
    for name, spec in metrics.items():
        if not isinstance(spec, Mapping):
            fail(f"metrics[{name!r}] must be an object, got {spec!r}")
        if not isinstance(spec.get("lower_better"), bool):
            fail(f"metrics[{name!r}].lower_better must be true or false, got {spec.get('lower_better')!r}")
        if spec.get("kind") not in METRIC_KINDS:
            fail(f"metrics[{name!r}].kind must be one of {METRIC_KINDS}, got {spec.get('kind')!r}")

    aggregate = data["aggregate"]
    if not isinstance(aggregate, Mapping):
        fail(f"'aggregate' must be an object, got {type(aggregate).__name__}")
    for name, value in aggregate.items():
        if name not in metrics:
            fail(f"aggregate[{name!r}] has no entry in 'metrics' (known: {sorted(metrics)})")
        _check_score(value, f"aggregate[{name!r}]", fail)

    per_image = data["per_image"]
    if not isinstance(per_image, list):
        fail(f"'per_image' must be a list, got {type(per_image).__name__}")
    seen: set[str] = set()
    for i, entry in enumerate(per_image):
        where = f"per_image[{i}]"
        if not isinstance(entry, Mapping):
            fail(f"{where} must be an object, got {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            fail(f"{where}.name must be a non-empty string, got {name!r}")
        if name in seen:
            fail(f"{where}: image name {name!r} appears twice")
        seen.add(name)
        where = f"per_image[{i}] ({name!r})"
        for key in ("sr", "lr"):
            if not isinstance(entry.get(key), str):
                fail(f"{where}.{key} must be a path string, got {entry.get(key)!r}")
        if entry.get("gt") is not None and not isinstance(entry["gt"], str):
            fail(f"{where}.gt must be a path string or null, got {entry['gt']!r}")
        scores = entry.get("scores", {})
        if not isinstance(scores, Mapping):
            fail(f"{where}.scores must be an object, got {scores!r}")
        for metric, value in scores.items():
            if metric not in metrics:
                fail(f"{where}.scores[{metric!r}] has no entry in 'metrics' (known: {sorted(metrics)})")
            if metrics[metric]["kind"] == "set":
                fail(f"{where}.scores[{metric!r}]: set-level metrics have no per-image score")
            _check_score(value, f"{where}.scores[{metric!r}]", fail)

    out = dict(data)
    skipped = out.setdefault("skipped", [])
    if not isinstance(skipped, list):
        fail(f"'skipped' must be a list, got {type(skipped).__name__}")
    for i, entry in enumerate(skipped):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            fail(f"skipped[{i}] must be an object with a string 'name', got {entry!r}")
        if not isinstance(entry.get("reason"), str):
            fail(f"skipped[{i}] ({entry['name']!r}) needs a string 'reason', got {entry.get('reason')!r}")
    missing = out.setdefault("missing_metrics", {})
    if not isinstance(missing, Mapping) or not all(isinstance(v, str) for v in missing.values()):
        fail(f"'missing_metrics' must be an object of metric name -> reason string, got {missing!r}")
    if not isinstance(out.setdefault("settings", {}), Mapping):
        fail(f"'settings' must be an object, got {out['settings']!r}")
    out.setdefault("num_scored", len(per_image))
    out.setdefault("num_images", len(per_image) + len(skipped))
    for key in ("num_images", "num_scored"):
        n = out[key]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            fail(f"{key!r} must be a non-negative integer, got {n!r}")
    if out["num_scored"] > out["num_images"]:
        fail(f"'num_scored' ({out['num_scored']}) exceeds 'num_images' ({out['num_images']})")
    overrides = out.setdefault("overrides", {})
    if not isinstance(overrides, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in overrides.items()
    ):
        fail(f"'overrides' must be an object of override key -> value string, got {overrides!r}")
    dataset = out.setdefault("dataset", None)
    if dataset is not None and (not isinstance(dataset, Mapping) or not isinstance(dataset.get("id"), str)):
        fail(
            f"'dataset' must be an object with a string 'id' (the test set's content identity), got {dataset!r}"
        )
    note = out.setdefault("note", None)
    if note is not None and (not isinstance(note, str) or not note.strip()):
        fail(f"'note' must be a non-empty string or null, got {note!r}")
    job_num = out.setdefault("job_num", None)
    if job_num is not None and (not isinstance(job_num, int) or isinstance(job_num, bool) or job_num < 0):
        fail(f"'job_num' must be a non-negative integer or null, got {job_num!r}")
    created = out.setdefault("created", None)
    if created is not None and _parse_created(created) is None:
        fail(f"'created' must be an ISO 8601 date-time string or null, got {created!r}")
    return out


def validate_all(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`validate_results` on each result (loaded or built in memory by the runner), in order."""
    if isinstance(results, Mapping):
        raise TypeError("expected a sequence of results, got a single result mapping; wrap it in a list")
    return [validate_results(r, result_source(r, i)) for i, r in enumerate(results)]


def find_results_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``results.json`` files named directly or found (recursively, sorted) under the given directories.

    A path that does not exist, or a directory holding no ``results.json``, raises ``FileNotFoundError``:
    a typo in a run directory should not quietly drop a column from a table.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(
                (
                    Path(d, RESULTS_FILENAME)
                    for d, _, files in os.walk(p, followlinks=True)
                    if RESULTS_FILENAME in files
                ),
                key=lambda f: f.as_posix(),
            )
            if not hits:
                raise FileNotFoundError(f"no {RESULTS_FILENAME} found under '{p}'")
            found.extend(hits)
        else:
            raise FileNotFoundError(
                f"'{p}' does not exist (expected a {RESULTS_FILENAME} file or a run directory)"
            )
    if not found:
        raise FileNotFoundError(f"no {RESULTS_FILENAME} files given")
    unique: dict[Path, Path] = {}
    for f in found:  # a file named directly and again via its parent directory counts once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def load_results_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one results file; relative image paths are resolved against its directory."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResultsFormatError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ResultsFormatError(f"{path}: not a UTF-8 text file ({err})") from err
    result = validate_results(data, source=str(path))
    base = path.resolve().parent
    per_image = []
    for entry in result["per_image"]:
        entry = dict(entry)
        for key in ("sr", "lr", "gt"):
            if isinstance(entry.get(key), str) and not os.path.isabs(entry[key]):
                entry[key] = str(base / entry[key])
        per_image.append(entry)
    result["per_image"] = per_image
    result[SOURCE_KEY] = str(path)
    return result


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Load results files and/or run directories (searched recursively for ``results.json``).

    Each returned dict is the validated file content plus ``"_source"`` (the file path). Raises
    ``FileNotFoundError`` if nothing is found and :class:`ResultsFormatError` for a malformed file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [load_results_file(f) for f in find_results_files(paths)]


def _parse_created(created: Any) -> datetime | None:
    if not isinstance(created, str):
        return None
    try:  # Python < 3.11 does not take a trailing "Z"
        dt = datetime.fromisoformat(created[:-1] + "+00:00" if created.endswith("Z") else created)
    except ValueError:
        return None
    # Naive and aware stamps must compare: aware ones go to local time, then all become naive.
    return dt if dt.tzinfo is None else dt.astimezone().replace(tzinfo=None)


def _created_key(result: Mapping[str, Any]) -> datetime:
    return _parse_created(result.get("created")) or datetime.min


def dedupe_results(
    results: Sequence[Mapping[str, Any]], on_duplicate: Literal["error", "newest"] = "error"
) -> list[Mapping[str, Any]]:
    """Check that each (method, benchmark) occurs once; order of first appearance is kept.

    ``on_duplicate="error"`` raises ``ValueError`` naming both sources; ``"newest"`` keeps the result with
    the latest ``created`` (a result without ``created`` counts as oldest).
    """
    if on_duplicate not in ("error", "newest"):
        raise ValueError(f"on_duplicate must be 'error' or 'newest', got {on_duplicate!r}")
    kept: dict[tuple[str, str], tuple[int, Mapping[str, Any]]] = {}
    for i, r in enumerate(results):
        key = (r["method"], r["benchmark"])
        if key not in kept:
            kept[key] = (i, r)
            continue
        j, other = kept[key]
        if on_duplicate == "error":
            raise ValueError(
                f"two results for method {key[0]!r} on benchmark {key[1]!r}: {result_source(other, j)} and "
                f"{result_source(r, i)}; remove one, rename a method, or keep the newest (--keep-newest)"
            )
        if _created_key(r) > _created_key(other):
            kept[key] = (j, r)  # keep the first one's position so column order stays stable
    return [r for _, r in sorted(kept.values(), key=lambda t: t[0])]


def _dataset_paths(result: Mapping[str, Any]) -> tuple[str | None, str | None]:
    recorded = result.get("dataset") or {}
    settings = result.get("settings") or {}
    return (
        recorded.get("lr_dir") or settings.get("lr_dir"),
        recorded.get("gt_dir") if recorded else settings.get("gt_dir"),
    )


def _describe_dataset(result: Mapping[str, Any], index: int) -> str:
    lr, gt = _dataset_paths(result)
    content = (result.get("dataset") or {}).get("id") or "no content id (scored before restore recorded one)"
    return f"{result_source(result, index)} (data set {content}; LR {lr}, GT {gt})"


def check_same_datasets(results: Sequence[Mapping[str, Any]]) -> None:
    """Results that share a benchmark name must have scored the same files, else ``ValueError`` names both.

    Two results match when their content ids (sha256 over every LR/GT file, ``results["dataset"]["id"]``) are
    equal; a result without one (written before content ids existed) matches when its LR/GT folders are the same.
    A test set rewritten in place, or two ``benchmark=folder`` runs on different folders, never share a row.
    """
    first: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for i, r in enumerate(results):
        name = r["benchmark"]
        if name not in first:
            first[name] = (i, r)
            continue
        j, other = first[name]
        a, b = (other.get("dataset") or {}).get("id"), (r.get("dataset") or {}).get("id")
        same = a == b if a and b else _dataset_paths(other) == _dataset_paths(r)
        if not same:
            raise ValueError(
                f"benchmark {name!r} names two different test sets: {_describe_dataset(other, j)} and "
                f"{_describe_dataset(r, i)}. Their numbers cannot share a row: tabulate them separately, "
                "rerun the older one on the current files, or give one set its own name (benchmark.name=...)"
            )


def finite(value: Any) -> float | None:
    """A score as float, or None for missing / null / NaN / inf (all displayed as "–")."""
    if value is None or not _is_number(value):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
