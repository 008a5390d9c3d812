"""Two-process CPU DDP (trainer=ddp_sim): per-rank degradation generators, gathered into one checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from restore.methods.feedforward import GENERATOR_CKPT_KEY

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_sim_saves_one_generator_state_per_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "experiment=realesrnet_tiny",
        "trainer=ddp_sim",
        "trainer.max_steps=2",
        "data.val=null",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    states = ckpt[GENERATOR_CKPT_KEY]["states"]
    assert len(states) == 2
    assert not torch.equal(states[0], states[1]), "each rank must draw its own degradations"
