"""StableSR as a method (restore.methods.stablesr): training on the tiny SD prior, the pair pool, the respaced DDPM
sampler against LDM's formulas, the canvas tiling, the inference resize rules and the released checkpoint layout
(official: IceClear/StableSR ldm/models/diffusion/ddpm.py, scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from restore.diffusion.iddpm import LearnedRangeSchedule, space_timesteps
from restore.methods.stablesr import StableSR, load_official_stablesr, stablesr_input_size
from restore.methods.training_pairs import PairPool
from restore.models.priors import tiny_prior
from restore.models.stablesr import (
    StableSRCheckpointError,
    ours_to_official,
    sft_state_dict,
    tiny_stablesr_encoder_config,
)
from restore.weights import WeightFileNotFoundError
from tests.tiny_training import EmbeddedPairs, fit_on_cpu

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SAMPLING = {
    "scheduler": "iddpm",
    "variance": "fixed_small",
    "num_steps": 3,
    "guidance_scale": 1.0,
    "latent_tile": 16,
    "latent_tile_overlap": 8,
    "seed": 0,
    "progress": False,
}


def _tiny(**kwargs) -> StableSR:
    torch.manual_seed(0)
    defaults = dict(
        prior=tiny_prior(),
        encoder=tiny_stablesr_encoder_config(),
        sft_hidden=16,
        input_size=64,
        pixel_tile=512,
        pixel_tile_stride=400,
        pair_pool=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        sampling=SAMPLING,
    )
    return StableSR(**{**defaults, **kwargs})


def _fit(module: StableSR, tmp_path: Path, steps: int = 2) -> L.Trainer:
    return fit_on_cpu(module, tmp_path, steps, EmbeddedPairs(prompts=False))


# ------------------------------------------------------------------------------------------------ training
def test_training_updates_only_the_encoder_and_sft_and_checkpoints_them(tmp_path) -> None:
    module = _tiny()
    frozen_before = {k: v.clone() for k, v in module.prior.unet.state_dict().items() if ".spade." not in k}
    sft_before = {k: v.clone() for k, v in sft_state_dict(module.prior.unet).items()}
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    trainer = _fit(module, tmp_path)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert set(trainer.callback_metrics) >= {"train/diffusion_loss", "train/loss"}
    unet = module.prior.unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in frozen_before.items())
    assert any(not torch.equal(unet[k], v) for k, v in sft_before.items())
    assert any(not torch.equal(module.encoder.state_dict()[k], v) for k, v in encoder_before.items())
    keys = set(module.state_dict())
    assert keys == {f"trainable.encoder.{k}" for k in encoder_before} | {
        f"prior.unet.{k}" for k in sft_before
    }


def test_gradient_checkpointing_keeps_the_features_for_backward(tmp_path) -> None:
    plain, checkpointed = _tiny(), _tiny(gradient_checkpointing=True)
    assert checkpointed.prior.unet.is_gradient_checkpointing
    _fit(plain, tmp_path / "a", steps=1)
    _fit(checkpointed, tmp_path / "b", steps=1)
    for key, value in plain.state_dict().items():  # same draws, same update: recomputation changes nothing
        torch.testing.assert_close(checkpointed.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_batch_prep_identity_pairs_and_the_pool(tmp_path) -> None:
    module = _tiny(no_degradation_prob=1.0)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=1)
    module.trainer = trainer
    trainer.training = True
    batch = EmbeddedPairs()
    out = module.on_after_batch_transfer({"gt": batch.gt, "lq": batch.lq}, 0)
    assert torch.equal(out["lq_up"], batch.gt)  # no_degradation_prob: the input is the GT
    assert out["lq_latent"].shape == (2, 4, 8, 8)
    trainer.training = False
    out = _tiny(no_degradation_prob=1.0).on_after_batch_transfer({"gt": batch.gt, "lq": batch.lq}, 0)
    expected = F.interpolate(batch.lq, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out["lq_up"], expected)  # not in training: always the degraded input


def test_pair_pool_is_real_esrgans_queue() -> None:
    pool, gen = PairPool(4), torch.Generator().manual_seed(0)
    batches = [(torch.full((2, 1), float(i)), torch.full((2, 1), 10.0 + i)) for i in range(4)]
    assert pool(*batches[0], gen)[0].flatten().tolist() == [0, 0]  # filling: passes through
    assert pool(*batches[1], gen)[0].flatten().tolist() == [1, 1]
    seen = []
    for lq, gt in batches[2:]:
        out_lq, out_gt = pool(lq, gt, gen)
        assert torch.equal(out_gt - out_lq, torch.full_like(out_lq, 10.0))  # pairs stay pairs
        seen += out_lq.flatten().tolist()
    assert sorted(pool.lq.flatten().tolist() + seen) == [0, 0, 1, 1, 2, 2, 3, 3]  # nothing lost or duplicated
    with pytest.raises(ValueError, match="multiple of the batch size"):
        PairPool(5)(torch.zeros(2, 1), torch.zeros(2, 1), gen)


# ------------------------------------------------------------------------------------------------ sampling
def _ldm_respaced(steps: int) -> dict[str, np.ndarray]:
    """LDM's ``register_schedule`` after StableSR's respacing, written out in numpy as the official code does it
    (``ldm/models/diffusion/ddpm.py``; SD's scaled-linear betas 0.00085 -> 0.012)."""
    betas = np.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    kept = sorted(space_timesteps(1000, [steps]))
    new_betas, last = [], 1.0
    for i, a in enumerate(abar):
        if i in kept:
            new_betas.append(1 - a / last)
            last = a
    betas = np.array(new_betas)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "kept": np.array(kept),
        "recip": np.sqrt(1.0 / abar),
        "recipm1": np.sqrt(1.0 / abar - 1),
        "coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        "logvar": np.log(np.maximum(var, 1e-20)),
    }


