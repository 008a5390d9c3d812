"""Benchmark prompt side-files reach ``restore(lq, prompts=[record])`` of the methods that take them (XPSR):
keyed by the LR path, checked before anything is restored, and part of the run key."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra_helpers import compose_config
from omegaconf import open_dict
from torch import nn

from restore.data.image_io import write_image
from restore.evaluation.benchmark import BenchmarkError
from restore.evaluation.fingerprint import run_key
from restore.run import evaluate

FAST = ["benchmark.metrics=[psnr]", "num_workers=0", "progress=false", "trainer=cpu", "report.enabled=false"]
RECORDS = {
    "a.png": {"highlevel": "a red car", "lowlevel": "blurry", "score": 0.5},
    "sub/b.png": {"highlevel": "two dogs", "lowlevel": "noisy"},
    "c.png": {"tags": ["tree", "sky"]},
}


class PromptRecorder(nn.Module):
    """A method without weights that remembers the prompts each ``restore`` call got (nearest x4)."""

    calls: ClassVar[list[Any]] = []
    requires_weights = False  # the declarations eval.py reads
    takes_prompts = True

    def restore(self, lq: torch.Tensor, prompts: list[dict[str, str]] | None = None) -> torch.Tensor:
        PromptRecorder.calls.append(prompts)
        return F.interpolate(lq, scale_factor=4, mode="nearest")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """LR a.png, c.png, sub/b.png (8x8) with their 32x32 GT, and a prompt side-file for all three."""
    rng = np.random.default_rng(0)
    for name in ("a", "c", "sub/b"):
        write_image(tmp_path / "lr" / f"{name}.png", rng.random((8, 8, 3)))
        write_image(tmp_path / "gt" / f"{name}.png", rng.random((32, 32, 3)))
    lines = [json.dumps({"path": path, **fields}) for path, fields in RECORDS.items()]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _cfg(folder: Path, method: str = "recorder", prompts: Path | None = None):
    cfg = compose_config(
        "eval",
        [
            "benchmark=folder",
            f"benchmark.lr_dir={folder / 'lr'}",
            f"benchmark.gt_dir={folder / 'gt'}",
            f"benchmark.prompts={prompts or folder / 'prompts.jsonl'}",
            "method=bicubic",
            *FAST,
        ],
        folder,
    )
    if method == "recorder":
        with open_dict(cfg):
            cfg.method = {"_target_": f"{__name__}.PromptRecorder"}
            cfg.label = "recorder"
    return cfg


def test_each_image_gets_its_record(folder: Path) -> None:
    PromptRecorder.calls.clear()
    results = evaluate(_cfg(folder))
    assert results["num_scored"] == 3
    text = {path: {k: v for k, v in r.items() if k != "score"} for path, r in RECORDS.items()}
    text["c.png"] = {"tags": "tree, sky"}
    # restored in name order (a, c, sub/b), one record per image, keyed by the LR path relative to lr_dir
    assert PromptRecorder.calls == [[text["a.png"]], [text["c.png"]], [text["sub/b.png"]]]
    assert results["settings"]["prompts"] == str(folder / "prompts.jsonl")


def test_missing_prompts_stop_before_anything_is_restored(folder: Path) -> None:
    PromptRecorder.calls.clear()
    partial = folder / "partial.jsonl"
    partial.write_text(json.dumps({"path": "a.png", "highlevel": "a red car"}) + "\n")
    with pytest.raises(
        BenchmarkError,
        match=r"2 LR image\(s\) have no entry in the prompt side-file .*partial\.jsonl': 'c\.png', 'sub/b\.png'"
        r".*python scripts/extract_prompts\.py --input .*lr --out .*partial\.jsonl",
    ):
        evaluate(_cfg(folder, prompts=partial))
    assert PromptRecorder.calls == []
    assert not (folder / "run/images").exists()


def test_methods_without_prompts_are_called_as_before(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="restore.evaluation.runner"):
        results = evaluate(_cfg(folder, method="bicubic"))
    assert results["num_scored"] == 3
    notes = [r for r in caplog.records if "takes none" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # once per run, not once per image


def test_run_key_follows_the_prompt_file_content(folder: Path) -> None:
    cfg = _cfg(folder)
    key = run_key(cfg)
    assert run_key(_cfg(folder)) == key
    prompts = folder / "prompts.jsonl"
    prompts.write_text(prompts.read_text().replace("a red car", "a blue car"))  # same path, new text
    assert run_key(cfg) != key
