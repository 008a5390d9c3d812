"""Random crop/flip/rotate and centre crop on HWC float images."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch

from restore.data.transforms import CenterCrop, CropFlip, RandomCropFlip, rng_from_torch


def _ramp(h: int, w: int) -> np.ndarray:
    """Every pixel/channel unique, so a crop's position can be recovered from its values."""
    return np.arange(h * w * 3, dtype=np.float32).reshape(h, w, 3) / np.float32(h * w * 3)


def _expected(img, size, seed, hflip, rotate):
    """Reference: same draw order as documented (top, left, flip, rotation)."""
    r = np.random.default_rng(seed)
    h, w = img.shape[:2]
    top, left = int(r.integers(0, h - size + 1)), int(r.integers(0, w - size + 1))
    out = img[top : top + size, left : left + size]
    flipped = bool(hflip and r.random() < 0.5)
    if flipped:
        out = np.flip(out, axis=1)
    k = int(r.integers(0, 4)) if rotate else 0
    return np.rot90(out, k), flipped, k


def test_crop_size_dtype_and_window():
    img = _ramp(40, 50)
    t = RandomCropFlip(16, hflip=False)
    positions = set()
    for seed in range(30):
        out = t(img, np.random.default_rng(seed))
        assert out.shape == (16, 16, 3) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
        top, left = np.argwhere(img[:, :, 0] == out[0, 0, 0])[0]
        np.testing.assert_array_equal(out, img[top : top + 16, left : left + 16])
        positions.add((int(top), int(left)))
    assert len(positions) > 20  # positions really are random


def test_hflip_really_flips():
    img = _ramp(20, 24)
    t = RandomCropFlip(8, hflip=True)
    n_flipped = 0
    for seed in range(40):
        out = t(img, np.random.default_rng(seed))
        expected, flipped, _ = _expected(img, 8, seed, hflip=True, rotate=False)
        np.testing.assert_array_equal(out, expected)
        unflipped = RandomCropFlip(8, hflip=False)(img, np.random.default_rng(seed))
        if flipped:
            np.testing.assert_array_equal(out, np.flip(unflipped, axis=1))
            assert not np.array_equal(out, unflipped)
        else:
            np.testing.assert_array_equal(out, unflipped)
        n_flipped += flipped
    assert 8 <= n_flipped <= 32  # p = 0.5 over 40 draws


def test_rotate_uses_all_four_rotations():
    img = _ramp(12, 12)
    t = RandomCropFlip(12, hflip=True, rotate=True)
    ks = set()
    for seed in range(40):
        out = t(img, np.random.default_rng(seed))
        expected, _, k = _expected(img, 12, seed, hflip=True, rotate=True)
        np.testing.assert_array_equal(out, expected)
        ks.add(k)
    assert ks == {0, 1, 2, 3}


def test_same_seed_same_crop_and_torch_seeding():
    img = _ramp(64, 64)
    t = RandomCropFlip(16, rotate=True)
    a = t(img, np.random.default_rng(5))
    b = t(img, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    torch.manual_seed(123)
    c = t(img)
    torch.manual_seed(123)
    d = t(img)
    np.testing.assert_array_equal(c, d)
    torch.manual_seed(123)
    np.testing.assert_array_equal(t(img, rng_from_torch()), c)
    torch.manual_seed(124)
    assert not np.array_equal(t(img), c)


def test_draw_then_apply_equals_call_and_scales_the_window():
    img = _ramp(40, 48)
    t = RandomCropFlip(8, hflip=True, rotate=True)
    for seed in range(20):
        window = t.draw(40, 48, np.random.default_rng(seed))
        expected, flipped, k = _expected(img, 8, seed, hflip=True, rotate=True)
        assert (window.size, window.hflip, window.rot90) == (8, flipped, k)
        np.testing.assert_array_equal(window.apply(img), expected)
        np.testing.assert_array_equal(t(img, np.random.default_rng(seed)), expected)
    # x scale: the same region of an image `scale` times larger (a GT and its LR), same flip/rotation.
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)  # nearest x4: every LR pixel is a 4x4 block
    window = CropFlip(top=3, left=5, size=8, hflip=True, rot90=1)
    out = window.apply(big, scale=4)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out[::4, ::4], window.apply(img))
    with pytest.raises(ValueError, match="does not fit in 'lr.png'"):
        CropFlip(top=35, left=0, size=8).apply(img, key="lr.png")
    with pytest.raises(ValueError, match="smaller than crop_size"):
        t.draw(7, 48, np.random.default_rng(0))


