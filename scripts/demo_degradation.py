"""Demo: degrade the embedded photos with both presets and write an LR/HR comparison grid.

    python scripts/demo_degradation.py [--out outputs/demo] [--crop 512] [--seed 0]

Rows are real photos shipped with scikit-image; columns: the HR crop, the USM-sharpened GT (the training
target), and the synthesised LR of each preset shown x4 with nearest (pixels) and bicubic upsampling.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from restore.data.degradation import RealESRGANDegradation
from restore.data.hr_datasets import EmbeddedPhotos
from restore.evaluation.grid import save_comparison_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--panel", type=int, default=256, help="panel height in the grid (px)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)  # crop positions and flips of the dataset
    photos = EmbeddedPhotos(crop_size=args.crop, hflip=False, small_image="upscale")
    with warnings.catch_warnings():  # a few photos are smaller than 512: upscaling them is intended here
        warnings.simplefilter("ignore", UserWarning)
        batch = [photos[i] for i in range(len(photos))]
    hq = torch.stack([item["hq"] for item in batch])
    names = [Path(item["key"]).stem for item in batch]

    columns, outputs = ["HR crop", "GT (USM, target)"], {}
    for preset in ("realesrgan", "stablesr_mild"):
        deg = RealESRGANDegradation.from_preset(preset)
        start = time.perf_counter()
        outputs[preset] = deg(hq, generator=torch.Generator().manual_seed(args.seed))
        print(
            f"{preset}: {len(hq)} images {tuple(hq.shape[-2:])} -> {tuple(outputs[preset].lq.shape[-2:])} "
            f"in {time.perf_counter() - start:.2f} s"
        )
        columns += [f"{preset} LR x4 nearest", f"{preset} LR x4 bicubic"]

    rows = []
    for i in range(len(hq)):
        row = [hq[i], outputs["realesrgan"].gt[i]]
        for preset in ("realesrgan", "stablesr_mild"):
            lq = outputs[preset].lq[i : i + 1]
            row.append(lq[0])
            row.append(F.interpolate(lq, scale_factor=4, mode="bicubic").clamp(0, 1)[0])
        rows.append(row)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = save_comparison_grid(
        args.out / f"degradation_grid_{stamp}.png", rows, columns, names, panel_height=args.panel
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
