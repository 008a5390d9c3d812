"""FID from tensors (restore.metrics.fid) vs pyiqa's folder-based FID, with a random FID Inception.

The Inception weights are written by ``restore.weights.random_init`` into a scratch TORCH_HOME and loaded
by pyiqa's own loader, so the network is the one pyiqa builds; the images are real photos written as PNG
folders for pyiqa and decoded to [0, 1] tensors for the tensor path. scipy's sqrtm on 2048x2048 matrices
costs ~20 s on 2 cores, so the end-to-end FID comparison (two of them) is marked slow; the fast tests check every
ingredient (resize, features, statistics + distance) against pyiqa or closed forms.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from skimage import data

from restore.metrics.fid import FIDFeatures, clean_resize, fid_from_features, to_uint8
from restore.weights import pyiqa_cache_synced
from restore.weights.random_init import materialize_random_weights


def _photos() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Six real photos (small, odd sizes) as GT, and a blurred copy of each as the "restored" set."""
    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
        data.hubble_deep_field(),
    ]
    gt = [cv2.resize(np.ascontiguousarray(p), (96, 80), interpolation=cv2.INTER_AREA) for p in photos]
    sr = [cv2.GaussianBlur(g, (0, 0), 1.2) for g in gt]
    return sr, gt


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Scratch TORCH_HOME with a random FID Inception, PNG folders, and the extractor."""
    root = tmp_path_factory.mktemp("fid")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root / "torch"))
    materialize_random_weights(["fid"], seed=0)
    sr, gt = _photos()
    for sub, images in (("sr", sr), ("gt", gt)):
        (root / sub).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / sub / f"{i:02d}.png")
    yield {"root": root, "sr": sr, "gt": gt, "extractor": FIDFeatures("cpu")}
    mp.undo()


def _pyiqa_folder_features(folder: Path, model: torch.nn.Module) -> np.ndarray:
    from pyiqa.archs.fid_arch import get_folder_features

    return get_folder_features(
        str(folder),
        model,
        num_workers=0,
        batch_size=8,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )


def test_to_uint8_recovers_8bit_values():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(1, 3, 1, 1)
    assert np.array_equal(to_uint8(values.float() / 255.0)[0, :, :, 0], values[0, 0].numpy())


def test_clean_resize_equals_pyiqa_dataset(setup):
    from pyiqa.archs.fid_arch import ResizeDataset

    files = sorted((setup["root"] / "sr").glob("*.png"))
    dataset = ResizeDataset(files, mode="clean", size=(299, 299))
    for i, img in enumerate(setup["sr"]):
        np.testing.assert_array_equal(clean_resize(img), dataset[i].permute(1, 2, 0).numpy())


def test_tensor_features_equal_pyiqa_folder_features(setup):
    ext = setup["extractor"]
    for side in ("sr", "gt"):
        ours = ext(_tensor(setup[side])).numpy()
        theirs = _pyiqa_folder_features(setup["root"] / side, ext.model)
        assert ours.shape == (6, 2048) and ours.dtype == np.float64
        np.testing.assert_array_equal(ours, theirs.astype(np.float64))
        assert theirs.std() > 0.05  # random He-init features are not degenerate
    # features of two halves, concatenated, equal the whole (what gathering across ranks/runs does)
    halves = torch.cat([ext(_tensor(setup["sr"][:3])), ext(_tensor(setup["sr"][3:]))])
    torch.testing.assert_close(halves, ext(_tensor(setup["sr"])), rtol=1e-6, atol=1e-6)


def test_frechet_distance_matches_eigenvalue_form():
    """Fréchet distance = |mu1-mu2|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1^1/2 S2 S1^1/2)), computed here."""
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (40, 8)) @ rng.normal(0, 1, (8, 8))
    b = rng.normal(0.5, 1.5, (50, 8))
    a, b = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1).real
    eig = np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-5)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(a[:1], b)


@pytest.mark.slow
def test_fid_equals_pyiqa_folder_fid(setup):
    import pyiqa

    with pyiqa_cache_synced():
        metric = pyiqa.create_metric("fid", device="cpu")
    theirs = metric(str(setup["root"] / "sr"), str(setup["root"] / "gt"), num_workers=0, verbose=False)
    ext = setup["extractor"]
    # the runner's path: features of parts of the set (ranks, resumed runs) concatenated, one distance
    feats_sr = torch.cat([ext(_tensor(setup["sr"][:2])), ext(_tensor(setup["sr"][2:]))])
    feats_gt = torch.cat([ext(_tensor(setup["gt"][:3])), ext(_tensor(setup["gt"][3:]))])
    ours = fid_from_features(feats_sr, feats_gt)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours > 1.0  # blurred vs sharp: far from 0 even with random features
