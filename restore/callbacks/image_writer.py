"""Write restored images as PNGs during ``trainer.predict``.

Prediction (not ``test``) is the multi-GPU-safe way to run a benchmark: Lightning's predict sampler does not
pad or repeat samples, so with this writer every image is written exactly once, by the rank that restored it
(Lightning-AI/pytorch-lightning: ``src/lightning/pytorch/trainer/connectors/data_connector.py``,
``_get_distributed_sampler``: predict uses ``UnrepeatedDistributedSamplerWrapper``, validate/test a padding
``DistributedSampler``).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from restore.data.image_io import write_image

__all__ = ["PNGWriter"]


class PNGWriter(BasePredictionWriter):
    """Saves ``prediction["sr"][i]`` as ``<out_dir>/<key>.png`` (key = the LR path relative to its folder).

    Expects ``predict_step`` to return ``{"sr": list of (3, H, W) tensors in [0, 1], "key": list of str}``.
    Existing files are never overwritten unless ``overwrite`` (results of earlier runs are precious).
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.written: list[Path] = []

    def path_for(self, key: str) -> Path:
        rel = PurePosixPath(key).with_suffix(".png")
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"image key {key!r} must be a relative path inside the dataset folder")
        return self.out_dir / rel

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        srs, keys = prediction["sr"], prediction["key"]
        if len(srs) != len(keys):
            raise ValueError(f"predict_step returned {len(srs)} images for {len(keys)} keys")
        for sr, key in zip(srs, keys, strict=True):
            self.written.append(write_image(self.path_for(key), sr, overwrite=self.overwrite))
