"""XPSR as a method (restore.methods.xpsr): trainable set, prompts in training and inference, DFC in the loss,
presets, official folders.

Official: qyp2000/XPSR train.py, test.py, configs/xpsr*.yaml, the released checkpoint-300000 folder.
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
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from restore.data.hr_datasets import load_embedded_photo
from restore.data.image_io import read_image
from restore.data.prompts import PromptTable
from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.xpsr import XPSR, MissingPromptsError
from restore.models.priors import sd15_prior, tiny_prior
from restore.models.xpsr import PIXEL_ATTR

REPO = Path(__file__).resolve().parents[1]

PRESETS = OmegaConf.to_container(OmegaConf.load(REPO / "configs/method/xpsr.yaml").presets)
# the released models: trainable = ControlNet (620.2M) + UNet pixel_attentions (248.2M)
CONTROLNET_PARAMS = 620_216_909
PIXEL_ATTENTION_PARAMS = 248_234_560


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)


def _tiny_xpsr(**kwargs) -> XPSR:
    torch.manual_seed(0)
    defaults = dict(
        prior=tiny_prior(),
        presets=PRESETS,
        controlnet={"conditioning_embedding_out_channels": (8, 16, 16, 16)},
        optimizer=_adamw,
        null_prompt_prob=0.0,
        sampling={
            "num_steps": 3,
            "process_size": 64,
            "latent_tile": 96,
            "latent_tile_overlap": 4,
            "seed": 0,
            "progress": False,
        },
    )
    return XPSR(**{**defaults, **kwargs})


def _photos(size: int = 64, names=("astronaut", "coffee")) -> torch.Tensor:
    images = [torch.from_numpy(load_embedded_photo(n)).permute(2, 0, 1).float() for n in names]
    return torch.stack([F.interpolate(x[None], size=(size, size), mode="area")[0] for x in images])


class _Pairs(Dataset):
    def __init__(self, gt: torch.Tensor, prompts: bool = True) -> None:
        self.gt, self.lq, self.prompts = gt, F.interpolate(gt, scale_factor=0.25, mode="area"), prompts

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        item = {"gt": self.gt[i], "lq": self.lq[i], "key": f"p{i}"}
        if self.prompts:
            item.update(prompt=f"a photo number {i}", lowlevel_prompt=f"blurry and noisy {i}")
        return item


def _fit(module: XPSR, tmp_path: Path, steps: int, prompts: bool = True) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(_Pairs(_photos(), prompts), batch_size=2))
    return trainer


def test_full_size_trainable_parameters_equal_the_official_counts() -> None:
    module = XPSR(prior=lambda: sd15_prior(device="meta"), presets=PRESETS)
    trainable = module.trainable_parameters()
    controlnet = sum(p.numel() for p in module.controlnet.parameters())
    pixel = sum(p.numel() for n, p in module.prior.unet.named_parameters() if f".{PIXEL_ATTR}." in n)
    assert (controlnet, pixel) == (CONTROLNET_PARAMS, PIXEL_ATTENTION_PARAMS)
    assert sum(p.numel() for p in trainable) == CONTROLNET_PARAMS + PIXEL_ATTENTION_PARAMS


def test_training_adds_dfc_to_the_loss_and_changes_only_the_trainable_part(tmp_path: Path) -> None:
    module = _tiny_xpsr()
    before = {k: v.clone() for k, v in module.named_parameters()}
    trainer = _fit(module, tmp_path, steps=2)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/diffusion_loss", "train/dfc_loss"} <= set(metrics)
    torch.testing.assert_close(
        metrics["train/loss"], metrics["train/diffusion_loss"] + metrics["train/dfc_loss"]
    )
    changed = {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("trainable.controlnet.") or f".{PIXEL_ATTR}." in k for k in changed)
    assert any(f".{PIXEL_ATTR}." in k for k in changed)
    assert set(module.state_dict()) == {
        k for k in before if k.startswith("trainable.") or f".{PIXEL_ATTR}." in k
    } | {k for k, _ in module.named_buffers() if k.startswith("trainable.")}


def test_dfc_none_trains_on_the_diffusion_loss_alone(tmp_path: Path) -> None:
    trainer = _fit(_tiny_xpsr(dfc="none"), tmp_path, steps=1)
    assert "train/dfc_loss" not in trainer.callback_metrics


def test_training_without_prompts_names_the_extraction_script(tmp_path: Path) -> None:
    with pytest.raises(MissingPromptsError, match="extract_prompts.py"):
        _fit(_tiny_xpsr(), tmp_path, steps=1, prompts=False)


@pytest.mark.parametrize(
    ("fusion", "training_prompt", "text", "low"),
    [
        ("sfa", "paper", "a photo number 0", "blurry and noisy 0"),
        ("sfa", "official", "", "blurry and noisy 0"),
        ("serial", "paper", "a photo number 0", "blurry and noisy 0"),
        ("high_only", "paper", "a photo number 0", None),
        ("low_only", "paper", "blurry and noisy 0", None),
    ],
)
def test_training_texts_follow_fusion_and_the_paper_official_switch(
    tmp_path: Path, monkeypatch, fusion: str, training_prompt: str, text: str, low: str | None
) -> None:
    module = _tiny_xpsr(fusion=fusion, training_prompt=training_prompt, dfc="none")
    seen: list[list[str]] = []
    original = module.prior.encode_text
    monkeypatch.setattr(
        module.prior, "encode_text", lambda p, null=None: (seen.append(list(p)), original(p, null))[1]
    )
    _fit(module, tmp_path, steps=1)
    assert seen[0][0] == text  # the base step encodes the text prompt first
    assert (seen[1][0] if len(seen) > 1 else None) == low


def _records(n: int = 2) -> list[dict[str, str]]:
    return [{"highlevel": f"a cat {i}", "lowlevel": f"the image is blurry {i}"} for i in range(n)]


def test_restore_upscales_x4_deterministically_with_prompt_records() -> None:
    module = _tiny_xpsr().eval()
    lq = _photos(16)
    a, b = module.restore(lq, prompts=_records()), module.restore(lq, prompts=_records())
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, module.restore(lq, prompts=[{"highlevel": "a dog", "lowlevel": "sharp"}] * 2))


@pytest.mark.parametrize(
    ("which", "negatives", "expected"),
    [
        (
            "both",
            True,
            [
                "a cat 0 clean, high-resolution, 8k, high quality, clear text.",
                "the image is blurry 0",
                "blurry, dotted, noise, unclear, low-res, over-smoothed",
                "high resolution, best quality, clear",
            ],
        ),
        (
            "high",
            True,
            [
                "a cat 0 clean, high-resolution, 8k, high quality, clear text.",
                "",
                "blurry, dotted, noise, unclear, low-res, over-smoothed",
                "high resolution, best quality, clear",
            ],
        ),
        (
            "low",
            False,
            [" clean, high-resolution, 8k, high quality, clear text.", "the image is blurry 0", "", ""],
        ),
        (
            "null",
            True,
            [
                " clean, high-resolution, 8k, high quality, clear text.",
                "",
                "blurry, dotted, noise, unclear, low-res, over-smoothed",
                "high resolution, best quality, clear",
            ],
        ),
    ],
)
def test_inference_strings_for_the_prompt_and_negative_ablations(
    monkeypatch, which: str, negatives: bool, expected: list[str]
) -> None:
    module = _tiny_xpsr(inference_prompts=which, use_negative_prompts=negatives)
    seen: list[str] = []
    original = module.prior.encode_text
    monkeypatch.setattr(
        module.prior, "encode_text", lambda p, null=None: (seen.append(list(p)[0]), original(p, null))[1]
    )
    module.conditions(_records(1))
    cond_text, uncond_text, cond_low, uncond_low = seen
    assert [cond_text, cond_low, uncond_text, uncond_low] == expected


def test_official_preset_is_the_released_test_config() -> None:
    module = _tiny_xpsr(preset="official", sampling={"process_size": 64})
    s = module.sampling
    assert (s.scheduler, s.num_steps, s.guidance_scale, s.start, s.second_timestep) == (
        "ddpm",
        20,
        4.5,
        "lr_double",
        800,
    )
    assert (s.latent_tile, s.latent_tile_overlap, s.process_size) == (320, 8, 64)
    assert (
        module.inference["negative_prompt"]
        == "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
    )
    with pytest.raises(ValueError, match="preset 'nope'"):
        _tiny_xpsr(preset="nope")


def test_restore_without_prompts_or_captioners_says_how_to_get_them() -> None:
    with pytest.raises(MissingPromptsError, match="benchmark.prompts"):
        _tiny_xpsr().restore(_photos(16))


def test_restore_captions_the_lr_with_the_captioners_when_no_prompts_are_given() -> None:
    seen = {}

    class FakeCaptioner(torch.nn.Module):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

        def caption(self, images: torch.Tensor) -> list[str]:
            seen[self.text] = tuple(images.shape)
            return [self.text] * len(images)

    module = _tiny_xpsr(
        captioners={"highlevel": lambda: FakeCaptioner("a cat 0"), "lowlevel": FakeCaptioner("x")}
    )
    lq = _photos(16)[:1]
    out = module.restore(lq)
    assert seen == {"a cat 0": (1, 3, 16, 16), "x": (1, 3, 16, 16)}  # the raw LR, as the official scripts
    assert torch.equal(out, module.restore(lq, prompts=[{"highlevel": "a cat 0", "lowlevel": "x"}]))


def test_text_cache_gives_the_same_embeddings_with_fewer_encoder_calls(monkeypatch) -> None:
    module = _tiny_xpsr(text_cache_size=2)
    plain = _tiny_xpsr(text_cache_size=0)
    calls: list[int] = []
    original = module.prior.run_text_encoder
    monkeypatch.setattr(module.prior, "run_text_encoder", lambda p: (calls.append(len(p)), original(p))[1])
    prompts = ["a", "b", "a", ""]
    # equal up to the rounding of another batch composition inside the encoder (~1e-7)
    torch.testing.assert_close(
        module.prior.encode_text(prompts).hidden_states,
        plain.prior.encode_text(prompts).hidden_states,
        rtol=0,
        atol=1e-5,
    )
    torch.testing.assert_close(
        module.prior.encode_text(["", "b"]).hidden_states,
        plain.prior.encode_text(["", "b"]).hidden_states,
        rtol=0,
        atol=1e-5,
    )
    # least recently used first out: after [a, b, a, ""] the cache keeps a and ""; then b is encoded again
    assert calls == [3, 1] and list(module.prior.text_cache._rows) == ["", "b"]


def _save_official_folder(module: XPSR, root: Path) -> None:
    module.controlnet.save_pretrained(root / "controlnet")
    module.prior.unet.save_pretrained(root / "unet")


def test_official_folder_loads_with_zero_missing_keys_and_other_variants_are_refused(tmp_path: Path) -> None:
    trained = _tiny_xpsr()
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    _save_official_folder(trained, tmp_path / "xpsr")
    loaded = _tiny_xpsr(pretrained=tmp_path / "xpsr")
    assert all(
        torch.equal(a, b) for a, b in zip(trained.trainable_parameters(), loaded.trainable_parameters())
    )
    with pytest.raises(CheckpointMismatchError, match="official XPSR controlnet: 0 missing .* unexpected"):
        _tiny_xpsr(fusion="serial", pretrained=tmp_path / "xpsr")


# ---------------------------------------------------------------------------------------------- end to end
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}


def _extract_tiny_prompts(data_root: Path) -> Path:
    """The embedded photos' prompts by the tiny LLaVA, where experiment=xpsr_tiny reads them."""
    out = data_root / "xpsr_tiny" / "prompts.jsonl"
    fields = ["--field", "highlevel", "--field", "lowlevel"]
    _run(
        "scripts/extract_prompts.py",
        "--input-embedded",
        "--tiny",
        *fields,
        "--out",
        str(out),
        "--no-progress",
    )
    return out


