"""Image reading/writing/listing: odd files are built here, expected values computed by hand."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from restore.data.image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_images,
    read_image,
    to_numpy,
    to_tensor,
    write_image,
)


def _png_bytes_rgb(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


# --------------------------------------------------------------------------- reading


def test_rgb_png_channel_order_and_scale(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # pure red top-left
    rgb[1, 2] = (10, 20, 30)
    Image.fromarray(rgb, "RGB").save(tmp_path / "a.png")  # written by PIL: independent of cv2's BGR
    img = read_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (2, 3, 3)
    np.testing.assert_array_equal(img[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(img[1, 2], np.float32([10, 20, 30]) / np.float32(255))
    assert img.flags["C_CONTIGUOUS"]


def test_rgba_png_is_composited_over_background(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 51, 51)  # alpha 0.2
    rgba[0, 1] = (40, 80, 120, 255)  # opaque
    rgba[0, 2] = (200, 200, 200, 0)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")

    white = read_image(tmp_path / "rgba.png")  # default background 1.0
    # 0.2 * c + 0.8 * 1
    np.testing.assert_allclose(white[0, 0], [1.0, 0.8, 0.2 * 0.2 + 0.8], atol=1e-6)
    np.testing.assert_allclose(white[0, 1], np.array([40, 80, 120]) / 255, atol=1e-6)
    np.testing.assert_allclose(white[0, 2], [1.0, 1.0, 1.0], atol=1e-6)

    black = read_image(tmp_path / "rgba.png", alpha_background=0.0)
    np.testing.assert_allclose(black[0, 0], [0.2, 0.0, 0.2 * 0.2], atol=1e-6)
    np.testing.assert_allclose(black[0, 2], [0.0, 0.0, 0.0], atol=1e-6)

    grey = read_image(tmp_path / "rgba.png", alpha_background=0.5)
    np.testing.assert_allclose(grey[0, 0], [0.2 + 0.4, 0.4, 0.04 + 0.4], atol=1e-6)


def test_alpha_background_out_of_range(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="alpha_background"):
        read_image(tmp_path / "a.png", alpha_background=2.0)


def test_16bit_rgb_png_keeps_full_precision(tmp_path):
    # Codes chosen so that none is a multiple of 257 (i.e. none is representable in 8 bits).
    rgb16 = np.array([[[1, 32769, 65534], [1000, 20001, 40000]]], np.uint16)
    assert np.all(rgb16 % 257 != 0)
    assert cv2.imwrite(str(tmp_path / "deep.png"), rgb16[:, :, ::-1])  # cv2 wants BGR
    img = read_image(tmp_path / "deep.png")
    assert img.dtype == np.float32
    expected = (rgb16.astype(np.float64) / 65535.0).astype(np.float32)
    np.testing.assert_array_equal(img, expected)
    # An 8-bit detour would be off by up to 1/510: make sure we are much closer than that.
    eight_bit = np.round(rgb16 / 65535.0 * 255) / 255
    assert np.all(np.abs(img - eight_bit) > 1e-5)


def test_16bit_grayscale(tmp_path):
    g = np.array([[3, 65535], [0, 12345]], np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), g)
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], (g / 65535.0).astype(np.float32))


def test_grayscale_png_replicated_to_three_equal_channels(tmp_path):
    g = np.array([[0, 64, 255], [17, 128, 200]], np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "gray.png")
    img = read_image(tmp_path / "gray.png")
    assert img.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], g.astype(np.float32) / np.float32(255))


def test_grayscale_jpeg(tmp_path):
    Image.fromarray(np.full((8, 8), 100, np.uint8), "L").save(tmp_path / "gray.jpg")
    img = read_image(tmp_path / "gray.jpg")
    assert img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[..., 0], img[..., 1])
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    np.testing.assert_allclose(img, 100 / 255, atol=1.5 / 255)


def test_gray_alpha_png(tmp_path):
    la = np.zeros((1, 2, 2), np.uint8)
    la[0, 0] = (200, 51)  # 0.2 alpha
    la[0, 1] = (30, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = read_image(tmp_path / "la.png")
    expected0 = 200 / 255 * 0.2 + 1.0 * 0.8
    np.testing.assert_allclose(img[0, 0], [expected0] * 3, atol=1e-6)
    np.testing.assert_allclose(img[0, 1], [30 / 255] * 3, atol=1e-6)
    img0 = read_image(tmp_path / "la.png", alpha_background=0.0)
    np.testing.assert_allclose(img0[0, 0], [200 / 255 * 0.2] * 3, atol=1e-6)


def test_other_formats_decode_to_same_pixels(tmp_path):
    rgb = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 4).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb).save(tmp_path / "a.TIFF")
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    for name in ("a.bmp", "a.TIFF", "a.webp"):
        np.testing.assert_array_equal(read_image(tmp_path / name), rgb.astype(np.float32) / np.float32(255))


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "missing.png"
    with pytest.raises(ImageReadError, match="missing.png") as info:
        read_image(path)
    assert isinstance(info.value, OSError)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file(tmp_path, ext):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, rgb)
    assert ok
    data = buf.tobytes()
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    # The intact file decodes, so the failure is due to the truncation only.
    (tmp_path / f"whole{ext}").write_bytes(data)
    assert read_image(tmp_path / f"whole{ext}").shape == (64, 64, 3)


def test_jpeg_missing_only_end_marker_is_rejected(tmp_path):
    ok, buf = cv2.imencode(".jpg", np.full((32, 32, 3), 90, np.uint8))
    data = buf.tobytes()
    assert data.endswith(b"\xff\xd9")
    (tmp_path / "noeoi.jpg").write_bytes(data[:-2])
    with pytest.raises(ImageReadError, match="noeoi.jpg"):
        read_image(tmp_path / "noeoi.jpg")


def test_png_with_trailing_bytes_after_iend_is_accepted(tmp_path):
    data = _png_bytes_rgb(np.full((4, 4, 3), 7, np.uint8))
    (tmp_path / "trail.png").write_bytes(data + b"\x00" * 10)
    np.testing.assert_array_equal(read_image(tmp_path / "trail.png"), np.full((4, 4, 3), 7 / 255, np.float32))


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="notes.png") as info:
        read_image(path)
    assert "not a decodable image" in str(info.value)


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path / "dir.png")


def test_image_read_error_survives_pickling(tmp_path):
    # DataLoader workers send exceptions to the main process by pickling them.
    err = ImageReadError(tmp_path / "x.png", "broken", "re-download it")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ImageReadError) and str(back) == str(err)


# --------------------------------------------------------------------------- writing


def test_write_image_round_trip_rounds_and_clips(tmp_path):
    img = np.array([[[0.0, 0.5, 1.0], [-0.3, 1.7, 0.2]]], np.float32)
    out = write_image(tmp_path / "deep" / "dir" / "out.png", img)
    assert out.is_file()
    back = read_image(out)
    expected = np.array([[[0, 128, 255], [0, 255, 51]]], np.float32) / np.float32(255)  # rint(0.5*255)=128
    np.testing.assert_array_equal(back, expected)
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind


def test_write_image_from_chw_tensor_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.random((5, 6, 3), dtype=np.float32)
    write_image(tmp_path / "np.png", img)
    write_image(tmp_path / "t.png", torch.from_numpy(img).permute(2, 0, 1))
    assert (tmp_path / "np.png").read_bytes() == (tmp_path / "t.png").read_bytes()
    np.testing.assert_allclose(read_image(tmp_path / "t.png"), img, atol=0.5 / 255 + 1e-7)


def test_write_image_refuses_overwrite(tmp_path):
    path = tmp_path / "x.png"
    write_image(path, np.zeros((2, 2, 3), np.float32))
    with pytest.raises(FileExistsError) as info:
        write_image(path, np.ones((2, 2, 3), np.float32))
    assert str(path) in str(info.value) and "overwrite=True" in str(info.value)
    np.testing.assert_array_equal(read_image(path), 0.0)  # untouched
    write_image(path, np.ones((2, 2, 3), np.float32), overwrite=True)
    np.testing.assert_array_equal(read_image(path), 1.0)


def test_write_image_rejects_non_png_and_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="PNG"):
        write_image(tmp_path / "x.jpg", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        write_image(tmp_path / "x.png", np.zeros((2, 2, 4), np.float32))


def test_write_grayscale(tmp_path):
    write_image(tmp_path / "g.png", np.full((3, 3), 0.2, np.float32))
    img = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(img, np.float32(51) / np.float32(255))


# --------------------------------------------------------------------------- tensors


def test_to_tensor_and_back():
    img = np.random.default_rng(2).random((4, 7, 3), dtype=np.float32)
    t = to_tensor(img[:, ::-1])  # negative strides must be handled
    assert t.shape == (3, 4, 7) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[2, 1, 0].item() == img[1, 6, 2]
    back = to_numpy(t)
    np.testing.assert_array_equal(back, img[:, ::-1])
    with pytest.raises(ValueError):
        to_tensor(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        to_numpy(torch.zeros(1, 3, 4, 4))


# --------------------------------------------------------------------------- listing


def _touch_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes_rgb(np.zeros((2, 2, 3), np.uint8)))


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/2.png", "a/10.PNG", "a/1.JpG", "c.webp", "sub/deep/x.tif"]:
        _touch_png(tmp_path / rel)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "a" / "._1.png").write_bytes(b"\x00\x05")  # macOS resource fork, not an image
    _touch_png(tmp_path / ".cache" / "hidden.png")
    files = list_images(tmp_path)
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    assert rel == ["a/1.JpG", "a/10.PNG", "b/2.png", "c.webp", "sub/deep/x.tif"]
    assert ".png" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS


def test_list_images_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "data/README.md" in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "absent")


def test_list_images_text_file_list(tmp_path):
    for rel in ["x/1.png", "x/2.png", "y/3.png"]:
        _touch_png(tmp_path / "root" / rel)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\ny/3.png\n\nx/1.png\n")
    files = list_images(tmp_path / "root", lst)
    assert [f.relative_to(tmp_path / "root").as_posix() for f in files] == ["y/3.png", "x/1.png"]


def test_list_images_json_file_lists(tmp_path):
    root = tmp_path / "LSDIR"
    for rel in ["HR/train/0001000/0000001.png", "HR/train/0001000/0000002.png"]:
        _touch_png(root / rel)
    rels = ["HR/train/0001000/0000001.png", "HR/train/0001000/0000002.png"]
    (tmp_path / "str.json").write_text(json.dumps(rels))
    (tmp_path / "lsdir.json").write_text(json.dumps([{"path": r} for r in rels]))
    (tmp_path / "x4.json").write_text(json.dumps([{"path_gt": r, "path_lq": "X4/" + r} for r in rels]))
    (tmp_path / "custom.json").write_text(json.dumps([{"hr": r} for r in rels]))
    for name, key in [("str.json", None), ("lsdir.json", None), ("x4.json", None), ("custom.json", "hr")]:
        files = list_images(root, tmp_path / name, file_list_key=key)
        assert [f.relative_to(root).as_posix() for f in files] == rels, name
    with pytest.raises(ValueError, match="file_list_key"):
        list_images(root, tmp_path / "custom.json")


def test_list_images_file_list_reports_missing(tmp_path):
    root = tmp_path / "root"
    _touch_png(root / "ok.png")
    names = ["ok.png"] + [f"gone_{i}.png" for i in range(7)]
    (tmp_path / "list.txt").write_text("\n".join(names))
    with pytest.raises(FileNotFoundError) as info:
        list_images(root, tmp_path / "list.txt")
    msg = str(info.value)
    assert "7 file(s)" in msg and "'gone_0.png'" in msg and "'gone_4.png'" in msg
    assert "gone_5.png" not in msg and "and 2 more" in msg and "list.txt" in msg
