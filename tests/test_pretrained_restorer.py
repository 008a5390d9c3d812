"""`eval.py method=spandrel`: released GAN / regression restorers scored from their files.

The networks are built with random weights and saved in the layouts their releases use (BasicSR's ``params_ema``
for Real-ESRGAN / Real-ESRNet / SwinIR-GAN, the original ESRGAN key names for BSRGAN), so spandrel's detection
and loading path is the one a downloaded file takes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from restore.methods.pretrained_restorer import PretrainedRestorer
from restore.models.reference import ReferenceWeightsError
from restore.models.rrdbnet import RRDBNet

REPO = Path(__file__).resolve().parents[1]


def _rrdb(scale: int = 4, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    # num_grow_ch 32: spandrel's RRDBNet detection assumes ESRGAN's growth channels.
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=8, num_block=1, num_grow_ch=32).eval()


def _esrgan_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR's RRDBNet keys -> the original ESRGAN / BSRGAN names (RRDB_trunk, trunk_conv, upconv, HRconv)."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2.", key)
        for ours, theirs in (("conv_body", "trunk_conv"), ("conv_up1", "upconv1"), ("conv_up2", "upconv2")):
            key = key.replace(ours, theirs)
        renamed[key.replace("conv_hr", "HRconv")] = value
    return renamed


def _swinir_gan():
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(1)
    # 003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN: upsampler nearest+conv, x4 (here 12 wide, one stage)
    return SwinIR(
        img_size=8, patch_size=1, in_chans=3, embed_dim=12, depths=[1], num_heads=[2], window_size=2,
        mlp_ratio=2, upscale=4, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
    ).eval()  # fmt: skip


@pytest.mark.parametrize(
    ("name", "architecture"),
    [("RealESRGAN_x4plus.pth", "ESRGAN"), ("BSRGAN.pth", "ESRGAN"), ("SwinIR_x4_GAN.pth", "SwinIR")],
)
def test_released_layouts_are_detected_and_run_exactly(tmp_path, name, architecture) -> None:
    if architecture == "SwinIR":
        net = _swinir_gan()
        torch.save({"params_ema": net.state_dict()}, tmp_path / name)
    else:
        net = _rrdb()
        state = net.state_dict()
        torch.save(_esrgan_names(state) if name == "BSRGAN.pth" else {"params_ema": state}, tmp_path / name)
    method = PretrainedRestorer(tmp_path / name, scale=4)
    assert (method.restorer.architecture, method.restorer.scale) == (architecture, 4)
    assert method.evaluation_note is None
    lq = torch.rand(2, 3, 8, 12)
    with torch.no_grad():
        expected = net(lq).clamp(0, 1)
    sr = method.restore(lq)
    assert sr.shape == (2, 3, 32, 48)
    torch.testing.assert_close(sr, expected, rtol=0, atol=0)


def test_a_x2_network_at_x4_runs_on_the_resized_lr_and_says_so(tmp_path) -> None:
    net = _rrdb(scale=2)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "RealESRGAN_x2plus.pth")
    method = PretrainedRestorer(tmp_path / "RealESRGAN_x2plus.pth", scale=4)
    assert method.restorer.scale == 2
    assert method.evaluation_note == "ESRGAN x2 run on the LR resized by 2 (bicubic) for x4"
    assert method.restore(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


def test_a_missing_manifest_file_names_its_url_and_the_fetch_command(tmp_path) -> None:
    with pytest.raises(ReferenceWeightsError) as info:
        PretrainedRestorer(tmp_path / "RealESRGAN_x4plus.pth")
    message = str(info.value)
    assert "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth" in message
    assert "python -m restore.weights fetch RealESRGAN_x4plus.pth" in message
    with pytest.raises(ReferenceWeightsError, match="place the file there"):
        PretrainedRestorer(tmp_path / "my_own_net.pth")
    with pytest.raises(ValueError, match="positive int"):
        PretrainedRestorer(tmp_path / "x.pth", scale=0)


def test_eval_scores_a_released_file_under_its_own_name(tmp_path) -> None:
    """eval.py method=spandrel end to end on the embedded photos: the column is named after the file and the
    scores are those of the network's own forward (PSNR recomputed from the written images)."""
    torch.save({"params_ema": _rrdb().state_dict()}, tmp_path / "RealESRGAN_x4plus.pth")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    args = [
        "benchmark=samples", "method=spandrel", f"method.weights={tmp_path / 'RealESRGAN_x4plus.pth'}",
        "benchmark.metrics=[psnr]", "num_workers=0", "progress=false", "trainer=cpu",
        f"paths.data_root={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "eval.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = sorted((tmp_path / "logs" / "eval" / "samples").glob("*"))
    assert run.name.startswith("RealESRGAN_x4plus-")
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "RealESRGAN_x4plus" and results["num_scored"] == 8
    assert "RealESRGAN_x4plus" in (run / "table.md").read_text()
