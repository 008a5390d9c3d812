"""eval.py end to end on the embedded `samples` benchmark: restore (bicubic, a trained tiny RealESRNet) or
score a folder, with per-image numbers checked against a hand-written PSNR, resume, odd inputs and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra_helpers import compose_config

from restore.data.image_io import read_image, write_image
from restore.evaluation.benchmark import BenchmarkError
from restore.methods.checkpoints import MethodWeightsError
from restore.methods.feedforward import FeedForwardSR
from restore.models.rrdbnet import RRDBNet
from restore.run import ConfigError, evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}  # configs/method/realesrnet_tiny.yaml
FAST = ["benchmark.metrics=[psnr,ssim,psnr_rgb]", "num_workers=0", "progress=false", "trainer=cpu"]


def psnr_y_ycbcr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR on BT.601 YCbCr luma (16-235), 8-bit range: the SR papers' convention, written out by hand."""
    weights = np.array([65.481, 128.553, 24.966]) / 255.0
    ya = (a.astype(np.float64) * 255.0) @ weights + 16.0
    yb = (b.astype(np.float64) * 255.0) @ weights + 16.0
    return float(10 * np.log10(255.0**2 / np.mean((ya - yb) ** 2)))


@pytest.fixture(scope="module")
def samples_root(tmp_path_factory) -> Path:
    """The `samples` benchmark as eval.py builds it on first use (8 photos, 256² GT, 64² LR)."""
    from restore.data.testsets import prepare_samples

    root = tmp_path_factory.mktemp("data")
    prepare_samples(root / "benchmarks/samples", progress=False)
    return root