def test_small_image_pad_is_reflect_101():
    img = _ramp(5, 7)
    t = RandomCropFlip(8, hflip=False, small_image="pad")
    with pytest.warns(UserWarning, match="small.png"):
        out = t(img, np.random.default_rng(0), key="small.png")
    assert out.shape == (8, 8, 3)
    # Padded to exactly 8x8, so the crop is the whole padded image.
    np.testing.assert_array_equal(out, cv2.copyMakeBorder(img, 0, 3, 0, 1, cv2.BORDER_REFLECT_101))
    # Same thing written out by hand: row 5 mirrors row 3, row 6 mirrors row 2, ... (edge not repeated).
    np.testing.assert_array_equal(out[5], np.concatenate([img[3], img[3, 5:6]]))
    np.testing.assert_array_equal(out[7, :7], img[1])
    np.testing.assert_array_equal(out[:5, 7], img[:, 5])
    np.testing.assert_array_equal(out, np.pad(img, ((0, 3), (0, 1), (0, 0)), mode="reflect"))


def test_small_image_pad_larger_than_image():
    img = _ramp(3, 3)
    t = RandomCropFlip(8, hflip=False)
    with pytest.warns(UserWarning):
        padded = t.fit_small(img, "tiny.png")
    np.testing.assert_array_equal(padded, np.pad(img, ((0, 5), (0, 5), (0, 0)), mode="reflect"))


def test_small_image_upscale_short_side_equals_crop():
    img = _ramp(50, 100)
    t = RandomCropFlip(64, hflip=False, small_image="upscale")
    with pytest.warns(UserWarning, match="upscale"):
        big = t.fit_small(img, "wide.png")
    assert big.shape == (64, 128, 3)
    assert big.min() >= 0.0 and big.max() <= 1.0
    np.testing.assert_allclose(big, np.clip(cv2.resize(img, (128, 64), interpolation=cv2.INTER_CUBIC), 0, 1))
    with pytest.warns(UserWarning):
        out = t(_ramp(30, 40), np.random.default_rng(0), key="other.png")
    assert out.shape == (64, 64, 3)
    # Only one side small: the short side still becomes the crop size.
    with pytest.warns(UserWarning):
        tall = t.fit_small(_ramp(200, 32), "tall.png")
    assert tall.shape == (400, 64, 3)


def test_large_image_untouched_without_warning():
    img = _ramp(64, 64)
    t = RandomCropFlip(64, small_image="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert t.fit_small(img) is img
        assert t(img, np.random.default_rng(0)).shape == (64, 64, 3)


def test_small_image_warning_once_per_file():
    img = _ramp(4, 4)
    t = RandomCropFlip(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # our own de-duplication is under test, not Python's
        for _ in range(3):
            t(img, np.random.default_rng(0), key="dir/a.png")
        t(img, np.random.default_rng(0), key="dir/b.png")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "dir/a.png" in messages[0] and "small_image='pad'" in messages[0]
    assert "dir/b.png" in messages[1]


def test_small_image_error_names_file_and_option():
    t = RandomCropFlip(8, small_image="error")
    with pytest.raises(ValueError) as info:
        t(_ramp(4, 20), np.random.default_rng(0), key="faces/00042.png")
    assert "faces/00042.png" in str(info.value) and "small_image" in str(info.value)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="small_image"):
        RandomCropFlip(8, small_image="stretch")
    with pytest.raises(ValueError, match="crop_size"):
        RandomCropFlip(0)
    with pytest.raises(ValueError, match="H, W, C"):
        RandomCropFlip(8)(np.zeros((8, 8)), np.random.default_rng(0))


def test_center_crop():
    img = _ramp(11, 20)
    out = CenterCrop(6)(img)
    np.testing.assert_array_equal(out, img[2:8, 7:13])  # (11-6)//2 = 2, (20-6)//2 = 7
    np.testing.assert_array_equal(CenterCrop(11)(img)[:, 0], img[:, 4])
    with pytest.raises(ValueError, match="val/x.png"):
        CenterCrop(12)(img, key="val/x.png")
