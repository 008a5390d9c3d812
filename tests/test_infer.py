"""``python -m restore.infer`` with the tiny RealESRNet (configs/method/realesrnet_tiny.yaml): outputs, skipped
files, resume without rewriting, overwrite, refusals, the recorded config, equality with ``module.restore``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra_helpers import compose_config
from omegaconf import OmegaConf

from restore.data.image_io import read_image, to_tensor, write_image
from restore.infer import CONFIG_FILE, infer
from restore.methods.checkpoints import MethodWeightsError
from restore.methods.feedforward import FeedForwardSR
from restore.models.rrdbnet import RRDBNet
from restore.run import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}  # configs/method/realesrnet_tiny.yaml
SIZES = {"a.png": (12, 10), "b.png": (8, 16), "sub/c.png": (9, 9)}


@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> Path:
    """A train.py-style checkpoint (Lightning layout: weights under "state_dict"), as tests/test_eval.py makes."""
    torch.manual_seed(0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": FeedForwardSR(RRDBNet(**TINY)).state_dict(), "global_step": 2}, path)
    return path


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    """Two PNGs, one in a subfolder, and a truncated PNG."""
    root = tmp_path / "in"
    gen = torch.Generator().manual_seed(1)
    for name, (h, w) in SIZES.items():
        write_image(root / name, torch.rand(3, h, w, generator=gen))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _run(tmp_path: Path, *overrides: str) -> object:
    cfg = compose_config("infer", ["method=realesrnet_tiny", "progress=false", *overrides], tmp_path)
    return infer(cfg)


def _mtimes(out: Path) -> dict[str, int]:
    return {name: (out / name).stat().st_mtime_ns for name in SIZES}


def test_cli_restores_skips_and_resumes(tmp_path: Path, inputs: Path, tiny_ckpt: Path) -> None:
    out = tmp_path / "out"
    args = [f"input={inputs}", f"output={out}", f"ckpt_path={tiny_ckpt}"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "restore.infer",
            "method=realesrnet_tiny",
            *args,
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for name, (h, w) in SIZES.items():
        assert read_image(out / name).shape == (4 * h, 4 * w, 3)
    assert "restored 3, skipped 0 existing, 1 unreadable" in text
    assert "broken.png" in text and "truncated" in text
    assert (out / CONFIG_FILE).is_file() and not (out / "broken.png").exists()
    assert OmegaConf.load(out / CONFIG_FILE).ckpt_path == str(tiny_ckpt)

    # Same command again (in-process): nothing is rewritten.
    old = _mtimes(out)
    summary = _run(tmp_path, *args)
    assert summary.line() == "restored 0, skipped 3 existing, 1 unreadable"
    assert sorted(summary.existing) == sorted(out / n for n in SIZES) and _mtimes(out) == old
    assert [p.name for p in out.glob("infer_config*.yaml")] == [CONFIG_FILE]  # same config: one record

    # overwrite=true rewrites them (mtimes set to the past first, so any write shows).
    for name in SIZES:
        os.utime(out / name, ns=(10**9, 10**9))
    summary = _run(tmp_path, *args, "overwrite=true")
    assert len(summary.restored) == 3 and all(t > 10**9 for t in _mtimes(out).values())
    assert [p.name for p in out.glob("infer_config*.yaml")] == [CONFIG_FILE]  # overwrite is a run-only key


def test_output_equals_module_restore(tmp_path: Path, inputs: Path, tiny_ckpt: Path) -> None:
    out = tmp_path / "single"
    summary = _run(tmp_path, f"input={inputs / 'sub/c.png'}", f"output={out}", f"ckpt_path={tiny_ckpt}")
    assert summary.restored == [out / "c.png"]  # a single image: written under its own name
    module = FeedForwardSR(RRDBNet(**TINY))
    module.load_state_dict(torch.load(tiny_ckpt, weights_only=True)["state_dict"])
    lq = to_tensor(read_image(inputs / "sub/c.png"))
    with torch.inference_mode():
        expected = module.eval().restore(lq[None])[0].clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(
        np.rint(read_image(out / "c.png") * 255), np.rint(np.clip(expected, 0, 1) * 255).astype(np.float32)
    )


def test_a_changed_config_keeps_the_old_record(tmp_path: Path, inputs: Path, tiny_ckpt: Path) -> None:
    out = tmp_path / "out"
    args = [f"input={inputs}", f"output={out}", f"ckpt_path={tiny_ckpt}"]
    _run(tmp_path, *args)
    first = (out / CONFIG_FILE).read_text()
    _run(tmp_path, *args, "seed=7", "overwrite=true")
    records = sorted(p.name for p in out.glob("infer_config*.yaml"))
    assert len(records) == 2 and CONFIG_FILE in records
    (backup,) = [out / r for r in records if r != CONFIG_FILE]
    assert backup.read_text() == first and OmegaConf.load(out / CONFIG_FILE).seed == 7


def test_required_keys_and_refusals(tmp_path: Path, inputs: Path, tiny_ckpt: Path) -> None:
    cfg = compose_config("infer", [f"input={inputs}", f"output={tmp_path / 'o'}"], tmp_path)
    with pytest.raises(ConfigError, match=r"`method` is required .*method=<.*realesrnet_tiny"):
        infer(cfg)
    with pytest.raises(ConfigError, match="`input` is required"):
        _run(tmp_path, f"output={tmp_path / 'o'}")
    with pytest.raises(ConfigError, match="output is the input folder"):
        _run(tmp_path, f"input={inputs}", f"output={inputs}", f"ckpt_path={tiny_ckpt}")
    with pytest.raises(MethodWeightsError, match="ckpt_path="):
        _run(tmp_path, f"input={inputs}", f"output={tmp_path / 'o'}")
    write_image(inputs / "a.jpg.png", torch.rand(3, 4, 4))  # fine: its own name
    import cv2

    cv2.imwrite(str(inputs / "b.jpg"), np.zeros((4, 4, 3), np.uint8))  # clashes with b.png -> b.png
    with pytest.raises(ConfigError, match="share an output file"):
        _run(tmp_path, f"input={inputs}", f"output={tmp_path / 'o'}", f"ckpt_path={tiny_ckpt}")


def test_output_inside_input_is_not_read_back(tmp_path: Path, inputs: Path, tiny_ckpt: Path) -> None:
    out = inputs / "restored"
    args = [f"input={inputs}", f"output={out}", f"ckpt_path={tiny_ckpt}"]
    assert len(_run(tmp_path, *args).restored) == 3
    again = _run(tmp_path, *args)
    assert len(again.existing) == 3 and not again.restored and not (out / "restored").exists()


def test_smoke_run_without_weights(tmp_path: Path, inputs: Path) -> None:
    out = tmp_path / "o"
    summary = _run(tmp_path, f"input={inputs / 'a.png'}", f"output={out}", "requires_weights=false")
    assert summary.restored == [out / "a.png"] and read_image(out / "a.png").shape == (48, 40, 3)
