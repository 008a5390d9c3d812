"""The benchmark runner behind ``eval.py``: restore a test set (or take a folder of restored images), score
it, and write results.json / results.csv / table.md / report.html into the run directory.

Per rank (one process per GPU, or one CPU process):

1. list the benchmark (:class:`~restore.evaluation.benchmark.Benchmark`); skipped files are reported;
2. what is scored: either the method restores this rank's share of the LR images into
   ``images/<benchmark>/<name>.png``, or ``outputs=DIR`` names a folder of restored images, matched to the
   benchmark by name. A restored image of an earlier run in this directory is kept only when it was made from
   an LR with the same content (sha256, :mod:`restore.evaluation.input_identity`) on the same kind of device;
   otherwise it is restored again, and the log says how many of each and why;
3. score this rank's share: each restored image and its GT are decoded once (DataLoader workers), grouped
   into batches of equal size and passed to every metric of the :class:`~restore.metrics.MetricSuite`;
   each batch's records are appended to the score store before the next (a killed run loses one batch). A
   stored record is reused only when the restored image and the GT it scored still have the same content;
4. gather every rank's records (exact, pickled objects), then rank 0 computes the set-level metrics (FID)
   over the whole set and writes the outputs.

Images are assigned to ranks round-robin in name order, so each one is restored and scored exactly once.

``module=`` evaluates a module already in memory (``train.py evaluate=...`` right after fitting) instead of
building ``spec.method`` and loading ``spec.ckpt_path``; the restore loop is the same. A method declares whether
it needs trained weights (``requires_weights``, default true) and whether it takes per-image prompts
(``takes_prompts``): when it does and the benchmark names a prompt side-file, each image's record (all text fields
of its entry) is passed as ``restore(lq, prompts=[record])``; other methods are called as ``restore(lq)``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from restore.atomic_write import atomic_write_text
from restore.data.image_io import ImageReadError, image_size, read_image, to_tensor, write_image
from restore.data.prompts import PromptTable
from restore.evaluation.benchmark import (
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    Skipped,
    apply_steps,
    index_images,
)
from restore.evaluation.fingerprint import stable_hash
from restore.evaluation.input_identity import ContentDigests, dataset_identity, describe_changes
from restore.evaluation.parallel import barrier, gather_objects, world
from restore.evaluation.score_store import ScoreStore, decode_features, encode_features

__all__ = ["EvalSpec", "evaluate_benchmark", "match_outputs", "RESULTS_FORMAT"]

log = logging.getLogger(__name__)

RESULTS_FORMAT = "restore.results/v1"
RUN_KEY_FILE = "run_key.txt"
#: the method's ``evaluation_note``, kept beside the images so that a resumed run that restores nothing has it
NOTE_FILE = "method_note.txt"


@dataclass
class EvalSpec:
    """Everything one rank needs (picklable: Fabric may spawn the ranks)."""

    benchmark: Benchmark
    label: str
    run_dir: Path
    run_key: str
    method: Mapping[str, Any] | None = None  # the `method` config node (instantiable), as a plain dict
    ckpt_path: str | None = None
    outputs: Path | None = None
    metric_catalog: Mapping[str, Any] | None = None
    on_missing_weights: str = "warn"
    batch_size: int = 8
    num_workers: int = 2
    progress: bool = True
    report: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, str] = field(default_factory=dict)  # a sweep's varying overrides (sweep.py)
    job_num: int | None = None  # the job's number in that sweep
    protocol: Mapping[str, Any] | None = None  # the `protocol` config node (configs/protocol/), recorded
    precision: str = "32-true"  # what the method restored in (Lightning's names), recorded and in the run key

    @property
    def images_dir(self) -> Path:
        return self.run_dir / "images" / self.benchmark.name


# ---------------------------------------------------------------------------------------------- outputs=
def match_outputs(items: Sequence[BenchmarkItem], outputs: Path) -> dict[str, Path]:
    """``name -> restored file`` for every benchmark item; an error lists missing and unexpected names."""
    if not outputs.is_dir():
        raise BenchmarkError(f"outputs={outputs} is not a folder")
    found, _ = index_images(outputs, "", "outputs")
    wanted = {it.name for it in items}
    missing = sorted(wanted - set(found))
    extra = sorted(set(found) - wanted)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:10]) + (
            f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        hint = (
            f"; the folder also has {len(extra)} image(s) with other names, e.g. {extra[0]!r}"
            if extra
            else ""
        )
        raise BenchmarkError(
            f"outputs={outputs}: {len(missing)} benchmark image(s) have no restored file of the same name "
            f"(any image extension): {shown}{hint}. Name the restored files like the LR files"
        )
    if extra:
        log.warning(
            f"outputs={outputs}: {len(extra)} image(s) are not in the benchmark and are ignored, e.g. {extra[:3]}"
        )
    return {name: found[name] for name in wanted}


def check_sizes(pairs: Sequence[tuple[str, Path, Path | None]], post: Sequence[Mapping[str, Any]]) -> None:
    """Restored and GT images must have the same size (unless a ``post`` resize makes them equal)."""
    if any("resize" in step for step in post):
        return
    wrong = []
    for name, sr, gt in pairs:
        if gt is None:
            continue
        a, b = image_size(sr), image_size(gt)
        if a is not None and b is not None and a != b:
            wrong.append(f"{name} (restored {a[0]}x{a[1]}, GT {b[0]}x{b[1]})")
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        raise BenchmarkError(
            f"{len(wrong)} restored image(s) differ in size from their GT: {shown}. Check the scale, or crop/"
            "resize both with benchmark.post=[{center_crop: SIZE}] / [{resize: SIZE}]"
        )


# ---------------------------------------------------------------------------------------------- restore
def _load_method(spec: EvalSpec, device: torch.device) -> torch.nn.Module:
    from hydra.utils import instantiate

    from restore.methods.checkpoints import load_method_weights

    method = spec.method or {}
    if "_target_" not in method:
        raise BenchmarkError("the method config has no `_target_` (see configs/method/)")
    module = instantiate(method)
    if not hasattr(module, "restore"):
        raise BenchmarkError(f"method `{spec.label}` ({type(module).__name__}) has no restore(lq) method")
    if requires_weights(module):
        load_method_weights(module, spec.ckpt_path, spec.label)
    return module.to(device).eval()


def requires_weights(model: Any) -> bool:
    """The method's declaration (class attribute ``requires_weights``, default true)."""
    return bool(getattr(model, "requires_weights", True))


