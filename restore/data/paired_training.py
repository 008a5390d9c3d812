"""Training pairs read from disk (pre-degraded offline), cropped at the same place on LR and GT.

The official SeeSR and XPSR recipes degrade their training set once, offline, and train on the stored
pairs (cswry/SeeSR ``utils_data/make_paired_data.py``: ``gt/`` 512², ``lr/`` 128², ``sr_bicubic/`` 512²;
qyp2000/XPSR ``utils_data/make_train.py``: ``HR/`` 512² and ``LR/`` bicubic-upsampled to 512²),
instead of degrading HR crops on the fly (:mod:`restore.data.hr_datasets` +
``restore.methods.training_pairs``).
:class:`PairedTrainingFolder` reads such a folder pair. Its batches hold both ``lq`` and ``gt``, which
``restore.methods.training_pairs.add_synthesised_pairs`` passes through unchanged.

Items: ``{"gt": (3, crop, crop), "lq": (3, crop / scale, crop / scale), "key": str}`` in [0, 1], plus
one string per prompt field when a side-file is configured (:class:`restore.data.paired.PromptFields`).
``key`` is the LR path relative to ``lq_dir`` (as in :class:`restore.data.paired.PairedImageFolder`):
the ID that prompt side-files use, since XPSR captions the LR images (qyp2000/XPSR
``utils_data/highlevel_prompt_train.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from restore.data.image_io import read_image, to_tensor
from restore.data.paired import check_pair_scale, load_prompt_fields, match_pairs, prompt_field_map
from restore.data.transforms import RandomCropFlip, rng_from_torch

__all__ = ["GT_PROMPT_SUFFIX", "PairedTrainingFolder", "downscale_like_lq"]

#: Suffix of the side-file field holding the HR image's text, e.g. ``lowlevel`` -> ``lowlevel_gt``.
GT_PROMPT_SUFFIX = "_gt"


def downscale_like_lq(gt: torch.Tensor, scale: int) -> torch.Tensor:
    """``(3, H, W)`` -> ``(3, H / scale, W / scale)``: bicubic with antialiasing, clamped to [0, 1].

    The stand-in LR of an "original image" item (:class:`PairedTrainingFolder`). ``scale == 1`` returns the
    image itself (a copy): no resampling at all, so SeeSR/XPSR-style 512² LR folders get exactly the HR.
    """
    if scale == 1:
        return gt.clone()
    h, w = gt.shape[-2:]
    out = F.interpolate(
        gt[None].float(), size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp(0.0, 1.0)


def _check_probability(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"original_image_prob must be a number in [0, 1], got {value!r}")
    return float(value)


class PairedTrainingFolder(Dataset):
    """GT/LR training pairs from two folders, matched by name, with random aligned crops.

    Args:
        gt_dir: folder of GT (HR) images.
        lq_dir: folder of LR images, ``scale`` times smaller than their GT (``lr/`` 128² for 512² GT), or
            the same size with ``scale=1`` (SeeSR's ``sr_bicubic/``, XPSR's ``LR/``: LR upsampled to 512²;
            the methods upsample ``lq`` to the GT size, an identity then).
        scale: GT size / LR size; every pair is checked when loaded (``ValueError`` naming the pair).
        crop_size: GT crop side; the LR crop is ``crop_size // scale`` at the same place. The window is
            drawn on the LR grid and multiplied by ``scale`` on the GT, so both show the same region.
            A pair smaller than the crop is an error naming the file: padding an LR and its GT separately
            does not keep them aligned (reflect-101 mirrors about the last pixel centre, which is not the
            same place on both grids), and the official data is pre-cropped to the training size anyway.
        hflip, rotate: horizontal flip (p=0.5) and k·90° rotation (k uniform), identical on both images
            (:class:`restore.data.transforms.RandomCropFlip`; SeeSR/XPSR: hflip, no rotation).
        prompts, prompt_key, prompt_missing: JSONL side-file keyed by the LR key, the field(s) read (a name
            -> ``item["prompt"]``; a mapping ``{item_field: side_file_field}``, e.g. XPSR's
            ``{prompt: highlevel, lowlevel_prompt: lowlevel}``), and ``"error"``/``"empty"`` for images
            without text. Checked up front.
        lr_suffix, gt_suffix: stem suffixes removed before matching (as in
            :class:`~restore.data.paired.PairedImageFolder`).
        original_image_prob: XPSR's ``original_image_ratio`` (0.1 in XPSR's ``train.py``; 0 here, the XPSR
            config sets it). With this probability an item's ``lq`` is the GT crop itself, downscaled by
            ``scale`` (:func:`downscale_like_lq`), and its prompt fields are the HR's
            (``original_prompt_key``). The official stores 512² LR-upsampled inputs and feeds the 512² HR in
            their place, so the ControlNet learns that a clean input with a "clean" quality text must stay
            clean. Here ``lq`` keeps its LR size (a batch must stack), so the method's bicubic x``scale``
            upsampling gives back a slightly blurred HR for ``scale > 1`` and exactly the HR for
            ``scale == 1`` (512² LR folders, the official layout).
        original_prompt_key: for those items, ``{item_field: side_file_field}`` read instead (e.g.
            ``{lowlevel_prompt: lowlevel_gt}``: the official switches only the low-level text,
            ``lowlevel_prompt_q_GT``); item fields not listed keep the LR text. ``None``: every item field
            whose side-file field ``F`` has a ``F_gt`` counterpart in the side-file (in the entry of any
            image) reads ``F_gt``. The fields used are checked up front like ``prompt_key``; unused
            without ``prompts``.

    Randomness (window, flip, rotation, original-image draw) comes from one numpy generator per item seeded
    from torch's global RNG (:func:`restore.data.transforms.rng_from_torch`), as every training dataset
    here: reproducible per DataLoader worker under ``seed_everything(workers=True)``.
    """

    def __init__(
        self,
        gt_dir: str | os.PathLike,
        lq_dir: str | os.PathLike,
        scale: int = 4,
        crop_size: int = 512,
        hflip: bool = True,
        rotate: bool = False,
        prompts: str | os.PathLike | None = None,
        prompt_key: str | Mapping[str, str] = "prompt",
        prompt_missing: str = "error",
        lr_suffix: str = "",
        gt_suffix: str = "",
        original_image_prob: float = 0.0,
        original_prompt_key: str | Mapping[str, str] | None = None,
    ):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size <= 0:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        if crop_size % scale:
            raise ValueError(
                f"crop_size={crop_size} is not a multiple of scale={scale}: the LR crop must be whole"
            )
        self.gt_dir, self.lq_dir = Path(gt_dir), Path(lq_dir)
        self.scale, self.crop_size = scale, crop_size
        self.lq_files, self.gt_files, self.keys = match_pairs(self.lq_dir, self.gt_dir, lr_suffix, gt_suffix)
        if not self.keys:
            raise ValueError(f"no images in '{self.lq_dir}' / '{self.gt_dir}' (layout: data/README.md)")
        # Drawn on the LR grid: the GT window is the LR one x scale, so both always cover the same region.
        self.transform = RandomCropFlip(crop_size // scale, hflip=hflip, rotate=rotate, small_image="error")
        self.original_image_prob = _check_probability(original_image_prob)
        self.prompts = load_prompt_fields(prompts, prompt_key, prompt_missing, self.keys)
        self.original_prompts = None
        if self.prompts is not None and self.original_image_prob > 0:
            mapping = self._original_mapping(original_prompt_key)
            self.original_prompts = self.prompts.with_mapping({**self.prompts.mapping, **mapping})
            self.original_prompts.require(self.keys)

    def _original_mapping(self, original_prompt_key: str | Mapping[str, str] | None) -> dict[str, str]:
        """Item field -> side-file field read for original-image items (only the fields that change)."""
        if original_prompt_key is None:
            return {
                field: side + GT_PROMPT_SUFFIX
                for field, side in self.prompts.mapping.items()
                if self.prompts.has_side_field(side + GT_PROMPT_SUFFIX, self.keys)
            }
        mapping = prompt_field_map(original_prompt_key)
        unknown = sorted(set(mapping) - set(self.prompts.mapping))
        if unknown:
            raise ValueError(
                f"original_prompt_key names item field(s) {unknown} that prompt_key does not fill "
                f"({sorted(self.prompts.mapping)}); it replaces fields, it does not add them"
            )
        return mapping

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(gt_dir='{self.gt_dir}', lq_dir='{self.lq_dir}', n={len(self)}, "
            f"scale={self.scale}, crop_size={self.crop_size}, transform={self.transform}, "
            f"original_image_prob={self.original_image_prob})"
        )

    def _read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        key, gt_file = self.keys[index], self.gt_files[index]
        lq, gt = read_image(self.lq_files[index]), read_image(gt_file)
        check_pair_scale(key, gt_file, lq.shape[:2], gt.shape[:2], self.scale)
        h, w = lq.shape[:2]
        lq_crop = self.transform.crop_size
        if h < lq_crop or w < lq_crop:
            raise ValueError(
                f"pair '{key}': GT '{gt_file}' is {h * self.scale}x{w * self.scale}, smaller than "
                f"crop_size={self.crop_size} (LR '{self.lq_files[index]}' is {h}x{w} < {lq_crop}); "
                "build the pairs with crops of at least crop_size (prepare_testsets.py --crop), "
                "remove this pair, or lower crop_size"
            )
        return lq, gt

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index %= len(self)
        key = self.keys[index]
        lq, gt = self._read_pair(index)
        rng = rng_from_torch()
        window = self.transform.draw(lq.shape[0], lq.shape[1], rng, key)
        gt_t = to_tensor(window.apply(gt, scale=self.scale, key=key))
        # Drawn after the window so that p > 0 leaves the crops of every item unchanged.
        original = self.original_image_prob > 0 and rng.random() < self.original_image_prob
        lq_t = downscale_like_lq(gt_t, self.scale) if original else to_tensor(window.apply(lq, key=key))
        item = {"gt": gt_t, "lq": lq_t, "key": key}
        prompts = self.original_prompts if original else self.prompts
        if prompts is not None:
            item.update(prompts(key))
        return item
