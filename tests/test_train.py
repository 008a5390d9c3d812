"""train.py end to end on CPU: checkpoint, resume (step counter and degradation generator), CLI errors, NaN stop.

The training runs go through ``train.py`` in a subprocess, exactly as a user starts them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from restore.data.degradation import RealESRGANDegradation
from restore.data.hr_datasets import EmbeddedPhotos
from restore.methods.feedforward import GENERATOR_CKPT_KEY, FeedForwardSR
from restore.run import ConfigError, metric_value, resolve_ckpt_path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}

# Identical batches at every step (one whole 512x512 photo, no flip): the number of random draws of the
# degradation depends on the pixels (Poisson noise), so comparing generator states between an uninterrupted
# and a resumed run needs the same images in both.
TINY = [
    "experiment=realesrnet_tiny",
    "data.train.names=[astronaut]",
    "data.train.crop_size=512",
    "data.train.hflip=false",
    "data.val=null",
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.log_every_n_steps=1",
]


def _cli(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    _ok(_run(_cli("train.py", *TINY, "trainer.max_steps=3", f"hydra.run.dir={run_dir}")))
    return run_dir


def test_train_writes_checkpoint(three_step_run: Path) -> None:
    ckpt = _load(three_step_run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert (
        "net.conv_first.weight" in ckpt["state_dict"] and "net.body.0.rdb1.conv1.weight" in ckpt["state_dict"]
    )
    assert not any(k.startswith("degradation") for k in ckpt["state_dict"]), "degradation must not be saved"
    saved = ckpt[GENERATOR_CKPT_KEY]
    assert saved["device_type"] == "cpu" and len(saved["states"]) == 1 and saved["seed"] == 12345
    metrics = (three_step_run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics
    assert (three_step_run / ".hydra" / "config.yaml").is_file()


def test_resume_continues_step_counter_and_degradation_generator(
    three_step_run: Path, tmp_path: Path
) -> None:
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(three_step_run, resumed_dir)
    at_step3 = _load(resumed_dir / "checkpoints" / "last.ckpt")[GENERATOR_CKPT_KEY]["states"][0]
    # auto_resume=false: `ckpt_path=last` alone must find <run dir>/checkpoints/last.ckpt
    resume = _cli(
        "train.py",
        *TINY,
        "trainer.max_steps=5",
        "ckpt_path=last",
        "auto_resume=false",
        "resume_with_changed_config=true",  # max_steps 3 -> 5 is a changed config: said on purpose
        f"hydra.run.dir={resumed_dir}",
    )
    reference = _cli("train.py", *TINY, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'uninterrupted'}")
    procs = [
        subprocess.Popen(a, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for a in (resume, reference)
    ]  # both at once: the machine has 2 cores
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"

    resumed = _load(resumed_dir / "checkpoints" / "last.ckpt")
    uninterrupted = _load(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"] == 5
    resumed_state = resumed[GENERATOR_CKPT_KEY]["states"][0]
    assert not torch.equal(resumed_state, at_step3), "the generator must have advanced after resuming"
    # restored, not re-seeded: the resumed run continued the very same random stream
    assert torch.equal(resumed_state, uninterrupted[GENERATOR_CKPT_KEY]["states"][0])
    history = {p.name: yaml.safe_load(p.read_text()) for p in (resumed_dir / "config_history").glob("?.yaml")}
    assert {name: h["trainer"]["max_steps"] for name, h in history.items()} == {"0.yaml": 3, "1.yaml": 5}


def test_a_changed_config_or_a_live_run_in_the_same_directory_is_refused(
    three_step_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "again"
    shutil.copytree(three_step_run, run_dir)
    proc = _run(_cli("train.py", *TINY, "trainer.max_steps=5", f"hydra.run.dir={run_dir}"))
    assert proc.returncode != 0
    assert "trainer.max_steps: 3 -> 5" in proc.stderr and "resume_with_changed_config=true" in proc.stderr
    # Hydra rewrote the record before train.py ran: it is put back, and the checkpoint is untouched
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["max_steps"] == 3
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-03T10:00:00"}
    (run_dir / ".restore.lock").write_text(json.dumps(holder))  # this test process: alive
    proc = _run(_cli("train.py", *TINY, "trainer.max_steps=3", f"hydra.run.dir={run_dir}"))
    assert (
        proc.returncode != 0 and f"in use by pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    )
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_a_mistyped_trainer_argument_names_its_key() -> None:
    proc = _run(_cli("train.py", *TINY, "trainer.max_steps=abc", "train=false"))
    assert proc.returncode != 0 and "trainer.max_steps='abc' (str) is not a valid value" in proc.stderr


def test_ckpt_path_resolution(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    with pytest.raises(
        FileNotFoundError, match=r"ckpt_path=last but .*last\.ckpt' does not exist.*hydra\.run\.dir"
    ):
        resolve_ckpt_path("last", ckpt_dir)
    with pytest.raises(FileNotFoundError, match="ckpt_path=nope.ckpt does not exist"):
        resolve_ckpt_path("nope.ckpt", ckpt_dir)
    assert resolve_ckpt_path(None, ckpt_dir) is None
    ckpt_dir.mkdir()
    last = ckpt_dir / "last.ckpt"
    last.touch()
    other = tmp_path / "init.ckpt"
    other.touch()
    assert resolve_ckpt_path("last", ckpt_dir, auto_resume=False) == str(last)
    assert resolve_ckpt_path(None, ckpt_dir) == str(last)  # requeued job: continue
    assert resolve_ckpt_path(str(other), ckpt_dir) == str(last)  # progress beats the initial checkpoint
    assert resolve_ckpt_path(str(other), ckpt_dir, auto_resume=False) == str(other)
    assert resolve_ckpt_path(None, ckpt_dir, auto_resume=False) is None


def test_sweep_objective() -> None:
    assert metric_value({"val/psnr": 21.5}, "val/psnr") == 21.5
    assert metric_value({"val/psnr": 21.5}, None) is None
    with pytest.raises(ConfigError, match=r"optimized_metric='val/ssim' was not logged.*val/psnr"):
        metric_value({"val/psnr": 21.5}, "val/ssim")


def test_cfg_job_prints_composed_config() -> None:
    proc = _ok(_run(_cli("train.py", "--cfg", "job", "experiment=realesrnet_tiny")))
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["task_name"] == "realesrnet_tiny"
    assert cfg["method"]["net"]["num_feat"] == 8 and cfg["method"]["optimizer"]["lr"] == 2e-4
    assert cfg["degradation"]["_target_"] == "restore.data.degradation.RealESRGANDegradation"
    assert "hydra" not in cfg


def test_help_lists_config_groups() -> None:
    proc = _ok(_run(_cli("train.py", "--help")))
    for group in ("experiment", "method", "method/prior", "method/tagger"):  # nested groups are listed too
        names = sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))
        assert "realesrnet_tiny" in names or group != "experiment"
        assert f"{group}: {', '.join(names)}" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.nope=1", "Could not override 'trainer.nope'"),
        ("method=doesnotexist", "Could not find 'method/doesnotexist'"),
    ],
)
def test_bad_override_fails_with_hydra_message(override: str, message: str) -> None:
    proc = _run(_cli("train.py", override))
    assert proc.returncode != 0
    assert message in proc.stderr


class _NaNNet(nn.Module):
    """Upsamples like an SR net but outputs NaN: the loss is non-finite at the very first step."""

    scale = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=self.scale) * float("nan")


def _nan_fit(model: FeedForwardSR, **trainer_kwargs) -> L.Trainer:
    loader = DataLoader(EmbeddedPhotos(names=["astronaut"], crop_size=128, repeats=4), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def _nan_model(skip: bool) -> FeedForwardSR:
    return FeedForwardSR(
        _NaNNet(),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        degradation=RealESRGANDegradation.from_preset("realesrgan"),
        skip_nonfinite_loss=skip,
    )


def test_nan_loss_stops_training_naming_the_step() -> None:
    match = r"non-finite training loss \(nan\) at global step 0 .*skip_nonfinite_loss=true"
    with pytest.raises(FloatingPointError, match=match):
        _nan_fit(_nan_model(skip=False), max_steps=3)


def test_nan_loss_can_be_skipped() -> None:
    model = _nan_model(skip=True)
    before = model.net.conv.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"at global step 1 .*step skipped"):
        trainer = _nan_fit(model, max_steps=2)
    assert trainer.global_step == 2  # the loop goes on (and max_steps still ends it) ...
    assert torch.equal(model.net.conv.weight, before)  # ... but no update was applied