def method_note(model: Any) -> str | None:
    """What a reader must know next to the method's numbers (its ``evaluation_note``), e.g. a tiny random
    prior whose images are noise by design."""
    note = getattr(model, "evaluation_note", None)
    return str(note) if note else None


def takes_prompts(model: Any) -> bool:
    """The method's declaration (class attribute ``takes_prompts``): ``restore(lq, prompts=[...])``."""
    return bool(getattr(model, "takes_prompts", False))


def restore_images(
    spec: EvalSpec,
    items: Sequence[BenchmarkItem],
    fabric: Any,
    module: torch.nn.Module | None = None,
    prompts: PromptTable | None = None,
    digests: ContentDigests | None = None,
) -> list[Skipped]:
    """Restore this rank's share of ``items`` into ``spec.images_dir``, reusing what is still valid.

    An image already there is reused when its provenance record (``<run dir>/restored/``) says it was made from
    an LR of the same content, on the same kind of device, and the file is the one that was written; any other
    is deleted and restored again (it is this run's own derived file, never a user's).
    ``module``: the method to run (default: built from ``spec.method`` with ``spec.ckpt_path``); it is moved
    to the device and put in eval mode, and its train/eval mode is restored afterwards. ``prompts``: the
    benchmark's side-file (:meth:`Benchmark.prompt_table`), passed to methods that take ``prompts=``.
    """
    rank, size = world()
    digests = digests or ContentDigests(None)
    device = fabric.device if fabric is not None else torch.device("cpu")
    provenance = ScoreStore(spec.run_dir / "restored", spec.run_key, rank, stem="restored")
    made = provenance.load()
    share = list(items[rank::size])
    mine, why = _stale_restorations(spec, share, made, digests, device.type)
    if rank == 0 and (why or len(mine) < len(share)):
        reused = len(share) - len(mine)
        detail = f" ({describe_changes(why)})" if why else ""
        log.info(f"restore: {reused} image(s) of this run reused, {len(mine)} to restore{detail}")
    skipped: list[Skipped] = []
    if not mine:
        return skipped
    was_training = None if module is None else module.training
    model = _load_method(spec, device) if module is None else module.to(device).eval()
    if not hasattr(model, "restore"):
        raise BenchmarkError(f"method `{spec.label}` ({type(model).__name__}) has no restore(lq) method")
    note = method_note(model)
    if note and rank == 0:
        (spec.run_dir / NOTE_FILE).write_text(note, encoding="utf-8")
    use_prompts = prompts is not None and takes_prompts(model)
    if prompts is not None and not use_prompts and rank == 0:
        log.info(
            f"benchmark `{spec.benchmark.name}` has prompts ({prompts.path}) but method `{spec.label}` "
            f"({type(model).__name__}.restore) takes none: restoring without them"
        )
    try:
        skipped += _restore_loop(
            spec, mine, model, fabric, device, prompts if use_prompts else None, provenance, digests
        )
    finally:
        if was_training is not None:
            module.train(was_training)
    return skipped


