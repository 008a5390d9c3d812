"""LatentDiffusionSR (restore.methods.latent_diffusion): trainable set, objective, prompt dropout, checkpoints,
EMA, resume (the training step of the official trainers, e.g. cswry/SeeSR train_seesr.py)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from restore.data.degradation import RealESRGANDegradation
from restore.data.hr_datasets import EmbeddedPhotos
from restore.methods.latent_diffusion import CheckpointMismatchError, LatentDiffusionSR, build
from restore.models.priors import tiny_prior


class ControlSR(LatentDiffusionSR):
    """A minimal ControlNet method: LR (bicubic to GT size, [0, 1]) enters a ControlNet copy of the UNet."""

    def __init__(self, prior, **kwargs):
        prior = build(prior)
        controlnet = ControlNetModel.from_unet(
            prior.unet, conditioning_embedding_out_channels=(8, 16, 16, 16)
        )
        super().__init__(prior, nn.ModuleDict({"controlnet": controlnet}), **kwargs)

    def predict(self, noisy, timesteps, text, batch):
        gt = batch["gt"]
        cond = F.interpolate(batch["lq"], size=gt.shape[-2:], mode="bicubic").clamp(0, 1)
        down, mid = self.trainable["controlnet"](
            noisy, timesteps, controlnet_cond=cond, return_dict=False, **self.prior.denoiser_kwargs(text)
        )
        return self.prior.predict(
            noisy, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )


def _adamw(lr: float = 1e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


class _Fixed(Dataset):
    """Paired items made once from real photos: gt = photo, lq = 4x area-downscaled photo."""

    def __init__(self, photos: torch.Tensor, prompts: bool = True):
        self.gt = photos
        self.lq = F.interpolate(photos, scale_factor=0.25, mode="area")
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        item = {"gt": self.gt[i], "lq": self.lq[i], "key": f"p{i}"}
        if self.prompts:
            item["prompt"] = "a photo, clean, high-resolution, 8k"
        return item


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def photos_64(photos_128) -> torch.Tensor:
    return F.interpolate(photos_128, size=64, mode="area")


# ------------------------------------------------------------------------------------------------ module
def test_frozen_prior_and_optimizer_sees_only_trainable(tmp_path, photos_64) -> None:
    model = ControlSR(tiny_prior(), optimizer=_adamw(), trainable_prior_modules=("conv_out",))
    prior_before = {k: v.clone() for k, v in model.prior.state_dict().items()}
    ctrl_before = {k: v.clone() for k, v in model.trainable.state_dict().items()}
    loader = DataLoader(_Fixed(photos_64), batch_size=4)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(model, loader)

    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    expected = {id(p) for p in model.trainable.parameters()} | {
        id(p) for p in model.prior.unet.conv_out.parameters()
    }
    assert opt_params == expected
    assert opt_params == {id(p) for p in model.parameters() if p.requires_grad}
    # prior: no grads, eval mode after Lightning's train(); only conv_out changed
    for name, p in model.prior.named_parameters():
        assert p.grad is None or name.startswith("unet.conv_out"), name
    assert not model.prior.training and not model.prior.vae.training and model.trainable.training
    assert model.prior.unet.conv_out.training
    for k, v in model.prior.state_dict().items():
        assert torch.equal(v, prior_before[k]) != k.startswith("unet.conv_out"), k
    changed = [k for k, v in model.trainable.state_dict().items() if not torch.equal(v, ctrl_before[k])]
    assert any("controlnet_down_blocks" in k for k in changed)  # the zero convs learn first


def test_loss_decreases_on_fixed_batch(tmp_path, photos_64) -> None:
    torch.manual_seed(0)
    model = ControlSR(tiny_prior(), optimizer=_adamw(3e-3), trainable_prior_modules=("conv_out",))
    losses = _Losses()
    _trainer(tmp_path, max_steps=24, callbacks=[losses]).fit(
        model, DataLoader(_Fixed(photos_64), batch_size=4)
    )
    assert len(losses.losses) == 24 and all(math.isfinite(v) for v in losses.losses)
    first, last = sum(losses.losses[:6]) / 6, sum(losses.losses[-6:]) / 6
    assert last < 0.8 * first, (first, last)  # measured: 0.99 -> 0.42


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_targets_match_formulas(prediction_type) -> None:
    model = LatentDiffusionSR(tiny_prior(), trainable=nn.ModuleDict(), prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 499, 999])
    abar = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = model.noise_scheduler.add_noise(x0, eps, t)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    expected = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(model.objective.target(x0, eps, t), expected)
    # abar(999) of SD's schedule: prod(1 - betas) = 0.0047 (final signal scale sqrt = 0.068)
    assert abar[2].item() == pytest.approx(0.004660, abs=2e-5)


def test_prediction_type_defaults_to_scheduler_and_is_validated() -> None:
    prior = tiny_prior()
    assert LatentDiffusionSR(prior, trainable=nn.ModuleDict()).prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        LatentDiffusionSR(tiny_prior(), trainable=nn.ModuleDict(), prediction_type="sample")
    with pytest.raises(ValueError, match="no submodule of the prior's unet"):
        LatentDiffusionSR(tiny_prior(), trainable=nn.ModuleDict(), trainable_prior_modules=("nope",))
    with pytest.raises(ValueError, match="shares parameters"):
        LatentDiffusionSR(prior, trainable=nn.ModuleDict({"x": prior.unet.conv_in}))


def test_null_prompt_rate_and_determinism() -> None:
    model = LatentDiffusionSR(tiny_prior(), trainable=nn.ModuleDict(), null_prompt_prob=0.5)
    masks = [model.null_prompt_mask(20_000, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    rate = masks[0].float().mean().item()
    assert abs(rate - 0.5) < 0.015  # 4.2 sigma of Binomial(20000, 0.5)
    model.hparams.null_prompt_prob = 0.1
    assert (
        abs(model.null_prompt_mask(20_000, torch.Generator().manual_seed(1)).float().mean().item() - 0.1)
        < 0.01
    )


def test_gradient_checkpointing_flag() -> None:
    model = ControlSR(tiny_prior(), gradient_checkpointing=True)
    assert model.trainable["controlnet"].is_gradient_checkpointing
    assert model.prior.unet.is_gradient_checkpointing
    assert not ControlSR(tiny_prior()).trainable["controlnet"].is_gradient_checkpointing


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_trainable_only_and_reloads_exactly(tmp_path, photos_64) -> None:
    model = ControlSR(tiny_prior(), optimizer=_adamw(), ema_decay=0.9, trainable_prior_modules=("conv_out",))
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(model, DataLoader(_Fixed(photos_64), batch_size=2))
    ckpt_path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    keys = list(ckpt["state_dict"])
    prior_keys = [k for k in keys if k.startswith("prior.")]
    assert prior_keys and all(k.startswith("prior.unet.conv_out.") for k in prior_keys)
    assert len(keys) == len(model.trainable.state_dict()) + len(prior_keys)
    n_trainable = sum(v.numel() for v in ckpt["state_dict"].values())
    n_prior = sum(p.numel() for p in model.prior.parameters())
    assert n_trainable < n_prior  # the frozen prior (VAE, text encoder, UNet) is not in the file
    assert ckpt["ema"]["optimization_step"] == 3 and len(ckpt["ema"]["shadow_params"]) == len(
        model.trainable_parameters()
    )
    assert "diffusion_generator" in ckpt

    fresh = ControlSR(tiny_prior(), ema_decay=0.9, trainable_prior_modules=("conv_out",))
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(model.ema.shadow_params, fresh.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert fresh.ema.optimization_step == 3
    # the EMA differs from the live weights after 3 steps, and ema_weights() swaps it in and back
    live = [p.detach().clone() for p in fresh.trainable_parameters()]
    with fresh.ema_weights():
        swapped = [p.detach().clone() for p in fresh.trainable_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(live, swapped, strict=True))
    assert all(torch.equal(a, p) for a, p in zip(live, fresh.trainable_parameters(), strict=True))

    other = ControlSR(tiny_prior())  # conv_out frozen here: its trained weights would be dropped
    with pytest.raises(CheckpointMismatchError, match="2 unexpected"):
        other.load_state_dict(ckpt["state_dict"])
    with pytest.warns(UserWarning, match="ignored 2 frozen-prior keys"):
        other.load_state_dict(ckpt["state_dict"], strict=False)
    assert torch.equal(
        other.trainable.state_dict()["controlnet.conv_in.weight"],
        ckpt["state_dict"]["trainable.controlnet.conv_in.weight"],
    )
    missing = {k: v for k, v in ckpt["state_dict"].items() if k != "trainable.controlnet.conv_in.weight"}
    with pytest.raises(CheckpointMismatchError, match="1 missing"):
        fresh.load_state_dict(missing)


def test_fit_end_to_end_with_degradation_and_resume(tmp_path) -> None:
    """EmbeddedPhotos -> Real-ESRGAN degradation on the device -> 3 steps, bf16-mixed; resume continues."""
    data = EmbeddedPhotos(names=["astronaut", "coffee"], crop_size=96)  # the degradation needs >= 74 px
    loader = DataLoader(data, batch_size=2)
    deg = RealESRGANDegradation.from_preset("realesrgan")

    def make() -> ControlSR:
        return ControlSR(tiny_prior(), optimizer=_adamw(), degradation=deg, ema_decay=0.99)

    model = make()
    losses = _Losses()
    trainer = _trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[losses])
    trainer.fit(model, loader)
    assert len(losses.losses) == 3 and all(math.isfinite(v) for v in losses.losses)
    trainer.save_checkpoint(tmp_path / "a.ckpt")

    resumed = make()
    trainer2 = _trainer(tmp_path, max_steps=5, precision="bf16-mixed")
    trainer2.fit(resumed, loader, ckpt_path=tmp_path / "a.ckpt")
    assert trainer2.global_step == 5 and resumed.ema.optimization_step == 5


def test_nonfinite_loss_stops_with_step(tmp_path, photos_64) -> None:
    class Broken(ControlSR):
        def predict(self, noisy, timesteps, text, batch):
            return super().predict(noisy, timesteps, text, batch) * float("nan")

    model = Broken(tiny_prior(), optimizer=_adamw())
    with pytest.raises(FloatingPointError, match="global step 0"):
        _trainer(tmp_path, max_steps=2).fit(model, DataLoader(_Fixed(photos_64), batch_size=2))


def test_scale_lr_multiplies_by_effective_batch(tmp_path, photos_64) -> None:
    class DM(L.LightningDataModule):
        batch_size = 2

        def train_dataloader(self):
            return DataLoader(_Fixed(photos_64), batch_size=self.batch_size)

    # linear (diffusers' --scale_lr): x global batch; sqrt (PixArt's auto_lr): x sqrt(global / base batch)
    for rule, base, expected in ((True, 1, 1e-4 * 4), ("sqrt", 128, 1e-4 * math.sqrt(4 / 128))):
        model = ControlSR(tiny_prior(), optimizer=_adamw(1e-4), scale_lr=rule, lr_base_batch=base)
        trainer = _trainer(tmp_path, max_steps=1, accumulate_grad_batches=2)
        trainer.fit(model, datamodule=DM())
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def test_loss_weights_scale_named_terms_and_unknown_names_are_refused(tmp_path, photos_64) -> None:
    losses = {}
    for weight in (1.0, 3.0):
        torch.manual_seed(0)
        model = ControlSR(tiny_prior(), optimizer=_adamw(), loss_weights={"diffusion": weight})
        record = _Losses()
        _trainer(tmp_path, max_steps=1, callbacks=[record]).fit(
            model, DataLoader(_Fixed(photos_64), batch_size=2)
        )
        losses[weight] = record.losses[0]
    assert losses[3.0] == pytest.approx(3 * losses[1.0], rel=1e-6)
    model = ControlSR(tiny_prior(), optimizer=_adamw(), loss_weights={"difusion": 2.0})
    with pytest.raises(ValueError, match=r"loss_weights names \['difusion'\].*\['diffusion'\]"):
        _trainer(tmp_path, max_steps=1).fit(model, DataLoader(_Fixed(photos_64), batch_size=2))
