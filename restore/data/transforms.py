"""Geometric transforms on HWC float32 numpy images (random training crops, centre crops for eval).

Randomness comes from an explicit ``numpy.random.Generator``. When none is given, a generator is seeded
from torch's global RNG, which DataLoader workers seed per worker (and Lightning's
``seed_everything(workers=True)`` makes that seed a function of the global seed), so crops are
reproducible without every dataset threading generators through.

A random crop is drawn (:meth:`RandomCropFlip.draw`, a :class:`CropFlip`) apart from being applied
(:meth:`CropFlip.apply`), so that an LR/GT pair gets the same window (in LR pixels, ``x scale`` on the GT)
and the same flip/rotation: :class:`restore.data.paired_training.PairedTrainingFolder`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = ["CenterCrop", "CropFlip", "RandomCropFlip", "SMALL_IMAGE_POLICIES", "rng_from_torch"]

#: What to do with an image smaller than the crop: see :class:`RandomCropFlip`.
SMALL_IMAGE_POLICIES = ("pad", "upscale", "error")


def rng_from_torch() -> np.random.Generator:
    """A numpy generator seeded from (and advancing) torch's global RNG, i.e. the per-worker seed."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_hwc(img: np.ndarray, key: str | None) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3:
        shape = getattr(img, "shape", None)
        raise ValueError(f"expected an (H, W, C) numpy array for '{key or '<image>'}', got shape {shape}")


@dataclass(frozen=True)
class CropFlip:
    """One drawn crop window (``size`` x ``size`` at ``top``, ``left``), horizontal flip and ``rot90``
    quarter turns (counter-clockwise, ``np.rot90``), applied in that order."""

    top: int
    left: int
    size: int
    hflip: bool = False
    rot90: int = 0

    def apply(self, img: np.ndarray, scale: int = 1, key: str | None = None) -> np.ndarray:
        """Crop ``img`` at the window ``x scale`` (a GT ``scale`` times larger than the image the window
        was drawn on gets the same region), then flip/rotate; contiguous float32. A window outside
        ``img`` is a ``ValueError`` naming ``key``."""
        _check_hwc(img, key)
        scale = _check_size("scale", scale)
        top, left, size = self.top * scale, self.left * scale, self.size * scale
        h, w = img.shape[:2]
        if top < 0 or left < 0 or top + size > h or left + size > w:
            raise ValueError(
                f"crop window {size}x{size} at ({top}, {left}) does not fit in '{key or '<image>'}' ({h}x{w})"
            )
        out = img[top : top + size, left : left + size]
        if self.hflip:
            out = out[:, ::-1]
        if self.rot90 % 4:
            out = np.rot90(out, k=self.rot90 % 4, axes=(0, 1))
        return np.ascontiguousarray(out, dtype=np.float32)


class RandomCropFlip:
    """Random square crop, then optional horizontal flip (p=0.5) and rotation by k*90 degrees (k uniform).

    ``small_image`` decides what happens when the image is smaller than ``crop_size`` on either side:

    - ``"pad"``: reflect-101 padding at the bottom/right up to the crop size, as Real-ESRGAN's dataset
      does (``cv2.BORDER_REFLECT_101``); keeps the pixel scale, so the degradation stays meaningful.
    - ``"upscale"``: bicubic resize so that the short side equals ``crop_size`` (values clipped to [0, 1]).
    - ``"error"``: raise ``ValueError`` naming the file, for datasets that should not hold small images.

    "pad" and "upscale" warn once per file (per process, so once per DataLoader worker).
    """

    def __init__(
        self, crop_size: int = 512, hflip: bool = True, rotate: bool = False, small_image: str = "pad"
    ):
        self.crop_size = _check_size("crop_size", crop_size)
        if small_image not in SMALL_IMAGE_POLICIES:
            raise ValueError(f"small_image must be one of {SMALL_IMAGE_POLICIES}, got {small_image!r}")
        self.hflip = bool(hflip)
        self.rotate = bool(rotate)
        self.small_image = small_image
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, hflip={self.hflip}, rotate={self.rotate}, "
            f"small_image={self.small_image!r})"
        )

    def fit_small(self, img: np.ndarray, key: str | None = None) -> np.ndarray:
        """Apply the ``small_image`` policy: ``img`` unchanged when both sides are >= ``crop_size``,
        else padded / upscaled so that they are (or ``ValueError`` for "error")."""
        _check_hwc(img, key)
        h, w = img.shape[:2]
        size = self.crop_size
        if h >= size and w >= size:
            return img
        name = key or "<image>"
        if self.small_image == "error":
            raise ValueError(
                f"image '{name}' is {h}x{w}, smaller than crop_size={size}; remove it from the dataset, "
                "or set small_image='pad' or 'upscale'"
            )
        if name not in self._warned:
            self._warned.add(name)
            action = "reflect-padded" if self.small_image == "pad" else "bicubic-upscaled"
            warnings.warn(
                f"image '{name}' is {h}x{w}, smaller than crop_size={size}; it is {action} "
                f"(small_image={self.small_image!r}; use small_image='error' to reject such images)",
                stacklevel=3,
            )
        if self.small_image == "pad":
            pad_h, pad_w = max(0, size - h), max(0, size - w)
            out = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
            return out[:, :, None] if out.ndim == 2 else out
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        out = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
        out = out[:, :, None] if out.ndim == 2 else out
        return np.clip(out, 0.0, 1.0)

    def __call__(
        self, img: np.ndarray, rng: np.random.Generator | None = None, key: str | None = None
    ) -> np.ndarray:
        """Crop (and augment) ``img``; ``key`` (the file's dataset key) is used in warnings/errors only."""
        _check_hwc(img, key)
        rng = rng_from_torch() if rng is None else rng
        img = self.fit_small(img, key)
        return self.draw(img.shape[0], img.shape[1], rng, key).apply(img, key=key)

    def draw(self, height: int, width: int, rng: np.random.Generator, key: str | None = None) -> CropFlip:
        """Draw a window for an image of ``height`` x ``width`` (>= ``crop_size``; apply ``fit_small``
        first), then the flip and rotation. Draw order, fixed so that crops are reproducible: top, left,
        flip (only with ``hflip``), rotation (only with ``rotate``)."""
        size = self.crop_size
        if height < size or width < size:
            raise ValueError(f"image '{key or '<image>'}' is {height}x{width}, smaller than crop_size={size}")
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
        flip = bool(self.hflip and rng.random() < 0.5)
        k = int(rng.integers(0, 4)) if self.rotate else 0
        return CropFlip(top, left, size, flip, k)


class CenterCrop:
    """Deterministic centre crop to ``size`` x ``size`` (offsets floor((H - size) / 2)), for eval-style crops.

    An image smaller than ``size`` raises ``ValueError``: silently padding a test image would change
    the metric.
    """

    def __init__(self, size: int):
        self.size = _check_size("size", size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"

    def __call__(self, img: np.ndarray, key: str | None = None) -> np.ndarray:
        _check_hwc(img, key)
        h, w = img.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(
                f"image '{key or '<image>'}' is {h}x{w}, smaller than the centre crop {self.size}"
            )
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return np.ascontiguousarray(img[top : top + self.size, left : left + self.size])
