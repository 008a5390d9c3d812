"""Building the evaluation sets of the SeeSR / StableSR protocol as ``OUT/lq`` (+ ``OUT/gt``) PNG folders.

The command line is ``scripts/prepare_testsets.py`` (its docstring lists the commands, the pairing rules and
the crop geometry); this module holds the logic, so that ``eval.py benchmark=samples`` can build its
embedded test set on first use. Every builder is deterministic (same inputs and options -> identical
bytes), writes ``OUT/meta.json`` last (its presence marks a finished set) and never replaces files of an
earlier run unless asked to. Source and output folders must not overlap (:mod:`restore.data.folder_overlap`);
an ``--overwrite`` run removes the earlier ``meta.json`` before writing and any earlier output whose source
it now skips, so the folder always matches its meta.json.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from restore import CONFIG_DIR
from restore.atomic_write import atomic_write_text
from restore.data.degradation import RealESRGANDegradation
from restore.data.folder_overlap import check_folders_disjoint
from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, load_embedded_photo
from restore.data.image_io import (
    ImageReadError,
    image_size,
    is_image_file,
    list_images,
    read_image,
    to_tensor,
    write_image,
)
from restore.data.transforms import CenterCrop

LOG = logging.getLogger(__name__)

#: (LR suffix, GT suffix) of the file stems of each real-capture test set.
PAIRING_RULES: dict[str, tuple[str, str]] = {"realsr": ("_LR4", "_HR"), "drealsr": ("_x4", "_x1")}
META_FILE = "meta.json"


class PrepareError(Exception):
    """A problem with the inputs or the output folder; ``main`` prints it without a traceback."""


@dataclass(frozen=True)
class Summary:
    """What a subcommand did, for the one-line report."""

    command: str
    out: Path
    written: int
    skipped: int = 0
    unit: str = "pair"

    def line(self) -> str:
        return f"{self.command}: wrote {self.written} {self.unit}(s), skipped {self.skipped} -> {self.out}"


def _names(items: Sequence[object], shown: int = 10) -> str:
    head = ", ".join(f"'{x}'" for x in items[:shown])
    return head + (f" (and {len(items) - shown} more)" if len(items) > shown else "")


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PrepareError(f"{name} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------- output folder
def check_output_folder(
    out: Path, planned: Sequence[str], overwrite: bool, folders: Sequence[str] = ("lq", "gt")
) -> None:
    """Refuse before writing anything if the run would replace files (without ``overwrite``) or leave
    foreign images next to its own in ``folders`` (a stale larger run would silently mix into the set).

    ``planned`` are the paths, relative to ``out`` and in POSIX form, that the run will write.
    """
    planned_set = set(planned)
    existing = [rel for rel in planned if (out / rel).exists()]
    if existing and not overwrite:
        raise PrepareError(
            f"{len(existing)} output file(s) already exist in '{out}': {_names(existing, 5)}; "
            "pass --overwrite to replace them, or choose another --out"
        )
    foreign = []
    for sub in folders:
        root = out / sub
        if root.is_dir():
            for dirpath, _, filenames in os.walk(root):
                for name in filenames:
                    rel = Path(dirpath, name).relative_to(out).as_posix()
                    # hidden files are never listed by the loaders (list_images skips them)
                    if is_image_file(name) and not name.startswith(".") and rel not in planned_set:
                        foreign.append(rel)
    if foreign:
        raise PrepareError(
            f"'{out}' holds {len(foreign)} image(s) this run would not write: {_names(sorted(foreign), 5)}; "
            "they would be evaluated as part of the test set (--overwrite only replaces files this run "
            "writes): remove them or choose another --out"
        )


def start_output(out: Path, overwrite: bool) -> None:
    """Mark ``out`` unfinished before the first image is written: an ``--overwrite`` run removes the earlier
    meta.json, so a run that stops half-way never leaves new images described by the old meta.json."""
    if overwrite:
        (out / META_FILE).unlink(missing_ok=True)


def _write_meta(out: Path, meta: dict, overwrite: bool) -> None:
    path = out / META_FILE
    if path.exists() and not overwrite:  # checked up front too; guards against a concurrent run
        raise PrepareError(f"'{path}' already exists; pass --overwrite to replace it")
    atomic_write_text(path, _dumps_meta(meta))


def _dumps_meta(meta: dict) -> str:
    """JSON with one line per top-level key and per record of a list of records: readable and diffable
    (3,000 crops stay 3,000 lines), and byte-identical between identical runs."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            records = ",\n".join(f"  {json.dumps(v)}" for v in value)
            lines.append(f" {json.dumps(key)}: [\n{records}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


# --------------------------------------------------------------------------------- realsr / drealsr
@dataclass(frozen=True)
class Pair:
    """One LR/GT pair; ``name`` is the output file stem."""

    name: str
    lr: Path
    gt: Path


def _strip(stem: str, suffix: str) -> str | None:
    """``stem`` without ``suffix`` when it ends with it (and something is left), else None."""
    if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
        return stem[: -len(suffix)]
    return None


def _add(index: dict[str, Path], name: str, path: Path, role: str) -> None:
    if name in index:
        raise PrepareError(
            f"two {role} files for the name '{name}': '{index[name]}' and '{path}'; keep one (point the "
            "source at a single scale folder, e.g. RealSR's Test/4)"
        )
    index[name] = path


def _pair_up(lr: dict[str, Path], gt: dict[str, Path], rule: str) -> list[Pair]:
    lr_only, gt_only = sorted(set(lr) - set(gt)), sorted(set(gt) - set(lr))
    if lr_only or gt_only:
        parts = []
        if lr_only:
            parts.append(f"{len(lr_only)} LR file(s) without GT: {_names([str(lr[n]) for n in lr_only])}")
        if gt_only:
            parts.append(f"{len(gt_only)} GT file(s) without LR: {_names([str(gt[n]) for n in gt_only])}")
        raise PrepareError(f"unmatched files ({rule}): " + "; ".join(parts))
    if not lr:
        raise PrepareError(f"no LR/GT pairs found ({rule})")
    return [Pair(name, lr[name], gt[name]) for name in sorted(lr)]


def find_pairs(srcs: Sequence[Path], lr_suffix: str, gt_suffix: str) -> list[Pair]:
    """Pairs from mixed folders, where the role of a file is given by its stem's suffix (module doc)."""
    if not lr_suffix or not gt_suffix or lr_suffix == gt_suffix:
        raise PrepareError(
            f"--src needs two different, non-empty suffixes to tell LR from GT files, got "
            f"--lr-suffix {lr_suffix!r} --gt-suffix {gt_suffix!r}"
        )
    lr: dict[str, Path] = {}
    gt: dict[str, Path] = {}
    ignored: list[Path] = []
    for src in srcs:
        for path in list_images(src):
            if (name := _strip(path.stem, gt_suffix)) is not None:
                _add(gt, name, path, "GT")
            elif (name := _strip(path.stem, lr_suffix)) is not None:
                _add(lr, name, path, "LR")
            else:
                ignored.append(path)
    if ignored:
        LOG.info(
            "ignored %d image(s) whose name ends in neither %r (LR) nor %r (GT): %s",
            len(ignored),
            lr_suffix,
            gt_suffix,
            _names([str(p) for p in ignored], 5),
        )
    return _pair_up(lr, gt, f"stems ending in {lr_suffix!r} (LR) / {gt_suffix!r} (GT) under {_names(srcs)}")


def match_dirs(lr_dir: Path, gt_dir: Path, lr_suffix: str = "", gt_suffix: str = "") -> list[Pair]:
    """Pairs from an LR and a GT folder, matched by file stem minus the suffix when present."""
    lr: dict[str, Path] = {}
    gt: dict[str, Path] = {}
    for root, suffix, index, role in ((lr_dir, lr_suffix, lr, "LR"), (gt_dir, gt_suffix, gt, "GT")):
        for path in list_images(root):
            _add(index, _strip(path.stem, suffix) or path.stem, path, role)
    rule = f"'{lr_dir}' vs '{gt_dir}' by file stem without {lr_suffix!r} / {gt_suffix!r}"
    return _pair_up(lr, gt, rule)


def _geometry_problem(
    pair: Pair, lr_hw: tuple[int, int], gt_hw: tuple[int, int], lr_size: int, scale: int
) -> str | None:
    (h, w), (gh, gw) = lr_hw, gt_hw
    if (gh, gw) == (h, w) and scale != 1:
        return (
            f"'{pair.gt}' and '{pair.lr}' are both {h}x{w}: this LR is registered at the HR size "
            f"(RealSR V1/V2); use pairs whose LR is {scale}x smaller (RealSR V3 / DRealSR x{scale})"
        )
    if (gh, gw) != (h * scale, w * scale):
        return (
            f"GT '{pair.gt}' is {gh}x{gw} but LR '{pair.lr}' is {h}x{w}: the GT must be exactly {scale}x "
            f"the LR size ({h * scale}x{w * scale})"
        )
    if h < lr_size or w < lr_size:
        return f"LR '{pair.lr}' is {h}x{w}, smaller than the {lr_size}x{lr_size} centre crop"
    return None


def crop_pair(
    lr: np.ndarray, gt: np.ndarray, lr_size: int, scale: int, pair: Pair
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Centre-crop the LR to ``lr_size`` and the GT to the *same region* (offsets x ``scale``).

    Returns the two crops and their boxes (for meta.json). Raises PrepareError on a size mismatch.
    """
    problem = _geometry_problem(pair, lr.shape[:2], gt.shape[:2], lr_size, scale)
    if problem is not None:
        raise PrepareError(problem)
    lr_crop = CenterCrop(lr_size)(lr, key=str(pair.lr))
    h, w = lr.shape[:2]
    top, left = (h - lr_size) // 2, (w - lr_size) // 2  # CenterCrop's offsets
    size = lr_size * scale
    gt_crop = np.ascontiguousarray(gt[top * scale : top * scale + size, left * scale : left * scale + size])
    boxes = {
        "lr_box": {"top": top, "left": left, "height": lr_size, "width": lr_size},
        "gt_box": {"top": top * scale, "left": left * scale, "height": size, "width": size},
    }
    return lr_crop, gt_crop, boxes


def prepare_paired(
    pairs: Sequence[Pair],
    out: Path,
    lr_size: int = 128,
    scale: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "realsr",
    sources: dict | None = None,
) -> Summary:
    """StableSR protocol for real captures: ``OUT/lq/NAME.png`` (lr_size²) and ``OUT/gt/NAME.png``
    (the same region, (lr_size·scale)²). All sizes are checked (file headers) before anything is written."""
    positive_int("--lr-size", lr_size)
    positive_int("--scale", scale)
    out = Path(out)
    problems = []
    for pair in pairs:
        lr_hw, gt_hw = image_size(pair.lr), image_size(pair.gt)
        if lr_hw is not None and gt_hw is not None:
            problem = _geometry_problem(pair, lr_hw, gt_hw, lr_size, scale)
            if problem is not None:
                problems.append(problem)
    if problems:
        shown = "\n  - ".join(problems[:10]) + (
            f"\n  (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        )
        raise PrepareError(f"{len(problems)} of {len(pairs)} pair(s) cannot be cropped:\n  - {shown}")
    # the folders of the pair files themselves: whatever option named them, none may overlap the output
    check_folders_disjoint(sorted({p.lr.parent for p in pairs} | {p.gt.parent for p in pairs}), [out])
    planned = [f"{sub}/{p.name}.png" for p in pairs for sub in ("lq", "gt")] + [META_FILE]
    check_output_folder(out, planned, overwrite)
    start_output(out, overwrite)

    records = []
    for pair in tqdm(pairs, desc=command, unit="pair", disable=not progress):
        lr_crop, gt_crop, boxes = crop_pair(read_image(pair.lr), read_image(pair.gt), lr_size, scale, pair)
        write_image(out / "lq" / f"{pair.name}.png", lr_crop, overwrite=overwrite)
        write_image(out / "gt" / f"{pair.name}.png", gt_crop, overwrite=overwrite)
        records.append({"name": f"{pair.name}.png", "lr": str(pair.lr), "gt": str(pair.gt), **boxes})
    meta = {
        "command": command,
        "protocol": "StableSR: centre crop of the LR, GT cropped at the same region",
        "lr_size": lr_size,
        "scale": scale,
        "sources": sources or {},
        "pairs": records,
    }
    _write_meta(out, meta, overwrite)
    return Summary(command, out, len(records))


# --------------------------------------------------------------------------- div2k_val / samples
@dataclass(frozen=True)
class CropPlan:
    """One synthetic pair: which crop of which source, and the seed of its degradation."""

    index: int
    name: str
    source: str
    top: int
    left: int
    size: int
    torch_seed: int


def crop_randomness(seed: int, index: int) -> tuple[np.random.Generator, int]:
    """Randomness of crop ``index``, derived from (seed, index) alone: a numpy Generator for its position
    and a torch seed for its degradation. Crop i is therefore the same whatever ``--num``, the batch size
    or the order of processing (independent SeedSequence streams, not offsets of one global stream)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PrepareError(f"--seed must be a non-negative integer, got {seed!r}")
    position, degradation = np.random.SeedSequence([seed, index]).spawn(2)
    torch_seed = int(degradation.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))  # 63 bits
    return np.random.default_rng(position), torch_seed


def plan_random_crops(
    sources: Sequence[tuple[str, tuple[int, int]]], num: int, crop: int, seed: int
) -> list[CropPlan]:
    """``num`` random ``crop``² boxes spread evenly over ``sources`` ((key, (height, width)) pairs):
    crop i comes from source ``i % len(sources)`` (3,000 crops of 100 images -> 30 each), so the first
    crops do not change when ``num`` grows."""
    positive_int("--num", num)
    positive_int("--crop", crop)
    if not sources:
        raise PrepareError("no source images to crop")
    plans = []
    for i in range(num):
        key, (h, w) = sources[i % len(sources)]
        if h < crop or w < crop:
            raise PrepareError(f"source '{key}' is {h}x{w}, smaller than the {crop}x{crop} crop")
        rng, torch_seed = crop_randomness(seed, i)
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        plans.append(CropPlan(i, f"{i:05d}", key, top, left, crop, torch_seed))
    return plans


def _crops_in_source_order(
    plans: Sequence[CropPlan], load: Callable[[str], np.ndarray]
) -> Iterator[tuple[CropPlan, np.ndarray]]:
    """Crops grouped by source so that each source image is decoded once (plans are round-robin)."""
    rank = {}
    for p in plans:
        rank.setdefault(p.source, len(rank))
    current, image = None, None
    for plan in sorted(plans, key=lambda p: (rank[p.source], p.index)):
        if plan.source != current:
            current, image = plan.source, load(plan.source)
        h, w = image.shape[:2]
        if plan.top + plan.size > h or plan.left + plan.size > w:
            raise PrepareError(
                f"crop {plan.index} does not fit in '{plan.source}' ({h}x{w}); was it replaced?"
            )
        yield (
            plan,
            np.ascontiguousarray(image[plan.top : plan.top + plan.size, plan.left : plan.left + plan.size]),
        )


def degrade_crops(
    plans: Sequence[CropPlan],
    load: Callable[[str], np.ndarray],
    out: Path,
    preset: str,
    meta: dict,
    batch_size: int = 8,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    command: str = "div2k_val",
) -> Summary:
    """Write ``OUT/gt/NAME.png`` (the clean crop) and ``OUT/lq/NAME.png`` (its degradation) for each plan.

    Each crop is degraded by its own call with its own ``torch.Generator`` (seeded by its plan): batching
    several crops into one call would share the per-batch draws of the Real-ESRGAN pipeline (resize
    scale and mode, noise family, second blur, final order) between them, making a crop depend
    on its batch-mates, and correlating test images. ``batch_size`` only groups the deterministic part:
    the GT unsharp masking (USM), the pipeline's most expensive step, runs batched and is bit-identical
    per image whatever the batch (checked by the tests).
    """
    positive_int("--batch-size", batch_size)
    out = Path(out)
    full = RealESRGANDegradation.from_preset(preset)
    scale = full.config.scale
    for plan in plans:
        if plan.size % scale:
            raise PrepareError(f"--crop {plan.size} is not divisible by the preset's scale {scale}")
    # Same pipeline with the USM step taken out: the USM is applied batched below, then each sharpened
    # crop goes through `deg(..., generator)` alone, exactly what `full(crop, generator)` computes.
    deg = RealESRGANDegradation.from_preset(preset, usm_sharpen_gt=False).to(device)
    usm = full.usm.to(device) if full.config.usm_sharpen_gt else None
    planned = [f"{sub}/{p.name}.png" for p in plans for sub in ("lq", "gt")] + [META_FILE]
    if len(set(planned)) != len(planned):
        raise PrepareError("two crops would be written under the same name")
    check_output_folder(out, planned, overwrite)
    start_output(out, overwrite)

    def flush(batch: list[tuple[CropPlan, np.ndarray]]) -> None:
        hq = torch.stack([to_tensor(crop) for _, crop in batch]).to(device)
        with torch.no_grad():
            sharp = usm(hq) if usm is not None else hq
        for k, (plan, crop) in enumerate(batch):
            generator = torch.Generator(device=device).manual_seed(plan.torch_seed)
            lq = deg(sharp[k : k + 1], generator=generator).lq[0]
            write_image(out / "lq" / f"{plan.name}.png", lq, overwrite=overwrite)
            # The pipeline's `gt` is the USM-sharpened crop: the *training* target of Real-ESRGAN/SeeSR.
            # A test GT is a clean reference for PSNR/LPIPS/..., so we save the original crop (the LR
            # is still synthesised from the sharpened crop, as in training and in StableSR's sets).
            write_image(out / "gt" / f"{plan.name}.png", crop, overwrite=overwrite)
        bar.update(len(batch))

    batch: list[tuple[CropPlan, np.ndarray]] = []
    with tqdm(total=len(plans), desc=command, unit="crop", disable=not progress) as bar:
        for item in _crops_in_source_order(plans, load):
            batch.append(item)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)

    meta = {
        "command": command,
        **meta,
        "preset": preset,
        "preset_options": asdict(full.config),
        "scale": scale,
        "lr_size": plans[0].size // scale if plans else None,
        "device": str(torch.device(device).type),
        "torch_version": torch.__version__,
        "gt": "clean crop (not USM-sharpened); lq synthesised from the USM-sharpened crop when the preset "
        "sharpens (usm_sharpen_gt)",
        "crops": [
            {
                "index": p.index,
                "name": f"{p.name}.png",
                "source": p.source,
                "box": {"top": p.top, "left": p.left, "height": p.size, "width": p.size},
                "torch_seed": p.torch_seed,
            }
            for p in plans
        ],
    }
    _write_meta(out, meta, overwrite)
    return Summary(command, out, len(plans))


