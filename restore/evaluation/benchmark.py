"""A benchmark: which LR images to restore, which GT to score against, and how (scale, crop border, steps).

Built from a ``configs/benchmark/*.yaml`` node. Unlike the training datasets, a benchmark never fails on one
odd file: real LR folders hold RGBA, 16-bit, grayscale, JPEG/WebP files (all read by
:func:`restore.data.image_io.read_image`) and stray non-images (skipped, each with a logged reason).
Structural problems — an LR name without GT, two files for one name — are errors listing every offender,
since scores over a silently different image set would not be comparable with published ones.

Items are named by their LR path relative to ``lr_dir`` without extension (and without ``lr_suffix``),
which is also the restored file's name (``<name>.png``) and the key of its scores.

A benchmark may name a prompt side-file (``prompts:``, the JSONL of :mod:`restore.data.prompts`, keyed by the
LR path relative to ``lr_dir`` *with* its extension, as ``scripts/extract_prompts.py --input <lr_dir>``
writes it): methods whose ``restore`` takes ``prompts=`` get each image's record (XPSR's MLLM prompts).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F

from restore.data.image_io import is_image_file, walk_files
from restore.data.prompts import PromptTable

__all__ = ["Benchmark", "BenchmarkError", "BenchmarkItem", "Skipped", "apply_steps", "index_images"]

log = logging.getLogger(__name__)

#: Image processing steps a benchmark may apply: ``pre`` to the LR input, ``post`` to SR and GT before scoring.
STEP_NAMES = ("center_crop", "resize")


class BenchmarkError(ValueError):
    """The benchmark's folders do not form a valid test set; the message lists the offending files."""


@dataclass(frozen=True)
class BenchmarkItem:
    name: str
    lr: Path
    gt: Path | None


@dataclass(frozen=True)
class Skipped:
    name: str
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "reason": self.reason}


def _list(names: Sequence[str], shown: int = 10) -> str:
    head = ", ".join(repr(n) for n in names[:shown])
    return head + (f" (and {len(names) - shown} more)" if len(names) > shown else "")


def index_images(root: Path, suffix: str, role: str) -> tuple[dict[str, Path], list[Skipped]]:
    """``name -> file`` for the images under ``root`` and the files left out (non-images, hidden files).

    The name is the relative path without extension, minus ``suffix`` at the end of the stem.
    """
    if not root.is_dir():
        raise BenchmarkError(f"{role} folder '{root}' does not exist (see data/README.md for the layouts)")
    index: dict[str, Path] = {}
    files, problems = walk_files(root)
    # an unreadable or looping folder is reported by name (its images are not in the set): never a silent gap
    skipped = [Skipped(f"{p.relative_to(root).as_posix()}/", str(p), reason) for p, reason in problems]
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.name.startswith("."):
            log.debug(f"ignoring hidden file '{path}'")
            continue
        name = PurePosixPath(rel).with_suffix("").as_posix()
        if suffix and name.endswith(suffix):
            name = name[: -len(suffix)]
        if not is_image_file(path):
            skipped.append(Skipped(name, str(path), f"not an image file (suffix '{path.suffix}')"))
            continue
        if name in index:
            raise BenchmarkError(
                f"{role} folder '{root}' has two images for the name '{name}': "
                f"'{index[name].relative_to(root).as_posix()}' and '{rel}'; keep one"
            )
        index[name] = path
    return index, skipped


