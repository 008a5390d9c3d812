"""DreamClear as a method (restore.methods.dreamclear) and its reference restorers (restore.models.reference):
training on the tiny PixArt prior, inference rules, the released checkpoint layout, spandrel loading, the Tab. 4
ablation sweep (official: shallowdream204/DreamClear train_dreamclear.py, test.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.dreamclear import DreamClear, dreamclear_output_size
from restore.models.dreamclear import (
    AdaptiveModulator,
    DreamClearControlFormer,
    MixtureOfAdaptiveModulators,
    ours_to_official,
)
from restore.models.priors import tiny_pixart_prior
from restore.models.reference import BicubicReference, ReferenceWeightsError, SpandrelRestorer, tiny_reference
from restore.models.rrdbnet import RRDBNet
from tests.tiny_training import EmbeddedPairs, fit_on_cpu

REPO = Path(__file__).resolve().parents[1]
SAMPLING = {"num_steps": 3, "latent_tile": 16, "latent_tile_overlap": 4, "seed": 0, "progress": False}


def _tiny(**kwargs) -> DreamClear:
    torch.manual_seed(0)
    defaults = dict(
        prior=tiny_pixart_prior(),
        reference=tiny_reference(),
        min_size=64,
        size_multiple=16,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        sampling=SAMPLING,
    )
    return DreamClear(**{**defaults, **kwargs})


def _fit(module: DreamClear, tmp_path: Path, steps: int = 2) -> L.Trainer:
    return fit_on_cpu(module, tmp_path, steps, EmbeddedPairs(prompts=True))


# ------------------------------------------------------------------------------------------------ training
def test_training_learns_the_variance_and_checkpoints_only_the_controlformer(tmp_path) -> None:
    module = _tiny()
    trainer = _fit(module, tmp_path)
    metrics = trainer.callback_metrics
    assert {"train/diffusion_loss", "train/vlb_loss", "train/loss"} <= set(metrics)
    assert metrics["train/loss"] == pytest.approx(
        float(metrics["train/diffusion_loss"] + metrics["train/vlb_loss"])
    )
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    keys = list(torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"])
    assert keys and all(k.startswith("trainable.controlformer.") for k in keys)  # no prior, no reference
    zero_inits = [
        module.controlformer.cross_de[0].proj.weight,
        module.controlformer.c_embedder_lq.proj.weight,
    ]
    assert all(p.abs().sum() > 0 for p in zero_inits)  # trained away from zero
    assert not any(p.requires_grad for p in module.reference.parameters())


def test_training_batch_holds_the_mode_latents_of_the_upsampled_lr_and_the_reference(tmp_path) -> None:
    module = _tiny()
    batch = next(iter(DataLoader(EmbeddedPairs(), batch_size=2)))
    conditions = module.condition_latents(batch["lq"], (64, 64))
    reference = module.reference(batch["lq"], (64, 64))
    torch.testing.assert_close(conditions["reference"], reference)
    torch.testing.assert_close(conditions["ref_latent"], module.prior.encode_images(reference, sample=False))
    assert conditions["lq_latent"].shape == (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize(
    ("lq", "upscale", "min_size", "multiple", "expected"),
    [
        ((128, 128), 4, 1024, 64, (1024, 1024)),  # RealSR crops: LR 128 -> 512 -> raised to 1024
        ((256, 384), 4, 1024, 64, (1024, 1536)),  # already >= 1024
        ((100, 150), 4, 1024, 64, (1024, 1536)),  # 400x600 x 2.56 = 1024 x 1536
        ((70, 90), 4, 1024, 64, (1024, 1280)),  # 280x360 x 3.657 = 1024 x 1316 -> 1280
    ],
)
def test_output_size_follows_test_py(lq, upscale, min_size, multiple, expected) -> None:
    assert dreamclear_output_size(lq, upscale, min_size, multiple) == expected


def test_restore_is_x4_deterministic_and_uses_the_records_caption() -> None:
    module = _tiny().eval()
    lq = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    out = module.restore(lq)
    assert out.shape == (1, 3, 80, 96) and torch.isfinite(out).all()
    assert torch.equal(out, module.restore(lq))
    captioned = module.restore(lq, prompts=[{"caption": "a photo of the cat"}])
    assert not torch.equal(out, captioned)  # the caption reaches the DiT
    with pytest.raises(ValueError, match="2 prompt records for 1 images"):
        module.restore(lq, prompts=[{"caption": "a"}, {"caption": "b"}])


def test_captioner_is_built_on_first_use_and_captions_only_images_without_a_record() -> None:
    """test.py captions the reference restoration with LLaVA-1.6 (llava/llava_caption.py); here the tiny
    LLaVA-NeXT with the same prompt and seeded sampling, built from a Hydra-style factory when first needed."""
    from functools import partial

    from restore.models.captioners import tiny_llava_next

    built = []

    def factory():
        built.append(tiny_llava_next(max_new_tokens=4, temperature=0.2, top_p=0.7))
        return built[-1]

    module = _tiny(captioner=partial(factory)).eval()
    assert built == [] and "captioner" not in dict(module.named_children())
    reference = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    texts = module.captions(reference, [{"caption": "given"}, {}, {"tags": "x"}])
    assert len(built) == 1 and texts[0] == "given"
    assert texts[1:] == built[0].caption(reference[1:])  # one batch of the two without a record
    assert all(isinstance(t, str) and t for t in texts)
    assert module.captions(reference[:1], None) == built[0].caption(reference[:1]) and len(built) == 1
    assert _tiny().captions(reference[:2], [{}, {"caption": "b"}]) == [
        "",
        "b",
    ]  # no captioner: default_prompt
    assert not any(k.startswith("_captioner") for k in module.state_dict())


def test_bicubic_reference_is_the_without_reference_branch_ablation() -> None:
    lq = torch.rand(1, 3, 8, 8)
    module = _tiny(reference=BicubicReference())
    conditions = module.condition_latents(lq, (32, 32))
    torch.testing.assert_close(conditions["ref_latent"], conditions["lq_latent"])  # both the bicubic LR


# ------------------------------------------------------------------------------------------------ released weights
def test_released_checkpoint_layout_loads_with_zero_missing_keys_and_variants_are_refused(tmp_path) -> None:
    source = _tiny()
    torch.manual_seed(5)
    for p in source.controlformer.parameters():
        p.data.normal_(0, 0.02)
    base = {f"base_model.{k}": v for k, v in {"pos_embed": torch.zeros(1)}.items()}
    state = {**base, **ours_to_official(source.controlformer.state_dict())}
    torch.save({"state_dict": state}, tmp_path / "DreamClear-1024.pth")
    loaded = _tiny(pretrained=tmp_path / "DreamClear-1024.pth")
    for (key, a), b in zip(
        source.controlformer.state_dict().items(), loaded.controlformer.state_dict().values()
    ):
        assert torch.equal(a, b), key
    with pytest.raises(CheckpointMismatchError, match="missing"):
        _tiny(num_experts=2, pretrained=tmp_path / "DreamClear-1024.pth")


# ------------------------------------------------------------------------------------------------ reference restorers
def test_spandrel_loads_official_layouts_and_runs_them_at_their_scale(tmp_path) -> None:
    torch.manual_seed(0)
    esrgan = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=8, num_block=1, num_grow_ch=32).eval()
    torch.save({"params_ema": esrgan.state_dict()}, tmp_path / "RealESRGAN_x4plus.pth")  # BasicSR's layout
    restorer = SpandrelRestorer.from_file(tmp_path / "RealESRGAN_x4plus.pth")
    assert (restorer.architecture, restorer.scale) == ("ESRGAN", 4)
    lq = torch.rand(1, 3, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(restorer(lq, (48, 64)), esrgan(lq).clamp(0, 1))
    # a x1 restorer (DiffBIR's SwinIR: PixelUnshuffle 8, nearest+conv x8) runs on the upsampled LR
    from spandrel.architectures.SwinIR import SwinIR

    swinir = SwinIR(
        img_size=8, patch_size=1, in_chans=3, embed_dim=12, depths=[1], num_heads=[2], window_size=2,
        mlp_ratio=2, upscale=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
        start_unshuffle=8,
    ).eval()  # fmt: skip
    # DiffBIR's file: a DataParallel prefix and conv_first as Sequential(PixelUnshuffle, Conv2d)
    released = {
        f"module.{k.replace('conv_first.', 'conv_first.1.')}": v for k, v in swinir.state_dict().items()
    }
    torch.save({"state_dict": released}, tmp_path / "swinir.ckpt")
    restorer = SpandrelRestorer.from_file(tmp_path / "swinir.ckpt")
    assert (restorer.architecture, restorer.scale) == ("SwinIR", 1)
    lq = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = swinir(BicubicReference()(lq, (32, 32))).clamp(0, 1)
        torch.testing.assert_close(restorer(lq, (32, 32)), expected)
    with pytest.raises(ReferenceWeightsError, match="does not exist"):
        SpandrelRestorer.from_file(tmp_path / "missing.pth")
    torch.save({"not": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ReferenceWeightsError, match="no architecture spandrel knows"):
        SpandrelRestorer.from_file(tmp_path / "junk.pth")


# ------------------------------------------------------------------------------------------------ sweep
@pytest.mark.slow
def test_tab4_sweep_runs_with_multirun_and_makes_one_table(tmp_path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    sweep = tmp_path / "sweep"
    args = [
        sys.executable, str(REPO / "train.py"), "-m", "experiment=dreamclear_tiny",
        "ablation=dreamclear_full,dreamclear_am_only,dreamclear_no_reference,dreamclear_null_caption",
        "trainer.max_steps=1", "method.sampling.num_steps=2", "evaluate.benchmark=samples",
        "evaluate.metrics=[psnr]", "evaluate.num_workers=0", "evaluate.progress=false",
        f"hydra.sweep.dir={sweep}", f"paths.data_root={tmp_path / 'data'}", "extras.print_config=false",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/eval/samples/results.json"))]
    rows = ["dreamclear_full", "dreamclear_am_only", "dreamclear_no_reference", "dreamclear_null_caption"]
    assert [r["overrides"]["ablation"] for r in results] == rows
    assert all(math.isfinite(r["aggregate"]["psnr"]) for r in results)
    # the rows differ: every ablation changes the restored images
    assert len({round(r["aggregate"]["psnr"], 6) for r in results}) == 4
    table = subprocess.run(
        [sys.executable, str(REPO / "scripts/make_table.py"), "--ablation", str(sweep)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert all(f"ablation={row}" in table.stdout for row in rows)


@pytest.mark.parametrize("row", sorted(p.stem for p in (REPO / "configs/ablation").glob("dreamclear_*.yaml")))
def test_every_tab4_row_builds_the_model_it_names(row, tmp_path) -> None:
    from hydra.utils import instantiate
    from hydra_helpers import compose_config

    cfg = compose_config("train", ["experiment=dreamclear_tiny", f"ablation={row}"], tmp_path)
    method = instantiate(cfg.method)
    modulator = method.controlformer.am_lq[0]
    if row == "dreamclear_am_only":
        assert isinstance(modulator, AdaptiveModulator)
    else:
        assert isinstance(modulator, MixtureOfAdaptiveModulators)
        assert len(modulator.experts) == {"dreamclear_experts_1": 1, "dreamclear_experts_5": 5}.get(row, 3)
    assert isinstance(method.reference, BicubicReference) == (row == "dreamclear_no_reference")
    assert method.hparams.null_caption == (row == "dreamclear_null_caption")
    assert method.hparams.null_prompt_prob == (1.0 if row == "dreamclear_null_caption" else 0.5)


def test_controlformer_of_a_method_is_the_models_class() -> None:
    assert isinstance(_tiny().controlformer, DreamClearControlFormer)