def _run_eval(args: list[str], log_dir: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "eval.py", *args, f"paths.log_dir={log_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _run_dirs(log_dir: Path, benchmark: str = "samples") -> list[Path]:
    return sorted((log_dir / "eval" / benchmark).glob("*"))


def test_bicubic_on_samples_then_resume_then_score_the_folder(samples_root: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = ["benchmark=samples", "method=bicubic", f"paths.data_root={samples_root}", *FAST]
    proc = _run_eval(args, logs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = _run_dirs(logs)
    assert run.name.startswith("bicubic-")
    results = json.loads((run / "results.json").read_text())
    assert results["format"] == "restore.results/v1" and results["num_scored"] == 8
    assert list(results["metrics"]) == ["psnr", "ssim", "psnr_rgb"]
    assert results["metrics"]["psnr"]["lower_better"] is False
    assert results["metrics"]["psnr"]["options"]["color_space"] == "ycbcr"
    for rec in results["per_image"]:  # every number equals the convention computed by hand
        sr, gt = read_image(rec["sr"]), read_image(rec["gt"])
        assert sr.shape == gt.shape == (256, 256, 3)
        assert rec["scores"]["psnr"] == pytest.approx(psnr_y_ycbcr(sr, gt), abs=1e-4)
    mean = np.mean([r["scores"]["psnr"] for r in results["per_image"]])
    assert results["aggregate"]["psnr"] == pytest.approx(mean, abs=1e-9)
    table = (run / "table.md").read_text()
    assert "PSNR ↑" in table and "bicubic" in table
    csv_lines = (run / "results.csv").read_text().splitlines()
    assert (
        csv_lines[0] == "name,psnr,ssim,psnr_rgb"
        and len(csv_lines) == 10
        and csv_lines[-1].startswith("mean,")
    )
    assert (run / "report.html").stat().st_size > 10_000

    # the same command again: same directory, nothing restored or scored twice
    score_lines = sum(len(p.read_text().splitlines()) for p in (run / "scores").glob("*.jsonl"))
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "images/samples").glob("*.png")}
    proc = _run_eval(args, logs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _run_dirs(logs) == [run]
    assert "already scored" in proc.stderr + proc.stdout
    assert sum(len(p.read_text().splitlines()) for p in (run / "scores").glob("*.jsonl")) == score_lines == 8
    assert {p: p.stat().st_mtime_ns for p in (run / "images/samples").glob("*.png")} == mtimes

    # a folder of restored images is scored by the same code: identical numbers
    proc = _run_eval(
        [
            "benchmark=samples",
            f"outputs={run / 'images/samples'}",
            "label=folder",
            f"paths.data_root={samples_root}",
            f"report.compare=[{logs / 'eval/samples'}]",  # every run of this benchmark, itself included
            *FAST,
        ],
        logs,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (folder_run,) = [d for d in _run_dirs(logs) if d.name.startswith("folder-")]
    again = json.loads((folder_run / "results.json").read_text())
    assert [r["scores"] for r in again["per_image"]] == [r["scores"] for r in results["per_image"]]
    assert again["method"] == "folder"
    assert (folder_run / "table.md").read_text().splitlines()[0] == "| Dataset | Metric | bicubic | folder |"


@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> Path:
    """A train.py-style checkpoint (Lightning layout: weights under "state_dict") of the tiny RealESRNet."""
    torch.manual_seed(0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": FeedForwardSR(RRDBNet(**TINY)).state_dict(), "global_step": 7}, path)
    return path


def test_trained_method_restores_and_is_scored(samples_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_config("eval", ["method=realesrnet_tiny", f"ckpt_path={tiny_ckpt}", *FAST], tmp_path)
    cfg.paths.data_root = str(samples_root)
    results = evaluate(cfg)
    assert results["method"] == "realesrnet_tiny" and results["num_scored"] == 8
    method = FeedForwardSR(RRDBNet(**TINY))
    method.load_state_dict(torch.load(tiny_ckpt, weights_only=True)["state_dict"])
    rec = results["per_image"][0]
    lq = torch.from_numpy(read_image(rec["lr"])).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = torch.round(method.eval().restore(lq).clamp(0, 1)[0] * 255)
    written = torch.from_numpy(read_image(rec["sr"])).permute(2, 0, 1) * 255
    assert Path(rec["sr"]) == tmp_path / "run/images/samples" / f"{rec['name']}.png"
    assert torch.equal(torch.round(written), expected)
    assert rec["scores"]["psnr"] == pytest.approx(
        psnr_y_ycbcr(read_image(rec["sr"]), read_image(rec["gt"])), abs=1e-4
    )


def test_odd_lr_files_are_restored_or_skipped_with_reasons(tmp_path: Path) -> None:
    import cv2

    lr, gt = tmp_path / "lr", tmp_path / "gt"
    rng = np.random.default_rng(0)
    rgb = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    lr.mkdir()
    cv2.imwrite(str(lr / "rgba.png"), np.dstack([rgb, np.full((12, 10), 200, np.uint8)]))
    cv2.imwrite(str(lr / "deep.tif"), rgb.astype(np.uint16) * 257)
    cv2.imwrite(str(lr / "gray.png"), rgb[..., 0])
    cv2.imwrite(str(lr / "photo.webp"), rgb, [cv2.IMWRITE_WEBP_QUALITY, 90])
    (lr / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (lr / "readme.txt").write_text("not an image")
    for name in ("rgba", "deep", "gray", "photo", "broken"):
        write_image(gt / f"{name}.png", rng.random((48, 40, 3)))
    overrides = [
        "benchmark=folder",
        f"benchmark.lr_dir={lr}",
        f"benchmark.gt_dir={gt}",
        "method=bicubic",
        *FAST,
    ]
    results = evaluate(compose_config("eval", overrides, tmp_path))
    assert sorted(r["name"] for r in results["per_image"]) == ["deep", "gray", "photo", "rgba"]
    for rec in results["per_image"]:
        assert Path(rec["sr"]).name == f"{rec['name']}.png" and read_image(rec["sr"]).shape == (48, 40, 3)
    reasons = {s["name"]: s["reason"] for s in results["skipped"]}
    assert set(reasons) == {"broken", "readme"}
    assert "truncated" in reasons["broken"] or "corrupt" in reasons["broken"]
    assert "not an image file" in reasons["readme"]
    assert results["num_images"] == 5 and results["num_scored"] == 4


def test_what_to_evaluate_must_be_said_exactly_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a method \(method=<bicubic\|.*or outputs=<folder"):
        evaluate(compose_config("eval", [], tmp_path))
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate(compose_config("eval", ["method=bicubic", f"outputs={tmp_path}"], tmp_path))


def test_trained_method_without_weights_is_refused(samples_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("eval", ["method=realesrnet_tiny", *FAST], tmp_path)
    cfg.paths.data_root = str(samples_root)
    with pytest.raises(MethodWeightsError, match="needs trained weights: pass ckpt_path="):
        evaluate(cfg)


def test_folder_benchmark_needs_its_folder(tmp_path: Path) -> None:
    cfg = compose_config("eval", ["method=bicubic", "benchmark=folder"], tmp_path)
    with pytest.raises(ConfigError, match=r"`benchmark\.lr_dir` must be set .*benchmark\.lr_dir=\.\.\."):
        evaluate(cfg)


def test_a_run_directory_belongs_to_one_configuration(samples_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("eval", ["method=bicubic", *FAST], tmp_path)
    cfg.paths.data_root = str(samples_root)
    evaluate(cfg)
    changed = compose_config("eval", ["method=bicubic", "benchmark.crop_border=4", *FAST], tmp_path)
    changed.paths.data_root = str(samples_root)
    with pytest.raises(BenchmarkError, match="holds an evaluation with another configuration"):
        evaluate(changed)


@pytest.mark.slow
def test_ddp_relaunched_by_lightning_under_hydra_equals_one_process(
    samples_root: Path, tmp_path: Path
) -> None:
    """trainer=ddp re-runs eval.py once per rank (Lightning's subprocess launcher, as on GPU nodes): the
    ranks must find the same run directory and together score every image once, with the same numbers."""
    common = ["benchmark=samples", "method=bicubic", f"paths.data_root={samples_root}", *FAST[:-1]]
    single = _run_eval([*common, "trainer=cpu"], tmp_path / "single")
    assert single.returncode == 0, single.stderr[-4000:]
    ddp = _run_eval(
        [*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path / "ddp"
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    (one,), (two,) = _run_dirs(tmp_path / "single"), _run_dirs(tmp_path / "ddp")
    assert one.name == two.name  # the trainer is not part of the run key
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert [r["scores"] for r in a["per_image"]] == [r["scores"] for r in b["per_image"]]
    lines = {p.name: len(p.read_text().splitlines()) for p in (two / "scores").glob("*.jsonl")}
    assert lines == {"scores.rank0.jsonl": 4, "scores.rank1.jsonl": 4}


@pytest.mark.slow
def test_kill_9_while_scoring_then_the_same_command_finishes_the_rest(
    samples_root: Path, tmp_path: Path
) -> None:
    import signal
    import time

    logs = tmp_path / "logs"
    args = [
        "benchmark=samples",
        "method=bicubic",
        f"paths.data_root={samples_root}",
        "benchmark.metrics=[psnr,{name:ssim,implementation:pyiqa}]",  # pyiqa's slow SSIM: time to kill
        "batch_size=1",
        "num_workers=0",
        "progress=false",
        "trainer=cpu",
        f"paths.log_dir={logs}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "eval.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        stored = list(logs.glob("eval/samples/*/scores/scores.rank0.jsonl"))
        if stored and 1 <= len(stored[0].read_text().splitlines()) < 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    (run,) = _run_dirs(logs)
    done_before = len((run / "scores/scores.rank0.jsonl").read_text().splitlines())
    assert not (run / "results.json").exists()

    again = _run_eval(args[:-1], logs)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (
        f"score: {done_before} image(s) already scored with this configuration reused"
        in again.stderr + again.stdout
    )
    names = [
        json.loads(line)["name"] for line in (run / "scores/scores.rank0.jsonl").read_text().splitlines()
    ]
    assert len(names) == len(set(names)) == 8
    assert json.loads((run / "results.json").read_text())["num_scored"] == 8