def _stale_restorations(
    spec: EvalSpec,
    share: Sequence[BenchmarkItem],
    made: Mapping[str, Mapping[str, Any]],
    digests: ContentDigests,
    device_kind: str,
) -> tuple[list[BenchmarkItem], Counter]:
    """The items of ``share`` to restore (stale outputs deleted) and why, counted by reason."""
    todo: list[BenchmarkItem] = []
    why: Counter = Counter()
    for item in share:
        out = spec.images_dir / f"{item.name}.png"
        if not out.is_file():
            todo.append(item)
            why["new"] += 1
            continue
        record = made.get(item.name)
        try:
            lr_digest = digests.digest(item.lr)
        except OSError:
            lr_digest = None  # unreadable now: restoring it again reports the reason and skips it
        if record is None:
            reason = "no record of the LR it was made from"
        elif lr_digest is None or record.get("lr_sha256") != lr_digest:
            reason = "LR changed"
        elif record.get("device") != device_kind:
            reason = f"made on {record.get('device')}, this run uses {device_kind}"
        elif record.get("sr_sha256") != digests.digest(out):
            reason = "restored file changed since"
        else:
            continue
        out.unlink()  # stale: never scored again, whatever happens to its re-restoration
        todo.append(item)
        why[reason] += 1
    return todo, why


def _restore_loop(
    spec: EvalSpec,
    mine: Sequence[BenchmarkItem],
    model: Any,
    fabric: Any,
    device: torch.device,
    prompts: PromptTable | None,
    provenance: ScoreStore,
    digests: ContentDigests,
) -> list[Skipped]:
    rank, _ = world()
    skipped: list[Skipped] = []
    scale = spec.benchmark.scale
    bar = tqdm(
        mine, desc=f"restore {spec.benchmark.name}", unit="img", disable=not spec.progress or rank != 0
    )
    for item in bar:
        try:
            lq = to_tensor(read_image(item.lr))
        except ImageReadError as err:
            skipped.append(Skipped(item.name, str(item.lr), f"{err.reason}. Fix: {err.fix}"))
            log.warning(f"skipped '{item.lr}': {err.reason}")
            continue
        lq = apply_steps(lq, spec.benchmark.pre)
        kwargs = {} if prompts is None else {"prompts": [prompts.record(spec.benchmark.prompt_key(item))]}
        with torch.inference_mode(), fabric.autocast() if fabric is not None else nullcontext():
            sr = model.restore(lq[None].to(device), **kwargs)
        expected = (lq.shape[1] * scale, lq.shape[2] * scale)
        if tuple(sr.shape[-2:]) != expected:
            raise BenchmarkError(
                f"method `{spec.label}` returned {tuple(sr.shape[-2:])} for '{item.lr}' "
                f"({lq.shape[1]}x{lq.shape[2]}); expected x{scale} = {expected}"
            )
        if not torch.isfinite(sr).all():
            raise BenchmarkError(f"method `{spec.label}` returned NaN/inf pixels for '{item.lr}'")
        out = write_image(spec.images_dir / f"{item.name}.png", sr[0].float().clamp(0, 1).cpu())
        provenance.append(
            [
                {
                    "name": item.name,
                    "lr_sha256": digests.digest(item.lr),
                    "device": device.type,
                    "sr_sha256": digests.digest(out),
                }
            ]
        )
    return skipped


