"""FID from in-memory tensors, numerically the same as pyiqa's folder-based ``fid`` in 'clean' mode.

pyiqa's FID takes two folders and computes everything internally; an evaluation runner has decoded tensors,
runs on several ranks and may resume, so FID has to be split into per-image features (gathered across ranks
and runs) and one Fréchet distance over the whole set. This module does that with pyiqa's own pieces:

* preprocessing = pyiqa's 'clean' mode (clean-fid): the 8-bit image, each channel as a float32 PIL 'F' image,
  bicubic-resized to 299x299, clipped to [0, 255], then (x - 128) / 128;
* network = the InceptionV3 pool3 (2048-d) that ``pyiqa.create_metric('fid')`` builds, so the same weight file
  (``pt_inception-2015-12-05-6726825d.pth``) is loaded the same way;
* distance = ``pyiqa.archs.fid_arch.frechet_distance`` on mean/covariance computed as pyiqa does (float32
  features, ``np.mean``, ``np.cov(rowvar=False)``).

Inputs are RGB floats in [0, 1] that came from 8-bit images: they are mapped back to the exact uint8 values
by rounding (x * 255), which is what pyiqa reads from the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

#: Inception input size of clean-fid / pyiqa.
FID_SIZE = 299
FEATURE_DIM = 2048


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8, rounding to the nearest 8-bit value."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) RGB images, got {tuple(images.shape)}")
    values = torch.round(images.detach().float().cpu() * 255.0).clamp_(0, 255)
    return values.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def clean_resize(image: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """One HxWx3 uint8 image -> size x size x 3 float32 in [0, 255], clean-fid's per-channel PIL bicubic."""
    channels = []
    for c in range(image.shape[2]):
        plane = Image.fromarray(image[:, :, c].astype(np.float32))  # float32 2-D array -> PIL mode 'F'
        plane = plane.resize((size, size), resample=Image.Resampling.BICUBIC)
        channels.append(np.asarray(plane).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


def build_fid_inception(device: str | torch.device = "cpu", **fid_options: Any) -> torch.nn.Module:
    """The Inception network of ``pyiqa.create_metric('fid')`` (loads the FID weights from the pyiqa cache)."""
    import pyiqa

    from restore.weights import check_metric_weights, pyiqa_cache_synced

    dims = fid_options.get("dims", FEATURE_DIM)
    if fid_options.get("backbone", "inceptionv3") != "inceptionv3" or dims != FEATURE_DIM:
        raise ValueError(f"only the Inception pool3 (2048-d) FID is supported, got options {fid_options}")
    check_metric_weights("fid", fid_options)
    with pyiqa_cache_synced():
        metric = pyiqa.create_metric("fid", device=device, **fid_options)
    return metric.net.model.eval()


class FIDFeatures:
    """Inception pool3 features of image tensors, preprocessed exactly as pyiqa's 'clean' FID."""

    lower_better = True

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 8, **fid_options: Any) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = build_fid_inception(self.device, **fid_options)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 2048) float64 on CPU."""
        arrays = to_uint8(images)
        feats = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = np.stack([clean_resize(a) for a in arrays[start : start + self.batch_size]])
            # contiguous NCHW like pyiqa's collated batches (a channels-last view changes conv numerics)
            batch = torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous().to(self.device)
            batch = (batch - 128) / 128
            out = self.model(batch, False, False)[0]  # resize_input=False, normalize_input=False
            feats.append(out.reshape(out.shape[0], -1).float().cpu())
        if not feats:
            return torch.zeros((0, FEATURE_DIM), dtype=torch.float64)
        return torch.cat(feats).double()


def _as_float32(features: torch.Tensor | np.ndarray) -> np.ndarray:
    # Features are float32 network outputs stored as float64: the cast back is exact and reproduces
    # pyiqa's float32 np.mean.
    array = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {array.shape}")
    return array.astype(np.float32)


def fid_from_features(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between two feature sets, with pyiqa's statistics and ``frechet_distance``."""
    from pyiqa.archs.fid_arch import frechet_distance

    a, b = _as_float32(features_a), _as_float32(features_b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, sigma_a = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu_b, sigma_b = np.mean(b, axis=0), np.cov(b, rowvar=False)
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def fid_from_feature_dict(features: Mapping[str, torch.Tensor | np.ndarray]) -> float:
    """FID of the restored set against the ground-truth set: ``{"sr": (N, D), "gt": (M, D)}``."""
    return fid_from_features(features["sr"], features["gt"])