def test_fixed_small_step_is_ldms_respaced_ddpm() -> None:
    ref = _ldm_respaced(200)
    prior = tiny_prior()
    full = LearnedRangeSchedule.from_config(prior.noise_scheduler.config)
    chain = full.respaced(space_timesteps(1000, "200"))
    assert chain.timesteps.tolist() == ref["kept"].tolist() and ref["kept"][[0, 1, -1]].tolist() == [
        0,
        5,
        999,
    ]
    gen = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for k in (199, 100, 1, 0):
        x0 = ref["recip"][k] * x.numpy() - ref["recipm1"][k] * eps.numpy()
        mean = ref["coef1"][k] * x0 + ref["coef2"][k] * x.numpy()
        expected = mean + (np.exp(0.5 * ref["logvar"][k]) * noise.numpy() if k > 0 else 0.0)
        got = chain.p_sample(eps, x, k, noise if k > 0 else None, variance="fixed_small")
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_canvas_runs_nine_64_latent_tiles_per_step_on_a_128_latent() -> None:
    """A 1024x1024 canvas (a 256x256 LR at x4) is a 128x128 latent; tile 64 / overlap 32 -> 3 x 3 tiles, each with
    its own encoder features of its crop of the LR latent, at every step."""
    from restore.sampling.sampler import SamplingInputs, SamplingSettings

    module = _tiny().eval()
    calls = []
    module.encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].clone()))
    gen = torch.Generator().manual_seed(0)
    lq_latent = torch.randn(1, 4, 128, 128, generator=gen)
    inputs = SamplingInputs(
        module.prior.encode_text([""]),
        spatial={"lq_latent": lq_latent},
        start_latent=lq_latent,
        decode=lambda z: torch.zeros(1, 3, 1024, 1024),  # the canvas is the point here, not the VAE
        image_size=(1024, 1024),
        batch_size=1,
    )
    settings = SamplingSettings(**{**SAMPLING, "num_steps": 2, "latent_tile": 64, "latent_tile_overlap": 32})
    with torch.no_grad():
        module.sample(inputs, settings)
    assert len(calls) == 2 * 9
    corners = [(y, x) for y in (0, 32, 64) for x in (0, 32, 64)]
    for call, (y, x) in zip(calls, corners * 2, strict=True):
        assert torch.equal(call, lq_latent[..., y : y + 64, x : x + 64])


