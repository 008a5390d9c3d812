"""Benchmark listing, restored-folder matching, the score store and the bicubic baseline (no metrics needed)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from restore.data.image_io import write_image
from restore.evaluation.benchmark import Benchmark, BenchmarkError, apply_steps
from restore.evaluation.fingerprint import ckpt_signature, run_key
from restore.evaluation.runner import check_sizes, match_outputs
from restore.evaluation.score_store import ScoreStore, decode_features, encode_features, file_signature
from restore.methods.bicubic import BicubicUpsampler


def _bench(lr: Path, gt: Path | None = None, **kw) -> Benchmark:
    return Benchmark.from_config({"name": "t", "lr_dir": str(lr), "gt_dir": str(gt) if gt else None, **kw})


def test_odd_files_are_listed_or_skipped_with_a_reason(tmp_path: Path) -> None:
    lr = tmp_path / "lr"
    lr.mkdir()
    rgb = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(lr / "rgba.png"), np.dstack([rgb, np.full((8, 8), 128, np.uint8)]))
    cv2.imwrite(str(lr / "deep.png"), (rgb.astype(np.uint16) * 257))
    cv2.imwrite(str(lr / "gray.jpg"), rgb[..., 0])
    cv2.imwrite(str(lr / "photo.webp"), rgb)
    (lr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (lr / "notes.txt").write_text("not an image")
    (lr / ".DS_Store").write_bytes(b"\0")
    items, skipped = _bench(lr).collect()
    assert [it.name for it in items] == ["broken", "deep", "gray", "photo", "rgba"]
    assert [(s.name, s.reason) for s in skipped] == [("notes", "not an image file (suffix '.txt')")]
    assert all(it.gt is None for it in items)


def test_unmatched_names_are_an_error_listing_both_sides(tmp_path: Path) -> None:
    for side, names in (("lr", ["a", "b", "c"]), ("gt", ["a", "d"])):
        for n in names:
            write_image(tmp_path / side / f"{n}.png", np.zeros((4, 4, 3)))
    with pytest.raises(
        BenchmarkError, match=r"2 LR image\(s\) without GT: 'b', 'c'; 1 GT image\(s\) without LR: 'd'"
    ):
        _bench(tmp_path / "lr", tmp_path / "gt").collect()


def test_suffixes_and_subfolders_pair_up(tmp_path: Path) -> None:
    write_image(tmp_path / "lr/x/0801x4.png", np.zeros((4, 4, 3)))
    write_image(tmp_path / "gt/x/0801.png", np.zeros((16, 16, 3)))
    items, _ = _bench(tmp_path / "lr", tmp_path / "gt", lr_suffix="x4").collect()
    assert [(it.name, it.gt.name) for it in items] == [("x/0801", "0801.png")]


def test_two_files_for_one_name_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "lr/a.png", np.zeros((4, 4, 3)))
    cv2.imwrite(str(tmp_path / "lr/a.jpg"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BenchmarkError, match="two images for the name 'a'"):
        _bench(tmp_path / "lr").collect()


def test_bad_benchmark_keys_and_steps(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match=r"unknown benchmark key\(s\) \['crop'\]"):
        _bench(tmp_path, crop=3)
    with pytest.raises(BenchmarkError, match="a benchmark step must be one of"):
        _bench(tmp_path, post=[{"rotate": 90}])
    with pytest.raises(BenchmarkError, match="does not exist"):
        _bench(tmp_path / "nope").collect()


def test_steps_crop_and_resize() -> None:
    img = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12) / 400
    crop = apply_steps(img, [{"center_crop": [4, 6]}])
    assert torch.equal(crop, img[:, 3:7, 3:9])  # offsets floor((10-4)/2), floor((12-6)/2)
    assert apply_steps(img, [{"center_crop": 2}], scale=2).shape == (3, 4, 4)
    assert apply_steps(img, [{"resize": 5}]).shape == (3, 5, 5)
    with pytest.raises(BenchmarkError, match="cannot center_crop a 10x12 image to 11x11"):
        apply_steps(img, [{"center_crop": 11}])


def test_outputs_folder_must_cover_the_benchmark(tmp_path: Path) -> None:
    for n in ("a", "b", "c"):
        write_image(tmp_path / "lr" / f"{n}.png", np.zeros((4, 4, 3)))
    write_image(tmp_path / "out/a.png", np.zeros((16, 16, 3)))
    cv2.imwrite(str(tmp_path / "out/b.jpg"), np.zeros((16, 16, 3), np.uint8))  # any extension matches
    write_image(tmp_path / "out/zzz.png", np.zeros((16, 16, 3)))
    items, _ = _bench(tmp_path / "lr").collect()
    with pytest.raises(
        BenchmarkError, match=r"1 benchmark image\(s\) have no restored file .*: 'c'.* e\.g\. 'zzz'"
    ):
        match_outputs(items, tmp_path / "out")
    write_image(tmp_path / "out/c.png", np.zeros((16, 16, 3)))
    found = match_outputs(items, tmp_path / "out")
    assert {k: v.name for k, v in found.items()} == {"a": "a.png", "b": "b.jpg", "c": "c.png"}


def test_size_mismatch_lists_the_offenders(tmp_path: Path) -> None:
    write_image(tmp_path / "sr/a.png", np.zeros((16, 16, 3)))
    write_image(tmp_path / "sr/b.png", np.zeros((16, 12, 3)))
    write_image(tmp_path / "gt/a.png", np.zeros((16, 16, 3)))
    write_image(tmp_path / "gt/b.png", np.zeros((16, 16, 3)))
    pairs = [(n, tmp_path / f"sr/{n}.png", tmp_path / f"gt/{n}.png") for n in ("a", "b")]
    with pytest.raises(
        BenchmarkError, match=r"1 restored image\(s\) differ in size .*: b \(restored 16x12, GT 16x16\)"
    ):
        check_sizes(pairs, [])
    check_sizes(pairs, [{"resize": 8}])  # a post-resize makes them comparable


def test_score_store_resumes_only_matching_records(tmp_path: Path) -> None:
    feats = {"fid": {"sr": torch.linspace(-1, 1, 7), "gt": torch.arange(7.0)}}
    store = ScoreStore(tmp_path, "fp-1", rank=0)
    store.append([{"name": "a", "scores": {"psnr": 20.5}, "features": encode_features(feats)}])
    ScoreStore(tmp_path, "fp-1", rank=1).append([{"name": "b", "scores": {"psnr": 21.0}, "features": {}}])
    ScoreStore(tmp_path, "fp-OTHER", rank=0).append([{"name": "c", "scores": {"psnr": 1.0}, "features": {}}])
    with open(store.path, "a") as fh:
        fh.write('{"name": "d", "scores": {"ps')  # a line cut short by a kill
    loaded = store.load()
    assert sorted(loaded) == ["a", "b"]
    back = decode_features(loaded["a"]["features"])["fid"]
    assert np.array_equal(back["sr"], feats["fid"]["sr"].numpy()) and np.array_equal(
        back["gt"], np.arange(7.0)
    )
    assert json.loads(store.path.read_text().splitlines()[0])["fingerprint"] == "fp-1"


def test_file_signature_changes_when_rewritten(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
    before = file_signature(path)
    write_image(path, np.ones((4, 4, 3)), overwrite=True)
    assert file_signature(path) != before


def test_run_key_ignores_workers_but_not_weights_or_metrics(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"1")
    base = {
        "benchmark": {"name": "b", "lr_dir": "x", "metrics": ["psnr"]},
        "method": {"name": "m"},
        "ckpt_path": str(ckpt),
        "metrics": {"psnr": {"pyiqa": "psnr"}},
        "num_workers": 2,
    }
    key = run_key(OmegaConf.create(base))
    assert run_key(OmegaConf.create({**base, "num_workers": 8})) == key
    assert (
        run_key(OmegaConf.create({**base, "metrics": {"psnr": {"pyiqa": "psnr", "options": {"a": 1}}}}))
        != key
    )
    sig = ckpt_signature(ckpt)
    ckpt.write_bytes(b"22")  # retrained into the same path
    assert ckpt_signature(ckpt) != sig and run_key(OmegaConf.create(base)) != key


def test_bicubic_conventions_match_opencv_and_matlab() -> None:
    from reference.basicsr_ref import import_basicsr

    import_basicsr()
    from basicsr.utils.matlab_functions import imresize

    x = np.random.default_rng(0).random((13, 17, 3)) * 0.5 + 0.25  # inside [0, 1]: clamping plays no role
    t = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    opencv = BicubicUpsampler(4, "opencv").restore(t)[0].permute(1, 2, 0).numpy()
    matlab = BicubicUpsampler(4, "matlab").restore(t)[0].permute(1, 2, 0).numpy()
    ref_cv = cv2.resize(x.astype(np.float32), (68, 52), interpolation=cv2.INTER_CUBIC)
    assert np.abs(opencv - ref_cv).max() < 1e-6
    assert np.abs(matlab - imresize(x, 4)).max() < 1e-6
    assert np.abs(matlab - opencv).max() > 1e-3  # the two conventions really differ
    with pytest.raises(ValueError, match="kernel must be one of"):
        BicubicUpsampler(4, "lanczos")
