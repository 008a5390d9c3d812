"""Calibration check of the metric suite's weight-free metrics against pyiqa's official values.

Data: the 5 TID2013 ref/dist pairs and ``results_official.csv`` from pyiqa's ResultsCalibra (a local copy,
not part of this repository; see its README). Every weight-free metric the suite supports is scored through
``restore.metrics.MetricSuite`` exactly as an evaluation would, and compared per image with the official
value under pyiqa's own test tolerance (``allclose(atol=1e-2, rtol=1e-2)``, NIQE ``rtol=6e-2``):

* ``psnr``, ``ssim``, ``ms_ssim``, ``niqe`` with pyiqa's defaults (raw pyiqa names, as the table was made);
  NIQE with the pristine model rebuilt from basicsr's bundled npz (``fetch --from-basicsr``);
* the paper settings of the catalog (PSNR/SSIM on Y of BT.601 YCbCr), which have no official row: PSNR-Y
  is checked against PSNR-Y(YIQ) with the MSE scaled by (219/255)^2 (+20*log10(255/219) dB, less where
  pyiqa's 1e-8 MSE eps matters, i.e. above ~50 dB), and both against BasicSR's calculate_psnr /
  calculate_ssim (test_y_channel=True) when basicsr is installed (1e-3 dB once pyiqa's eps is applied to
  BasicSR's eps-free value; SSIM 2e-3: pyiqa rounds Y to integers, BasicSR's calculate_ssim does not).

Nothing is written outside a temporary TORCH_HOME. Exit status 1 when any check fails.

    python benchmarks/metric_calibration.py [--calibration-dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"niqe": (1e-2, 6e-2)}  # pyiqa tests/test_metric_general.py; default (1e-2, 1e-2)
Y_GAP_DB = 20 * math.log10(255 / 219)
EPS = 1e-8  # pyiqa's psnr adds it to the MSE (data range 1): 0.02 dB at 57 dB, where MSE is ~2e-6


def with_eps(psnr_without_eps: np.ndarray) -> np.ndarray:
    """The PSNR pyiqa reports for an MSE whose eps-free PSNR is given."""
    return -10 * np.log10(10 ** (-psnr_without_eps / 10) + EPS)


def ycbcr_from_yiq(psnr_y_yiq: np.ndarray) -> np.ndarray:
    """Exact PSNR-Y(YCbCr) from pyiqa's PSNR-Y(YIQ): MSE scales by (219/255)^2, pyiqa's eps does not."""
    mse_yiq = 10 ** (-psnr_y_yiq / 10) - EPS
    return -10 * np.log10((219 / 255) ** 2 * mse_yiq + EPS)


def default_calibration_dir() -> Path:
    env = os.environ.get("RESTORE_CALIBRATION_DIR")
    return Path(env) if env else REPO.parent / "shared" / "testdata" / "pyiqa_calibration"


def read_official(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    names, table = rows[0][1:], {}
    for row in rows[1:]:
        if len(row) == len(names) + 1:
            table[row[0]] = np.array([float(v) for v in row[1:]])
    return names, table


def load_images(folder: Path, names: list[str]):
    import torch
    from PIL import Image

    arrays = [np.asarray(Image.open(folder / n).convert("RGB")) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def basicsr_reference(dist, ref) -> dict[str, np.ndarray] | None:
    """BasicSR's PSNR/SSIM on Y (YCbCr), or None without basicsr."""
    try:
        import torchvision.transforms.functional as functional

        # basicsr 1.4.2 imports a torchvision module that no longer exists; basicsr-fixed does not need this
        sys.modules.setdefault("torchvision.transforms.functional_tensor", functional)
        from basicsr.metrics import calculate_psnr, calculate_ssim
    except ImportError:
        return None
    bgr = lambda t: (t.permute(1, 2, 0).numpy()[:, :, ::-1] * 255.0).round().astype(np.float64)  # noqa: E731
    return {
        "psnr": np.array([calculate_psnr(bgr(d), bgr(r), 0, test_y_channel=True) for d, r in zip(dist, ref)]),
        "ssim": np.array([calculate_ssim(bgr(d), bgr(r), 0, test_y_channel=True) for d, r in zip(dist, ref)]),
    }


