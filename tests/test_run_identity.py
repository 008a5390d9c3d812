"""What restores different images gets a different evaluation run: the precision is part of the run key (a bf16
run never lands in the fp32 run's folder), and results.json records precision, device and library versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra_helpers import compose_config

from restore.evaluation.fingerprint import evaluation_key, run_key
from restore.run import evaluate


def _key(tmp_path: Path, *overrides: str) -> str:
    return run_key(compose_config("eval", ["benchmark=samples", "method=bicubic", *overrides], tmp_path))


def test_precision_changes_the_run_key_and_fp32_keys_stay_what_they_were(tmp_path) -> None:
    default = _key(tmp_path)
    assert _key(tmp_path, "trainer.precision=32-true") == default
    bf16, fp16 = _key(tmp_path, "trainer.precision=bf16-mixed"), _key(tmp_path, "trainer.precision=16-mixed")
    assert len({default, bf16, fp16}) == 3
    # keys made before precision was part of them: the same parts without it
    bench, method = {"name": "b", "metrics": ["psnr"]}, {"_target_": "m"}
    assert evaluation_key(bench, method, None) == evaluation_key(bench, method, None, precision="32-true")
    # scoring a folder runs no network: its precision does not matter
    assert evaluation_key(bench, None, None, outputs="x", precision="bf16-mixed") == evaluation_key(
        bench, None, None, outputs="x"
    )


@pytest.fixture(scope="module")
def samples_root(tmp_path_factory) -> Path:
    from restore.data.testsets import prepare_samples

    root = tmp_path_factory.mktemp("data")
    prepare_samples(root / "benchmarks/samples", progress=False)
    return root


def test_results_record_precision_device_and_versions(samples_root, tmp_path) -> None:
    import diffusers
    import pyiqa
    import torch

    cfg = compose_config(
        "eval",
        [
            "benchmark=samples",
            "method=bicubic",
            "benchmark.metrics=[psnr]",
            "num_workers=0",
            "progress=false",
        ],
        tmp_path,
    )
    cfg.paths.data_root = str(samples_root)
    settings = evaluate(cfg)["settings"]
    assert settings["precision"] == "32-true" and settings["device"] == "cpu"
    assert settings["diffusers_version"] == diffusers.__version__
    assert settings["pyiqa_version"] == pyiqa.__version__ and settings["torch_version"] == torch.__version__


def test_the_seed_and_weight_files_named_in_the_method_config_are_part_of_the_run_key(tmp_path) -> None:
    assert _key(tmp_path, "seed=1") != _key(tmp_path, "seed=2")
    weights = tmp_path / "net.pth"
    weights.write_bytes(b"first")
    bench, method = {"name": "b", "metrics": ["psnr"]}, {"_target_": "m", "weights": str(weights)}
    before = evaluation_key(bench, method, None)
    weights.write_bytes(b"retrained")  # same path, new weights: another run
    assert evaluation_key(bench, method, None) != before
    # scoring a folder draws nothing: the seed does not matter there
    assert evaluation_key(bench, None, None, outputs="x", seed=1) == evaluation_key(
        bench, None, None, outputs="x"
    )