@pytest.mark.parametrize(
    ("lq", "scale", "input_size", "size", "factor"),
    [
        ((128, 128), 4, 512, (512, 512), 4.0),
        ((64, 96), 4, 512, (512, 768), 8.0),
        ((300, 200), 4, 512, (1200, 800), 4.0),
    ],
)
def test_input_size_follows_the_canvas_script(lq, scale, input_size, size, factor) -> None:
    assert stablesr_input_size(lq, scale, input_size) == (size, factor)


def test_restore_pads_crops_resizes_back_and_is_seeded() -> None:
    module = _tiny().eval()
    lq = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    out = module.restore(lq)  # 20x24 -> x3.2 up to a 64 short side: 64x76, padded to 64x96, cropped, -> 80x96
    assert out.shape == (1, 3, 80, 96) and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, module.restore(lq))
    big = _tiny(pixel_tile=64, pixel_tile_stride=48).eval()
    calls = []
    big.encoder.register_forward_hook(lambda m, args, out: calls.append(1))
    assert big.restore(torch.rand(1, 3, 16, 32)).shape == (1, 3, 64, 128)  # 64x128 px -> pixel tiles of 64
    assert len(calls) == 3 * 3  # 3 pixel tiles x 3 steps (each tile's 8x8 latent is one latent tile)


def test_guided_sampling_needs_and_uses_the_negative_prompt() -> None:
    module = _tiny(
        negative_prompt="3d, cartoon, anime",
        sampling={**SAMPLING, "scheduler": "ddim", "variance": "learned_range", "guidance_scale": 7.0},
    )
    cond, uncond = module.text_conditions(2)
    assert uncond is not None and not torch.equal(cond.hidden_states, uncond.hidden_states)
    assert module.restore(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="variance='fixed_small' belongs to scheduler=iddpm"):
        _tiny(sampling={**SAMPLING, "scheduler": "ddim"})


# ------------------------------------------------------------------------------------------------ weights
def test_released_layout_loads_and_problems_are_named(tmp_path) -> None:
    trained = _tiny()
    for p in trained.trainable_parameters():
        p.data.normal_()
    official = ours_to_official(trained.encoder.state_dict(), sft_state_dict(trained.prior.unet), 1, 2)
    official["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = torch.ones(32)  # frozen SD keys
    official["first_stage_model.decoder.conv_in.weight"] = torch.ones(1)
    path = tmp_path / "stablesr_000117.ckpt"
    torch.save({"state_dict": official, "global_step": 117}, path)
    fresh = _tiny()
    load_official_stablesr(fresh, path)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(
        fresh.prior.unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"],
        _tiny().prior.unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"],
    )  # the frozen UNet keeps the prior's weights
    with pytest.raises(WeightFileNotFoundError, match="huggingface.co/Iceclear/StableSR.*method.pretrained"):
        load_official_stablesr(fresh, tmp_path / "elsewhere" / "stablesr_000117.ckpt")
    variant = tmp_path / "stablesr_768v_000139.ckpt"  # same layout, other prior: refused with what it needs
    torch.save({"state_dict": official}, variant)
    with pytest.raises(StableSRCheckpointError, match="v-prediction SD-2.1 .*input_size=768"):
        load_official_stablesr(fresh, variant)
    del official["structcond_stage_model.fea_tran.1.out_layers.3.bias"]
    torch.save({"state_dict": official}, path)
    with pytest.raises(StableSRCheckpointError, match=r"stablesr_000117.ckpt: .*encoder: 1 missing"):
        load_official_stablesr(fresh, path)