@dataclass
class Benchmark:
    """A test set and how it is scored (see configs/benchmark/)."""

    name: str
    lr_dir: Path
    gt_dir: Path | None = None
    scale: int = 4
    crop_border: int = 0
    metrics: list[Any] = field(default_factory=list)
    lr_suffix: str = ""
    gt_suffix: str = ""
    pre: list[dict[str, Any]] = field(default_factory=list)
    post: list[dict[str, Any]] = field(default_factory=list)
    prepare: str | None = None
    prompts: Path | None = None  # JSONL prompt side-file keyed by the LR path relative to lr_dir

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Benchmark:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise BenchmarkError(f"unknown benchmark key(s) {unknown}; known: {sorted(known)}")
        kwargs = dict(cfg)
        kwargs["lr_dir"] = Path(kwargs["lr_dir"])
        kwargs["gt_dir"] = Path(kwargs["gt_dir"]) if kwargs.get("gt_dir") else None
        kwargs["prompts"] = Path(kwargs["prompts"]).expanduser() if kwargs.get("prompts") else None
        kwargs["metrics"] = list(kwargs.get("metrics") or [])
        kwargs["pre"] = [dict(s) for s in kwargs.get("pre") or []]
        kwargs["post"] = [dict(s) for s in kwargs.get("post") or []]
        bench = cls(**kwargs)
        if isinstance(bench.scale, bool) or not isinstance(bench.scale, int) or bench.scale < 1:
            raise BenchmarkError(f"benchmark.scale must be a positive int, got {bench.scale!r}")
        if bench.crop_border < 0:
            raise BenchmarkError(f"benchmark.crop_border must be >= 0, got {bench.crop_border}")
        for step in (*bench.pre, *bench.post):
            _check_step(step)
        return bench

    @property
    def has_reference(self) -> bool:
        return self.gt_dir is not None

    def settings(self) -> dict[str, Any]:
        """What defines the scores (recorded in results.json and hashed into the config fingerprint)."""
        return {
            "name": self.name,
            "lr_dir": str(self.lr_dir),
            "gt_dir": None if self.gt_dir is None else str(self.gt_dir),
            "scale": self.scale,
            "crop_border": self.crop_border,
            "lr_suffix": self.lr_suffix,
            "gt_suffix": self.gt_suffix,
            "pre": self.pre,
            "post": self.post,
            "prompts": None if self.prompts is None else str(self.prompts),
        }

    def prompt_key(self, item: BenchmarkItem) -> str:
        """The key of ``item`` in the prompt side-file: its LR path relative to ``lr_dir``, extension included."""
        return item.lr.relative_to(self.lr_dir).as_posix()

    def prompt_table(self, items: Sequence[BenchmarkItem]) -> PromptTable | None:
        """The prompt side-file (``None`` without one), checked to hold an entry for every item.

        Checked before anything is restored: a missing prompt found hours into a run would waste them.
        """
        if self.prompts is None:
            return None
        if not self.prompts.is_file():
            raise BenchmarkError(
                f"benchmark `{self.name}`: prompt side-file '{self.prompts}' does not exist; "
                f"{self._extract_hint()}"
            )
        table = PromptTable(self.prompts)
        missing = [k for k in (self.prompt_key(it) for it in items) if not table.has_record(k)]
        if missing:
            raise BenchmarkError(
                f"benchmark `{self.name}`: {len(missing)} LR image(s) have no entry in the prompt side-file "
                f"'{self.prompts}': {_list(missing, 5)}; {self._extract_hint()}"
            )
        return table

    def _extract_hint(self) -> str:
        # --input <lr_dir> keys the entries exactly as prompt_key() looks them up; the script resumes,
        # so rerunning it on an existing file only adds the images it lacks
        return (
            f"write the prompts with `python scripts/extract_prompts.py --input {self.lr_dir} "
            f"--out {self.prompts} --field NAME=SOURCE ...` (e.g. --field highlevel=llava15_7b "
            "--field lowlevel=qinstruct for XPSR), or set benchmark.prompts=null"
        )

    def collect(self) -> tuple[list[BenchmarkItem], list[Skipped]]:
        """The items in name order and the files left out; raises on unmatched names."""
        lr, skipped = index_images(self.lr_dir, self.lr_suffix, "LR")
        if not lr:
            raise BenchmarkError(f"benchmark `{self.name}`: no images in '{self.lr_dir}'")
        gt: dict[str, Path] = {}
        if self.gt_dir is not None:
            gt, gt_skipped = index_images(self.gt_dir, self.gt_suffix, "GT")
            skipped += [s for s in gt_skipped if s.name in lr or s.name.endswith("/")]
            # names under a folder that could not be listed on one side: skipped by name, not a mismatch
            for side, other, problems in ((lr, gt, gt_skipped), (gt, lr, skipped)):
                blocked = [s for s in problems if s.name.endswith("/")]
                for name in sorted(set(side) - set(other)):
                    folder = next((b for b in blocked if name.startswith(b.name) or b.name == "./"), None)
                    if folder is not None:
                        del side[name]
                        if side is lr:
                            skipped.append(
                                Skipped(name, folder.path, f"its GT folder was skipped ({folder.reason})")
                            )
            lr_only, gt_only = sorted(set(lr) - set(gt)), sorted(set(gt) - set(lr))
            if lr_only or gt_only:
                parts = []
                if lr_only:
                    parts.append(f"{len(lr_only)} LR image(s) without GT: {_list(lr_only)}")
                if gt_only:
                    parts.append(f"{len(gt_only)} GT image(s) without LR: {_list(gt_only)}")
                raise BenchmarkError(
                    f"benchmark `{self.name}`: LR '{self.lr_dir}' and GT '{self.gt_dir}' do not match "
                    f"(names compared without extension, lr_suffix={self.lr_suffix!r}, "
                    f"gt_suffix={self.gt_suffix!r}): " + "; ".join(parts)
                )
        items = [BenchmarkItem(n, lr[n], gt.get(n)) for n in sorted(lr)]
        for s in skipped:
            log.warning(f"skipped '{s.path}': {s.reason}")
        return items, skipped


def _check_step(step: Mapping[str, Any]) -> None:
    if len(step) != 1 or next(iter(step)) not in STEP_NAMES:
        raise BenchmarkError(
            f"a benchmark step must be one of {{center_crop: SIZE}}, {{resize: SIZE}}; got {dict(step)}"
        )
    size = next(iter(step.values()))
    sizes = [size] if isinstance(size, int) else list(size)
    if len(sizes) not in (1, 2) or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise BenchmarkError(f"step {dict(step)}: SIZE must be a positive int or [height, width]")


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def apply_steps(img: torch.Tensor, steps: Sequence[Mapping[str, Any]], scale: int = 1) -> torch.Tensor:
    """Apply ``center_crop`` / ``resize`` steps to a (3, H, W) image; sizes are multiplied by ``scale``.

    ``center_crop`` takes offsets ``floor((H - h) / 2)`` (as the StableSR test-set crops); ``resize`` is
    bicubic with antialiasing and clamped to [0, 1].
    """
    for step in steps:
        op, size = next(iter(step.items()))
        h, w = (s * scale for s in _hw(size))
        if op == "center_crop":
            H, W = img.shape[-2:]
            if h > H or w > W:
                raise BenchmarkError(f"cannot center_crop a {H}x{W} image to {h}x{w}")
            top, left = (H - h) // 2, (W - w) // 2
            img = img[..., top : top + h, left : left + w]
        else:
            img = F.interpolate(img[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            img = img[0].clamp(0, 1)
    return img
