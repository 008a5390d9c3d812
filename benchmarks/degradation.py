"""Throughput of the Real-ESRGAN degradation: `restore` vs BasicSR's reference, measured in one run.

Both sides synthesise x4 LR from the same HR batches (512², batch 8 by default) with the x4plus options. The
BasicSR side is the reference pipeline end to end: Real-ESRGAN's dataset-side numpy kernel synthesis per
sample plus its model-side ``feed_data`` ops (USM, filter2D, DiffJPEG, noise), see
tests/reference/basicsr_ref.py. Each side also prints an output-distribution fingerprint: quantiles of
PSNR(LR, area-downsampled GT) over all timed samples (320 with the defaults).

    python benchmarks/degradation.py                      # CPU, 40 batches each (about 6 minutes here)
    python benchmarks/degradation.py --device cuda        # GPU figure, when one is available
    python benchmarks/degradation.py --sampler-check 150  # + same-distribution check on 1,200 samples

With per-batch draws a 40-batch fingerprint rests on only 40 resize/noise-family draws, so its quantiles
move by ~0.5 dB from seed to seed. ``--sampler-check N`` compares the *samplers* on N batches each: since
``RealESRGANDegradation.apply`` equals BasicSR's ``feed_data`` for the same draws (exactness tests), both
BasicSR's draws and ours go through ``apply`` (fast), and the two PSNR samples are compared (quantiles and
a two-sample KS test).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the BasicSR reference lives with the tests

from reference.basicsr_ref import BasicSROps, feed_data, sample_params_basicsr  # noqa: E402

from restore.data.degradation import RealESRGANDegradation  # noqa: E402
from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, load_embedded_photo  # noqa: E402
from restore.data.image_io import read_image  # noqa: E402

SHARED = ROOT.parent / "shared" / "testdata"
#: 8 real HR images read from ../shared/testdata when present (5 pyiqa reference images, Set5 baby, Set14
#: baboon, BSRGAN Lincoln): the inputs of the BasicSR figures in BENCHMARKS.md, so fingerprints compare.
SPEC_IMAGES = [
    *(SHARED / "pyiqa_calibration" / "ref_dir" / f"I{i}.bmp" for i in ("03", "04", "06", "08", "19")),
    SHARED / "paired" / "set5_x4" / "HR" / "baby.png",
    SHARED / "paired" / "realesrgan_tests_x4" / "gt" / "baboon.png",
    SHARED / "hr_extra" / "Lincoln_BSRGAN.png",
]


def pad_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-101 pad to at least size x size (as the training datasets do), then centre-crop."""
    h, w = img.shape[:2]
    if h < size or w < size:
        img = cv2.copyMakeBorder(img, 0, max(0, size - h), 0, max(0, size - w), cv2.BORDER_REFLECT_101)
        h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def load_batch(size: int, batch: int) -> tuple[torch.Tensor, str]:
    if all(p.is_file() for p in SPEC_IMAGES):
        images, source = [read_image(p) for p in SPEC_IMAGES], "8 real HR images (../shared/testdata)"
    else:
        images, source = [load_embedded_photo(n) for n in EMBEDDED_PHOTO_NAMES], "embedded skimage photos"
    crops = [
        torch.from_numpy(np.ascontiguousarray(pad_center_crop(im, size))).permute(2, 0, 1) for im in images
    ]
    while len(crops) < batch:
        crops += crops
    return torch.stack(crops[:batch]).float(), source


