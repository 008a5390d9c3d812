"""Builders for ``restore.results/v1`` documents used by the table and report tests.

:func:`results_doc` makes a minimal valid document from aggregate values; :func:`make_paired_runs` and
:func:`make_lr_only_run` write real images (scikit-image photos) and results.json files the way the
evaluation runner lays them out, with scores computed here (PSNR via numpy), so the report is exercised
on genuine pixels and genuinely different methods.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from restore.data.image_io import write_image

METRIC_SPECS: dict[str, dict[str, Any]] = {
    "psnr": {"lower_better": False, "kind": "fr", "pyiqa": "psnr", "options": {}},
    "ssim": {"lower_better": False, "kind": "fr", "pyiqa": "ssim", "options": {}},
    "lpips": {"lower_better": True, "kind": "fr", "pyiqa": "lpips", "options": {}},
    "mae": {"lower_better": True, "kind": "fr", "pyiqa": "mae", "options": {}},
    "fid": {"lower_better": True, "kind": "set", "pyiqa": "fid", "options": {}},
    "niqe": {"lower_better": True, "kind": "nr", "pyiqa": "niqe", "options": {}},
    "musiq": {"lower_better": False, "kind": "nr", "pyiqa": "musiq", "options": {}},
    "sharpness": {"lower_better": False, "kind": "nr", "pyiqa": "sharpness", "options": {}},
}


def results_doc(
    method: str,
    benchmark: str,
    aggregate: Mapping[str, float | None],
    *,
    n: int = 10,
    scored: int | None = None,
    created: str | None = "2026-11-23T12:00:00",
    per_image: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A valid results document with the given aggregate values (metric specs from METRIC_SPECS)."""
    doc = {
        "format": "restore.results/v1",
        "method": method,
        "benchmark": benchmark,
        "scale": 4,
        "num_images": n,
        "num_scored": n if scored is None else scored,
        "metrics": {k: copy.deepcopy(METRIC_SPECS[k]) for k in aggregate},  # tests mutate these
        "aggregate": dict(aggregate),
        "per_image": per_image or [],
        "skipped": [],
        "missing_metrics": {},
        "settings": {"crop_border": 0, "pyiqa_version": "0.1.16", "config_hash": f"h-{method}", "post": []},
        "created": created,
    }
    doc.update(extra)
    return doc


def write_results(run_dir: Path, doc: Mapping[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [0, 1] images as stored in 8-bit files (what a scorer reading the PNGs sees)."""
    a8, b8 = np.rint(a * 255).astype(np.float64), np.rint(b * 255).astype(np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((a8 - b8) ** 2)))


def sharpness(img: np.ndarray) -> float:
    """A stand-in no-reference score: variance of the Laplacian of the gray image (higher = sharper)."""
    gray = cv2.cvtColor(np.float32(img), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_32F).var() * 1e3)


def make_paired_runs(root: Path, photos: np.ndarray, benchmark: str = "photos") -> dict[str, Any]:
    """GT = ``photos`` (N, H, W, 3), LR = bicubic ÷4; methods "bicubic" (bicubic ×4) and "blurred" (the
    bicubic output blurred again: always worse). Writes images + two results.json; returns the details."""
    n, h, w, _ = photos.shape
    names = [f"img{i + 1}" for i in range(n)]
    outputs: dict[str, dict[str, np.ndarray]] = {"bicubic": {}, "blurred": {}}
    for name, gt in zip(names, photos):
        lr = np.clip(cv2.resize(gt, (w // 4, h // 4), interpolation=cv2.INTER_AREA), 0, 1)
        write_image(root / "gt" / f"{name}.png", gt)
        write_image(root / "lq" / f"{name}.png", lr)
        up = np.clip(cv2.resize(lr, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
        outputs["bicubic"][name] = up
        outputs["blurred"][name] = cv2.GaussianBlur(up, (0, 0), 2.0)
    paths, scores = {}, {}
    for method, imgs in outputs.items():
        per_image = []
        scores[method] = {}
        for name in names:
            sr_path = write_image(root / method / "images" / benchmark / f"{name}.png", imgs[name])
            s = {"psnr": psnr(imgs[name], photos[names.index(name)]), "sharpness": sharpness(imgs[name])}
            scores[method][name] = s
            per_image.append(
                {
                    "name": name,
                    "sr": str(sr_path),
                    "lr": str(root / "lq" / f"{name}.png"),
                    "gt": str(root / "gt" / f"{name}.png"),
                    "scores": s,
                }
            )
        agg = {k: float(np.mean([scores[method][nm][k] for nm in names])) for k in ("psnr", "sharpness")}
        agg["fid"] = 50.0 if method == "bicubic" else 80.0
        doc = results_doc(method, benchmark, agg, n=n, per_image=per_image)
        doc["metrics"] = {k: METRIC_SPECS[k] for k in ("psnr", "sharpness", "fid")}
        paths[method] = write_results(root / method, doc)
    return {"names": names, "scores": scores, "paths": paths}


def make_lr_only_run(
    root: Path, photos: np.ndarray, method: str = "bicubic", benchmark: str = "lronly"
) -> Path:
    """An LR-only benchmark (``gt: null``) with one method, a skipped file and a missing metric."""
    n, h, w, _ = photos.shape
    per_image = []
    for i, gt in enumerate(photos):
        name = f"lr{i + 1}"
        lr = np.clip(cv2.resize(gt, (w // 4, h // 4), interpolation=cv2.INTER_AREA), 0, 1)
        lr_path = write_image(root / "lronly_lq" / f"{name}.png", lr)
        up = np.clip(cv2.resize(lr, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
        sr_path = write_image(root / f"{method}_lronly" / "images" / f"{name}.png", up)
        per_image.append(
            {
                "name": name,
                "sr": str(sr_path),
                "lr": str(lr_path),
                "gt": None,
                "scores": {"sharpness": sharpness(up)},
            }
        )
    agg = {"sharpness": float(np.mean([e["scores"]["sharpness"] for e in per_image]))}
    doc = results_doc(method, benchmark, agg, n=n + 1, scored=n, per_image=per_image)
    doc["skipped"] = [
        {"name": "broken<1>", "path": "/x/broken.png", "reason": "not an image file (<truncated> & co)"}
    ]
    doc["missing_metrics"] = {"maniqa": "weights file ckpt_koniq10k.pt missing"}
    return write_results(root / f"{method}_lronly", doc)
