"""SeeSR stage 2 (restore.methods.seesr): trainable set, conditions, official folders, sampling, train/eval.

Official: cswry/SeeSR train_seesr.py, test_seesr.py, the released preset/models/seesr folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from restore.data.hr_datasets import load_embedded_photo
from restore.methods.latent_diffusion import EMA_CKPT_KEY, GENERATOR_CKPT_KEY, CheckpointMismatchError
from restore.methods.seesr import SeeSR
from restore.models.dape import tiny_dape
from restore.models.priors import sd2_base_prior, tiny_prior
from restore.models.seesr import RCA_ATTR

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}

# the released models: trainable = ControlNet (489.0M) + UNet RCA (260.8M)
CONTROLNET_PARAMS = 489_031_440
UNET_RCA_PARAMS = 260_849_600


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)


def _tiny_seesr(**kwargs) -> SeeSR:
    torch.manual_seed(0)
    defaults = dict(
        prior=tiny_prior(),
        dape=tiny_dape(token_dim=32),
        controlnet={"conditioning_embedding_out_channels": (8, 16, 16, 16)},
        optimizer=_adamw,
        sampling={"num_steps": 4, "process_size": 64, "seed": 0},
    )
    return SeeSR(**{**defaults, **kwargs})


def _photos(size: int = 64, names=("astronaut", "coffee")) -> torch.Tensor:
    images = [torch.from_numpy(load_embedded_photo(n)).permute(2, 0, 1).float() / 255 for n in names]
    return torch.stack([F.interpolate(x[None], size=(size, size), mode="area")[0] for x in images])


class _Pairs(Dataset):
    def __init__(self, gt: torch.Tensor, prompt: str | None = None) -> None:
        self.gt, self.lq, self.prompt = gt, F.interpolate(gt, scale_factor=0.25, mode="area"), prompt

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        item = {"gt": self.gt[i], "lq": self.lq[i], "key": f"p{i}"}
        if self.prompt is not None:
            item["prompt"] = self.prompt
        return item


def _fit(module: SeeSR, tmp_path: Path, steps: int, prompt: str | None = None) -> None:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(_Pairs(_photos(), prompt), batch_size=2))


# ---------------------------------------------------------------------------------------------- full size
def test_full_size_trainable_parameters_equal_the_official_counts() -> None:
    from restore.models.ram.ram import build_ram

    module = SeeSR(prior=sd2_base_prior("meta"), dape=build_ram("swin_l_384", device="meta"))
    controlnet = sum(p.numel() for p in module.controlnet.parameters())
    rca = sum(p.numel() for n, p in module.prior.unet.named_parameters() if f".{RCA_ATTR}." in n)
    trainable = sum(p.numel() for p in module.trainable_parameters())
    assert controlnet == CONTROLNET_PARAMS
    assert rca == UNET_RCA_PARAMS
    assert trainable == CONTROLNET_PARAMS + UNET_RCA_PARAMS  # nothing of the prior base, nothing of DAPE
    assert not any(p.requires_grad for p in module.dape.parameters())


# ---------------------------------------------------------------------------------------------- training
def test_only_controlnet_and_unet_rca_train(tmp_path: Path) -> None:
    module = _tiny_seesr()
    before = {k: v.clone() for k, v in module.named_parameters()}  # prior, DAPE and trainable parts
    _fit(module, tmp_path, steps=2, prompt="a photo")
    after = dict(module.named_parameters())
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("trainable.controlnet.") or f".{RCA_ATTR}." in k for k in changed)
    assert any(f"prior.unet.down_blocks.0.{RCA_ATTR}." in k for k in changed), "UNet RCA did not train"
    assert any(k.startswith("trainable.controlnet.") for k in changed)
    state = module.state_dict()
    assert state and all(k.startswith("trainable.") or f".{RCA_ATTR}." in k for k in state)
    assert not any(k.startswith("dape.") for k in state), "the frozen DAPE must not be checkpointed"


def test_ram_tokens_reach_the_rca_of_both_networks() -> None:
    module = _tiny_seesr().eval()
    # non-zero ControlNet residuals, so the ControlNet's RCA shows in the output too
    for p in module.controlnet.controlnet_down_blocks.parameters():
        torch.nn.init.normal_(p, std=0.1)
    latents = torch.randn(1, 4, 8, 8)
    image = torch.rand(1, 3, 64, 64)
    text = module.prior.encode_text(["a photo"])
    tokens = module.ram_tokens(image)
    with torch.no_grad():
        out = module.denoise(latents, torch.tensor(500), {"text": text, "tokens": tokens}, {"image": image})
        other = module.denoise(
            latents, torch.tensor(500), {"text": text, "tokens": tokens + 1}, {"image": image}
        )
        # the UNet alone (no ControlNet residual change) still sees the tokens through its own RCA
        for p in module.controlnet.parameters():
            p.zero_()
        a = module.denoise(latents, torch.tensor(500), {"text": text, "tokens": tokens}, {"image": image})
        b = module.denoise(latents, torch.tensor(500), {"text": text, "tokens": tokens * 2}, {"image": image})
    assert out.shape == latents.shape
    assert not torch.allclose(out, other)
    assert not torch.allclose(a, b)


def test_training_tags_come_from_the_prompt_or_from_dape_on_the_gt(monkeypatch) -> None:
    module = _tiny_seesr()
    seen: list[torch.Tensor] = []
    original = module.tags

    def spy(images):
        seen.append(images)
        return original(images)

    monkeypatch.setattr(module, "tags", spy)
    gt = _photos()
    lq = F.interpolate(gt, scale_factor=0.25, mode="area")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    module.trainer = trainer  # the hook reads trainer.training
    trainer.training = True
    with_prompt = module.on_after_batch_transfer({"gt": gt, "lq": lq, "prompt": ["x", "y"]}, 0)
    assert with_prompt["prompt"] == ["x", "y"] and not seen
    without = module.on_after_batch_transfer({"gt": gt, "lq": lq}, 0)
    assert len(seen) == 1 and torch.equal(seen[0], gt)
    assert without["prompt"] == original(gt)
    assert without["lr_up"].shape == gt.shape and 0 <= without["lr_up"].min() <= without["lr_up"].max() <= 1
    assert without["ram_tokens"].shape[0] == 2 and without["ram_tokens"].shape[-1] == 32


def test_inference_prompt_is_the_official_string() -> None:
    module = _tiny_seesr()
    # test_seesr.py: f"{tags}, {user_prompt}," + added_prompt
    assert module.inference_prompt("cat, tree") == "cat, tree, ,clean, high-resolution, 8k"
    assert module.hparams.negative_prompt == "dotted, noise, blur, lowres, smooth"


# ---------------------------------------------------------------------------------------------- inference
def test_restore_upscales_x4_deterministically() -> None:
    module = _tiny_seesr().eval()
    lq = _photos(32)[:1]
    a = module.restore(lq)
    b = module.restore(lq)
    assert a.shape == (1, 3, 128, 128)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "a fixed sampling seed must give the same image"


def test_restore_uses_the_ema_weights(tmp_path: Path) -> None:
    module = _tiny_seesr(ema_decay=0.5)
    _fit(module, tmp_path, steps=2, prompt="a photo")
    module.eval()
    lq = _photos(32)[:1]
    with_ema = module.restore(lq)
    module.ema = None
    without = module.restore(lq)
    assert not torch.equal(with_ema, without)


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_official_folder(module: SeeSR, root: Path) -> None:
    """An official-layout folder (preset/models/seesr): diffusers save_pretrained of the UNet (with RCA) and ControlNet."""
    module.prior.unet.save_pretrained(root / "unet")
    module.controlnet.save_pretrained(root / "controlnet")


def test_official_folder_loads_with_zero_missing_keys(tmp_path: Path) -> None:
    source = _tiny_seesr()
    with torch.no_grad():
        for p in source.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    _save_official_folder(source, tmp_path / "seesr")
    torch.manual_seed(123)  # another random init, overwritten by the folder
    loaded = _tiny_seesr(pretrained=str(tmp_path / "seesr"))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.hparams.pretrained == str(tmp_path / "seesr")


def test_official_folder_with_other_keys_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    source = _tiny_seesr()
    _save_official_folder(source, tmp_path / "seesr")
    path = tmp_path / "seesr" / "controlnet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state.pop(next(k for k in state if f".{RCA_ATTR}." in k))
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        _tiny_seesr(pretrained=str(tmp_path / "seesr"))
    with pytest.raises(FileNotFoundError, match="unet/ and controlnet/"):
        _tiny_seesr(pretrained=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- train.py / eval.py
TINY_RUN = [
    "experiment=seesr_tiny",
    "data.batch_size=1",
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.log_every_n_steps=1",
    "method.ema_decay=0.9",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


@pytest.fixture(scope="module")
def one_photo_data(tmp_path_factory) -> list[str]:
    """One 128x128 photo, no flip: the crop is the whole image, so every batch is the same and a resumed run
    can be compared with an uninterrupted one bit for bit (random crops would follow the global RNG, which
    Lightning does not checkpoint)."""
    from restore.data.image_io import write_image

    root = tmp_path_factory.mktemp("one_photo")
    write_image(root / "astronaut.png", _photos(128, names=("astronaut",))[0])
    return [
        "data=folder",
        f"data.train.root={root}",
        "data.train.hflip=false",
    ]


def _train(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *TINY_RUN, *extra, f"hydra.run.dir={run_dir}"]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_step_optimizer_and_ema(
    tmp_path: Path, one_photo_data: list[str]
) -> None:
    steps = ["trainer.max_steps=6", *one_photo_data]
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(
        _train(killed_dir, *steps), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    reference = subprocess.Popen(
        _train(reference_dir, *steps),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last_ckpt = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:  # kill as soon as a complete checkpoint is on disk
            if _load(last_ckpt)["global_step"] >= 2:
                break
        except Exception:  # not written yet, or being written
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = _load(killed_dir / "checkpoints" / "last.ckpt")
    assert 2 <= last["global_step"] < 6

    resumed = subprocess.run(  # the very same command: auto_resume finds last.ckpt
        _train(killed_dir, *steps), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in (resumed.stdout + resumed.stderr).lower()
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    a, b = _load(killed_dir / "checkpoints" / "last.ckpt"), _load(reference_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(float(opt_a[i]["step"]) == 6 for i in opt_a)
    assert a[EMA_CKPT_KEY]["optimization_step"] == b[EMA_CKPT_KEY]["optimization_step"] == 6
    assert torch.equal(a[GENERATOR_CKPT_KEY]["states"][0], b[GENERATOR_CKPT_KEY]["states"][0])
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for x, y in zip(a[EMA_CKPT_KEY]["shadow_params"], b[EMA_CKPT_KEY]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for i in opt_b:
        torch.testing.assert_close(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_train_then_eval_writes_table_and_report(tmp_path: Path) -> None:
    run = tmp_path / "train"
    trained = subprocess.run(
        _train(run, "trainer.max_steps=2"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    state = _load(ckpt)["state_dict"]
    assert all(k.startswith("trainable.controlnet.") or f".{RCA_ATTR}." in k for k in state)

    out = tmp_path / "eval"
    evaluated = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "benchmark=samples",
            "method=seesr_tiny",
            f"ckpt_path={ckpt}",
            "benchmark.metrics=[psnr,ssim]",
            "method.sampling.num_steps=4",
            "trainer=cpu",
            "num_workers=0",
            "progress=false",
            "extras.print_config=false",
            f"paths.data_root={tmp_path / 'data'}",
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "seesr_tiny" in table and "PSNR" in table
    assert (out / "report.html").is_file()
    restored = sorted((out / "images" / "samples").glob("*.png"))
    assert len(restored) == 8

    # the same checkpoint through `python -m restore.infer` gives the very same images (same sampling seed)
    lq_dir = tmp_path / "data" / "benchmarks" / "samples" / "lq"
    inferred = tmp_path / "infer"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "restore.infer",
            "method=seesr_tiny",
            f"input={lq_dir}",
            f"output={inferred}",
            f"ckpt_path={ckpt}",
            "method.sampling.num_steps=4",
            "extras.print_config=false",
            f"hydra.run.dir={tmp_path / 'infer_run'}",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from restore.data.image_io import read_image

    for path in restored:
        assert (read_image(inferred / path.name) == read_image(path)).all(), path.name
