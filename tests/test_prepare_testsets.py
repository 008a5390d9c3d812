"""scripts/prepare_testsets.py on small real photos (scikit-image), offline.

Checks the StableSR crop geometry (LR 128 <-> GT 512 of the same region, here 32 <-> 128), pairing rules
and their errors, determinism of the synthetic DIV2K-Val crops (bytes identical across runs, batch sizes
and --num), meta.json, the overwrite policy and the normalisation of odd LR-only inputs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from restore.data.degradation import RealESRGANDegradation
from restore.data.hr_datasets import export_embedded_photos
from restore.data.image_io import read_image, to_tensor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Per-crop degradations of small crops are many tiny ops: with two threads, each op waits at an
    OpenMP barrier, which stalls badly when the CPU is shared (measured 30x slower); one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pt():
    """The script as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "prepare_testsets", ROOT / "scripts" / "prepare_testsets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Three real photos as PNGs: astronaut 512x512, coffee 400x600, chelsea 300x451."""
    paths = export_embedded_photos(
        tmp_path_factory.mktemp("photos"), names=["astronaut", "coffee", "chelsea"]
    )
    return {p.stem: p for p in paths}


def _u8(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _write_pair(folder: Path, lr_name: str, gt_name: str, photo: Path, lr_hw: tuple[int, int]) -> np.ndarray:
    """GT = top-left (4h, 4w) of the photo, LR = its INTER_AREA /4 (like a registered x4 capture)."""
    h, w = lr_hw
    gt = _u8(photo)[: 4 * h, : 4 * w]
    lr = cv2.resize(gt, (w, h), interpolation=cv2.INTER_AREA)
    (folder / gt_name).parent.mkdir(parents=True, exist_ok=True)
    (folder / lr_name).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / gt_name), gt)
    cv2.imwrite(str(folder / lr_name), lr)
    return gt


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------ realsr / drealsr
@pytest.fixture()
def realsr_src(tmp_path, photos) -> Path:
    src = tmp_path / "RealSR"
    # odd LR sizes: the GT region must follow the LR offsets (x4), not the GT's own centre
    _write_pair(src, "Canon_001_LR4.png", "Canon_001_HR.png", photos["astronaut"], (37, 43))
    _write_pair(src, "Nikon_002_LR4.png", "Nikon_002_HR.png", photos["coffee"], (35, 51))
    cv2.imwrite(str(src / "Canon_001_LR2.png"), np.zeros((8, 8, 3), np.uint8))  # other scale: ignored
    return src


