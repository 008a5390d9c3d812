"""Test sets: LR/GT pairs matched by name, and LR-only folders. Items are full images, never cropped.

Items: ``{"lq": (3, h, w), "gt": (3, H, W), "key": str}`` (no ``"gt"`` for LR-only sets), plus
``"prompt"`` when a side-file is configured. ``key`` is the LR path relative to ``lr_dir``, which is
also where results are written and what prompt side-files are keyed by. Sizes vary between items, so
batch them with :func:`collate_variable_size`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import Dataset

from restore.data.image_io import list_images, read_image, to_tensor
from restore.data.prompts import PromptTable

__all__ = ["LRImageFolder", "PairedImageFolder", "collate_variable_size"]


def _match_name(rel: str, suffix: str) -> str:
    """Relative path without extension, minus ``suffix`` at the end of the stem (when present)."""
    stem_path = PurePosixPath(rel).with_suffix("").as_posix()
    if suffix and stem_path.endswith(suffix):
        stem_path = stem_path[: -len(suffix)]
    return stem_path


def _index_by_name(root: Path, suffix: str, role: str) -> dict[str, Path]:
    by_name: dict[str, Path] = {}
    for path in list_images(root):
        rel = path.relative_to(root).as_posix()
        name = _match_name(rel, suffix)
        if name in by_name:
            raise ValueError(
                f"{role} folder '{root}' has two files for the name '{name}': "
                f"'{by_name[name].relative_to(root).as_posix()}' and '{rel}'; keep one"
            )
        by_name[name] = path
    return by_name


def _list_names(names: Sequence[str], shown: int = 10) -> str:
    head = ", ".join(repr(n) for n in names[:shown])
    return head + (f" (and {len(names) - shown} more)" if len(names) > shown else "")


def _load_prompts(
    prompts: str | os.PathLike | None, key: str, missing: str, keys: list[str]
) -> PromptTable | None:
    if prompts is None:
        return None
    table = PromptTable(prompts, key=key, missing=missing)
    table.require(keys)
    return table


class PairedImageFolder(Dataset):
    """LR/GT pairs from two folders, matched by relative path without extension (the file stem for flat
    folders), so ``lr/0001.png`` pairs with ``gt/0001.png`` and also with ``gt/0001.jpg``.

    ``lr_suffix`` / ``gt_suffix`` are removed from the end of the stem before matching, for sets that
    tag file names: DIV2K ``0801x4.png`` -> ``lr_suffix="x4"``; RealSR ``Canon_001_LR4.png`` /
    ``Canon_001_HR.png`` -> ``lr_suffix="_LR4", gt_suffix="_HR"``. Names present on one side only raise
    ``ValueError`` listing them in both directions.

    ``scale``, when given, checks ``GT size == LR size * scale`` on loading (catches mixed-up folders).
    """

    def __init__(
        self,
        lr_dir: str | os.PathLike,
        gt_dir: str | os.PathLike,
        prompts: str | os.PathLike | None = None,
        lr_suffix: str = "",
        gt_suffix: str = "",
        scale: int | None = None,
        prompt_key: str = "prompt",
        prompt_missing: str = "error",
    ):
        self.lr_dir, self.gt_dir = Path(lr_dir), Path(gt_dir)
        lr = _index_by_name(self.lr_dir, lr_suffix, "LR")
        gt = _index_by_name(self.gt_dir, gt_suffix, "GT")
        lr_only = sorted(set(lr) - set(gt))
        gt_only = sorted(set(gt) - set(lr))
        if lr_only or gt_only:
            parts = []
            if lr_only:
                parts.append(
                    f"{len(lr_only)} LR name(s) without GT in '{self.gt_dir}': {_list_names(lr_only)}"
                )
            if gt_only:
                parts.append(
                    f"{len(gt_only)} GT name(s) without LR in '{self.lr_dir}': {_list_names(gt_only)}"
                )
            raise ValueError(
                "LR and GT folders do not match (names compared without extension and without "
                f"lr_suffix={lr_suffix!r} / gt_suffix={gt_suffix!r}): " + "; ".join(parts)
            )
        names = sorted(lr, key=lambda n: lr[n].relative_to(self.lr_dir).as_posix())
        self.lr_files = [lr[n] for n in names]
        self.gt_files = [gt[n] for n in names]
        self.keys = [p.relative_to(self.lr_dir).as_posix() for p in self.lr_files]
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0):
            raise ValueError(f"scale must be a positive int or None, got {scale!r}")
        self.scale = scale
        self.prompts = _load_prompts(prompts, prompt_key, prompt_missing, self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        lq = to_tensor(read_image(self.lr_files[index]))
        gt = to_tensor(read_image(self.gt_files[index]))
        if self.scale is not None and tuple(gt.shape[1:]) != (
            lq.shape[1] * self.scale,
            lq.shape[2] * self.scale,
        ):
            raise ValueError(
                f"pair '{key}': GT '{self.gt_files[index]}' is {gt.shape[1]}x{gt.shape[2]} but LR is "
                f"{lq.shape[1]}x{lq.shape[2]} (expected x{self.scale}); check the folders or `scale`"
            )
        item = {"lq": lq, "gt": gt, "key": key}
        if self.prompts is not None:
            item["prompt"] = self.prompts[key]
        return item


class LRImageFolder(Dataset):
    """LR-only folder for no-reference test sets (e.g. RealLR200): items ``{"lq", "key"[, "prompt"]}``."""

    def __init__(
        self,
        lr_dir: str | os.PathLike,
        prompts: str | os.PathLike | None = None,
        prompt_key: str = "prompt",
        prompt_missing: str = "error",
    ):
        self.lr_dir = Path(lr_dir)
        self.lr_files = list_images(self.lr_dir)
        self.keys = [p.relative_to(self.lr_dir).as_posix() for p in self.lr_files]
        self.prompts = _load_prompts(prompts, prompt_key, prompt_missing, self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        item = {"lq": to_tensor(read_image(self.lr_files[index])), "key": key}
        if self.prompts is not None:
            item["prompt"] = self.prompts[key]
        return item


def collate_variable_size(batch: Sequence[dict]) -> dict:
    """Collate dict items whose images may differ in size.

    Per field: tensors of identical shape are stacked, tensors of different shapes are kept as a list
    (one per item), anything else (keys, prompts) becomes a list. All items must have the same fields.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    fields = list(batch[0])
    for i, item in enumerate(batch):
        if set(item) != set(fields):
            raise ValueError(
                f"batch items have different fields: item 0 has {sorted(fields)}, item {i} has {sorted(item)} "
                "(e.g. a prompt file configured for only some of the mixed datasets)"
            )
    out = {}
    for field in fields:
        values = [item[field] for item in batch]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            out[field] = torch.stack(values)
        else:
            out[field] = values
    return out