def report(
    title: str, names: list[str], ours: np.ndarray, expected: np.ndarray, atol: float, rtol: float
) -> dict:
    ok = np.abs(ours - expected) <= atol + rtol * np.abs(expected)
    print(f"\n{title}   [pass: |ours - expected| <= {atol:g} + {rtol:g} * |expected|]")
    print(f"  {'image':9s} {'ours':>11s} {'expected':>11s} {'delta':>10s}")
    for n, o, e, good in zip(names, ours, expected, ok):
        print(f"  {n:9s} {o:11.4f} {e:11.4f} {o - e:+10.4f}  {'pass' if good else 'FAIL'}")
    return {
        "ours": ours.tolist(),
        "expected": expected.tolist(),
        "max_abs_delta": float(np.abs(ours - expected).max()),
        "atol": atol,
        "rtol": rtol,
        "pass": bool(ok.all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-dir", type=Path, default=default_calibration_dir())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    folder = args.calibration_dir
    if not (folder / "results_official.csv").is_file():
        print(f"no results_official.csv under {folder} (set --calibration-dir or RESTORE_CALIBRATION_DIR)")
        return 2

    # private weights cache: the NIQE parameters are rebuilt from basicsr there, the user's cache is untouched
    with tempfile.TemporaryDirectory(prefix="restore-calibration-") as cache:
        os.environ["TORCH_HOME"] = cache
        return run(folder, args.json)


def run(folder: Path, json_path: Path | None) -> int:
    import pyiqa
    import torch

    from restore.metrics import MetricSuite
    from restore.weights import fetch, get

    torch.set_grad_enabled(False)
    niqe = fetch(get("niqe_modelparameters.mat"), from_basicsr=True)
    names, official = read_official(folder / "results_official.csv")
    dist, ref = load_images(folder / "dist_dir", names), load_images(folder / "ref_dir", names)
    print(f"pyiqa {pyiqa.__version__}, torch {torch.__version__}, {len(names)} pairs from {folder}")
    print(f"NIQE parameters: {niqe.source}")

    results: dict[str, dict] = {}
    for name in ("psnr", "ssim", "ms_ssim", "niqe"):
        start = time.perf_counter()
        ours = MetricSuite([name], catalog={}).score(dist, ref)[name].numpy()
        atol, rtol = TOLERANCE.get(name, (1e-2, 1e-2))
        title = f"{name} (pyiqa default settings) vs official   {time.perf_counter() - start:.1f} s"
        results[name] = report(title, names, ours, official[name], atol, rtol)

    paper = MetricSuite(
        ["psnr", "ssim", {"name": "psnr_y_yiq", "pyiqa": "psnr", "options": {"test_y_channel": True}}]
    ).score(dist, ref)
    psnr_y, ssim_y = paper["psnr"].numpy(), paper["ssim"].numpy()
    psnr_yiq = paper["psnr_y_yiq"].numpy()
    print(f"\nPSNR-Y(YCbCr) - PSNR-Y(YIQ): {' '.join(f'{v:.4f}' for v in psnr_y - psnr_yiq)} dB "
          f"(20log10(255/219) = {Y_GAP_DB:.4f}; smaller where pyiqa's MSE eps matters)")  # fmt: skip
    results["psnr_y_ycbcr_vs_yiq_gap"] = report(
        "psnr Y-YCbCr (catalog 'psnr') vs PSNR-Y(YIQ) with MSE x (219/255)^2 (pyiqa's eps kept)",
        names, psnr_y, ycbcr_from_yiq(psnr_yiq), 1e-3, 0.0,
    )  # fmt: skip
    basicsr = basicsr_reference(dist, ref)
    if basicsr is None:
        print("\nbasicsr not installed: paper-setting PSNR/SSIM not compared with BasicSR")
    else:
        print(f"\nraw delta vs BasicSR PSNR-Y: {' '.join(f'{v:+.4f}' for v in psnr_y - basicsr['psnr'])} dB "
              "(BasicSR adds no eps to the MSE)")  # fmt: skip
        results["psnr_y_ycbcr_vs_basicsr"] = report(
            "psnr Y-YCbCr (catalog 'psnr') vs BasicSR calculate_psnr(test_y_channel=True) with pyiqa's 1e-8",
            names, psnr_y, with_eps(basicsr["psnr"]), 1e-3, 0.0,
        )  # fmt: skip
        results["ssim_y_ycbcr_vs_basicsr"] = report(
            "ssim Y-YCbCr (catalog 'ssim', Y rounded) vs BasicSR calculate_ssim (float Y): the known Y-rounding difference",
            names, ssim_y, basicsr["ssim"], 2e-3, 0.0,
        )  # fmt: skip

    failed = [k for k, v in results.items() if not v["pass"]]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} checks pass"
        + (f"; FAILED: {failed}" if failed else "")
    )
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pyiqa": pyiqa.__version__, "torch": torch.__version__, "niqe_params": niqe.source}
        json_path.write_text(json.dumps({**record, "checks": results}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
