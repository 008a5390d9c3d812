"""Precomputed training inputs (restore.data.precomputed_inputs, scripts/precompute_training_inputs.py).

The loss of a training step from the shards must equal the on-the-fly loss for the same draws, with the VAE
encoder, the text encoder and SeeSR's DAPE never called; a killed run resumes; another encoder is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from restore.data.hr_datasets import load_embedded_photo
from restore.data.image_io import write_image
from restore.data.paired import collate_variable_size
from restore.data.paired_training import PairedTrainingFolder
from restore.data.precomputed_inputs import (
    MANIFEST_FILE,
    PrecomputedInputs,
    PrecomputedInputsError,
    check_precomputed_source,
    method_encoder,
    shard_path,
    write_precomputed_inputs,
)
from restore.methods.rank_generator import RankGenerator
from tests.hydra_helpers import compose_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
PHOTOS = ("astronaut", "coffee", "chelsea")
XPSR_KEY = {"prompt": "highlevel", "lowlevel_prompt": "lowlevel"}


def _write_pairs(root: Path, size: int = 64) -> Path:
    """``gt/`` ``size``² crops of three embedded photos, ``lq/`` their x4 area downsampling, and an XPSR side-file."""
    records = []
    for i, name in enumerate(PHOTOS):
        photo = torch.from_numpy(load_embedded_photo(name)).permute(2, 0, 1).float() / 255
        gt = F.interpolate(photo[None], size=(size, size), mode="area")[0]
        write_image(root / "gt" / f"{i:03d}.png", gt)
        write_image(root / "lq" / f"{i:03d}.png", F.interpolate(gt[None], scale_factor=0.25, mode="area")[0])
        records.append(
            {"path": f"{i:03d}.png", "highlevel": f"a photo of the {name}", "lowlevel": "blurry, noisy"}
        )
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory) -> Path:
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def seesr(pair_root, tmp_path_factory):
    """A tiny SeeSR of experiment=seesr_tiny, the pairs, their precomputed folder and the writer's counts."""
    root = tmp_path_factory.mktemp("seesr")
    module, pairs = _method("seesr_tiny", root), _pairs(pair_root)
    counts = _precompute(module, pairs, root / "inputs")
    return module, pairs, root / "inputs", counts


def _pairs(root: Path, xpsr: bool = False) -> PairedTrainingFolder:
    prompts = {"prompts": root / "prompts.jsonl", "prompt_key": XPSR_KEY} if xpsr else {}
    return PairedTrainingFolder(root / "gt", root / "lq", scale=4, crop_size=64, hflip=False, **prompts)


def _method(experiment: str, tmp_path: Path, *overrides: str):
    cfg = compose_config("train", [f"experiment={experiment}", *overrides], tmp_path)
    torch.manual_seed(0)  # the trainable modules' random init: the same in both paths anyway (one module)
    return instantiate(cfg.method).eval()


def _precompute(module, pairs, out: Path, **kwargs) -> dict[str, int]:
    with torch.no_grad():
        return write_precomputed_inputs(
            pairs,
            method_encoder(module),
            out,
            module.precomputed_identity(),
            null_text=module.precompute_null_text(),
            progress=False,
            **{"samples_per_shard": 2, "batch_size": 2, **kwargs},
        )


def _step_loss(module, items: list[dict], seed: int = 7) -> torch.Tensor:
    """One training step's loss on ``items``, with a fresh generator (the same draws for every call)."""
    module.generator = RankGenerator(seed)
    module.log = lambda *args, **kwargs: None
    if module._trainer is None:  # the step asks the strategy whether any rank's loss is non-finite
        module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    batch = module.on_after_batch_transfer(collate_variable_size(items), 0)
    with torch.no_grad():
        return module.training_step(batch, 0)


def _forbid_encoders(module, monkeypatch) -> None:
    """Make every frozen encoder of the step raise: a precomputed step must not call them."""

    def called(*args, **kwargs):
        raise AssertionError("a frozen encoder ran although the batch carries precomputed inputs")

    monkeypatch.setattr(module.prior.vae, "encode", called)
    monkeypatch.setattr(module.prior, "run_text_encoder", called)
    monkeypatch.setattr(module.prior.text_encoder, "forward", called)
    if hasattr(module, "dape"):
        monkeypatch.setattr(module.dape, "image_embeds", called)
        monkeypatch.setattr(module.dape, "generate_tags", called)


