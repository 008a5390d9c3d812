"""The suite's weight-free metrics against independent references, on pairs generated here from real photos.

References: hand-written numpy PSNR (Y of BT.601 YCbCr and RGB) and SSIM (MATLAB settings), scikit-image's
SSIM, BasicSR's calculate_psnr/calculate_ssim and BasicSR's NIQE core. Where an implementation differs on
purpose (pyiqa clamps SSIM's cs term, rounds SSIM's Y, rounds its Gaussian window to float32) the test
either aligns the reference or bounds the documented difference. Plus: the +20*log10(255/219) dB Y
convention gap, crop_border, and, when the shared copy of pyiqa's calibration pairs exists, pyiqa's own
calibration table with pyiqa's tolerances.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from skimage import data
from skimage.metrics import structural_similarity

from restore.metrics import MetricSuite
from restore.weights import fetch, get

H, W = 256, 320
KINDS = ["blur", "noise", "jpeg", "colour", "down-up"]


def _pair_arrays() -> list[tuple[np.ndarray, np.ndarray]]:
    """(distorted, reference) uint8 RGB, one distortion per photo."""
    rng = np.random.default_rng(0)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    refs = [cv2.resize(np.ascontiguousarray(p), (W, H), interpolation=cv2.INTER_AREA) for p in photos]
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(refs[2][:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 20])
    assert ok
    small = cv2.resize(refs[4], (W // 4, H // 4), interpolation=cv2.INTER_AREA)
    dist = [
        cv2.GaussianBlur(refs[0], (0, 0), 1.5),
        np.clip(refs[1] + rng.normal(0, 12, refs[1].shape), 0, 255).round().astype(np.uint8),
        np.ascontiguousarray(cv2.imdecode(jpg, cv2.IMREAD_COLOR)[:, :, ::-1]),
        np.clip(refs[3].astype(int) + np.array([10, 6, -4]), 0, 255).astype(np.uint8),  # shifts luminance
        cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC),
    ]
    return list(zip(dist, refs))


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    arrays = _pair_arrays()
    return _to_tensor([d for d, _ in arrays]), _to_tensor([r for _, r in arrays])


@pytest.fixture(scope="module")
def niqe_cache(tmp_path_factory):
    """A scratch TORCH_HOME holding niqe_modelparameters.mat derived from basicsr's bundled npz."""
    root = tmp_path_factory.mktemp("torch_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root))
    result = fetch(get("niqe_modelparameters.mat"), from_basicsr=True)
    assert result.status == "derived"
    yield root
    mp.undo()


# --------------------------------------------------------------------------------------- references


def _y_ycbcr(images: torch.Tensor) -> np.ndarray:
    """Y of BT.601 YCbCr (16-235) in [0, 1], float64: (16 + 65.481 R + 128.553 G + 24.966 B) / 255."""
    a = images.double().numpy()
    return (16.0 + 65.481 * a[:, 0] + 128.553 * a[:, 1] + 24.966 * a[:, 2]) / 255.0


def _psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # pyiqa's convention (pyiqa/archs/psnr_arch.py): data range 1, mean over all but the batch axis, mse + 1e-8
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    return 10 * np.log10(1.0 / (mse + 1e-8))


def _ssim_matlab(a: np.ndarray, b: np.ndarray, clamp_cs: bool) -> float:
    """SSIM with the MATLAB reference settings: Gaussian 11x11 sigma 1.5, 'valid', K = (0.01, 0.03), L = 255."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda z: correlate2d(z, win, mode="valid")  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    if clamp_cs:
        cs = np.maximum(cs, 0)
    return float((((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)) * cs).mean())


def _matlab_cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1) + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


def _matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize(img, scale, 'bicubic') with antialiasing, float64, symmetric borders (2-D input)."""
    out = img.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        width = 4.0 / scale if scale < 1 else 4.0
        u = np.arange(1, int(np.ceil(n * scale)) + 1) / scale + 0.5 * (1 - 1 / scale)
        idx = np.floor(u - width / 2)[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
        w = (
            scale * _matlab_cubic(scale * (u[:, None] - idx))
            if scale < 1
            else _matlab_cubic(u[:, None] - idx)
        )
        w /= w.sum(axis=1, keepdims=True)
        mirror = np.concatenate([np.arange(n), np.arange(n - 1, -1, -1)])
        taps = mirror[np.mod(idx.astype(int) - 1, 2 * n)]
        moved = np.moveaxis(out, axis, 0)
        out = np.moveaxis(np.einsum("ok,ok...->o...", w, moved[taps]), 0, axis)
    return out


def _basicsr_npz() -> dict[str, np.ndarray]:
    root = next(iter(importlib.util.find_spec("basicsr").submodule_search_locations))
    with np.load(Path(root) / "metrics" / "niqe_pris_params.npz") as npz:
        return {k: npz[k] for k in npz.files}


# --------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_y_ycbcr_and_rgb_match_numpy_formula(pairs):
    dist, ref = pairs
    scores = MetricSuite(["psnr", "psnr_rgb"]).score(dist, ref)
    np.testing.assert_allclose(scores["psnr"].numpy(), _psnr(_y_ycbcr(dist), _y_ycbcr(ref)), atol=2e-5)
    np.testing.assert_allclose(
        scores["psnr_rgb"].numpy(), _psnr(dist.double().numpy(), ref.double().numpy()), atol=2e-5
    )
    assert scores["psnr"].min() > 20 and scores["psnr"].max() < 40  # the pairs are real distortions


def test_ssim_y_ycbcr_matches_matlab_settings(pairs):
    dist, ref = pairs
    ours = MetricSuite(["ssim"]).score(dist, ref)["ssim"].numpy()
    y_d, y_r = np.round(_y_ycbcr(dist) * 255), np.round(_y_ycbcr(ref) * 255)  # pyiqa's ssim rounds Y
    # Hand-written MATLAB-setting SSIM with pyiqa's cs >= 0 clamp; the residual is pyiqa's float32 window.
    exact = np.array([_ssim_matlab(a, b, clamp_cs=True) for a, b in zip(y_d, y_r)])
    np.testing.assert_allclose(ours, exact, atol=2e-6)
    # scikit-image (no clamp): identical where no local cs is negative; the down-up pair has some.
    skimage = np.array(
        [
            structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
            )
            for a, b in zip(y_d, y_r)
        ]
    )
    np.testing.assert_allclose(
        skimage, [_ssim_matlab(a, b, clamp_cs=False) for a, b in zip(y_d, y_r)], atol=1e-9
    )
    np.testing.assert_allclose(ours[:4], skimage[:4], atol=2e-6)
    assert 1e-6 < ours[4] - skimage[4] < 1e-4


def test_psnr_ssim_agree_with_basicsr(pairs):
    from reference.basicsr_ref import import_basicsr

    import_basicsr()
    from basicsr.metrics import calculate_psnr, calculate_ssim

    dist, ref = pairs
    scores = MetricSuite(["psnr", "ssim"]).score(dist, ref)
    bgr = lambda t: (t.permute(1, 2, 0).numpy()[:, :, ::-1] * 255.0).round().astype(np.float64)  # noqa: E731
    b_psnr = np.array([calculate_psnr(bgr(d), bgr(r), 0, test_y_channel=True) for d, r in zip(dist, ref)])
    b_ssim = np.array([calculate_ssim(bgr(d), bgr(r), 0, test_y_channel=True) for d, r in zip(dist, ref)])
    # Same Y and formula once pyiqa's +1e-8 on the MSE is applied to BasicSR's eps-free value (that eps is
    # what separates them above ~50 dB); what is left is float32 vs float64 arithmetic.
    np.testing.assert_allclose(scores["psnr"].numpy(), -10 * np.log10(10 ** (-b_psnr / 10) + 1e-8), atol=5e-5)
    # BasicSR's SSIM uses the unrounded Y and cv2's Gaussian: known small difference (<= 2e-3).
    diff = np.abs(scores["ssim"].numpy() - b_ssim)
    assert diff.max() < 2e-3 and diff.max() > 1e-5


def test_y_convention_gap_is_20log10_255_over_219(pairs):
    dist, ref = pairs
    gap = 20 * math.log10(255 / 219)  # Y(YCbCr) = 219/255 * Y(YIQ) + 16/255 for the same RGB
    assert gap == pytest.approx(1.32192, abs=1e-5)
    suite = MetricSuite(["psnr", {"name": "psnr_yiq", "pyiqa": "psnr", "options": {"test_y_channel": True}}])
    # Float images (no 8-bit rounding anywhere in PSNR): perturb the decoded pairs off the 8-bit grid.
    noisy = (dist + 1e-3 * torch.randn(dist.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    scores = suite.score(noisy, ref)
    # the 1e-8 in pyiqa's mse moves the gap by < 1e-4 dB at these PSNRs
    np.testing.assert_allclose((scores["psnr"] - scores["psnr_yiq"]).numpy(), gap, atol=1e-4)


@pytest.mark.usefixtures("niqe_cache")
def test_crop_border_removes_exactly_that_border(pairs):
    dist, ref = pairs
    c = 7
    cropped = MetricSuite(
        ["psnr", "ssim", "niqe", "psnr_nocrop"], catalog=_catalog_with_free(), crop_border=c
    )
    whole = MetricSuite(["psnr", "ssim", "niqe", "psnr_nocrop"], catalog=_catalog_with_free(), crop_border=0)
    a = cropped.score(dist, ref)
    b = whole.score(dist[..., c:-c, c:-c], ref[..., c:-c, c:-c])
    full = whole.score(dist, ref)
    for name in ("psnr", "ssim", "niqe"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-9)
        assert not torch.allclose(a[name], full[name], atol=1e-6)  # the crop matters
    # a spec without crop_border ignores the benchmark's crop
    torch.testing.assert_close(a["psnr_nocrop"], full["psnr_nocrop"], rtol=0, atol=0)
    assert cropped.describe()["psnr"]["options"]["crop_border"] == c
    assert cropped.describe()["psnr_nocrop"]["options"]["crop_border"] == 0


def _catalog_with_free() -> dict:
    from restore.metrics import load_catalog

    catalog = load_catalog()
    catalog["psnr_nocrop"] = {"pyiqa": "psnr", "options": {"test_y_channel": False}}  # no crop_border
    return catalog


# --------------------------------------------------------------------------------------- NIQE


@pytest.mark.usefixtures("niqe_cache")
def test_niqe_matches_basicsr_core_fed_the_same_y(pairs, monkeypatch):
    """pyiqa's NIQE with basicsr's pristine model vs BasicSR's own NIQE core on the same rounded Y.

    They share the algorithm but differ in two float details: pyiqa rounds its 7x7 Gaussian window to
    float32 and BasicSR's imresize works in float32. NIQE amplifies 1e-7 perturbations (variance
    cancellation in flat regions, then the argmin over the 0.001 grid of the AGGD shape), so unaligned they
    differ by up to ~0.7 % (about 0.6 % on pyiqa's calibration pairs). Aligned - the float32-rounded window,
    and a float64 MATLAB imresize written here in place of BasicSR's - they agree to ~1e-7 relative.
    """
    from pyiqa.utils.color_util import to_y_channel
    from reference.basicsr_ref import import_basicsr

    import_basicsr()
    import basicsr.metrics.niqe as basicsr_niqe

    dist, ref = pairs
    images = torch.cat([dist, ref])
    ours = MetricSuite(["niqe"]).score(images, None)["niqe"].numpy()
    y = to_y_channel(images, 255, "yiq").round().double()[:, 0].numpy()  # the same Y (pyiqa's YIQ default)
    params = _basicsr_npz()
    run = lambda window: np.array(  # noqa: E731
        [basicsr_niqe.niqe(img, params["mu_pris_param"], params["cov_pris_param"], window) for img in y]
    )
    raw = run(params["gaussian_window"])
    window32 = params["gaussian_window"].astype(np.float32).astype(np.float64)
    monkeypatch.setattr(
        basicsr_niqe, "imresize", lambda img, scale, antialiasing=True: _matlab_imresize(img, scale)
    )
    aligned = run(window32)
    np.testing.assert_allclose(ours, aligned, rtol=1e-5)
    np.testing.assert_allclose(ours, raw, rtol=2e-2)
    assert np.abs(ours - raw).max() > 1e-3  # the documented difference is real
    assert (ours[:5] > ours[5:]).sum() >= 4  # distorted images score worse (higher) than their references


# --------------------------------------------------------------------------------------- pyiqa's table

TOLERANCE = {"niqe": (1e-2, 6e-2)}  # pyiqa tests/test_metric_general.py: (atol, rtol); default (1e-2, 1e-2)


def calibration_dir() -> Path | None:
    env = os.environ.get("RESTORE_CALIBRATION_DIR")
    path = (
        Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/testdata/pyiqa_calibration"
    )
    return path if (path / "results_official.csv").is_file() else None


def _read_official(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    header, table = rows[0][1:], {}
    for row in rows[1:]:
        if len(row) == len(header) + 1:
            table[row[0]] = np.array([float(v) for v in row[1:]])
    return header, table


@pytest.mark.skipif(calibration_dir() is None, reason="shared pyiqa calibration pairs not present")
@pytest.mark.usefixtures("niqe_cache")
def test_pyiqa_calibration_table():
    from PIL import Image

    folder = calibration_dir()
    names, official = _read_official(folder / "results_official.csv")
    read = lambda sub: _to_tensor([np.asarray(Image.open(folder / sub / n).convert("RGB")) for n in names])  # noqa: E731
    dist, ref = read("dist_dir"), read("ref_dir")
    scores = MetricSuite(["psnr", "ssim", "niqe"], catalog={}).score(dist, ref)  # raw pyiqa defaults
    for name, values in scores.items():
        atol, rtol = TOLERANCE.get(name, (1e-2, 1e-2))
        np.testing.assert_allclose(values.numpy(), official[name], atol=atol, rtol=rtol, err_msg=name)
