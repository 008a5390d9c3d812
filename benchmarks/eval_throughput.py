"""Scoring throughput: ``restore``'s benchmark runner vs a plain per-metric pyiqa loop, same files, same run.

The baseline is how evaluation scripts of the diffusion-SR repos score a folder: for each metric,
``pyiqa.create_metric(...)`` and then one call per image with file paths, so every metric decodes every
image again and nothing is batched. The runner decodes each (restored, GT) pair once in DataLoader workers,
batches equal-sized images and hands the same tensors to every metric.

Metrics: the weight-free paper suite (PSNR and SSIM on Y of YCbCr, NIQE) plus one learned metric (LPIPS,
with randomly initialised weights written into a temporary cache: speed does not depend on weight values,
and nothing is downloaded). Both sides must produce the same numbers; the script checks that, then prints
images/s and the ratio.

    python benchmarks/eval_throughput.py [--images 48] [--size 512] [--batch-size 8] [--workers 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# pyiqa and torch.hub read the cache location when imported: point them at a private cache first.
_CACHE = Path(tempfile.mkdtemp(prefix="restore-bench-cache-"))
os.environ["TORCH_HOME"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

METRICS = ["psnr", "ssim", "niqe", "lpips"]


def make_images(root: Path, count: int, size: int) -> tuple[Path, Path]:
    """``count`` real-photo crops as GT and their bicubic x4 round trip as "restored" images (PNG)."""
    import cv2

    from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, load_embedded_photo
    from restore.data.image_io import write_image

    rng = np.random.default_rng(0)
    photos = [load_embedded_photo(n) for n in EMBEDDED_PHOTO_NAMES]
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = min(size, h, w)
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        gt = cv2.resize(np.ascontiguousarray(photo[top : top + side, left : left + side]), (size, size))
        lr = cv2.resize(gt, (size // 4, size // 4), interpolation=cv2.INTER_AREA)
        sr = cv2.resize(lr, (size, size), interpolation=cv2.INTER_CUBIC)
        write_image(root / "gt" / f"{i:04d}.png", gt)
        write_image(root / "sr" / f"{i:04d}.png", sr)
        write_image(root / "lr" / f"{i:04d}.png", lr)
    return root / "sr", root / "gt"


def run_restore(root: Path, batch_size: int, workers: int) -> tuple[float, dict[str, list[float]]]:
    from omegaconf import OmegaConf

    from restore import CONFIG_DIR
    from restore.evaluation.benchmark import Benchmark
    from restore.evaluation.runner import EvalSpec, evaluate_benchmark

    catalog = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "metrics/default.yaml"), resolve=True)
    bench = Benchmark(name="throughput", lr_dir=root / "lr", gt_dir=root / "gt", metrics=list(METRICS))
    spec = EvalSpec(
        benchmark=bench,
        label="restore",
        run_dir=root / "run",
        run_key="bench",
        outputs=root / "sr",
        metric_catalog=catalog,
        on_missing_weights="error",
        batch_size=batch_size,
        num_workers=workers,
        progress=False,
        report={"enabled": False},
    )
    start = time.perf_counter()
    results = evaluate_benchmark(spec)
    elapsed = time.perf_counter() - start
    scores = {m: [r["scores"][m] for r in results["per_image"]] for m in METRICS}
    return elapsed, scores


def run_plain_pyiqa(sr_dir: Path, gt_dir: Path) -> tuple[float, dict[str, list[float]]]:
    """One metric at a time, one image at a time, each call reading its own files (the usual script)."""
    import pyiqa
    from omegaconf import OmegaConf

    from restore import CONFIG_DIR
    from restore.weights import metric_model_path  # where the suite would load the same weights from

    catalog = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "metrics/default.yaml"), resolve=True)
    files = sorted(p.name for p in sr_dir.glob("*.png"))
    scores: dict[str, list[float]] = {}
    start = time.perf_counter()
    for name in METRICS:
        spec = catalog[name]
        options = dict(spec.get("options") or {})
        options.update(metric_model_path(spec["pyiqa"]))
        metric = pyiqa.create_metric(spec["pyiqa"], device="cpu", **options)
        values = []
        for f in files:
            if metric.metric_mode == "FR":
                values.append(float(metric(str(sr_dir / f), str(gt_dir / f))))
            else:
                values.append(float(metric(str(sr_dir / f))))
        scores[name] = values
    return time.perf_counter() - start, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from restore.weights import derive_niqe_params_from_basicsr
    from restore.weights.random_init import materialize_random_weights

    materialize_random_weights(["lpips"], seed=0)
    derive_niqe_params_from_basicsr()
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as tmp:
        root = Path(tmp)
        sr_dir, gt_dir = make_images(root, args.images, args.size)
        base_s, base_scores = run_plain_pyiqa(sr_dir, gt_dir)
        ours_s, ours_scores = run_restore(root, args.batch_size, args.workers)
    worst = {m: float(np.max(np.abs(np.subtract(ours_scores[m], base_scores[m])))) for m in METRICS}
    n = args.images
    print(f"{n} images {args.size}², metrics {', '.join(METRICS)} (lpips with random weights), CPU")
    print(f"plain pyiqa loop : {n / base_s:7.2f} img/s ({base_s:.1f} s)")
    print(f"restore runner   : {n / ours_s:7.2f} img/s ({ours_s:.1f} s)")
    print(f"ratio restore/plain: {base_s / ours_s:.2f}x")
    print("max |difference| per metric: " + ", ".join(f"{m} {d:.2e}" for m, d in worst.items()))
    record = {
        "images": n,
        "size": args.size,
        "metrics": METRICS,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "plain_pyiqa_s": base_s,
        "restore_s": ours_s,
        "ratio": base_s / ours_s,
        "max_abs_difference": worst,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if max(worst.values()) > 1e-4:
        print("error: the two paths disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