@pytest.mark.parametrize("null_prompt_prob", [0.0, 0.5, 1.0])
def test_seesr_loss_from_shards_equals_on_the_fly_without_running_encoders(
    seesr, monkeypatch, null_prompt_prob
):
    module, pairs, out, counts = seesr
    assert counts == {"written": 2, "kept": 0}  # 3 pairs, 2 per shard
    monkeypatch.setitem(module.hparams, "null_prompt_prob", null_prompt_prob)
    expected = _step_loss(module, [pairs[0], pairs[2]])  # DAPE tags of the GT, RAM tokens of the LR, VAE

    data = PrecomputedInputs(out, hflip=False)
    items = [data[0], data[2]]
    assert items[0]["key"] == pairs[0]["key"] == "000.png" and torch.equal(items[0]["gt"], pairs[0]["gt"])
    _forbid_encoders(module, monkeypatch)
    loss = _step_loss(module, items)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_seesr_flipped_orientation_matches_the_flipped_pair(seesr, monkeypatch):
    module, pairs, out, _ = seesr
    data = PrecomputedInputs(out, hflip=True)
    flips = []
    for seed in range(20):  # the orientation is a p=0.5 draw from torch's RNG: find one of each
        torch.manual_seed(seed)
        item = data[1]
        flips.append(torch.equal(item["gt"], pairs[1]["gt"].flip(-1)))
        if flips[-1]:
            flipped = item
    assert any(flips) and not all(flips)
    on_the_fly = {**pairs[1], "gt": pairs[1]["gt"].flip(-1), "lq": pairs[1]["lq"].flip(-1)}
    expected = _step_loss(module, [on_the_fly, pairs[0]])
    plain = PrecomputedInputs(out, hflip=False)[0]
    _forbid_encoders(module, monkeypatch)
    torch.testing.assert_close(_step_loss(module, [flipped, plain]), expected, rtol=1e-5, atol=1e-6)


def test_xpsr_loss_from_shards_equals_on_the_fly_with_lowlevel_prompts(pair_root, tmp_path, monkeypatch):
    module = _method("xpsr_tiny", tmp_path)
    pairs = _pairs(pair_root, xpsr=True)
    _precompute(module, pairs, tmp_path / "inputs")
    expected = _step_loss(module, [pairs[0], pairs[1]])  # epsilon MSE + DFC on the GT and its latent

    data = PrecomputedInputs(tmp_path / "inputs", hflip=False)
    item = data[0]
    assert "precomputed.lowlevel_text.hidden_states" in item and "prompt" not in item
    _forbid_encoders(module, monkeypatch)
    loss = _step_loss(module, [item, data[1]])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    texts = json.loads(_shard_metadata(shard_path(tmp_path / "inputs", 0))["texts"])
    assert texts[0]["plain"] == {"prompt": "a photo of the astronaut", "lowlevel_prompt": "blurry, noisy"}


def _shard_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_killed_run_resumes_keeping_finished_shards(seesr, tmp_path):
    module = seesr[0]
    pairs, out = seesr[1], tmp_path / "inputs"
    calls = {"n": 0}
    encode = method_encoder(module)

    def dies_after_first_shard(batch):
        calls["n"] += 1
        if calls["n"] > 2:  # two orientations of the first shard, then the process "dies"
            raise KeyboardInterrupt
        return encode(batch)

    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        write_precomputed_inputs(
            pairs,
            dies_after_first_shard,
            out,
            module.precomputed_identity(),
            samples_per_shard=2,
            progress=False,
        )
    first = shard_path(out, 0)
    assert first.is_file() and not shard_path(out, 1).exists()
    assert not [p for p in (out / "shards").iterdir() if p.suffix == ".tmp"]  # no half-written shard left
    with pytest.raises(PrecomputedInputsError, match="incomplete"):
        PrecomputedInputs(out)
    before = first.stat().st_mtime_ns
    assert _precompute(module, pairs, out) == {"written": 1, "kept": 1}
    assert first.stat().st_mtime_ns == before
    assert len(PrecomputedInputs(out)) == 3
    assert _precompute(module, pairs, out) == {"written": 0, "kept": 2}  # a finished set: nothing redone


def test_refuses_another_encoder_or_pair_set(seesr, pair_root, tmp_path):
    module, _, out, _ = seesr
    manifest = (out / MANIFEST_FILE).read_text()
    other_prior = _method("seesr_tiny", tmp_path, "method.prior.seed=1")
    with pytest.raises(PrecomputedInputsError, match="another encoder or pair set.*weights.vae"):
        _precompute(other_prior, _pairs(pair_root), out)
    other_pairs = _write_pairs(tmp_path / "other_pairs", size=128)
    other = PairedTrainingFolder(other_pairs / "gt", other_pairs / "lq", scale=4, crop_size=128, hflip=False)
    with pytest.raises(PrecomputedInputsError, match="pair_set"):
        _precompute(module, other, out)
    assert (out / MANIFEST_FILE).read_text() == manifest  # nothing of the first set was touched
    with pytest.raises(PrecomputedInputsError, match="made for method"):
        check_precomputed_source(
            {"precomputed.prior": ["SDPrior:in-code"], "precomputed.method": ["XPSR"]},
            "SDPrior:in-code",
            "SeeSR",
        )
    with pytest.raises(PrecomputedInputsError, match="crop_size=128"):
        PrecomputedInputs(out, crop_size=128)


@pytest.mark.slow
def test_script_then_train_end_to_end(tmp_path):
    pairs = _write_pairs(tmp_path / "pairs", size=128)  # seesr_tiny trains on 128 px crops
    out = tmp_path / "inputs"
    script = [sys.executable, str(REPO / "scripts/precompute_training_inputs.py"), "experiment=seesr_tiny"]
    args = [f"pairs={pairs}", f"out={out}", "samples_per_shard=2", f"hydra.run.dir={tmp_path / 'pre'}"]
    done = subprocess.run([*script, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 shard(s) written, 0 kept" in done.stderr + done.stdout
    train = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=seesr_tiny",
        "data=precomputed",
        f"data.train.root={out}",
        "trainer.max_steps=2",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'train'}",
    ]
    done = subprocess.run(train, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in done.stderr + done.stdout