def _run(*args: str, timeout: int = 600) -> None:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_extract_train_eval_with_xpsr_tiny(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    prompts = PromptTable(_extract_tiny_prompts(data_root), key="lowlevel")
    assert len(prompts) == 8 and all(prompts[f"skimage/{n}.png"] for n in ("astronaut", "coffee"))
    run = tmp_path / "train"
    common = [f"paths.data_root={data_root}", "extras.print_config=false"]
    _run("train.py", "experiment=xpsr_tiny", "trainer.max_steps=2", *common, f"hydra.run.dir={run}")
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("trainable.controlnet.") or f".{PIXEL_ATTR}." in k for k in state)
    assert any(".attentions_connect." in k for k in state) and any("conv_degradation_mid" in k for k in state)

    out = tmp_path / "eval"
    eval_args = [
        "eval.py",
        "benchmark=samples",
        "method=xpsr_tiny",
        f"ckpt_path={ckpt}",
        "benchmark.metrics=[psnr,ssim]",
        "method.sampling.num_steps=2",
        "trainer=cpu",
        "num_workers=0",
        "progress=false",
        *common,
        f"hydra.run.dir={out}",
    ]
    _run(*eval_args)
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "xpsr_tiny" and results["num_scored"] == 8
    assert "xpsr_tiny" in (out / "table.md").read_text()

    # with a benchmark prompt side-file the runner hands each image's record to restore(): no captioning, and
    # other prompts give other images
    lq_dir = data_root / "benchmarks" / "samples" / "lq"
    side_file = tmp_path / "lq_prompts.jsonl"
    side_file.write_text(
        "".join(
            json.dumps({"path": p.name, "highlevel": "a red car on a street", "lowlevel": "sharp and clean"})
            + "\n"
            for p in sorted(lq_dir.glob("*.png"))
        )
    )
    out2 = tmp_path / "eval_prompts"
    _run(*eval_args[:-1], f"benchmark.prompts={side_file}", f"hydra.run.dir={out2}")
    assert json.loads((out2 / "results.json").read_text())["num_scored"] == 8
    captioned = sorted((out / "images").rglob("*.png"))
    prompted = sorted((out2 / "images").rglob("*.png"))
    assert [p.name for p in captioned] == [p.name for p in prompted] and len(prompted) == 8
    assert any((read_image(a) != read_image(b)).any() for a, b in zip(captioned, prompted, strict=True))


