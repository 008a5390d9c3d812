"""Test sets: LR/GT pairs matched by name, and LR-only folders. Items are full images, never cropped.

Items: ``{"lq": (3, h, w), "gt": (3, H, W), "key": str}`` (no ``"gt"`` for LR-only sets), plus one
string per prompt field when a side-file is configured (``"prompt"`` by default, see :class:`PromptFields`).
``key`` is the LR path relative to ``lr_dir``, which is also where results are written and what prompt
side-files are keyed by. Sizes vary between items, so batch them with :func:`collate_variable_size`.

Also home of the two pieces every dataset shares: the LR/GT name matcher (:func:`match_pairs`, used by the
training pairs of :mod:`restore.data.paired_training` too) and the prompt fields of an item
(:class:`PromptFields`, used by :mod:`restore.data.hr_datasets` too).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import Dataset

from restore.data.image_io import list_images, read_image, to_tensor
from restore.data.prompts import PromptTable

__all__ = [
    "RESERVED_FIELDS",
    "LRImageFolder",
    "PairedImageFolder",
    "PromptFields",
    "check_pair_scale",
    "collate_variable_size",
    "load_prompt_fields",
    "match_pairs",
    "prompt_field_map",
]

#: Item fields holding images or the key, which a prompt field may not overwrite.
RESERVED_FIELDS = frozenset({"hq", "lq", "gt", "key"})


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


def match_pairs(
    lr_dir: str | os.PathLike, gt_dir: str | os.PathLike, lr_suffix: str = "", gt_suffix: str = ""
) -> tuple[list[Path], list[Path], list[str]]:
    """``(lr_files, gt_files, keys)`` of the LR/GT pairs of two folders, sorted by LR relative path.

    Files match by relative path without extension, minus ``lr_suffix`` / ``gt_suffix`` at the end of
    the stem; ``keys`` are the LR paths relative to ``lr_dir``. Names on one side only are a
    ``ValueError`` listing them in both directions; two files with one name on a side too.
    """
    lr_dir, gt_dir = Path(lr_dir), Path(gt_dir)
    lr = _index_by_name(lr_dir, lr_suffix, "LR")
    gt = _index_by_name(gt_dir, gt_suffix, "GT")
    lr_only = sorted(set(lr) - set(gt))
    gt_only = sorted(set(gt) - set(lr))
    if lr_only or gt_only:
        parts = []
        if lr_only:
            parts.append(f"{len(lr_only)} LR name(s) without GT in '{gt_dir}': {_list_names(lr_only)}")
        if gt_only:
            parts.append(f"{len(gt_only)} GT name(s) without LR in '{lr_dir}': {_list_names(gt_only)}")
        raise ValueError(
            "LR and GT folders do not match (names compared without extension and without "
            f"lr_suffix={lr_suffix!r} / gt_suffix={gt_suffix!r}): " + "; ".join(parts)
        )
    names = sorted(lr, key=lambda n: lr[n].relative_to(lr_dir).as_posix())
    lr_files = [lr[n] for n in names]
    return lr_files, [gt[n] for n in names], [p.relative_to(lr_dir).as_posix() for p in lr_files]


def check_pair_scale(
    key: str, gt_file: str | os.PathLike, lq_hw: Sequence[int], gt_hw: Sequence[int], scale: int
) -> None:
    """``ValueError`` naming the pair unless the GT is exactly ``scale`` times the LR (catches mixed-up
    folders and a wrong ``scale``)."""
    (h, w), (gh, gw) = tuple(lq_hw), tuple(gt_hw)
    if (gh, gw) != (h * scale, w * scale):
        raise ValueError(
            f"pair '{key}': GT '{gt_file}' is {gh}x{gw} but LR is {h}x{w} (expected x{scale}); "
            "check the folders or `scale`"
        )


def prompt_field_map(prompt_key: str | Mapping[str, str]) -> dict[str, str]:
    """``{item_field: side_file_field}`` from a dataset's ``prompt_key``.

    A string ``k`` is the one-prompt form, ``{"prompt": k}`` (``prompt_key="tags"`` puts the tags in
    ``item["prompt"]``). A mapping (a dict, or the DictConfig Hydra passes) names several fields, e.g. XPSR's
    ``{prompt: highlevel, lowlevel_prompt: lowlevel}`` (a content caption and a quality text per image, as
    qyp2000/XPSR ``dataloader/localdataset.py`` reads them).
    """
    if isinstance(prompt_key, str):
        prompt_key = {"prompt": prompt_key}
    if not isinstance(prompt_key, Mapping) or not prompt_key:
        raise ValueError(
            "prompt_key must be a side-file field name or a non-empty mapping {item_field: side_file_field}, "
            f"got {prompt_key!r}"
        )
    mapping: dict[str, str] = {}
    for field, side in prompt_key.items():
        if not (isinstance(field, str) and field and isinstance(side, str) and side):
            raise ValueError(
                f"prompt_key entries must map a non-empty name to a non-empty name, got {field!r}: {side!r}"
            )
        if field in RESERVED_FIELDS:
            raise ValueError(
                f"prompt_key maps side-file field {side!r} to item field {field!r}, which holds "
                f"{'the key' if field == 'key' else 'an image'}; pick another item field name"
            )
        mapping[field] = side
    return mapping


def _table_for(table: PromptTable, side_field: str) -> PromptTable:
    """The same side-file (read once, records shared) looked up in another field."""
    view = copy.copy(table)
    view.key = side_field
    return view


class PromptFields:
    """The prompt strings of an item: ``{item_field: text}`` read from one JSONL side-file
    (:class:`restore.data.prompts.PromptTable`), one side-file field per item field.

    The side-file is parsed once, whatever the number of fields. ``require`` checks every field of every
    image up front (the error names the images, the side-file field and the file).
    """

    def __init__(self, table: PromptTable, mapping: Mapping[str, str]):
        self.table = table
        self.mapping = prompt_field_map(mapping)
        self._tables = {field: _table_for(table, side) for field, side in self.mapping.items()}

    @classmethod
    def load(
        cls, path: str | os.PathLike, prompt_key: str | Mapping[str, str] = "prompt", missing: str = "error"
    ) -> PromptFields:
        mapping = prompt_field_map(prompt_key)
        return cls(PromptTable(path, key=next(iter(mapping.values())), missing=missing), mapping)

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.table.path}', {self.mapping}, missing={self.table.missing!r})"

    @property
    def fields(self) -> list[str]:
        """The item fields filled, in mapping order."""
        return list(self.mapping)

    def with_mapping(self, mapping: str | Mapping[str, str]) -> PromptFields:
        """Other fields of the same side-file, without reading it again."""
        return PromptFields(self.table, mapping)

    def has_side_field(self, side_field: str, image_keys: Iterable[str]) -> bool:
        """Whether the entry of at least one of ``image_keys`` holds ``side_field``."""
        view = _table_for(self.table, side_field)
        return any(k in view for k in image_keys)

    def require(self, image_keys: Iterable[str]) -> None:
        """Raise :class:`restore.data.prompts.PromptNotFoundError` now for images without text in any
        field (no-op with ``missing="empty"``)."""
        image_keys = list(image_keys)
        for table in self._tables.values():
            table.require(image_keys)

    def __call__(self, image_key: str) -> dict[str, str]:
        return {field: table[image_key] for field, table in self._tables.items()}


def load_prompt_fields(
    prompts: str | os.PathLike | None,
    prompt_key: str | Mapping[str, str],
    missing: str,
    image_keys: Iterable[str],
) -> PromptFields | None:
    """The datasets' ``prompts`` / ``prompt_key`` / ``prompt_missing`` arguments -> checked
    :class:`PromptFields` (``None`` without a side-file). ``prompt_key`` is validated even then, so a
    malformed mapping fails when the config is built, not when a side-file is added."""
    mapping = prompt_field_map(prompt_key)
    if prompts is None:
        return None
    fields = PromptFields.load(prompts, mapping, missing)
    fields.require(image_keys)
    return fields


class PairedImageFolder(Dataset):
    """LR/GT pairs from two folders, matched by relative path without extension (the file stem for flat
    folders), so ``lr/0001.png`` pairs with ``gt/0001.png`` and also with ``gt/0001.jpg``.

    ``lr_suffix`` / ``gt_suffix`` are removed from the end of the stem before matching, for sets that
    tag file names: DIV2K ``0801x4.png`` -> ``lr_suffix="x4"``; RealSR ``Canon_001_LR4.png`` /
    ``Canon_001_HR.png`` -> ``lr_suffix="_LR4", gt_suffix="_HR"``. Names present on one side only raise
    ``ValueError`` listing them in both directions.

    ``scale``, when given, checks ``GT size == LR size * scale`` on loading (catches mixed-up folders).

    ``prompts`` / ``prompt_key`` / ``prompt_missing``: JSONL side-file keyed by the LR key, the field(s) to
    read (a name -> ``item["prompt"]``, or a mapping ``{item_field: side_file_field}``, see
    :func:`prompt_field_map`) and ``"error"`` / ``"empty"`` for images without text (checked up front).
    """

    def __init__(
        self,
        lr_dir: str | os.PathLike,
        gt_dir: str | os.PathLike,
        prompts: str | os.PathLike | None = None,
        lr_suffix: str = "",
        gt_suffix: str = "",
        scale: int | None = None,
        prompt_key: str | Mapping[str, str] = "prompt",
        prompt_missing: str = "error",
    ):
        self.lr_dir, self.gt_dir = Path(lr_dir), Path(gt_dir)
        self.lr_files, self.gt_files, self.keys = match_pairs(self.lr_dir, self.gt_dir, lr_suffix, gt_suffix)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0):
            raise ValueError(f"scale must be a positive int or None, got {scale!r}")
        self.scale = scale
        self.prompts = load_prompt_fields(prompts, prompt_key, prompt_missing, self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        lq = to_tensor(read_image(self.lr_files[index]))
        gt = to_tensor(read_image(self.gt_files[index]))
        if self.scale is not None:
            check_pair_scale(key, self.gt_files[index], lq.shape[1:], gt.shape[1:], self.scale)
        item = {"lq": lq, "gt": gt, "key": key}
        if self.prompts is not None:
            item.update(self.prompts(key))
        return item


class LRImageFolder(Dataset):
    """LR-only folder for no-reference test sets (e.g. RealLR200): items ``{"lq", "key"}`` plus the prompt
    fields (``prompts`` / ``prompt_key`` / ``prompt_missing`` as :class:`PairedImageFolder`)."""

    def __init__(
        self,
        lr_dir: str | os.PathLike,
        prompts: str | os.PathLike | None = None,
        prompt_key: str | Mapping[str, str] = "prompt",
        prompt_missing: str = "error",
    ):
        self.lr_dir = Path(lr_dir)
        self.lr_files = list_images(self.lr_dir)
        self.keys = [p.relative_to(self.lr_dir).as_posix() for p in self.lr_files]
        self.prompts = load_prompt_fields(prompts, prompt_key, prompt_missing, self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        item = {"lq": to_tensor(read_image(self.lr_files[index])), "key": key}
        if self.prompts is not None:
            item.update(self.prompts(key))
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