def test_realsr_crops_the_same_region(pt, realsr_src, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["realsr", "--src", str(realsr_src), "--out", str(out), "--lr-size", "32", "--no-progress"]
    assert pt.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"realsr: wrote 2 pair(s), skipped 0 -> {out}"
    assert sorted(_files(out / "lq")) == ["Canon_001.png", "Nikon_002.png"]
    assert sorted(_files(out / "gt")) == ["Canon_001.png", "Nikon_002.png"]

    for name in ("Canon_001", "Nikon_002"):
        lq, gt = _u8(out / "lq" / f"{name}.png"), _u8(out / "gt" / f"{name}.png")
        assert lq.shape == (32, 32, 3) and gt.shape == (128, 128, 3)
        # the LR crop is the source LR's centre, untouched
        lr_src = _u8(realsr_src / f"{name}_LR4.png")
        top, left = (lr_src.shape[0] - 32) // 2, (lr_src.shape[1] - 32) // 2
        np.testing.assert_array_equal(lq, lr_src[top : top + 32, left : left + 32])
        # area /4 of the GT crop = the LR crop (both from the same 4x4 blocks; +-1 from 8-bit rounding)
        down = cv2.resize(gt, (32, 32), interpolation=cv2.INTER_AREA)
        assert np.abs(down.astype(int) - lq.astype(int)).max() <= 1
        # while the GT's own centre crop (2 px off for odd LR sizes) is measurably misaligned
        hr_src = _u8(realsr_src / f"{name}_HR.png")
        t2, l2 = (hr_src.shape[0] - 128) // 2, (hr_src.shape[1] - 128) // 2
        naive = cv2.resize(hr_src[t2 : t2 + 128, l2 : l2 + 128], (32, 32), interpolation=cv2.INTER_AREA)
        assert (t2, l2) != (4 * top, 4 * left)
        assert (
            np.abs(naive.astype(int) - lq.astype(int)).mean()
            > 2 * np.abs(down.astype(int) - lq.astype(int)).mean()
        )

    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "realsr" and meta["lr_size"] == 32 and meta["scale"] == 4
    canon = next(p for p in meta["pairs"] if p["name"] == "Canon_001.png")
    assert canon["lr_box"] == {"top": 2, "left": 5, "height": 32, "width": 32}
    assert canon["gt_box"] == {"top": 8, "left": 20, "height": 128, "width": 128}
    assert canon["lr"].endswith("Canon_001_LR4.png") and canon["gt"].endswith("Canon_001_HR.png")


def test_drealsr_pairs_across_subfolders_and_generic_dirs(pt, tmp_path, photos):
    src = tmp_path / "DRealSR"
    _write_pair(src, "test_LR/DSC_0001_x4.png", "test_HR/DSC_0001_x1.png", photos["coffee"], (34, 40))
    pairs = pt.find_pairs([src], *pt.PAIRING_RULES["drealsr"])
    assert [(p.name, p.lr.name, p.gt.name) for p in pairs] == [
        ("DSC_0001", "DSC_0001_x4.png", "DSC_0001_x1.png")
    ]
    out = tmp_path / "out"
    assert pt.main(["drealsr", "--src", str(src), "--out", str(out), "--lr-size", "32", "--no-progress"]) == 0
    assert _u8(out / "gt" / "DSC_0001.png").shape == (128, 128, 3)

    # generic folders: stems matched, suffix stripped only where present
    pairs = pt.match_dirs(src / "test_LR", src / "test_HR", lr_suffix="_x4", gt_suffix="_x1")
    assert [p.name for p in pairs] == ["DSC_0001"]
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    cv2.imwrite(str(tmp_path / "lr" / "0001x4.png"), _u8(src / "test_LR" / "DSC_0001_x4.png"))
    cv2.imwrite(str(tmp_path / "hr" / "0001.png"), _u8(src / "test_HR" / "DSC_0001_x1.png"))
    out2 = tmp_path / "out2"
    argv = ["realsr", "--lr-dir", str(tmp_path / "lr"), "--gt-dir", str(tmp_path / "hr"), "--lr-suffix", "x4"]
    assert pt.main([*argv, "--out", str(out2), "--lr-size", "32", "--no-progress"]) == 0
    assert _files(out2 / "gt") == {"0001.png": (out / "gt" / "DSC_0001.png").read_bytes()}


def test_pairing_errors_name_the_files(pt, tmp_path, photos, capsys):
    src = tmp_path / "src"
    _write_pair(src, "a_LR4.png", "a_HR.png", photos["coffee"], (34, 40))
    cv2.imwrite(str(src / "b_HR.png"), _u8(photos["coffee"])[:136, :160])  # no LR partner
    with pytest.raises(pt.PrepareError, match=r"1 GT file\(s\) without LR: '.*b_HR\.png'"):
        pt.find_pairs([src], "_LR4", "_HR")
    cv2.imwrite(str(src / "c_LR4.png"), _u8(photos["coffee"])[:34, :40])  # no GT partner
    with pytest.raises(pt.PrepareError, match=r"LR file\(s\) without GT: '.*c_LR4\.png'"):
        pt.find_pairs([src], "_LR4", "_HR")
    (src / "b_HR.png").unlink()
    (src / "c_LR4.png").unlink()

    # the same name twice on one side (e.g. RealSR's Test/2 and Test/4 both holding a_HR.png)
    _write_pair(src / "2", "a_LR2.png", "a_HR.png", photos["coffee"], (34, 40))
    with pytest.raises(pt.PrepareError, match=r"two GT files for the name 'a'"):
        pt.find_pairs([src], "_LR4", "_HR")
    (src / "2" / "a_HR.png").unlink()
    with pytest.raises(pt.PrepareError, match="no LR/GT pairs"):
        pt.find_pairs([src / "2"], "_LR4", "_HR")  # only an '_LR2' file: ignored, nothing left

    # size problems are all reported before anything is written, naming the files
    bad = tmp_path / "bad"
    _write_pair(bad, "x_LR4.png", "x_HR.png", photos["coffee"], (34, 40))
    cv2.imwrite(str(bad / "x_HR.png"), _u8(photos["coffee"])[:137, :160])  # 137 != 4 * 34
    _write_pair(bad, "y_LR4.png", "y_HR.png", photos["coffee"], (34, 40))
    cv2.imwrite(str(bad / "y_LR4.png"), _u8(bad / "y_HR.png"))  # same-size LR (RealSR V1/V2)
    _write_pair(bad, "z_LR4.png", "z_HR.png", photos["coffee"], (30, 40))  # LR smaller than the crop
    out = tmp_path / "out"
    assert pt.main(["realsr", "--src", str(bad), "--out", str(out), "--lr-size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "3 of 3 pair(s) cannot be cropped" in err
    assert "x_HR.png' is 137x160 but LR" in err and "exactly 4x the LR size (136x160)" in err
    assert "y_LR4.png' are both 136x160" in err and "RealSR V1/V2" in err
    assert "z_LR4.png' is 30x40, smaller than the 32x32 centre crop" in err
    assert not out.exists()


def test_refuses_to_overwrite_and_foreign_files(pt, realsr_src, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["realsr", "--src", str(realsr_src), "--out", str(out), "--lr-size", "32", "--no-progress"]
    assert pt.main(argv) == 0
    first = _files(out)
    assert pt.main(argv) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert _files(out) == first
    assert pt.main([*argv, "--overwrite"]) == 0
    assert _files(out) == first  # deterministic: same bytes, meta.json included

    cv2.imwrite(str(out / "gt" / "stale.png"), np.zeros((4, 4, 3), np.uint8))  # left by another run
    assert pt.main([*argv, "--overwrite"]) == 2
    assert "gt/stale.png" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- div2k_val
@pytest.fixture(scope="module")
def div2k(tmp_path_factory, photos) -> Path:
    src = tmp_path_factory.mktemp("DIV2K_valid_HR")
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        (src / f"{801 + i:04d}.png").write_bytes(photos[name].read_bytes())
    return src


def _div2k(pt, src: Path, out: Path, num: int, batch_size: int, **kwargs):
    return pt.prepare_div2k_val(
        src,
        out,
        preset="realesrgan",
        num=num,
        crop=128,
        seed=3,
        batch_size=batch_size,
        progress=False,
        **kwargs,
    )


def test_div2k_val_is_deterministic_per_crop(pt, div2k, tmp_path):
    a = _div2k(pt, div2k, tmp_path / "a", num=12, batch_size=4)
    b = _div2k(pt, div2k, tmp_path / "b", num=6, batch_size=1)
    _div2k(pt, div2k, tmp_path / "c", num=6, batch_size=1)
    assert (a.written, b.written, a.skipped) == (12, 6, 0)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fb == _files(tmp_path / "c")  # same options twice: identical bytes, meta.json included
    for i in range(6):  # crop i is the same with batch 4 and --num 12 as with batch 1 and --num 6
        for sub in ("lq", "gt"):
            assert fa[f"{sub}/{i:05d}.png"] == fb[f"{sub}/{i:05d}.png"], (sub, i)
    ma, mb = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("a", "b"))
    assert ma["crops"][:6] == mb["crops"]
    # crops differ from each other (positions and degradations are not all the same)
    assert len({fa[f"lq/{i:05d}.png"] for i in range(12)}) == 12
    assert len({(c["box"]["top"], c["box"]["left"]) for c in ma["crops"]}) == 12
    # another seed gives another set
    d = tmp_path / "d"
    pt.prepare_div2k_val(div2k, d, preset="realesrgan", num=2, crop=128, seed=4, progress=False)
    assert _files(d)["lq/00000.png"] != fa["lq/00000.png"]


def test_div2k_val_pairs_and_meta(pt, div2k, tmp_path):
    out = tmp_path / "out"
    _div2k(pt, div2k, out, num=7, batch_size=3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "div2k_val" and meta["preset"] == "realesrgan" and meta["seed"] == 3
    assert meta["num"] == 7 and meta["crop"] == 128 and meta["lr_size"] == 32 and meta["scale"] == 4
    assert meta["source_dir"] == str(div2k) and meta["skipped_sources"] == []
    assert meta["preset_options"]["noise_range"] == [1, 30]  # the preset's values are recorded
    assert [c["index"] for c in meta["crops"]] == list(range(7))
    # spread evenly: crop i comes from image i % 3
    assert [c["source"] for c in meta["crops"]] == ["0801.png", "0802.png", "0803.png"] * 2 + ["0801.png"]

    deg = RealESRGANDegradation.from_preset("realesrgan")
    for crop in meta["crops"]:
        src = read_image(div2k / crop["source"])
        box = crop["box"]
        assert box["height"] == box["width"] == 128
        assert 0 <= box["top"] <= src.shape[0] - 128 and 0 <= box["left"] <= src.shape[1] - 128
        clean = src[box["top"] : box["top"] + 128, box["left"] : box["left"] + 128]
        gt = read_image(out / "gt" / crop["name"])
        lq = read_image(out / "lq" / crop["name"])
        assert gt.shape == (128, 128, 3) and lq.shape == (32, 32, 3)
        # the saved GT is the clean crop (not the USM-sharpened training target)
        np.testing.assert_array_equal(gt, clean)
        # the LR is exactly the pipeline's output for this crop and its recorded seed
        ref = deg(to_tensor(clean)[None], generator=torch.Generator().manual_seed(crop["torch_seed"]))
        assert not torch.equal(ref.gt[0], to_tensor(clean))  # (the pipeline's gt is sharpened)
        np.testing.assert_array_equal(lq, ref.lq[0].permute(1, 2, 0).numpy())


def test_div2k_val_small_images(pt, div2k, tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    (src / "0801.png").write_bytes((div2k / "0801.png").read_bytes())
    cv2.imwrite(str(src / "0802.png"), np.full((100, 300, 3), 128, np.uint8))
    with pytest.raises(
        pt.PrepareError, match=r"'.*0802\.png' 100x300 is smaller than the 128x128 crop.*--skip-small"
    ):
        _div2k(pt, src, tmp_path / "a", num=2, batch_size=2)
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.INFO, logger="restore.data.testsets"):
        summary = _div2k(pt, src, tmp_path / "b", num=2, batch_size=2, skip_small=True)
    assert (summary.written, summary.skipped) == (2, 1)
    assert "0802.png" in caplog.text and "smaller than the 128x128 crop" in caplog.text
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert [c["source"] for c in meta["crops"]] == ["0801.png", "0801.png"]
    assert meta["skipped_sources"][0]["file"] == "0802.png"


def test_div2k_val_cli_requires_a_preset(pt, div2k, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pt.main(["div2k_val", "--src", str(div2k), "--out", str(tmp_path / "o"), "--num", "2"])
    assert "--preset" in capsys.readouterr().err


def test_div2k_val_cli_refuses_overwrite(pt, div2k, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "div2k_val",
        "--src",
        str(div2k),
        "--out",
        str(out),
        "--num",
        "2",
        "--crop",
        "128",
        "--preset",
        "realesrgan",
        "--no-progress",
    ]
    assert pt.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"div2k_val: wrote 2 pair(s), skipped 0 -> {out}"
    assert json.loads((out / "meta.json").read_text())["preset"] == "realesrgan"
    before = _files(out)
    assert pt.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _files(out) == before


def test_samples_subcommand(pt, tmp_path):
    summary = pt.prepare_samples(tmp_path / "s", crop=80, progress=False)
    assert summary.written == 8
    assert _u8(tmp_path / "s" / "lq" / "astronaut.png").shape == (20, 20, 3)
    assert _u8(tmp_path / "s" / "gt" / "retina.png").shape == (80, 80, 3)


# -------------------------------------------------------------------------------------------- reallr200
def test_reallr200_normalises_odd_inputs(pt, tmp_path, photos, caplog):
    src, out = tmp_path / "RealLR200", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    rgb = _u8(photos["chelsea"])[:60, :70]  # BGR uint8
    alpha = np.tile(np.linspace(0, 255, 70).astype(np.uint8), (60, 1))
    cv2.imwrite(str(src / "rgba.png"), np.dstack([rgb, alpha]))
    cv2.imwrite(str(src / "deep.png"), rgb.astype(np.uint16) * 257 + 3)  # 16-bit
    cv2.imwrite(str(src / "gray.png"), cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(src / "photo.jpg"), rgb)
    cv2.imwrite(str(src / "sub" / "photo.webp"), rgb)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_text("not a PNG either")
    (src / ".DS_Store").write_bytes(b"\0\0")

    with caplog.at_level(logging.INFO, logger="restore.data.testsets"):
        summary = pt.prepare_lr_only(src, out, progress=False)
    assert (summary.written, summary.skipped) == (5, 3)
    assert summary.line() == f"reallr200: wrote 5 image(s), skipped 3 -> {out}"
    for name in ("notes.txt", "broken.png", ".DS_Store"):
        assert name in caplog.text
    assert "not a decodable image" in caplog.text  # broken.png: the reason from read_image
    assert sorted(_files(out / "lq")) == ["deep.png", "gray.png", "photo.png", "rgba.png", "sub/photo.png"]

    for name, source in [
        ("rgba", "rgba.png"),
        ("deep", "deep.png"),
        ("gray", "gray.png"),
        ("photo", "photo.jpg"),
    ]:
        written = _u8(out / "lq" / f"{name}.png")
        assert written.dtype == np.uint8 and written.shape == (60, 70, 3), name
        expected = np.rint(read_image(src / source) * 255).astype(np.uint8)[:, :, ::-1]
        np.testing.assert_array_equal(written, expected, err_msg=name)
    gray = _u8(out / "lq" / "gray.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(_u8(out / "lq" / "deep.png"), rgb)  # (v*257+3)/65535 rounds back to v
    rgba = _u8(out / "lq" / "rgba.png")
    assert (rgba[:, 0] == 255).all()  # fully transparent column -> white background
    np.testing.assert_array_equal(rgba[:, -1], rgb[:, -1])  # opaque column unchanged

    meta = json.loads((out / "meta.json").read_text())
    assert {s["file"] for s in meta["skipped"]} == {"notes.txt", "broken.png", ".DS_Store"}
    assert meta["images"][0]["source_size"] == [60, 70]


def test_reallr200_max_side_and_name_clash(pt, tmp_path, photos):
    src = tmp_path / "src"
    src.mkdir()
    img = _u8(photos["coffee"])[:50, :71]
    cv2.imwrite(str(src / "a.png"), img)
    pt.prepare_lr_only(src, tmp_path / "out", max_side=40, progress=False)
    np.testing.assert_array_equal(_u8(tmp_path / "out" / "lq" / "a.png"), img[5:45, 15:55])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["images"][0]["box"] == {"top": 5, "left": 15, "height": 40, "width": 40}

    cv2.imwrite(str(src / "a.jpg"), img)
    with pytest.raises(pt.PrepareError, match=r"'a\.jpg' and 'a\.png' would both be written as 'lq/a\.png'"):
        pt.prepare_lr_only(src, tmp_path / "out2", progress=False)
