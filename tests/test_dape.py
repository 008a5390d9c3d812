"""DAPE (restore.models.dape, restore.methods.dape): SeeSR's LoRA on RAM, DAPE files, stage-1 training.

Full size only on the meta device; numerics and training on the tiny RAM. The last test runs
``train.py experiment=dape_tiny`` in a subprocess, as a user starts it.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from restore.methods.dape import DAPECheckpointMismatchError, DAPETraining
from restore.models.dape import (
    QVLoRALinear,
    add_dape_lora,
    dape_keys_from_official,
    dape_keys_to_official,
    dape_lora_state_dict,
    dape_state_dict,
    load_dape,
    load_dape_lora,
    merge_dape_lora,
    save_dape,
    tiny_dape,
)
from restore.models.ram import MissingModelFileError, build_ram

REPO = Path(__file__).resolve().parents[1]
# One thread: the tiny models run hundreds of small ops, and on a busy 2-core machine every OpenMP region of a
# second thread can wait a scheduler slice (measured: 20 training steps 80 s with 2 threads, 1 s with 1).
ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "HYDRA_FULL_ERROR": "0",
    "OMP_NUM_THREADS": "1",
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _official_lora_keys(depths=(2, 2, 18, 2), layers=2) -> set[str]:
    swin = {
        f"visual_encoder.layers.{s}.blocks.{b}.attn.qkv.lora_{ab}"
        for s, depth in enumerate(depths)
        for b in range(depth)
        for ab in "AB"
    }
    head = {
        f"tagging_head.encoder.layer.{i}.crossattention.self.{m}.lora_{ab}"
        for i in range(layers)
        for m in ("query", "key")
        for ab in "AB"
    }
    return swin | head


def _randomise_lora(ram, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ram.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


# --------------------------------------------------------------------------------------------- LoRA layout


def test_full_size_lora_keys_shapes_and_counts() -> None:
    ram = add_dape_lora(build_ram("swin_l_384", tag_list=[f"t{i}" for i in range(4585)], device="meta"))
    official = dape_keys_to_official(dape_lora_state_dict(ram))
    assert set(official) == _official_lora_keys()
    swin = {k: v for k, v in official.items() if k.startswith("visual_encoder.")}
    head = {k: v for k, v in official.items() if k.startswith("tagging_head.")}
    assert (len(swin), sum(v.numel() for v in swin.values())) == (48, 577_536)
    assert (len(head), sum(v.numel() for v in head.values())) == (8, 45_056)
    for stage, dim in enumerate((192, 384, 768, 1536)):
        assert official[f"visual_encoder.layers.{stage}.blocks.1.attn.qkv.lora_A"].shape == (16, dim)
        assert official[f"visual_encoder.layers.{stage}.blocks.1.attn.qkv.lora_B"].shape == (2 * dim, 8)
    q, k = (
        "tagging_head.encoder.layer.1.crossattention.self.query",
        "tagging_head.encoder.layer.1.crossattention.self.key",
    )
    assert official[q + ".lora_A"].shape == (8, 768) and official[q + ".lora_B"].shape == (768, 8)
    assert official[k + ".lora_A"].shape == (8, 512) and official[k + ".lora_B"].shape == (768, 8)
    trainable = {n for n, p in ram.named_parameters() if p.requires_grad}
    assert trainable == set(dape_lora_state_dict(ram))  # mark_only_lora_as_trainable
    assert ram.image_embeds(torch.empty(1, 3, 384, 384, device="meta")).shape == (1, 145, 512)


def test_key_converters_are_inverse() -> None:
    ours = dape_lora_state_dict(add_dape_lora(build_ram("tiny")))
    official = dape_keys_to_official(ours)
    assert set(official) == _official_lora_keys(depths=(2, 2, 2, 2))
    assert set(dape_keys_from_official(official)) == set(ours)
    assert any(k.endswith("query.lora_A.default.weight") for k in ours)  # peft's names on our side


# --------------------------------------------------------------------------------------------- LoRA maths


def test_qv_lora_equals_hand_written_merged_linear() -> None:
    torch.manual_seed(0)
    dim, rank = 12, 4
    base = torch.nn.Linear(dim, 3 * dim)
    layer = QVLoRALinear.from_linear(base, rank=rank, alpha=1.0)
    assert layer.weight is base.weight and layer.scaling == 1 / rank  # loralib: lora_alpha / r
    assert torch.count_nonzero(layer.lora_B) == 0  # zero-init: starts as the base layer
    bound = 1 / math.sqrt(dim)  # kaiming_uniform(a=sqrt(5)) on [2r, in]
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.shape == (2 * rank, dim)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, dim)
    a_q, a_v = layer.lora_A[:rank], layer.lora_A[rank:]
    b_q, b_v = layer.lora_B[:dim], layer.lora_B[dim:]
    plain = x @ base.weight.T + base.bias
    s = 1 / rank
    expected = torch.cat(
        [
            plain[..., :dim] + (x @ a_q.T @ b_q.T) * s,
            plain[..., dim : 2 * dim],
            plain[..., 2 * dim :] + (x @ a_v.T @ b_v.T) * s,
        ],
        dim=-1,
    )
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, expected)
        merged = layer.merged_linear()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_head_lora_is_loralib_linear_and_merging_keeps_outputs() -> None:
    ram = add_dape_lora(build_ram("tiny"))
    _randomise_lora(ram)
    query = ram.tagging_head.encoder.layer[0].crossattention.self.query
    x = torch.randn(3, 48)
    a, b = query.lora_A["default"].weight, query.lora_B["default"].weight
    with torch.no_grad():
        base = query.get_base_layer()
        torch.testing.assert_close(query(x), base(x) + (x @ a.T @ b.T) / 8)  # alpha 1, rank 8

    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        embeds, logits = ram(ram.preprocess(images))
        merge_dape_lora(ram)
        merged_embeds, merged_logits = ram(ram.preprocess(images))
    torch.testing.assert_close(merged_embeds, embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=1e-4)
    assert set(ram.state_dict()) == set(build_ram("tiny").state_dict())  # official keys, no LoRA left


# --------------------------------------------------------------------------------------------- files


def _official_file(seed: int = 1) -> dict[str, torch.Tensor]:
    """An official-layout DAPE.pth for the tiny RAM, with the off-path LoRA the real file also carries."""
    ram = add_dape_lora(build_ram("tiny"))
    _randomise_lora(ram, seed)
    state = dape_state_dict(ram)
    state["tag_encoder.encoder.layer.0.attention.self.query.lora_A"] = torch.zeros(8, 48)
    state["text_decoder.bert.encoder.layer.0.crossattention.self.key.lora_B"] = torch.zeros(48, 8)
    return state


def test_official_dape_round_trip(tmp_path: Path) -> None:
    official = _official_file()
    ram = add_dape_lora(build_ram("tiny"))
    counts = load_dape_lora(ram, official)
    assert counts == {"loaded": 24, "tag_encoder": 1, "text_decoder": 1}  # 8 qkv x 2 + 2 layers x 4
    saved = save_dape(ram, tmp_path / "DAPE.pth")
    reread = torch.load(saved, weights_only=True)
    on_path = {k: v for k, v in official.items() if k.startswith(("visual_encoder.", "tagging_head."))}
    assert reread.keys() == on_path.keys()
    assert all(torch.equal(reread[k], on_path[k]) for k in on_path)

    with pytest.raises(KeyError, match="1 missing"):
        load_dape_lora(add_dape_lora(build_ram("tiny")), {k: v for k, v in list(on_path.items())[1:]})
    with pytest.raises(ValueError, match="shapes differ"):
        load_dape_lora(add_dape_lora(build_ram("tiny"), rank=4), on_path)


def test_load_dape_tiny_merges_and_freezes(tmp_path: Path) -> None:
    path = tmp_path / "DAPE.pth"
    torch.save(_official_file(), path)
    reference = add_dape_lora(build_ram("tiny"))
    load_dape_lora(reference, path)
    dape = load_dape("tiny", dape_checkpoint=path)
    assert not dape.training and not any(p.requires_grad for p in dape.parameters())
    assert not any("lora_" in k for k in dape.state_dict())
    unmerged = load_dape("tiny", dape_checkpoint=path, merge=False)
    assert any("lora_" in k for k in unmerged.state_dict())
    images = torch.rand(2, 3, 80, 48)
    with torch.no_grad():
        expected = reference.eval()(reference.preprocess(images))
        for model in (dape, unmerged):
            embeds, logits = model(model.preprocess(images))
            torch.testing.assert_close(embeds, expected[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(logits, expected[1], atol=1e-5, rtol=1e-4)


def test_tiny_dape_is_a_frozen_tiny_ram() -> None:
    dape = tiny_dape(seed=0, token_dim=32)
    assert (dape.image_size, dape.token_dim, dape.num_classes) == (64, 32, 64)
    assert not dape.training and not any(p.requires_grad for p in dape.parameters())
    with torch.no_grad():
        embeds = dape.image_embeds(dape.preprocess(torch.rand(2, 3, 64, 64)))
        tags = dape.generate_tags(embeds)
    assert embeds.shape == (2, 5, 32) and len(tags) == 2
    assert tiny_dape(token_dim=16).token_dim == 16


def test_load_dape_missing_files_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingModelFileError) as info:  # checked before the 200M-parameter build
        load_dape(dape_checkpoint=tmp_path / "weights" / "DAPE.pth")
    message = str(info.value)
    assert "DAPE.pth" in message and "drive.google.com" in message and "experiment=dape" in message
    with pytest.raises(FileNotFoundError, match=r"DAPE.pth.*\n.*drive.google.com"):
        load_dape()  # the full-size DAPE needs its LoRA file
    dape_file = tmp_path / "DAPE.pth"
    torch.save(_official_file(), dape_file)
    with pytest.raises(MissingModelFileError) as info:
        load_dape(ram_checkpoint=tmp_path / "weights" / "ram_swin_large_14m.pth", dape_checkpoint=dape_file)
    message = str(info.value)
    assert "python -m restore.weights fetch ram_swin_large_14m.pth" in message
    assert (
        "https://huggingface.co/xinyu1205/recognize_anything_model/resolve/main/ram_swin_large_14m.pth"
        in message
    )


# --------------------------------------------------------------------------------------------- training


def _method(**kwargs) -> DAPETraining:
    ram = partial(build_ram, "tiny", token_dim=32)
    return DAPETraining(ram, optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0), **kwargs)


def test_loss_falls_on_fixed_data_and_only_lora_moves(photos_128: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = _method(student_train_mode=False)
    method.train()
    assert not method.teacher.training
    gt = photos_128[:2]
    lq = F.interpolate(gt, scale_factor=0.25, mode="area")
    before = {k: v.clone() for k, v in {**method.teacher.state_dict(), **method.student.state_dict()}.items()}
    optimizer = method.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in method.lora_parameters()
    )
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        terms = method.losses(lq, gt)
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    # The soft-target BCE cannot go below the entropy of the teacher's probabilities: compare what is above it.
    with torch.no_grad():
        target = torch.sigmoid(method.teacher(method.teacher.preprocess(gt))[1])
        floor = F.binary_cross_entropy(target, target).item()
    excess = [v - floor for v in losses]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:])), losses  # fixed data, no dropout
    assert excess[-1] < 0.8 * excess[0], (floor, losses)
    after = {**method.teacher.state_dict(), **method.student.state_dict()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)

    checkpoint = method.state_dict()
    assert set(checkpoint) == {"student." + k for k in dape_lora_state_dict(method.student)}
    fresh = _method()
    fresh.load_state_dict(checkpoint)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in checkpoint.items())
    with pytest.raises(DAPECheckpointMismatchError, match="1 missing"):
        fresh.load_state_dict(dict(list(checkpoint.items())[1:]))


def test_student_trains_in_train_mode_and_scales_are_checked() -> None:
    from restore.data.degradation import RealESRGANDegradation

    method = _method()
    method.train()
    assert method.student.training and not method.teacher.training
    assert method.scale == 4
    with pytest.raises(ValueError, match="degradation.scale=2 but method.scale=4"):
        _method(degradation=RealESRGANDegradation(scale=2))


def _read_metrics(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_train_py_dape_tiny_writes_lora_only_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "train.py",
        "experiment=dape_tiny",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.progress_bar=null",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    losses = _read_metrics(run_dir / "csv" / "version_0" / "metrics.csv")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and "dape_generator" in ckpt
    state = ckpt["state_dict"]
    student = add_dape_lora(build_ram("tiny", token_dim=32))
    assert set(state) == {"student." + k for k in dape_lora_state_dict(student)}  # LoRA only
    assert any(torch.count_nonzero(v) for k, v in state.items() if "lora_B" in k)  # it trained

    # the checkpoint is a DAPE file for SeeSR stage 2: same base (rebuilt from the seed) + the trained LoRA
    load_dape_lora(student, run_dir / "checkpoints" / "last.ckpt")
    dape = load_dape("tiny", dape_checkpoint=run_dir / "checkpoints" / "last.ckpt", token_dim=32)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dape(images)[0], student.eval()(images)[0], atol=1e-5, rtol=1e-4)
    official = dape_state_dict(student)
    assert set(official) == _official_lora_keys(depths=(2, 2, 2, 2))
