"""A training run directory: one live run at a time (the lock), one configuration (the record), and trainer
arguments checked by name before Lightning sees them."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from omegaconf import OmegaConf

from restore.run import ConfigError, check_trainer_arguments
from restore.run_directory import (
    CONFIG_HISTORY,
    LOCK_FILE,
    ChangedConfigError,
    RunDirectoryBusy,
    RunDirectoryLock,
    check_config_record,
    config_changes,
)


def _write_lock(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_holder_on_this_host_refuses_a_second_run_naming_pid_and_host(tmp_path) -> None:
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), started="2026-12-03T10:00:00")
    with pytest.raises(
        RunDirectoryBusy, match=rf"in use by pid {os.getppid()} on host {socket.gethostname()}"
    ):
        RunDirectoryLock(tmp_path).acquire()
    _write_lock(tmp_path, pid=1, host="gpu-node-17")  # another machine: its liveness cannot be checked here
    with pytest.raises(RunDirectoryBusy, match="on host gpu-node-17.*delete '.*restore.lock'"):
        RunDirectoryLock(tmp_path).acquire()


@pytest.mark.parametrize("case", ["dead pid", "requeued slurm job", "torn lock file"])
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch, case: str, caplog) -> None:
    if case == "dead pid":
        _write_lock(tmp_path, pid=_dead_pid(), host=socket.gethostname())
    elif case == "requeued slurm job":
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _write_lock(tmp_path, pid=os.getppid(), host="another-node", slurm_job_id="4242")
    else:
        (tmp_path / LOCK_FILE).write_text('{"pid": 12')
    with RunDirectoryLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not (tmp_path / LOCK_FILE).exists()
    assert "taking over the lock" in caplog.text


def test_release_leaves_a_lock_that_another_process_took(tmp_path) -> None:
    lock = RunDirectoryLock(tmp_path)
    lock.acquire()
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname())
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


def test_a_changed_config_is_refused_unless_asked_for_and_then_both_are_kept(tmp_path) -> None:
    first = OmegaConf.create({"trainer": {"max_steps": 3, "devices": 1}, "ckpt_path": None, "seed": 1})
    check_config_record(first, tmp_path)
    check_config_record(OmegaConf.create({**OmegaConf.to_container(first), "ckpt_path": "last"}), tmp_path)
    changed = OmegaConf.create({"trainer": {"max_steps": 5, "devices": 1}, "ckpt_path": None, "seed": 1})
    with pytest.raises(
        ChangedConfigError, match=r"changes trainer\.max_steps: 3 -> 5.*resume_with_changed_config"
    ):
        check_config_record(changed, tmp_path)
    check_config_record(changed, tmp_path, allow_change=True)
    history = sorted(p.name for p in (tmp_path / CONFIG_HISTORY).glob("*.yaml"))
    assert history == ["0.yaml", "1.yaml"]
    assert OmegaConf.load(tmp_path / CONFIG_HISTORY / "0.yaml").trainer.max_steps == 3
    assert OmegaConf.load(tmp_path / CONFIG_HISTORY / "1.yaml").trainer.max_steps == 5
    check_config_record(changed, tmp_path)  # compared with the latest entry from now on
    assert config_changes({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}, "c": 1}) == [
        "a.b: [1, 2] -> [1, 3]",
        "c: '<absent>' -> 1",
    ]


def test_trainer_arguments_are_type_checked_by_key() -> None:
    base = {"_target_": "lightning.pytorch.trainer.Trainer", "max_steps": 10, "precision": "bf16-mixed"}
    check_trainer_arguments(OmegaConf.create({**base, "devices": "auto", "val_check_interval": 0.5}))
    check_trainer_arguments(OmegaConf.create({**base, "default_root_dir": "${oc.env:HOME}"}))
    with pytest.raises(
        ConfigError, match=r"trainer\.max_steps='abc' \(str\) is not a valid value.*max_steps: int"
    ):
        check_trainer_arguments(OmegaConf.create({**base, "max_steps": "abc"}))
    with pytest.raises(ConfigError, match=r"trainer\.gradient_clip_val='x'"):
        check_trainer_arguments(OmegaConf.create({**base, "gradient_clip_val": "x"}))
