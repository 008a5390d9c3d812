"""StableSR's stage-2 (CFW) training data: the stage-1 model's final latents with their LQ and GT images.

Layout, as the official ``IceClear/StableSR: scripts/generate_vqgan_data.py`` writes it (one name per pair):
``latents/NAME.npy`` (the final UNet latent, *scaled* by 0.18215, ``[1, 4, h, w]`` or ``[4, h, w]`` float32),
``inputs/NAME.png`` (the LR bicubic-upsampled to the GT size, what the CFW encoder reads), ``gts/NAME.png`` (the
GT), and ``samples/NAME.png`` (the decoded latent, for checking only). ``scripts/make_cfw_pairs.py`` writes it
(:func:`restore.methods.stablesr_cfw.make_cfw_pairs`); :class:`CFWPairDataset` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from restore.data.image_io import read_image, to_tensor

__all__ = ["CFW_FOLDERS", "CFWPairDataset", "cfw_pair_names"]

#: The folders of a CFW pair set, in the order each pair's files are written (``latents`` last: a pair whose
#: latent exists is complete).
CFW_FOLDERS = ("inputs", "gts", "samples", "latents")


def cfw_pair_names(root: str | os.PathLike) -> list[str]:
    """The complete pairs of ``root`` (their latent, input and GT exist), sorted."""
    root = Path(root)
    latents = root / "latents"
    if not latents.is_dir():
        return []
    names = sorted(p.stem for p in latents.glob("*.npy"))
    return [
        n for n in names if (root / "inputs" / f"{n}.png").is_file() and (root / "gts" / f"{n}.png").is_file()
    ]


class CFWPairDataset(Dataset):
    """``{"lq", "gt", "latent", "key"}`` per pair of a CFW pair set (see the module doc): ``lq`` / ``gt``
    ``[3, H, W]`` in [0, 1], ``latent`` ``[4, H/8, W/8]`` as stored (scaled)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.names = cfw_pair_names(self.root)
        if not self.names:
            raise FileNotFoundError(
                f"no CFW pairs in '{self.root}' (expected latents/NAME.npy with inputs/NAME.png and gts/NAME.png): "
                "make them with `python scripts/make_cfw_pairs.py` from a stage-1 StableSR checkpoint"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        lq = to_tensor(read_image(self.root / "inputs" / f"{name}.png"))
        gt = to_tensor(read_image(self.root / "gts" / f"{name}.png"))
        latent = torch.from_numpy(np.load(self.root / "latents" / f"{name}.npy")).float()
        latent = latent.reshape(latent.shape[-3:])
        if lq.shape != gt.shape or tuple(latent.shape[-2:]) != (gt.shape[-2] // 8, gt.shape[-1] // 8):
            raise ValueError(
                f"CFW pair {name}: input {tuple(lq.shape)}, GT {tuple(gt.shape)} and latent {tuple(latent.shape)} "
                "do not fit (the input is the upsampled LR at the GT size, the latent 1/8 of it)"
            )
        return {"lq": lq, "gt": gt, "latent": latent, "key": name}
