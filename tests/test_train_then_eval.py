"""train.py evaluate.benchmark=...: the trained module is scored right after fitting, into <run>/eval/<benchmark>/,
with eval.py's numbers; a multirun gives one folder per job, labelled by its swept overrides, and
``make_table.py --ablation`` turns the sweep into one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra_helpers import compose_config

from restore.run import evaluate, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
METRICS = "[psnr,ssim]"
TRAIN = [
    "experiment=realesrnet_tiny",
    "data.val=null",
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "evaluate.benchmark=samples",
    f"evaluate.metrics={METRICS}",
    "evaluate.num_workers=0",
    "evaluate.progress=false",
]


@pytest.fixture(scope="module")
def samples_root(tmp_path_factory) -> Path:
    from restore.data.testsets import prepare_samples

    root = tmp_path_factory.mktemp("data")
    prepare_samples(root / "benchmarks/samples", progress=False)
    return root


def _results(path: Path) -> dict:
    return json.loads(path.read_text())


def test_train_then_evaluate_equals_eval_py_on_the_checkpoint(samples_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", [*TRAIN, "trainer.max_steps=2"], tmp_path / "train")
    cfg.paths.data_root = str(samples_root)
    metrics = train(cfg)
    run = tmp_path / "train/run"
    after = _results(run / "eval/samples/results.json")
    assert after["method"] == "realesrnet_tiny"  # not a multirun: the task name alone
    assert after["overrides"] == {} and after["job_num"] is None
    assert after["num_scored"] == 8 and list(after["metrics"]) == ["psnr", "ssim"]
    assert {"results.csv", "table.md", "report.html"} <= {p.name for p in (run / "eval/samples").iterdir()}
    assert metrics["eval/samples/psnr"] == after["aggregate"]["psnr"]  # what a sweeper can optimise

    # python eval.py benchmark=samples method=realesrnet_tiny ckpt_path=<run>/checkpoints/last.ckpt
    eval_cfg = compose_config(
        "eval",
        [
            "benchmark=samples",
            "method=realesrnet_tiny",
            f"ckpt_path={run / 'checkpoints/last.ckpt'}",
            f"benchmark.metrics={METRICS}",
            "num_workers=0",
            "progress=false",
            "report.enabled=false",
        ],
        tmp_path / "eval",
    )
    eval_cfg.paths.data_root = str(samples_root)
    reloaded = evaluate(eval_cfg)
    assert [r["name"] for r in reloaded["per_image"]] == [r["name"] for r in after["per_image"]]
    assert [r["scores"] for r in reloaded["per_image"]] == [r["scores"] for r in after["per_image"]]
    assert reloaded["aggregate"] == after["aggregate"]

    # the run resumed and trained one step further: its evaluation is of the new weights, not the old ones
    key = (run / "eval/samples/run_key.txt").read_text()
    cfg.trainer.max_steps = 3
    cfg.resume_with_changed_config = True  # training further is a changed config: said on purpose
    train(cfg)
    assert (run / "eval/samples/run_key.txt").read_text() != key
    assert _results(run / "eval/samples/results.json")["aggregate"] != after["aggregate"]


@pytest.fixture(scope="module")
def sweep(samples_root: Path, tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    args = [*TRAIN, "trainer.max_steps=1", "method.optimizer.lr=1e-3,2e-3", f"paths.data_root={samples_root}"]
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return sweep_dir


def test_multirun_writes_one_labelled_result_per_job(sweep: Path) -> None:
    docs = [_results(sweep / str(job) / "eval/samples/results.json") for job in (0, 1)]
    assert [d["method"] for d in docs] == ["realesrnet_tiny lr=0.001", "realesrnet_tiny lr=0.002"]
    assert [d["overrides"] for d in docs] == [
        {"method.optimizer.lr": "0.001"},
        {"method.optimizer.lr": "0.002"},
    ]
    assert [d["job_num"] for d in docs] == [0, 1]
    assert docs[0]["settings"]["config_hash"] != docs[1]["settings"]["config_hash"]  # other weights


def test_make_table_ablation_on_the_sweep_dir(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert make_table.main(["--ablation", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| samples | PSNR ↑ | SSIM ↑ |", "|:--|:-:|:-:|"]
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| lr=0.001", "| lr=0.002"]
    cells = [c for line in lines[2:] for c in line.strip("| ").split(" | ")[1:]]
    assert len(cells) == 4 and all(c.startswith(("**", "<u>")) for c in cells)  # best or second everywhere


@pytest.mark.slow
def test_ddp_training_then_rank0_evaluation_does_not_hang(samples_root: Path, tmp_path: Path) -> None:
    """Lightning re-runs train.py once per rank (DDP, 2 CPU processes): after fit the process group is still
    up; rank 0 evaluates alone and must neither wait for the other rank nor shard the images with it."""
    args = [*TRAIN, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2"]
    proc = subprocess.run(
        [sys.executable, "train.py", *args, f"paths.data_root={samples_root}", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    results = _results(tmp_path / "eval/samples/results.json")
    assert results["num_scored"] == 8
    assert [p.name for p in (tmp_path / "eval/samples/scores").iterdir()] == ["scores.rank0.jsonl"]