def psnr_vs_area_gt(lq: torch.Tensor, hq: torch.Tensor) -> list[float]:
    ref = F.interpolate(hq, size=lq.shape[-2:], mode="area")
    mse = ((lq - ref) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name: str, step, hq: torch.Tensor, batches: int, warmup: int) -> dict:
    for _ in range(warmup):
        step(hq)
    sync(hq.device)
    times, psnrs = [], []
    for _ in tqdm(range(batches), desc=name, leave=False):
        start = time.perf_counter()
        lq = step(hq)
        sync(hq.device)
        times.append(time.perf_counter() - start)
        psnrs += psnr_vs_area_gt(lq.float(), hq)
    t = np.array(times)
    return {
        "images_per_s": len(hq) * batches / t.sum(),
        "ms_per_batch_mean": 1000 * t.mean(),
        "ms_per_batch_p10_p50_p90": [round(1000 * float(np.percentile(t, q)), 1) for q in (10, 50, 90)],
        "psnr_lq_vs_area_gt_quantiles_5_25_50_75_95": [
            round(float(np.percentile(psnrs, q)), 2) for q in (5, 25, 50, 75, 95)
        ],
        "samples": len(psnrs),
    }


def sampler_check(hq: torch.Tensor, deg: RealESRGANDegradation, batches: int, seed: int) -> dict:
    """Fingerprints of BasicSR's parameter sampler and ours, both applied by ``deg.apply``."""
    from scipy import stats

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ops, generator = BasicSROps(hq.device), torch.Generator(hq.device).manual_seed(seed)
    ours, reference = [], []
    for _ in tqdm(range(batches), desc="sampler check", leave=False):
        ours += psnr_vs_area_gt(deg.apply(hq, deg.sample_params(len(hq), generator), generator).lq, hq)
        params = sample_params_basicsr(ops, deg.config, len(hq), hq.device)
        for kernels in (params.kernel1, params.kernel2, params.sinc):
            kernels.sizes = torch.full((len(hq),), kernels.kernels.shape[-1])  # full 21x21, as BasicSR
        reference += psnr_vs_area_gt(deg.apply(hq, params, generator).lq, hq)
    quantiles = lambda x: [round(float(np.percentile(x, q)), 2) for q in (5, 25, 50, 75, 95)]  # noqa: E731
    ks = stats.ks_2samp(ours, reference)
    return {
        "samples_each": len(ours),
        "restore_sampler_quantiles": quantiles(ours),
        "basicsr_sampler_quantiles": quantiles(reference),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenCV threads (the CI machine's 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-basicsr", action="store_true", help="time restore only")
    ap.add_argument("--sampler-check", type=int, default=0, metavar="N", help="compare samplers on N batches")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    device = torch.device(args.device)
    hq, source = load_batch(args.size, args.batch_size)
    hq = hq.to(device)

    deg = RealESRGANDegradation.from_preset("realesrgan").to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    results = {"restore": run("restore", lambda x: deg(x, generator).lq, hq, args.batches, args.warmup)}

    if not args.skip_basicsr:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        ops, opt = BasicSROps(device), deg.config

        def basicsr_step(x: torch.Tensor) -> torch.Tensor:
            return feed_data(ops, x, sample_params_basicsr(ops, opt, len(x), device))[1]

        results["basicsr"] = run("basicsr", basicsr_step, hq, args.batches, args.warmup)
        results["speedup"] = results["restore"]["images_per_s"] / results["basicsr"]["images_per_s"]

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    print(
        f"HR {args.batch_size}x3x{args.size}x{args.size} from {source}; {args.batches} timed batches; {machine}"
    )
    for name in ("restore", "basicsr"):
        if name in results:
            r = results[name]
            print(
                f"{name:8s} {r['images_per_s']:7.2f} img/s  {r['ms_per_batch_mean']:8.1f} ms/batch  "
                f"PSNR(LR, area GT) q5/25/50/75/95 = {r['psnr_lq_vs_area_gt_quantiles_5_25_50_75_95']} dB"
            )
    if "speedup" in results:
        print(f"ratio restore/basicsr: {results['speedup']:.2f}x")
    if args.sampler_check:
        check = results["sampler_check"] = sampler_check(hq, deg, args.sampler_check, args.seed)
        print(
            f"sampler check, {check['samples_each']} samples each, PSNR q5/25/50/75/95: "
            f"restore {check['restore_sampler_quantiles']} vs basicsr {check['basicsr_sampler_quantiles']} dB; "
            f"two-sample KS D = {check['ks_statistic']:.3f}, p = {check['ks_pvalue']:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "machine": machine, **results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
