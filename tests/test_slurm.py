"""The SLURM path for real: `train.py -m hydra/launcher=slurm` on a single-node SLURM started by the test
(tests/slurm_cluster.py; root and Debian's slurm-wlm + munge, else these tests skip saying why).

A two-job sweep of the tiny SeeSR through hydra-submitit-launcher, one job requeued with `scontrol requeue` after
its first checkpoint, both evaluated and tabulated; a failing job's error and log path in the launcher's output;
and, without SLURM, the launcher config composed and instantiated as Hydra does before any job runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError
from slurm_cluster import PARTITION, ClusterUnavailable, SlurmCluster, unavailable_reason

from restore import CONFIG_DIR
from restore.cluster import job_environment, prepare_job_environment
from restore.multirun import FailedJobLogPaths

# Under xdist each worker that runs a test of this module starts its own cluster (own ports and folder, ~1 s), so
# the tests need no grouping; everything that needs the sweep is one test, so the sweep runs once.
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# a CPU-only cluster: no GPUs, one CPU and 1 GB per job, so the two jobs of a sweep run side by side
CPU_JOBS = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=15",
]
QUIET = ["extras.print_config=false", "callbacks.progress_bar=null"]
MAX_STEPS = 3


# --- the launcher config, composed as Hydra does (no SLURM needed) -------------------------------------------
def _compose_for_multirun(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


def test_launcher_instantiates_before_any_job_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`train.py -m hydra/launcher=slurm` with no other override: Hydra instantiates the launcher before any job
    runs, when ${hydra:runtime.cwd} (paths.root_dir: the sweep dir, the submitit folder) only resolves thanks to
    restore.multirun's callback (issue 16: "HydraConfig was not set"; PROJECT_ROOT set or not)."""
    monkeypatch.delenv("RESTORE_WEIGHTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    hydra_config = HydraConfig.instance()
    previous, hydra_config.cfg = hydra_config.cfg, None  # as in the submitting process
    try:
        for project_root in (None, str(tmp_path)):
            if project_root:
                monkeypatch.setenv("PROJECT_ROOT", project_root)
            else:
                monkeypatch.delenv("PROJECT_ROOT", raising=False)
            cfg = _compose_for_multirun(["hydra/launcher=slurm", "experiment=seesr_tiny"])
            with pytest.raises(InterpolationResolutionError, match="HydraConfig was not set"):
                Plugins.instance()._instantiate(cfg.hydra.launcher)  # what Hydra 1.3 alone would do
            callbacks = Callbacks(cfg)  # what train.py -m does: callbacks, then the sweeper and its launcher
            callbacks.on_multirun_start(config=cfg, config_name="train")
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=HydraContext(config_loader=None, callbacks=callbacks),
                task_function=lambda _: None,
                config=cfg,
            )
            callbacks.on_multirun_end(config=cfg, config_name="train")
            assert HydraConfig.instance().cfg is None
    finally:
        hydra_config.cfg = previous
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    # what cluster users set, with the documented defaults (configs/hydra/launcher/slurm.yaml)
    expected = {
        "partition": None,
        "account": None,
        "qos": None,
        "timeout_min": 2880,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 1,
        "gpus_per_task": None,
        "cpus_per_task": 8,
        "mem_gb": 200,
        "signal_delay_s": 120,
        "max_num_timeout": 3,
        "array_parallelism": 256,
        "setup": [],
    }
    assert {k: params[k] for k in expected} == expected
    folder = Path(params["submitit_folder"])
    assert folder.parents[2] == tmp_path / "logs/seesr_tiny/multiruns" and folder.parts[-2:] == (
        ".submitit",
        "%j",
    )


def test_trainer_devices_set_tasks_and_gpus() -> None:
    cfg = _compose_for_multirun(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    )
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_job_environment_only_inside_slurm_and_never_over_a_set_variable(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"weights_dir": str(tmp_path / "w")}})
    outside: dict[str, str] = {}
    assert prepare_job_environment(cfg, outside) == {} and outside == {}
    inside = {"SLURM_JOB_ID": "42", "HF_HUB_OFFLINE": "0"}
    added = prepare_job_environment(cfg, inside)
    assert added == {
        "WANDB_MODE": "offline",
        "TORCH_HOME": str(tmp_path / "w/torch"),
        "HF_HOME": str(tmp_path / "w/huggingface"),
    }
    assert inside == {"SLURM_JOB_ID": "42", "HF_HUB_OFFLINE": "0", **added}  # the user's choice stays
    assert job_environment(tmp_path)["HF_HUB_OFFLINE"] == "1"


def test_failed_job_note_only_inside_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    """restore.multirun.FailedJobLogPaths leaves a local multirun's errors as they are (the SLURM case is
    test_failed_job_shows_its_error_and_log_path)."""
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    error = FileNotFoundError("ckpt_path=x does not exist")
    job = JobReturn(status=JobStatus.FAILED, _return_value=error)
    FailedJobLogPaths().on_job_end(config=OmegaConf.create(), job_return=job)
    assert not getattr(error, "__notes__", None)


# --- a real single-node SLURM ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except ClusterUnavailable as err:
        slurm.stop()
        pytest.skip(f"SLURM test cluster did not start: {err}")
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def samples_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from restore.data.testsets import prepare_samples

    root = tmp_path_factory.mktemp("data")
    prepare_samples(root / "benchmarks/samples", progress=False)
    return root


def _job_env(cluster: SlurmCluster) -> dict[str, str]:
    # sbatch passes this environment on to the jobs: the test callback's module, one thread per one-CPU job;
    # the caches restore/cluster.py points under the weights folder are left for it to set
    env = {k: v for k, v in cluster.env.items() if k not in ("TORCH_HOME", "HF_HOME")}
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }


