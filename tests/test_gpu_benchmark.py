"""benchmarks/gpu/run.py runs end to end with --smoke (tiny models, CPU) and writes every figure of issue 16."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from restore import CONFIG_DIR

SCRIPT = CONFIG_DIR.parent / "benchmarks" / "gpu" / "run.py"


@pytest.mark.slow  # five tiny training variants, inference, degradation and scoring: ~1-3 min on 2 CPU cores
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--json", str(tmp_path / "gpu.json")])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["smoke"] is True and report["settings"]["size"] == "tiny"
    steps = report["train_step"]
    assert set(steps) == {"plain", "restore", "restore_ckpt", "features", "features_ckpt"}
    for row in steps.values():
        assert row["samples_per_s"] > 0 and row["s_per_step"] > 0
        assert math.isclose(row["samples_per_s"] * row["s_per_step"], row["batch"])
        assert row["mfu"] is None  # no data-sheet peak on a CPU
    assert steps["features"]["optimizer"] == "AdamW8bit" and steps["features"]["frozen_dtype"] == "bf16"
    assert steps["plain"]["optimizer"] == "AdamW" and steps["restore_ckpt"]["grad_ckpt"] is True
    assert report["flops_per_step"] > 0
    assert set(report["ratio_over_plain"]) == set(steps) - {"plain"}
    assert report["largest_batch_24gb"] == {"plain": None, "features_ckpt": None}  # CUDA only
    assert report["inference"]["s_per_image"] > 0 and report["inference"]["output_size"] == [128, 128]
    assert report["degradation"]["cpu_images_per_s"] > 0
    assert report["scoring"]["images_per_s"] > 0 and report["scoring"]["metrics"] == ["psnr", "ssim"]
