"""The runner's guarantees: a killed evaluation resumes without recomputing what is stored, and two DDP
processes (CPU, gloo) give exactly the single-process results, each image scored once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra_helpers import compose_config

from restore.metrics import MetricSuite
from restore.run import evaluate

FAST = [
    "benchmark.metrics=[psnr,ssim]",
    "num_workers=0",
    "progress=false",
    "batch_size=2",
    "report.enabled=false",
]


@pytest.fixture(scope="module")
def samples_root(tmp_path_factory) -> Path:
    from restore.data.testsets import prepare_samples

    root = tmp_path_factory.mktemp("data")
    prepare_samples(root / "benchmarks/samples", progress=False)
    return root


def _cfg(tmp_path: Path, samples_root: Path, extra: list[str]):
    cfg = compose_config("eval", ["method=bicubic", *FAST, *extra], tmp_path)
    cfg.paths.data_root = str(samples_root)
    return cfg


def _score_lines(run: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted((run / "scores").glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_without_recomputing(samples_root: Path, tmp_path: Path, monkeypatch) -> None:
    reference = evaluate(_cfg(tmp_path / "clean", samples_root, ["trainer=cpu"]))

    calls = {"n": 0}
    real_score = MetricSuite.score

    def dies_on_third_batch(self, sr, gt):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed("simulated kill")
        return real_score(self, sr, gt)

    monkeypatch.setattr(MetricSuite, "score", dies_on_third_batch)
    with pytest.raises(Killed):
        evaluate(_cfg(tmp_path / "killed", samples_root, ["trainer=cpu"]))
    run = tmp_path / "killed/run"
    assert len(_score_lines(run)) == 4  # two batches of two were stored before the kill
    assert not (run / "results.json").exists()

    def counting(self, sr, gt):
        calls["resumed"] = calls.get("resumed", 0) + sr.shape[0]
        return real_score(self, sr, gt)

    monkeypatch.setattr(MetricSuite, "score", counting)
    resumed = evaluate(_cfg(tmp_path / "killed", samples_root, ["trainer=cpu"]))
    assert calls["resumed"] == 4  # only the 4 images not stored yet
    assert len(_score_lines(run)) == 8
    assert [r["scores"] for r in resumed["per_image"]] == [r["scores"] for r in reference["per_image"]]
    assert resumed["aggregate"] == reference["aggregate"]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(samples_root: Path, tmp_path: Path, monkeypatch) -> None:
    # FID (set-level: Inception features gathered from both ranks) with random weights in a private cache
    from restore.weights.random_init import materialize_random_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # inherited by the spawned ranks
    materialize_random_weights(["fid"])
    with_fid = ["benchmark.metrics=[psnr,ssim,fid]"]
    single = evaluate(_cfg(tmp_path / "single", samples_root, ["trainer=cpu", *with_fid]))
    ddp = evaluate(_cfg(tmp_path / "ddp", samples_root, ["trainer=ddp_sim", *with_fid]))
    assert set(ddp["aggregate"]) == {"psnr", "ssim", "fid"} and ddp["aggregate"]["fid"] > 0
    assert [r["name"] for r in ddp["per_image"]] == [r["name"] for r in single["per_image"]]
    assert [r["scores"] for r in ddp["per_image"]] == [r["scores"] for r in single["per_image"]]
    assert {k: v for k, v in ddp["aggregate"].items() if k != "fid"} == {
        k: v for k, v in single["aggregate"].items() if k != "fid"
    }
    # FID's Inception features are gathered bit-exactly, but Lightning gives each of the 2 ranks 1 CPU thread
    # (the single process has 2): the CNN's float32 sums are ordered differently, so features agree to float32
    # rounding (they do not depend on the batch), and FID to 1e-6
    assert ddp["aggregate"]["fid"] == pytest.approx(single["aggregate"]["fid"], rel=1e-6)
    lines = _score_lines(tmp_path / "ddp/run")
    names = [line["name"] for line in lines]
    assert len(names) == len(set(names)) == 8  # each image scored exactly once
    per_rank = {
        p.name: len(p.read_text().splitlines()) for p in (tmp_path / "ddp/run/scores").glob("*.jsonl")
    }
    assert per_rank == {"scores.rank0.jsonl": 4, "scores.rank1.jsonl": 4}
