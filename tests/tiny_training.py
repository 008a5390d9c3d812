"""Test helpers shared by the method tests: a paired set of the embedded photos and a quiet CPU fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from restore.data.hr_datasets import load_embedded_photo


class EmbeddedPairs(Dataset):
    """Two embedded photos as ``size``² GT with their x4 area-downsampled LR (and, with ``prompts``, a caption)."""

    def __init__(self, size: int = 64, prompts: bool = False) -> None:
        photos = [
            torch.from_numpy(load_embedded_photo(n)).permute(2, 0, 1).float() for n in ("astronaut", "coffee")
        ]
        self.gt = torch.stack([F.interpolate(p[None], size=(size, size), mode="area")[0] for p in photos])
        self.lq = F.interpolate(self.gt, scale_factor=0.25, mode="area")
        self.prompts = prompts

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        item = {"gt": self.gt[i], "lq": self.lq[i], "key": f"p{i}"}
        if self.prompts:
            item["prompt"] = f"a photo number {i}"
        return item


def fit_on_cpu(
    module: L.LightningModule,
    root: Path,
    steps: int = 2,
    data: Dataset | None = None,
    precision: str = "32-true",
) -> L.Trainer:
    """``steps`` optimisation steps of ``module`` on ``data`` (default :class:`EmbeddedPairs`), batch 2, no
    logger, bar or checkpoint."""
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    trainer.fit(module, DataLoader(data if data is not None else EmbeddedPairs(), batch_size=2))
    return trainer
