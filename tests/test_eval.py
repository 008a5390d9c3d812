"""eval.py: restores a benchmark into PNGs with a method's weights; clear errors without a method or weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra_helpers import compose_config

from restore.data.image_io import list_images, read_image, write_image
from restore.methods.feedforward import FeedForwardSR
from restore.models.rrdbnet import RRDBNet
from restore.run import ConfigError, evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}  # configs/model/realesrnet_tiny.yaml


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    """``benchmarks/samples/{lq,gt}`` as scripts/prepare_testsets.py writes it, with two small pairs."""
    root = tmp_path / "data"
    for name, size in (("a", 12), ("b", 16)):
        write_image(root / "benchmarks/samples/lq" / f"{name}.png", torch.rand(3, size, size))
        write_image(root / "benchmarks/samples/gt" / f"{name}.png", torch.rand(3, 4 * size, 4 * size))
    return root


@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> Path:
    """A train.py-style checkpoint (Lightning layout: weights under "state_dict") of the tiny RealESRNet."""
    torch.manual_seed(0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": FeedForwardSR(RRDBNet(**TINY)).state_dict(), "global_step": 7}, path)
    return path


def test_eval_cli_writes_restored_images(data_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "model=realesrnet_tiny",
        f"ckpt_path={tiny_ckpt}",
        f"paths.data_root={data_root}",
        f"hydra.run.dir={run_dir}",
        "trainer=cpu",
        "num_workers=0",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "eval.py", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list_images(run_dir / "images" / "samples")
    assert [p.name for p in written] == ["a.png", "b.png"]
    assert read_image(written[0]).shape == (48, 48, 3) and read_image(written[1]).shape == (64, 64, 3)


def test_eval_without_a_method_names_the_key(data_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("eval", [], tmp_path)
    with pytest.raises(ConfigError, match=r"`model` is required.*model=<realesrnet\|realesrnet_tiny>"):
        evaluate(cfg)


def test_eval_without_weights_refuses_random_init(data_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("eval", ["model=realesrnet_tiny", "trainer=cpu"], tmp_path)
    with pytest.raises(ConfigError, match="needs trained weights: pass ckpt_path="):
        evaluate(cfg)


def test_eval_folder_benchmark_needs_its_folders(tmp_path: Path) -> None:
    cfg = compose_config("eval", ["model=realesrnet_tiny", "benchmark=folder"], tmp_path)
    with pytest.raises(
        ConfigError, match=r"`benchmark\.dataset\.gt_dir`, `benchmark\.dataset\.lr_dir` must be set"
    ):
        evaluate(cfg)


def test_eval_in_process_matches_the_method(data_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_config("eval", ["model=realesrnet_tiny", "trainer=cpu", f"ckpt_path={tiny_ckpt}"], tmp_path)
    result = evaluate(cfg)
    assert result["num_images"] == 2 and Path(result["images_dir"]) == tmp_path / "run/images/samples"
    method = FeedForwardSR(RRDBNet(**TINY))
    method.load_state_dict(torch.load(tiny_ckpt, weights_only=True)["state_dict"])
    lq = torch.from_numpy(read_image(data_root / "benchmarks/samples/lq/a.png")).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = torch.round(method.eval().restore(lq).clamp(0, 1)[0] * 255)
    written = torch.from_numpy(read_image(Path(result["images_dir"]) / "a.png")).permute(2, 0, 1) * 255
    assert torch.equal(torch.round(written), expected)
