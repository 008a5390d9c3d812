"""Training pairs degraded offline, as the diffusion-SR recipes store them before training.

SeeSR (cswry/SeeSR ``utils_data/make_paired_data.py``) and DreamClear (shallowdream204/DreamClear
``tools/make_paired_data.py``) synthesise their training set once: per pass ("epoch") over the HR folders, one
random ``crop``² crop of every image (reflect-padded when the image is smaller, as BasicSR's
``RealESRGANDataset`` pads), USM-sharpened, degraded with the Real-ESRGAN second-order pipeline at x4, then saved
as three folders of ``NNNNNNN.png`` files (numbered from 1):

- ``gt/``: the sharpened crop (the training target; ``gt="clean"`` stores the crop before sharpening),
- ``lr/``: the degraded LR (``crop / 4``),
- ``sr_bicubic/``: the LR bicubic-upsampled (PyTorch, from the float LR) back to ``crop``: what the DreamClear
  and SeeSR training loaders read as their LQ (``configs/data/paired_train.yaml`` with ``scale: 1``).

Unlike the official scripts, every crop has its own random stream (:func:`restore.data.testsets.crop_randomness`):
the official batches of 192 share one resize scale, noise family and final order per batch; here crop ``k`` is
the same whatever the batch size, the device count or an interruption. A killed run resumes: crops whose three
files exist are kept, ``recipe.json`` (written first) refuses a resume with other options, and ``meta.json``
(written last) marks a finished set. Every PNG is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from restore.atomic_write import atomic_write_text
from restore.data.degradation import RealESRGANDegradation
from restore.data.folder_overlap import check_folders_disjoint
from restore.data.image_io import image_size, list_images, read_image, to_tensor, write_image
from restore.data.testsets import (
    META_FILE,
    PrepareError,
    Summary,
    check_output_folder,
    check_preset,
    crop_randomness,
    positive_int,
)

__all__ = [
    "GT_MODES",
    "OUTPUT_FOLDERS",
    "RECIPE_FILE",
    "TrainingCrop",
    "make_training_pairs",
    "plan_training_crops",
]

#: The folders of a pair set, in the order each crop's files are written (``gt`` last: its presence plus the
#: others' marks a finished crop).
OUTPUT_FOLDERS = ("lr", "sr_bicubic", "gt")
RECIPE_FILE = "recipe.json"
GT_MODES = ("sharpened", "clean")


@dataclass(frozen=True)
class TrainingCrop:
    """Crop ``index`` (0-based; file ``{index + 1:07d}.png``) of ``source`` at (top, left) of the image padded to
    at least ``size``² (``pad_bottom`` / ``pad_right`` reflected rows / columns)."""

    index: int
    source: str
    top: int
    left: int
    size: int
    pad_bottom: int
    pad_right: int
    torch_seed: int

    @property
    def name(self) -> str:
        return f"{self.index + 1:07d}"


def plan_training_crops(
    sources: Sequence[tuple[str, tuple[int, int]]], epochs: int, crop: int, seed: int
) -> list[TrainingCrop]:
    """One random crop of every source per epoch: crop ``e * len(sources) + j`` comes from source ``j``, so the
    first epochs do not change when ``epochs`` grows."""
    positive_int("--epochs", epochs)
    positive_int("--crop", crop)
    if not sources:
        raise PrepareError("no source images found")
    plans = []
    for epoch in range(epochs):
        for j, (key, (h, w)) in enumerate(sources):
            index = epoch * len(sources) + j
            rng, torch_seed = crop_randomness(seed, index)
            pad_bottom, pad_right = max(crop - h, 0), max(crop - w, 0)
            top = int(rng.integers(0, h + pad_bottom - crop + 1))
            left = int(rng.integers(0, w + pad_right - crop + 1))
            plans.append(TrainingCrop(index, key, top, left, crop, pad_bottom, pad_right, torch_seed))
    return plans


def _cut(image: np.ndarray, plan: TrainingCrop) -> np.ndarray:
    if plan.pad_bottom or plan.pad_right:  # BasicSR's RealESRGANDataset: cv2.BORDER_REFLECT_101 below / right
        image = cv2.copyMakeBorder(image, 0, plan.pad_bottom, 0, plan.pad_right, cv2.BORDER_REFLECT_101)
    h, w = image.shape[:2]
    if plan.top + plan.size > h or plan.left + plan.size > w:
        raise PrepareError(f"crop {plan.name} does not fit in '{plan.source}' ({h}x{w}); was it replaced?")
    return np.ascontiguousarray(image[plan.top : plan.top + plan.size, plan.left : plan.left + plan.size])


def _sources(src_dirs: Sequence[Path]) -> tuple[list[tuple[str, tuple[int, int]]], dict[str, Path]]:
    """(key, (h, w)) of every image under the folders; keys are ``<folder index>/<relative path>``."""
    sources, paths = [], {}
    for i, root in enumerate(src_dirs):
        root = Path(root)
        if not root.is_dir():
            raise PrepareError(f"--src '{root}' is not a folder")
        for path in list_images(root):
            key = f"{i}/{path.relative_to(root).as_posix()}"
            hw = image_size(path)
            sources.append((key, hw if hw is not None else read_image(path).shape[:2]))
            paths[key] = path
    return sources, paths


def _check_recipe(out: Path, recipe: dict, overwrite: bool) -> bool:
    """Write or compare ``recipe.json``; True when ``out`` already holds the finished set of this recipe."""
    path = out / RECIPE_FILE
    recipe = json.loads(json.dumps(recipe))  # as read back: tuples become lists
    if path.is_file() and not overwrite:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != recipe:
            changed = sorted(k for k in {*earlier, *recipe} if earlier.get(k) != recipe.get(k))
            raise PrepareError(
                f"'{out}' holds pairs made with other options ({', '.join(changed)} differ): resume with the "
                "same options, choose another --out, or pass --overwrite to start over"
            )
        return (out / META_FILE).is_file()
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # an --overwrite run is unfinished until it writes its own
    atomic_write_text(path, json.dumps(recipe, indent=2) + "\n")
    return False


def make_training_pairs(
    src_dirs: Sequence[str | Path],
    out: str | Path,
    preset: str = "realesrgan",
    crop: int = 1024,
    epochs: int = 1,
    seed: int = 0,
    gt: str = "sharpened",
    batch_size: int = 8,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Write ``OUT/{gt,lr,sr_bicubic}/NNNNNNN.png`` for ``epochs`` random crops of every image under
    ``src_dirs`` (see the module doc); ``Summary.skipped`` counts crops kept from an interrupted run."""
    check_preset(preset)
    positive_int("--batch-size", batch_size)
    if gt not in GT_MODES:
        raise PrepareError(f"--gt must be one of {GT_MODES}, got {gt!r}")
    out = Path(out)
    full = RealESRGANDegradation.from_preset(preset)
    scale = full.config.scale
    if crop % scale:
        raise PrepareError(f"--crop {crop} is not divisible by the preset's scale {scale}")
    try:
        full.check_input_size(crop, crop)
    except ValueError as err:
        raise PrepareError(f"--crop {crop}: {err}") from err
    # only the written folders count: `--src embedded` reads OUT/hr_embedded, which no run writes into
    check_folders_disjoint(src_dirs, [out / sub for sub in OUTPUT_FOLDERS])
    sources, paths = _sources([Path(s) for s in src_dirs])
    plans = plan_training_crops(sources, epochs, crop, seed)
    recipe = {
        "format": "restore.training_pairs/v1",
        "sources": [str(Path(s).resolve()) for s in src_dirs],
        "num_sources": len(sources),
        "preset": preset,
        "preset_options": asdict(full.config),
        "crop": crop,
        "epochs": epochs,
        "seed": seed,
        "gt": gt,
        "device": torch.device(device).type,  # cuda draws other random streams than cpu
    }
    if _check_recipe(out, recipe, overwrite):
        return Summary("training_pairs", out, 0, len(plans), unit="crop")
    planned = [f"{sub}/{p.name}.png" for p in plans for sub in OUTPUT_FOLDERS]
    # files of an interrupted run are this run's own: kept (resumed), or replaced with --overwrite
    check_output_folder(out, planned, overwrite=True, folders=OUTPUT_FOLDERS)
    todo = [
        p
        for p in plans
        if overwrite or not all((out / s / f"{p.name}.png").is_file() for s in OUTPUT_FOLDERS)
    ]
    kept = len(plans) - len(todo)

    deg = RealESRGANDegradation.from_preset(preset, usm_sharpen_gt=False).to(device)
    usm = full.usm.to(device) if full.config.usm_sharpen_gt else None

    def flush(batch: list[tuple[TrainingCrop, np.ndarray]]) -> None:
        hq = torch.stack([to_tensor(image) for _, image in batch]).to(device)
        with torch.no_grad():
            sharp = usm(hq) if usm is not None else hq  # batched: bit-identical per image whatever the batch
            for k, (plan, _) in enumerate(batch):
                generator = torch.Generator(device=device).manual_seed(plan.torch_seed)
                lq = deg(sharp[k : k + 1], generator=generator).lq
                up = F.interpolate(lq, size=(crop, crop), mode="bicubic", align_corners=False)
                target = sharp[k] if gt == "sharpened" else hq[k]
                for sub, image in zip(OUTPUT_FOLDERS, (lq[0], up[0], target)):
                    write_image(out / sub / f"{plan.name}.png", image.clamp(0, 1), overwrite=True)
        bar.update(len(batch))

    by_source: dict[str, list[TrainingCrop]] = {}
    for plan in todo:  # each source decoded once for all its epochs
        by_source.setdefault(plan.source, []).append(plan)
    batch: list[tuple[TrainingCrop, np.ndarray]] = []
    with tqdm(
        total=len(plans), initial=kept, desc="training pairs", unit="crop", disable=not progress
    ) as bar:
        for key, crops in by_source.items():
            image = read_image(paths[key])
            for plan in crops:
                batch.append((plan, _cut(image, plan)))
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)

    meta = {
        **recipe,
        "scale": scale,
        "torch_version": torch.__version__,
        "folders": {
            "gt": f"{crop}² crops, {'USM-sharpened (the training target)' if gt == 'sharpened' else 'clean'}",
            "lr": f"{crop // scale}² degraded",
            "sr_bicubic": f"lr bicubic-upsampled to {crop}² (torch, from the float LR)",
        },
        "crops": [
            {
                "name": f"{p.name}.png",
                "source": str(paths[p.source]),
                "box": {"top": p.top, "left": p.left, "size": p.size},
                "padded": {"bottom": p.pad_bottom, "right": p.pad_right},
                "torch_seed": p.torch_seed,
            }
            for p in plans
        ],
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    return Summary("training_pairs", out, len(todo), kept, unit="crop")