# ---------------------------------------------------------------------------------------------- score
class _PairDecoder(Dataset):
    """Decodes (restored, GT) once per image, applying the benchmark's ``post`` steps to both."""

    def __init__(self, pairs: Sequence[tuple[str, Path, Path | None]], post: Sequence[Mapping[str, Any]]):
        self.pairs = list(pairs)
        self.post = list(post)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, sr_path, gt_path = self.pairs[index]
        out: dict[str, Any] = {"name": name, "sr_path": str(sr_path), "gt_path": gt_path}
        try:
            out["sr"] = apply_steps(to_tensor(read_image(sr_path)), self.post)
            out["gt"] = None if gt_path is None else apply_steps(to_tensor(read_image(gt_path)), self.post)
        except (ImageReadError, BenchmarkError) as err:
            path = getattr(err, "path", sr_path)
            out["error"] = (str(path), str(getattr(err, "reason", err)))
            return out
        if out["gt"] is not None and out["sr"].shape != out["gt"].shape:
            out["error"] = (
                str(sr_path),
                f"restored {tuple(out['sr'].shape[1:])} != GT {tuple(out['gt'].shape[1:])}",
            )
        return out


class _SameSizeBatches(Sampler[list[int]]):
    """Consecutive indices of equal image size, at most ``batch_size`` per batch (metrics batch only equal sizes)."""

    def __init__(self, sizes: Sequence[tuple[int, int] | None], batch_size: int) -> None:
        self.sizes = list(sizes)
        self.batch_size = max(1, int(batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for i, size in enumerate(self.sizes):
            if batch and (len(batch) == self.batch_size or size is None or self.sizes[batch[0]] != size):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def score_images(
    spec: EvalSpec,
    pairs: Sequence[tuple[str, Path, Path | None]],
    suite: Any,
    store: ScoreStore,
    device: torch.device,
    digests: ContentDigests | None = None,
) -> tuple[dict[str, dict[str, Any]], list[Skipped]]:
    """Score this rank's share of ``pairs``; returns its records (resumed + new) and skipped images.

    A stored record is reused only when the restored image and the GT it scored have the same content now.
    """
    rank, size = world()
    digests = digests or ContentDigests(None)
    mine = list(pairs[rank::size])
    stored = store.load()
    records: dict[str, dict[str, Any]] = {}
    pending = []
    why: Counter = Counter()
    for name, sr, gt in mine:
        rec = stored.get(name)
        reason = "new" if rec is None else _stale_score_reason(rec, sr, gt, digests)
        if reason is None:
            records[name] = rec
        else:
            pending.append((name, sr, gt))
            why[reason] += 1
    if rank == 0 and (records or set(why) - {"new"}):
        log.info(
            f"score: {len(records)} image(s) already scored with this configuration reused, "
            f"{len(pending)} to score ({describe_changes(why) or 'none'})"
        )
    skipped: list[Skipped] = []
    if not pending:
        return records, skipped
    sizes = [image_size(sr) for _, sr, _ in pending]
    loader = DataLoader(
        _PairDecoder(pending, spec.benchmark.post),
        batch_sampler=_SameSizeBatches(sizes, spec.batch_size),
        num_workers=spec.num_workers,
        collate_fn=_collate,
    )
    bar = tqdm(
        total=len(pending),
        desc=f"score {spec.benchmark.name}",
        unit="img",
        disable=not spec.progress or rank != 0,
    )
    for batch in loader:
        good = []
        for entry in batch:
            if "error" in entry:
                path, reason = entry["error"]
                skipped.append(Skipped(entry["name"], path, reason))
                log.warning(f"skipped '{entry['name']}': {reason}")
            else:
                good.append(entry)
        if good:
            sr = torch.stack([e["sr"] for e in good]).to(device)
            gt = None if good[0]["gt"] is None else torch.stack([e["gt"] for e in good]).to(device)
            scores = suite.score(sr, gt)
            features = suite.set_features(sr, gt)
            new = []
            for i, entry in enumerate(good):
                new.append(
                    {
                        "name": entry["name"],
                        "sr_sha256": _digest_or_none(digests, entry["sr_path"]),
                        "gt_sha256": _digest_or_none(digests, entry["gt_path"]),
                        "scores": {k: float(v[i]) for k, v in scores.items()},
                        "features": encode_features(
                            {m: {r: t[i] for r, t in f.items()} for m, f in features.items()}
                        ),
                    }
                )
            store.append(new)
            records.update({r["name"]: r for r in new})
        bar.update(len(batch))
    bar.close()
    return records, skipped


def _digest_or_none(digests: ContentDigests, path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    try:
        return digests.digest(path)
    except OSError:
        return None


def _stale_score_reason(
    record: Mapping[str, Any], sr: Path, gt: Path | None, digests: ContentDigests
) -> str | None:
    """Why a stored score record no longer describes ``(sr, gt)``; ``None`` when it still does."""
    if "sr_sha256" not in record:
        return "recorded before content digests"
    if record["sr_sha256"] != _digest_or_none(digests, sr):
        return "restored image changed"
    if record.get("gt_sha256") != _digest_or_none(digests, gt):
        return "GT changed"
    return None


# ---------------------------------------------------------------------------------------------- results
def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _recorded_note(spec: EvalSpec) -> str | None:
    path = spec.run_dir / NOTE_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def build_results(
    spec: EvalSpec,
    items: Sequence[BenchmarkItem],
    sr_paths: Mapping[str, Path],
    records: Mapping[str, Mapping[str, Any]],
    skipped: Sequence[Skipped],
    suite: Any,
    fingerprint: str,
) -> dict[str, Any]:
    """The results.json document (format ``restore.results/v1``, see restore/evaluation/results.py)."""
    import pyiqa

    describe = suite.describe()
    scored = [it for it in items if it.name in records]
    per_image = [
        {
            "name": it.name,
            "sr": str(Path(sr_paths[it.name]).resolve()),
            "lr": str(it.lr.resolve()),
            "gt": None if it.gt is None else str(it.gt.resolve()),
            "scores": dict(records[it.name]["scores"]),
        }
        for it in scored
    ]
    aggregate: dict[str, float] = {}
    for name in suite.per_image:
        values = [rec["scores"][name] for rec in per_image]
        bad = sum(1 for v in values if not math.isfinite(v))
        if bad:
            log.warning(
                f"{name}: {bad} image(s) scored NaN/inf; the mean is over the other {len(values) - bad}"
            )
        aggregate[name] = _finite_mean(values)
    if suite.set_level and scored:
        features: dict[str, dict[str, torch.Tensor]] = {}
        for metric in suite.set_level:
            decoded = [decode_features(records[it.name]["features"])[metric] for it in scored]
            features[metric] = {
                role: torch.from_numpy(np.stack([d[role] for d in decoded]).astype(np.float64))
                for role in decoded[0]
            }
        aggregate.update({k: float(v) for k, v in suite.finalize(features).items()})
    metrics = {
        name: {
            "lower_better": bool(suite.lower_better[name]),
            "kind": suite.kind[name],
            "pyiqa": describe[name].get("pyiqa", name),
            "options": describe[name].get("options", {}),
        }
        for name in suite.names
        if name in aggregate
    }
    return {
        "format": RESULTS_FORMAT,
        "method": spec.label,
        "note": _recorded_note(spec),
        "benchmark": spec.benchmark.name,
        "scale": spec.benchmark.scale,
        "num_images": len(items),
        "num_scored": len(scored),
        "metrics": metrics,
        "aggregate": aggregate,
        "per_image": per_image,
        "skipped": [s.as_dict() for s in skipped],
        "missing_metrics": dict(suite.missing),
        "settings": {
            **spec.benchmark.settings(),
            "method": dict(spec.method) if spec.method else None,
            "ckpt_path": spec.ckpt_path,
            "outputs": None if spec.outputs is None else str(spec.outputs),
            "metric_details": describe,
            "protocol": dict(spec.protocol) if spec.protocol else None,
            "pyiqa_version": pyiqa.__version__,
            "torch_version": torch.__version__,
            "diffusers_version": _version_of("diffusers"),
            "precision": None if spec.outputs is not None else spec.precision,
            "device": _device_description(),
            "config_hash": spec.run_key,
            "score_fingerprint": fingerprint,
        },
        "overrides": dict(spec.overrides),
        "job_num": spec.job_num,
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _device_description() -> str:
    """The accelerator the run used (numbers can differ by a few ulps between devices and kernels)."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu"


def results_csv(results: Mapping[str, Any]) -> str:
    """One row per image, then a ``mean`` row with the aggregate (set-level metrics only there)."""
    names = list(results["metrics"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", *names])
    for rec in results["per_image"]:
        writer.writerow([rec["name"], *(_fmt(rec["scores"].get(n)) for n in names)])
    writer.writerow(["mean", *(_fmt(results["aggregate"].get(n)) for n in names)])
    return buf.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_outputs(spec: EvalSpec, results: Mapping[str, Any]) -> dict[str, Path]:
    """results.json, results.csv, table.md and (unless disabled) report.html in the run directory.

    These files are derived from this run's scores, so a resumed run rewrites them; results of other runs
    (``report.compare``) are only read.
    """
    from restore.evaluation.report import write_report
    from restore.evaluation.results import load_results
    from restore.evaluation.table import results_table

    run_dir = spec.run_dir
    paths = {"json": run_dir / "results.json", "csv": run_dir / "results.csv", "table": run_dir / "table.md"}
    _write_text(paths["json"], json.dumps(results, indent=1, allow_nan=True) + "\n")
    _write_text(paths["csv"], results_csv(results))
    others = load_results(list(spec.report.get("compare") or [])) if spec.report.get("compare") else []
    # a compare folder may contain this run itself (e.g. logs/eval/realsr): its in-memory results win
    others = [r for r in others if Path(r["_source"]).resolve() != paths["json"].resolve()]
    everyone = [*others, dict(results)]
    _write_text(paths["table"], results_table(everyone, last=spec.label) + "\n")
    if spec.report.get("enabled", True):
        paths["report"] = write_report(
            run_dir / "report.html",
            [r for r in everyone if r["benchmark"] == results["benchmark"]],
            max_images=spec.report.get("max_images"),
            overwrite=True,
        )
    return paths


# ---------------------------------------------------------------------------------------------- entry
def _check_run_dir(spec: EvalSpec) -> None:
    """A run directory belongs to one configuration: refuse to mix another one's images and scores into it."""
    marker = spec.run_dir / RUN_KEY_FILE
    if marker.is_file():
        previous = marker.read_text().strip()
        if previous != spec.run_key:
            raise BenchmarkError(
                f"run directory '{spec.run_dir}' holds an evaluation with another configuration (key {previous}, "
                f"this one is {spec.run_key}); its images and scores are kept. Use another hydra.run.dir"
            )


def _mark_run_dir(spec: EvalSpec) -> None:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / RUN_KEY_FILE).write_text(spec.run_key + "\n")


def _prepare_embedded(spec: EvalSpec) -> None:
    """``benchmark.prepare: samples``: build the embedded test set on first use (rank 0; others wait)."""
    from restore.data.testsets import META_FILE, prepare_samples

    root = spec.benchmark.lr_dir.parent
    if spec.benchmark.prepare != "samples":
        raise BenchmarkError(f"unknown benchmark.prepare={spec.benchmark.prepare!r}; known: samples")
    if not (root / META_FILE).is_file():  # meta.json is written last: absent = never built, or interrupted
        log.info(f"building the embedded `samples` test set in {root} (once)")
        # deterministic bytes, so finishing an interrupted build by rewriting its files loses nothing
        prepare_samples(root, progress=spec.progress, overwrite=True)


def _input_digests(
    items: Sequence[BenchmarkItem], digests: ContentDigests
) -> dict[str, tuple[str | None, str | None]]:
    """``name -> (LR sha256, GT sha256)`` of this rank's share (``None`` for a file that cannot be read)."""
    rank, size = world()
    return {
        it.name: (_digest_or_none(digests, it.lr), _digest_or_none(digests, it.gt))
        for it in items[rank::size]
    }


def check_suite_not_empty(spec: EvalSpec, suite: Any) -> None:
    """An evaluation that can compute no metric is an error, never an empty table with exit 0."""
    if suite.names:
        return
    asked = [m if isinstance(m, str) else str(m.get("name")) for m in spec.benchmark.metrics]
    reasons = []
    if not spec.benchmark.has_reference:
        reasons.append(
            f"benchmark `{spec.benchmark.name}` has no GT (gt_dir is null), so full-reference metrics and FID "
            "are left out: add no-reference ones, e.g. benchmark.metrics=[niqe,musiq,maniqa,clipiqa]"
        )
    if suite.missing:
        reasons.append(
            f"weights missing for {sorted(suite.missing)}: "
            f"python -m restore.weights fetch --metric {' '.join(sorted(suite.missing))}"
        )
    raise BenchmarkError(
        f"no metric of {asked or '[]'} can be computed: " + ("; ".join(reasons) or "the metric list is empty")
    )


def evaluate_benchmark(
    spec: EvalSpec, fabric: Any = None, module: torch.nn.Module | None = None
) -> dict[str, Any] | None:
    """Run one evaluation on this rank; rank 0 returns the results document, other ranks None.

    ``module``: a method already in memory to restore with (else built from ``spec.method``/``spec.ckpt_path``).
    """
    from restore.metrics import MetricSuite

    rank, _ = world()
    device = fabric.device if fabric is not None else torch.device("cpu")
    _check_run_dir(spec)  # every rank, so that all of them stop on a mismatch
    if rank == 0:
        _mark_run_dir(spec)
        if spec.benchmark.prepare:
            _prepare_embedded(spec)
    barrier()
    items, skipped = spec.benchmark.collect()
    digests = ContentDigests(spec.run_dir, rank)
    inputs = _input_digests(items, digests)
    if spec.outputs is not None:
        sr_paths = match_outputs(items, spec.outputs)
    else:
        prompts = spec.benchmark.prompt_table(items)  # every rank checks, so that all of them stop together
        try:
            skipped += restore_images(spec, items, fabric, module=module, prompts=prompts, digests=digests)
        finally:
            digests.save()
        barrier()
        # an LR that could not be read on any rank has no restored file: leave it out on every rank
        sr_paths = {
            it.name: spec.images_dir / f"{it.name}.png"
            for it in items
            if (spec.images_dir / f"{it.name}.png").is_file()
        }
    pairs = [(it.name, sr_paths[it.name], it.gt) for it in items if it.name in sr_paths]
    check_sizes(pairs, spec.benchmark.post)

    suite = MetricSuite(
        spec.benchmark.metrics,
        catalog=spec.metric_catalog,
        device=device,
        crop_border=spec.benchmark.crop_border,
        has_reference=spec.benchmark.has_reference,
        on_missing_weights=spec.on_missing_weights,
    )
    check_suite_not_empty(spec, suite)
    fingerprint = stable_hash({"run_key": spec.run_key, "metrics": suite.describe()}, 16)
    store = ScoreStore(spec.run_dir / "scores", fingerprint, rank)
    try:
        records, score_skipped = score_images(spec, pairs, suite, store, device, digests)
    finally:
        digests.save()

    gathered = gather_objects((records, skipped + score_skipped, inputs))
    if rank != 0:
        return None
    all_records: dict[str, dict[str, Any]] = {}
    all_skipped: dict[tuple[str, str], Skipped] = {}
    all_inputs: dict[str, tuple[str | None, str | None]] = {}
    for part_records, part_skipped, part_inputs in gathered:
        all_records.update(part_records)
        all_skipped.update({(s.name, s.path): s for s in part_skipped})
        all_inputs.update(part_inputs)
    if not all_records:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in list(all_skipped.values())[:5])
        raise BenchmarkError(
            f"benchmark `{spec.benchmark.name}`: no image could be scored"
            + (f" ({len(all_skipped)} skipped: {reasons})" if reasons else "")
            + "; nothing was written. Fix the inputs named above and rerun the same command"
        )
    results = build_results(
        spec, items, sr_paths, all_records, list(all_skipped.values()), suite, fingerprint
    )
    results["dataset"] = {
        "id": dataset_identity(
            [(name, lr, gt) for name, (lr, gt) in all_inputs.items()], spec.benchmark.scale
        ),
        "lr_dir": str(spec.benchmark.lr_dir.resolve()),
        "gt_dir": None if spec.benchmark.gt_dir is None else str(spec.benchmark.gt_dir.resolve()),
    }
    written = write_outputs(spec, results)
    log.info("wrote " + ", ".join(str(p) for p in written.values()))
    return results
