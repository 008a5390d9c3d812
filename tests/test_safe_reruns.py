"""Reruns of eval.py reuse exactly what is still valid: inputs changed in place, another device, odd inputs
(unreadable, looping, too small), torn score lines, and tables that refuse to merge different test sets.

Each test here failed on the code before content identities (issue "Nothing stale, nothing destroyed")."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
from hydra_helpers import compose_config
from results_fixtures import results_doc

from restore.data.image_io import write_image
from restore.evaluation.benchmark import BenchmarkError
from restore.evaluation.input_identity import ContentDigests, dataset_identity
from restore.evaluation.results import check_same_datasets
from restore.evaluation.score_store import ScoreStore
from restore.evaluation.table import results_table
from restore.run import evaluate

FAST = ["benchmark.metrics=[psnr,ssim]", "num_workers=0", "progress=false", "trainer=cpu", "method=bicubic"]


def _pairs(root: Path, seed: int, names=("a", "b", "c", "d"), lr_size: int = 12) -> tuple[Path, Path]:
    """Random x4 pairs: LR ``lr_size``², GT 4x that; smooth enough that bicubic PSNR is finite and varied."""
    rng = np.random.default_rng(seed)
    lr, gt = root / "lr", root / "gt"
    for name in names:
        base = rng.random((lr_size, lr_size, 3))
        write_image(lr / f"{name}.png", base, overwrite=True)
        up = np.kron(base, np.ones((4, 4, 1))) * 0.9 + 0.05 * rng.random((4 * lr_size, 4 * lr_size, 3))
        write_image(gt / f"{name}.png", up, overwrite=True)
    return lr, gt


def _eval(tmp_path: Path, lr: Path, gt: Path | None, run: str = "run", extra=()) -> dict:
    overrides = ["benchmark=folder", f"benchmark.lr_dir={lr}", *FAST, *extra]
    if gt is not None:
        overrides.append(f"benchmark.gt_dir={gt}")
    cfg = compose_config("eval", overrides, tmp_path)
    cfg.paths.output_dir = str(tmp_path / run)
    return evaluate(cfg)


def _psnr(results: dict) -> dict[str, float]:
    return {r["name"]: r["scores"]["psnr"] for r in results["per_image"]}


def test_a_test_set_rewritten_in_place_is_restored_and_scored_again(tmp_path: Path, caplog) -> None:
    lr, gt = _pairs(tmp_path / "data", seed=0)
    first = _eval(tmp_path, lr, gt)
    # prepare_testsets.py --overwrite does this: same names, same sizes, new pixels
    rng = np.random.default_rng(1)
    write_image(lr / "a.png", rng.random((12, 12, 3)), overwrite=True)
    write_image(lr / "b.png", rng.random((12, 12, 3)), overwrite=True)
    write_image(gt / "c.png", rng.random((48, 48, 3)), overwrite=True)
    with caplog.at_level(logging.INFO, logger="restore.evaluation.runner"):
        rerun = _eval(tmp_path, lr, gt)
    fresh = _eval(tmp_path, lr, gt, run="fresh")
    assert _psnr(rerun) == pytest.approx(_psnr(fresh), abs=1e-9)
    assert _psnr(rerun)["d"] == _psnr(first)["d"]  # untouched: reused, same number
    assert _psnr(rerun)["a"] != pytest.approx(_psnr(first)["a"])
    assert "2 image(s) of this run reused, 2 to restore (LR changed: 2)" in caplog.text
    assert "score: 1 image(s) already scored with this configuration reused, 3 to score" in caplog.text
    assert "restored image changed: 2" in caplog.text and "GT changed: 1" in caplog.text
    assert rerun["dataset"]["id"] == fresh["dataset"]["id"] != first["dataset"]["id"]


def test_images_restored_on_another_device_kind_are_restored_again(tmp_path: Path, caplog) -> None:
    lr, gt = _pairs(tmp_path / "data", seed=2, names=("a", "b"))
    _eval(tmp_path, lr, gt)
    (store,) = (tmp_path / "run" / "restored").glob("restored.rank0.jsonl")
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    store.write_text("".join(json.dumps({**r, "device": "cuda"}) + "\n" for r in lines))
    with caplog.at_level(logging.INFO, logger="restore.evaluation.runner"):
        _eval(tmp_path, lr, gt)
    assert "0 image(s) of this run reused, 2 to restore (made on cuda, this run uses cpu: 2)" in caplog.text


def test_a_scored_folder_rewritten_with_the_same_size_and_mtime_is_scored_again(tmp_path: Path) -> None:
    import cv2

    lr, gt = _pairs(tmp_path / "data", seed=3, names=("a", "b"))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    rng = np.random.default_rng(4)
    for name in ("a", "b"):  # BMP: the file size depends only on the image size
        cv2.imwrite(str(outputs / f"{name}.bmp"), (rng.random((48, 48, 3)) * 255).astype(np.uint8))
    cfg = compose_config(
        "eval",
        [
            "benchmark=folder",
            f"benchmark.lr_dir={lr}",
            f"benchmark.gt_dir={gt}",
            f"outputs={outputs}",
            *FAST[:4],
        ],
        tmp_path,
    )
    first = evaluate(cfg)
    target = outputs / "a.bmp"
    stat = target.stat()
    with open(target, "r+b") as fh:  # same inode, same size, then the old mtime back
        fh.seek(-48 * 3, os.SEEK_END)
        fh.write(bytes(48 * 3))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = evaluate(cfg)
    assert _psnr(second)["a"] != pytest.approx(_psnr(first)["a"])
    assert _psnr(second)["b"] == _psnr(first)["b"]


def test_content_digests_are_cached_by_stat_and_follow_rewrites(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"one")
    digests = ContentDigests(tmp_path / "run")
    first = digests.digest(path)
    digests.save()
    calls = []
    import restore.evaluation.input_identity as identity

    real = identity.file_digest
    monkeypatch.setattr(identity, "file_digest", lambda p: calls.append(p) or real(p))
    again = ContentDigests(tmp_path / "run")  # a later run reads the cache: no re-hash
    assert again.digest(path) == first and calls == []
    path.write_bytes(b"two")
    assert again.digest(path) != first and len(calls) == 1
    assert dataset_identity([("a", "1", "2")], 4) != dataset_identity([("a", "1", "3")], 4)


# ---------------------------------------------------------------------------------------------- odd inputs
def test_unreadable_files_and_folders_and_symlink_loops_are_skipped_by_name(
    tmp_path: Path, monkeypatch
) -> None:
    lr, gt = _pairs(tmp_path / "data", seed=5, names=("a", "b", "c"))
    (lr / "sub").mkdir()
    write_image(lr / "sub" / "d.png", np.zeros((12, 12, 3)))
    write_image(gt / "sub" / "d.png", np.zeros((48, 48, 3)))
    write_image(lr / "sub2" / "e.png", np.zeros((12, 12, 3)))  # its GT folder cannot be listed
    write_image(gt / "sub2" / "e.png", np.zeros((48, 48, 3)))
    (lr / "loop").symlink_to(lr, target_is_directory=True)  # lr/loop/loop/... would list the set forever
    # this process runs as root in CI, which ignores file modes: refuse reads as a non-root user would be refused
    denied_file, denied_dirs = lr / "b.png", (lr / "sub", gt / "sub2")
    real_read, real_scandir = pathlib.Path.read_bytes, os.scandir

    def read_bytes(self):
        if self == denied_file:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    def scandir(path="."):
        if Path(os.fspath(path)) in denied_dirs:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    monkeypatch.setattr(os, "scandir", scandir)
    results = _eval(tmp_path, lr, gt)
    assert sorted(r["name"] for r in results["per_image"]) == ["a", "c"]
    reasons = {s["name"]: s["reason"] for s in results["skipped"]}
    assert "permission denied" in reasons["b"]
    assert "cannot be listed: permission denied" in reasons["sub/"]
    assert "already listed (a loop?)" in reasons["loop/"]
    assert "its GT folder was skipped (the folder cannot be listed: permission denied" in reasons["sub2/e"]
    assert results["num_images"] == 3 and results["num_scored"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: the simulated case above covers it")
def test_a_chmod_000_image_is_skipped_with_its_reason(tmp_path: Path) -> None:
    lr, gt = _pairs(tmp_path / "data", seed=6, names=("a", "b"))
    (lr / "b.png").chmod(0)
    results = _eval(tmp_path, lr, gt)
    assert [r["name"] for r in results["per_image"]] == ["a"]
    assert "permission denied" in results["skipped"][0]["reason"]


def test_an_lr_only_set_with_only_full_reference_metrics_is_an_error(tmp_path: Path) -> None:
    lr, _ = _pairs(tmp_path / "data", seed=7, names=("a",))
    with pytest.raises(
        BenchmarkError, match=r"has no GT .* add no-reference ones, e.g. benchmark.metrics=\[niqe"
    ):
        _eval(tmp_path, lr, None)


def test_an_image_too_small_for_ssim_is_a_footnoted_nan_not_an_abort(tmp_path: Path) -> None:
    lr, gt = _pairs(tmp_path / "data", seed=8, names=("a", "b"))
    _pairs(tmp_path / "data", seed=9, names=("tiny",), lr_size=2)  # 8x8 after x4: under SSIM's 11x11 window
    results = _eval(tmp_path, lr, gt)
    scores = {r["name"]: r["scores"] for r in results["per_image"]}
    assert np.isnan(scores["tiny"]["ssim"]) and np.isfinite(scores["tiny"]["psnr"])
    assert results["aggregate"]["ssim"] == pytest.approx(np.mean([scores["a"]["ssim"], scores["b"]["ssim"]]))
    table = (tmp_path / "run" / "table.md").read_text()
    assert "SSIM: bicubic scored NaN on 1 of 3 image(s)" in table and "the mean is over the other 2" in table


def test_a_torn_score_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path, "fp", rank=0)
    store.append([{"name": "a", "scores": {"psnr": 1.0}, "features": {}}])
    with open(store.path, "a", encoding="utf-8") as fh:
        fh.write('{"name": "b", "scores": {"ps')  # killed mid-write
    resumed = ScoreStore(tmp_path, "fp", rank=0)
    resumed.append([{"name": "c", "scores": {"psnr": 3.0}, "features": {}}])
    assert sorted(resumed.load()) == ["a", "c"]


# ---------------------------------------------------------------------------------------------- tables
def _with_dataset(doc: dict, content: str | None, lr_dir: str) -> dict:
    doc = dict(doc)
    doc["settings"] = {"lr_dir": lr_dir, "gt_dir": None}
    if content is not None:
        doc["dataset"] = {"id": content, "lr_dir": lr_dir, "gt_dir": None}
    return doc


def test_tables_refuse_two_test_sets_under_one_name_and_name_both() -> None:
    a = _with_dataset(results_doc("bicubic", "folder", {"psnr": 20.0}), "1111", "/data/setA")
    b = _with_dataset(results_doc("ours", "folder", {"psnr": 25.0}), "2222", "/data/setB")
    with pytest.raises(
        ValueError, match=r"names two different test sets: .*data set 1111; LR /data/setA.*2222"
    ):
        results_table([a, b])
    moved = _with_dataset(results_doc("ours", "folder", {"psnr": 25.0}), "1111", "/elsewhere/setA")
    assert "**25.00**" in results_table([a, moved])  # same files, another folder: one row
    legacy = _with_dataset(results_doc("old", "folder", {"psnr": 21.0}), None, "/data/setB")
    with pytest.raises(ValueError, match="no content id"):
        check_same_datasets([a, legacy])


def test_infer_skips_a_permission_denied_image_and_lists_a_looping_folder_once(
    tmp_path: Path, monkeypatch
) -> None:
    from restore.infer import infer

    src = tmp_path / "in"
    write_image(src / "a.png", np.full((8, 8, 3), 0.5))
    write_image(src / "b.png", np.full((8, 8, 3), 0.25))
    (src / "again").symlink_to(src, target_is_directory=True)
    real_read = pathlib.Path.read_bytes
    denied = src / "b.png"

    def read_bytes(self):
        if self == denied:  # CI runs as root, which ignores file modes: refuse as for another user
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    cfg = compose_config(
        "infer", ["method=bicubic", "progress=false", f"input={src}", f"output={tmp_path / 'out'}"], tmp_path
    )
    summary = infer(cfg)
    assert [p.name for p in summary.restored] == ["a.png"]
    assert [(p.name, "permission denied" in why) for p, why in summary.unreadable] == [("b.png", True)]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["a.png"]
