"""scripts/memory_plan.py: a plan prints for every experiment (meta-device builds), and its bytes are the
hand-computed ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra_helpers import compose_config, options
from torch import nn

from restore import CONFIG_DIR
from restore.methods.memory_plan import optimizer_state_bytes, plan_parts

SCRIPT = CONFIG_DIR.parent / "scripts" / "memory_plan.py"


def _plan_text():
    spec = importlib.util.spec_from_file_location("memory_plan_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plan_text


@pytest.mark.slow  # 18 experiments, full-size structures on the meta device: ~1 min on the 2-core CPU
@pytest.mark.parametrize("experiment", options("experiment"))
def test_plan_prints_for_every_experiment(tmp_path: Path, experiment: str) -> None:
    cfg = compose_config("memory_plan", [f"experiment={experiment}"], tmp_path, hydra_cfg=True)
    text = _plan_text()(cfg)
    assert f"experiment={experiment}" in text and "total" in text
    assert text.count(" GB GPU: ") == 3
    assert any(" trainable " in line for line in text.splitlines()[2:])


def test_seesr_controlnet_bytes_equal_params_times_4_and_adamw_twice_that(tmp_path: Path) -> None:
    from restore.models.seesr import build_seesr_unet, seesr_controlnet_from_unet

    cfg = compose_config(
        "memory_plan",
        ["experiment=seesr", "trainer.precision=bf16-mixed", "method.frozen_dtype=bf16"],
        tmp_path,
        hydra_cfg=True,
    )
    text = _plan_text()(cfg)
    controlnet = sum(
        p.numel() for p in seesr_controlnet_from_unet(build_seesr_unet(device="meta")).parameters()
    )
    assert controlnet == 489_031_440  # README: the ControlNet is 489.0M
    row = next(line for line in text.splitlines() if line.startswith("trainable.controlnet"))
    gb = [float(x) for x in row.split()[-4:]]
    # fp32 master weights 4 B, fp32 grads 4 B, AdamW's two fp32 moments 8 B per parameter
    assert gb == pytest.approx([round(controlnet * b / 1e9, 2) for b in (4, 4, 8, 16)], abs=0.006)
    vae = next(line for line in text.splitlines() if line.startswith("prior.vae"))
    assert "bfloat16" in vae and float(vae.split()[-4]) == pytest.approx(83_653_863 * 2 / 1e9, abs=0.006)


def test_8bit_adamw_state_is_two_bytes_per_parameter_plus_block_scales() -> None:
    big, small = (
        nn.Parameter(torch.empty(512, 1024, device="meta")),
        nn.Parameter(torch.empty(100, device="meta")),
    )
    n = 512 * 1024
    # two uint8 moments + an fp32 absmax per 256-element block for each + two 256-entry fp32 maps; the small
    # tensor (< 4096 elements) keeps two fp32 moments
    expected = 2 * n + 2 * (n // 256) * 4 + 2 * 256 * 4 + 2 * 100 * 4
    assert optimizer_state_bytes("bitsandbytes.optim.AdamW8bit", [big, small]) == expected
    assert optimizer_state_bytes("torch.optim.AdamW", [big, small]) == 8 * (n + 100)
    with pytest.raises(ValueError, match="method.optimizer._target_"):
        optimizer_state_bytes("torch.optim.SGD", [big])


def test_half_true_precision_stores_trainables_in_half() -> None:
    net = nn.ModuleDict({"net": nn.Linear(1000, 1000)})  # 1,001,000 parameters
    (part,) = plan_parts(net, "bf16-true", "torch.optim.AdamW")
    assert (part.weight_bytes, part.grad_bytes, part.optimizer_bytes) == (2_002_000, 2_002_000, 4_004_000)
    (part,) = plan_parts(net, "32-true", "torch.optim.AdamW")
    assert (part.weight_bytes, part.grad_bytes, part.optimizer_bytes) == (4_004_000, 4_004_000, 8_008_000)
