"""docs/adding_a_method.md, proven: a method defined only in test files (tests/toy_method.py, its config in
tests/configs/) trains with train.py and restores benchmark=samples through eval.py on each of the tiny SD, SDXL
and PixArt-α priors, with no line of it in the package."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SEARCH = f"hydra.searchpath=[file://{REPO / 'tests' / 'configs'}]"
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO / "tests"),  # where toy_method lives; the package knows nothing of it
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "HYDRA_FULL_ERROR": "1",
}
# prior config -> (stepper used at evaluation, the loss terms the prior's objective logs)
PRIORS = {
    "tiny": ("ddpm", {"train/diffusion_loss"}),
    "tiny_sdxl": ("edm", {"train/diffusion_loss"}),
    "tiny_pixart": ("iddpm", {"train/diffusion_loss", "train/vlb_loss"}),
}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / script), SEARCH, "extras.print_config=false", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("prior", list(PRIORS))
def test_toy_method_trains_and_evaluates_on_every_prior(prior: str, tmp_path: Path) -> None:
    stepper, terms = PRIORS[prior]
    data = f"paths.data_root={tmp_path / 'data'}"
    _run(
        "train.py",
        "experiment=toy_concat",
        f"method/prior={prior}",
        f"hydra.run.dir={tmp_path / 'train'}",
        data,
    )
    ckpt = tmp_path / "train/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert sorted(state["state_dict"]) == ["trainable.adaptor.bias", "trainable.adaptor.weight"]  # no prior
    assert any(v.abs().sum() > 0 for v in state["state_dict"].values())  # zero-init, then trained
    logged = (tmp_path / "train").rglob("metrics.csv")
    header = next(logged).read_text().splitlines()[0].split(",")
    assert terms <= set(header) and "train/loss" in header  # every named term of the objective is logged

    _run(
        "eval.py",
        "benchmark=samples",
        "benchmark.metrics=[psnr,ssim]",
        "method=toy_concat",
        f"method/prior={prior}",
        f"method.sampling.scheduler={stepper}",
        f"ckpt_path={ckpt}",
        f"paths.log_dir={tmp_path / 'logs'}",
        data,
        "num_workers=0",
        "progress=false",
    )
    (results,) = (tmp_path / "logs").rglob("results.json")
    doc = json.loads(results.read_text())
    assert doc["method"] == "toy_concat" and doc["num_scored"] == 8
    assert all(math.isfinite(doc["aggregate"][m]) for m in ("psnr", "ssim"))
    assert doc["settings"]["method"]["_target_"] == "toy_method.LRConcatAdaptor"
    # a tiny random prior's images are noise by design: the table says so next to the column
    assert doc["note"].startswith("tiny random prior")
    table = (results.parent / "table.md").read_text()
    assert "toy_concat‡" in table and "‡ toy_concat: tiny random prior" in table