def prepare_div2k_val(
    src: Path,
    out: Path,
    preset: str,
    num: int = 3000,
    crop: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    skip_small: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """DIV2K-Val style synthetic pairs: ``num`` random ``crop``² GT crops of the images in ``src``,
    degraded with ``preset``. Images smaller than the crop are an error (a wrong source folder: all
    DIV2K images are larger), or skipped with a logged reason with ``skip_small``."""
    check_preset(preset)
    src = Path(src)
    check_folders_disjoint([src], [out])
    files = list_images(src)
    sources, skipped = [], []
    for path in files:
        key = path.relative_to(src).as_posix()
        hw = image_size(path)
        if hw is None:
            hw = read_image(path).shape[:2]  # raises ImageReadError naming the file
        if min(hw) < crop:
            reason = f"{hw[0]}x{hw[1]} is smaller than the {crop}x{crop} crop"
            if not skip_small:
                raise PrepareError(
                    f"source image '{path}' {reason}; remove it, lower --crop or pass --skip-small"
                )
            LOG.warning("skipping '%s': %s", path, reason)
            skipped.append({"file": key, "reason": reason})
            continue
        sources.append((key, hw))
    plans = plan_random_crops(sources, num, crop, seed)
    meta = {
        "source_dir": str(src),
        "num_sources": len(sources),
        "skipped_sources": skipped,
        "seed": seed,
        "num": num,
        "crop": crop,
    }
    summary = degrade_crops(
        plans,
        lambda key: read_image(src / key),
        out,
        preset,
        meta,
        batch_size,
        device,
        overwrite,
        progress,
        command="div2k_val",
    )
    return Summary(summary.command, summary.out, summary.written, len(skipped))


def prepare_samples(
    out: Path,
    preset: str = "realesrgan",
    crop: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Tiny paired set with no download (``benchmark=samples``): the centre ``crop``² of each photo
    bundled with scikit-image as GT, degraded with ``preset``; files are named after the photos."""
    check_preset(preset)
    positive_int("--crop", crop)
    plans = []
    for i, name in enumerate(EMBEDDED_PHOTO_NAMES):
        h, w = load_embedded_photo(name).shape[:2]
        if min(h, w) < crop:
            raise PrepareError(f"embedded photo '{name}' is {h}x{w}, smaller than --crop {crop}")
        _, torch_seed = crop_randomness(seed, i)
        plans.append(CropPlan(i, name, name, (h - crop) // 2, (w - crop) // 2, crop, torch_seed))
    meta = {"source_dir": "scikit-image embedded photos", "seed": seed, "crop": crop}
    return degrade_crops(
        plans,
        load_embedded_photo,
        out,
        preset,
        meta,
        batch_size,
        device,
        overwrite,
        progress,
        command="samples",
    )


def check_preset(preset: str) -> None:
    available = available_presets()
    if preset not in available:
        raise PrepareError(f"unknown --preset {preset!r}; available: {', '.join(available)}")


def available_presets() -> list[str]:
    """Degradation presets = ``configs/degradation/*.yaml``."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "degradation").glob("*.yaml"))


# ------------------------------------------------------------------------------------------ reallr200
def _center_box(h: int, w: int, max_side: int | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre crop limiting each side to ``max_side`` (CenterCrop's
    floor convention; a side already within the limit is kept whole)."""
    th, tw = (h, w) if max_side is None else (min(h, max_side), min(w, max_side))
    return (h - th) // 2, (w - tw) // 2, th, tw


def prepare_lr_only(
    src: Path,
    out: Path,
    max_side: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "reallr200",
) -> Summary:
    """Copy every image under ``src`` to ``OUT/lq/<relative path>.png`` as 8-bit RGB (through read_image:
    gray -> 3 channels, alpha composited over white, 16-bit -> 8-bit). Files that are not images (other
    suffix, hidden, or undecodable) are skipped with a logged reason, listed in meta.json."""
    src, out = Path(src), Path(out)
    if max_side is not None:
        positive_int("--max-side", max_side)
    if not src.is_dir():
        raise PrepareError(f"source folder '{src}' does not exist")
    check_folders_disjoint([src], [out])
    candidates, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(src).as_posix()
            reason = None
            if name.startswith("."):
                reason = "hidden file"
            elif not is_image_file(name):
                reason = f"suffix '{Path(name).suffix}' is not an image suffix"
            if reason:
                LOG.info("skipping '%s': %s", rel, reason)
                skipped.append({"file": rel, "reason": reason})
            else:
                candidates.append(rel)
    candidates.sort()
    by_name: dict[str, str] = {}
    for rel in candidates:
        name = Path(rel).with_suffix("").as_posix()
        if name in by_name:
            raise PrepareError(
                f"'{by_name[name]}' and '{rel}' would both be written as 'lq/{name}.png'; keep one"
            )
        by_name[name] = rel
    if not by_name:
        raise PrepareError(f"no image files found under '{src}'")
    check_output_folder(out, [f"lq/{n}.png" for n in by_name] + [META_FILE], overwrite)
    start_output(out, overwrite)

    records = []
    for name, rel in tqdm(by_name.items(), desc=command, unit="img", disable=not progress):
        try:
            img = read_image(src / rel)
        except ImageReadError as err:
            LOG.warning("skipping '%s': %s", rel, err.reason)
            skipped.append({"file": rel, "reason": err.reason})
            # an earlier run's output of this source (only there with --overwrite: checked above) must not
            # survive as a test image that meta.json lists as skipped
            (out / "lq" / f"{name}.png").unlink(missing_ok=True)
            continue
        top, left, th, tw = _center_box(*img.shape[:2], max_side)
        write_image(out / "lq" / f"{name}.png", img[top : top + th, left : left + tw], overwrite=overwrite)
        records.append(
            {
                "name": f"{name}.png",
                "source": rel,
                "source_size": list(img.shape[:2]),
                "box": {"top": top, "left": left, "height": th, "width": tw},
            }
        )
    meta = {
        "command": command,
        "source_dir": str(src),
        "max_side": max_side,
        "images": records,
        "skipped": skipped,
    }
    _write_meta(out, meta, overwrite)
    return Summary(command, out, len(records), len(skipped), unit="image")