def test_tiny_fusion_sweep_writes_one_result_per_run_and_one_ablation_table(tmp_path: Path) -> None:
    """The paper's Tab. 3 as a sweep: `train.py -m` (basic launcher), each job evaluated into its own folder,
    then scripts/make_table.py --ablation assembles them (rows in sweep order, labelled by the varied key)."""
    data_root = tmp_path / "data"
    _extract_tiny_prompts(data_root)
    sweep = tmp_path / "sweep"
    fusions = ["sfa", "serial", "high_only", "low_only"]
    _run(
        "train.py",
        "-m",
        "experiment=xpsr_tiny",
        f"method.fusion={','.join(fusions)}",
        "trainer.max_steps=1",
        "evaluate.benchmark=samples",
        "evaluate.metrics=[psnr,ssim]",
        "method.sampling.num_steps=2",
        f"paths.data_root={data_root}",
        f"hydra.sweep.dir={sweep}",
        "extras.print_config=false",
        timeout=900,
    )
    results = [
        json.loads((sweep / str(i) / "eval" / "samples" / "results.json").read_text()) for i in range(4)
    ]
    assert [r["overrides"]["method.fusion"] for r in results] == fusions
    assert all(r["num_scored"] == 8 for r in results)
    state = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(
        ".attentions_connect." in k for k in state["state_dict"]
    )  # serial has no connect attention
    table = subprocess.run(
        [sys.executable, "scripts/make_table.py", "--ablation", str(sweep)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| fusion=")]
    assert [row.split("|")[1].strip() for row in rows] == [f"fusion={f}" for f in fusions]
    psnr = [
        float(row.split("|")[2].strip().strip("*").replace("<u>", "").replace("</u>", "")) for row in rows
    ]
    assert psnr == [round(r["aggregate"]["psnr"], 2) for r in results]