def _launch(cluster: SlurmCluster, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "-m", *CPU_JOBS, *QUIET, *args],
        cwd=REPO,
        env=_job_env(cluster),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(condition, what: str, launcher: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if launcher.poll() is not None:
            pytest.fail(
                f"the launcher exited ({launcher.returncode}) before {what}:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _requeued_sweep(cluster: SlurmCluster, samples_root: Path, out: Path) -> dict:
    """`train.py -m hydra/launcher=slurm experiment=seesr_tiny method.conditioning_scale=0.5,1.0`, evaluated on
    the samples benchmark; job 0 is requeued with `scontrol requeue` once it has checkpointed step 1, job 1 runs
    uninterrupted (both wait at step 1 until the test lets them go on)."""
    sweep_dir, log = out / "multirun", out / "launcher.log"
    args = [
        "experiment=seesr_tiny",
        "method.conditioning_scale=0.5,1.0",
        f"trainer.max_steps={MAX_STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "+callbacks.pause._target_=slurm_cluster.pause_until_released",
        "method.sampling.num_steps=2",
        "evaluate.benchmark=samples",
        "evaluate.metrics=[psnr]",
        "evaluate.num_workers=0",
        "evaluate.progress=false",
        "evaluate.report.enabled=false",
        f"paths.data_root={samples_root}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    launcher = _launch(cluster, args, log)
    try:
        paused = [sweep_dir / str(job) / "paused" for job in (0, 1)]
        _wait_for(lambda: all(p.exists() for p in paused), "both jobs at step 1", launcher, log)
        assert (sweep_dir / "0/checkpoints/last.ckpt").is_file()
        array_id = next(iter(cluster.jobs())).split("_")[0]
        requeue = cluster.scontrol("requeue", f"{array_id}_0")
        assert requeue.returncode == 0, requeue.stderr
        cluster.start_now(f"{array_id}_0")
        (sweep_dir / "1/release").touch()  # job 1 goes on; job 0's first attempt is killed where it waits
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    output = log.read_text()
    assert launcher.returncode == 0, output[-4000:]
    job0 = cluster.scontrol("show", "job", f"{array_id}_0").stdout
    return {"dir": sweep_dir, "output": output, "array_id": array_id, "job0": job0}


def _last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)[
        "global_step"
    ]


def _check_results(sweep: dict) -> None:
    """Both jobs finished with their results folder; the job script carries the launcher's settings."""
    sweep_dir = sweep["dir"]
    docs = [json.loads((sweep_dir / f"{job}/eval/samples/results.json").read_text()) for job in (0, 1)]
    assert [d["method"] for d in docs] == [
        "seesr_tiny conditioning_scale=0.5",
        "seesr_tiny conditioning_scale=1.0",
    ]
    assert [d["job_num"] for d in docs] == [0, 1]
    assert all(d["num_scored"] == 8 for d in docs)
    script = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    for line in ("--array=0-1%2", f"--partition={PARTITION}", "--cpus-per-task=1", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    # accounting off: submitit says so on its polls, and still saw both jobs through (configs/hydra/launcher/
    # slurm.yaml says why)
    assert "Bypassing sacct error" in sweep["output"]


def _check_requeue(sweep: dict) -> None:
    """Job 0 ran twice, resumed from its last.ckpt and ended at the step count of job 1, which ran through."""
    sweep_dir, array_id = sweep["dir"], sweep["array_id"]
    assert "Restarts=1 " in sweep["job0"]
    assert _last_step(sweep_dir / "0") == _last_step(sweep_dir / "1") == MAX_STEPS
    logs = {
        job: next((sweep_dir / ".submitit" / f"{array_id}_{job}").glob("*_log.out")).read_text()
        for job in (0, 1)
    }
    resumed = f"resuming from '{sweep_dir / '0/checkpoints/last.ckpt'}'"
    assert resumed in logs[0] and "resuming from" not in logs[1]
    # restore/cluster.py's job environment, in both attempts; HF_HUB_OFFLINE and WANDB_MODE came set from the
    # submitting environment and were left alone
    assert logs[0].count("HF_HUB_OFFLINE=1") == 0
    weights = Path(os.environ.get("RESTORE_WEIGHTS_DIR", REPO / "weights"))
    assert logs[0].count(f"TORCH_HOME={weights / 'torch'} HF_HOME={weights / 'huggingface'}") == 2


def _check_table(sweep: dict, capsys: pytest.CaptureFixture) -> None:
    """scripts/make_table.py --ablation builds the table from the sweep folder."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    capsys.readouterr()
    assert make_table.main(["--ablation", str(sweep["dir"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| samples | PSNR ↑ |", "|:--|:-:|"]
    assert [line.split(" | ")[0] for line in lines[2:4]] == [
        "| conditioning_scale=0.5",
        "| conditioning_scale=1.0",
    ]


@pytest.mark.slow
def test_sweep_with_a_requeued_job_finishes_and_tabulates(
    cluster: SlurmCluster, samples_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = _requeued_sweep(cluster, samples_root, tmp_path)
    _check_results(sweep)
    _check_requeue(sweep)
    _check_table(sweep, capsys)


@pytest.mark.slow
def test_failed_job_shows_its_error_and_log_path(cluster: SlurmCluster, tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    log = tmp_path / "launcher.log"
    launcher = _launch(
        cluster,
        ["experiment=realesrnet_tiny", f"ckpt_path={missing}", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        log,
    )
    launcher.wait(timeout=180)
    output = log.read_text()
    assert launcher.returncode != 0
    error = f"ckpt_path={missing} does not exist"
    assert error in output
    err_logs = list((tmp_path / "multirun/.submitit").glob("*/*_0_log.err"))
    assert len(err_logs) == 1 and str(err_logs[0]) in output
    assert error in err_logs[0].read_text()
