"""SUPIR as a method: the sigma schedule and guidance of its sampler, its resize rule and prompts, both training
stages, restoration, the released checkpoint layout and the full-size parts on the meta device."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from restore.diffusion.edm import SUPIR_SIGMA_MAX, DiscreteSigmas
from restore.methods.checkpoints import CheckpointMismatchError
from restore.methods.supir import SUPIR, prompt_truncation, supir_output_size
from restore.models.priors import sd_scheduler_config
from restore.models.priors.sdxl import sdxl_base_prior, tiny_sdxl_prior
from restore.models.supir import (
    MissingControlError,
    connector_state_dict,
    denoise_encoder_ours_to_official,
    glv_ours_to_official,
    ours_to_official,
)
from restore.sampling.sampler import SamplingSettings
from restore.sampling.steppers import build_stepper
from restore.weights import WeightFileNotFoundError
from tests.tiny_training import EmbeddedPairs, fit_on_cpu

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# configs/method/prior/tiny_sdxl_supir.yaml
TINY_UNET = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (1, 2, 2),
    "norm_num_groups": 32,
}
EDM = {"scheduler": "edm", "start": "noise", "color_fix": "wavelet", "progress": False}


def _tiny(stage: str = "adaptor", seed: int = 0, **kwargs) -> SUPIR:
    sampling = {**EDM, "num_steps": 3, "guidance_scale": 4.0, "seed": 0, **kwargs.pop("sampling", {})}
    return SUPIR(
        partial(tiny_sdxl_prior, seed=seed, unet=TINY_UNET),
        stage=stage,
        min_size=64,
        positive_suffix=" sharp",
        negative_prompt="blurry",
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        sampling=sampling,
        **kwargs,
    ).eval()


# ------------------------------------------------------------------------------------------ the sampler
def test_fifty_step_sigmas_are_supirs() -> None:
    sigmas = DiscreteSigmas(_alphas_cumprod()).chain(50)[0]
    assert sigmas[:3].tolist() == pytest.approx([14.615, 12.966, 11.543], abs=1e-3)
    assert sigmas[-4:].tolist() == pytest.approx([0.248, 0.196, 0.134, 0.0], abs=1e-3)
    assert float(sigmas[0]) == pytest.approx(14.61464, abs=1e-5)  # sigma_max; sigma_min of the schedule:
    assert float(DiscreteSigmas(_alphas_cumprod()).sigmas[0]) == pytest.approx(0.02917, abs=1e-5)
    stepper = build_stepper(
        SamplingSettings(**EDM, num_steps=50, s_churn=5, restoration_guidance=4),
        sd_scheduler_config(),
        guidance_reference=torch.zeros(1),
    )
    assert stepper.gamma == pytest.approx(0.1)  # min(5 / 50, sqrt(2) - 1)
    active = sum(float(stepper.sigmas[i + 1]) > 0.05 for i in range(50))
    assert active == 49  # restoration guidance on every step but the last


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**sd_scheduler_config()).alphas_cumprod


def _one_step(tau: float, cfg_start: float | None = None, churn: float = 0.0) -> tuple[torch.Tensor, ...]:
    """One EDM step of the stepper on a fixed model output, and the quantities to redo it by hand."""
    settings = SamplingSettings(
        **EDM, num_steps=10, restoration_guidance=tau, guidance_scale_start=cfg_start, s_churn=churn
    )
    reference = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    stepper = build_stepper(settings, sd_scheduler_config(), guidance_reference=reference)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2)) * 14
    eps = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    _, t = stepper.model_input(x, 0, None)
    scale = stepper.guidance_scale(0, 4.0)
    out = stepper.step(eps, 0, x, None)
    return out, x, eps, reference, stepper, t, scale


def test_tau_minus_one_is_plain_cfg_euler() -> None:
    out, x, eps, _, stepper, t, _ = _one_step(tau=-1)
    sigma, sigma_next = float(stepper.sigmas[0]), float(stepper.sigmas[1])
    sigma_q = float(stepper.discrete.sigmas[int(t)])
    denoised = x - sigma_q * eps  # c_skip 1, c_out -sigma at the network's (snapped) sigma
    expected = x + (sigma_next - sigma) * (x - denoised) / sigma
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    off, *_ = _one_step(tau=0)
    torch.testing.assert_close(off, out)


def test_restoration_guidance_pulls_the_estimate_toward_the_stage1_latent() -> None:
    out, x, eps, reference, stepper, t, _ = _one_step(tau=4)
    sigma, sigma_next = float(stepper.sigmas[0]), float(stepper.sigmas[1])
    denoised = x - float(stepper.discrete.sigmas[int(t)]) * eps
    k = (sigma / SUPIR_SIGMA_MAX) ** 4  # sigma (not sigma_hat) over the hard-coded 14.6146
    guided = denoised - (denoised - reference) * k
    torch.testing.assert_close(out, x + (sigma_next - sigma) * (x - guided) / sigma, rtol=1e-6, atol=1e-5)
    assert k == pytest.approx(1.0, abs=1e-4)  # at sigma_max the estimate is (almost) the reference itself


def test_linear_cfg_ramps_from_start_at_sigma_max_to_the_scale_at_zero() -> None:
    *_, stepper, _, scale = _one_step(tau=-1, cfg_start=1.0)
    assert scale == pytest.approx(
        1.0 + (4.0 - 1.0) * (1 - float(stepper.sigmas[0]) / SUPIR_SIGMA_MAX), abs=1e-5
    )
    settings = SamplingSettings(
        scheduler="sde-dpmsolver++",
        karras_sigmas=True,
        num_steps=8,
        start="noise",
        guidance_scale=2.0,
        guidance_scale_start=1.5,
        progress=False,
    )
    dpm = build_stepper(settings, sd_scheduler_config())
    first, last = dpm.guidance_scale(0, 2.0), dpm.guidance_scale(7, 2.0)
    assert first == pytest.approx(1.5, abs=2e-3) and 1.99 < last <= 2.0
    assert dpm.noise_level(0) == pytest.approx(14.6146, abs=1e-3)  # Karras from the schedule's sigma_max


def test_control_scale_ramp_reads_the_pre_churn_sigma_of_every_step() -> None:
    module = _tiny(control_scale=1.0, control_scale_start=0.0, sampling={"s_churn": 5, "num_steps": 4})
    assert module.control_scale_at(SUPIR_SIGMA_MAX) == pytest.approx(0.0)
    assert module.control_scale_at(0.0) == pytest.approx(1.0)
    seen: list[float] = []
    original = module._set_control_scale
    module._set_control_scale = lambda i, sigma: (seen.append(sigma), original(i, sigma))[1]
    module.restore(torch.rand(1, 3, 16, 16))
    expected = DiscreteSigmas(_alphas_cumprod()).chain(4)[0][:4].tolist()
    assert seen == pytest.approx(expected)


def test_control_scale_zero_is_the_plain_sdxl_unet() -> None:
    module = _tiny()
    for p in module.trainable_parameters():  # trained-looking connectors and adaptor
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor(500)
    text = module.prior.encode_text(["a", "b"])
    control = torch.randn(2, 4, 8, 8)
    module._control_scale_now = 0.0
    with_zero = module.denoise(x, t, text, {"control_latent": control})
    plain_unet = tiny_sdxl_prior(seed=0, unet=TINY_UNET).unet
    plain = plain_unet(x, t.expand(2), **module.prior.denoiser_kwargs(text)).sample
    torch.testing.assert_close(with_zero, plain, rtol=1e-5, atol=1e-5)
    module._control_scale_now = 1.0
    assert not torch.allclose(module.denoise(x, t, text, {"control_latent": control}), plain, atol=1e-3)
    with pytest.raises(MissingControlError, match="control_features"):
        module.prior.unet(x, t.expand(2), **module.prior.denoiser_kwargs(text))


# ----------------------------------------------------------------------------------- sizes and prompts
@pytest.mark.parametrize(
    ("lq", "scale", "size", "final"),
    [
        ((128, 96), 4, (1344, 1024), (512, 384)),  # 384 -> 1024: 512 x 8/3 = 1365.3 -> 21 x 64
        ((300, 500), 4, (1216, 1984), (1200, 2000)),  # already >= 1024: 18.75 -> 19, 31.25 -> 31 (x 64)
        ((256, 256), 2, (1024, 1024), (512, 512)),
        ((100, 150), 1, (1024, 1536), (100, 150)),
    ],
)
def test_output_size_is_pil2tensors(lq, scale, size, final) -> None:
    assert supir_output_size(lq, scale) == (size, final)


def test_caption_view_size_is_fix_resize_512() -> None:
    assert supir_output_size((128, 96), 4, fix_resize=512) == ((704, 512), (683, 512))


def test_prompts_join_caption_and_suffix_and_warn_once_when_cut() -> None:
    module = _tiny()
    tokenizer = module.prior.tokenizer
    assert prompt_truncation(tokenizer, "a cat", " sharp") == 0
    long = " ".join(["word"] * 100)
    assert prompt_truncation(tokenizer, long, " sharp") > 0
    captured = {}
    encode = module.prior.encode_text
    module.prior.encode_text = lambda prompts, **kw: (
        captured.setdefault("p", []).append(list(prompts)),
        encode(prompts),
    )[1]
    with pytest.warns(
        UserWarning,
        match=r"1 of 2 prompt\(s\) exceed .* tokens: the last \d+ token\(s\) of the quality suffix",
    ):
        module.text_conditions(["a cat", long])
    assert captured["p"] == [["a cat sharp", long + " sharp"], ["blurry", "blurry"]]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.text_conditions([long])  # once per module


def test_captions_from_records_then_captioner_on_the_stage1_view() -> None:
    seen = []

    class Captioner(torch.nn.Module):
        def caption(self, images):
            seen.extend(tuple(i.shape) for i in images)
            return ["described"] * len(images)

    module = _tiny(captioner=Captioner())
    lq = torch.rand(2, 3, 16, 12)
    assert module.captions(lq, [{"caption": "given"}, {}]) == ["given", "described"]
    assert seen == [(3, 683, 512)]  # 64 x 48 at short side 512, unsnapped
    assert _tiny(default_prompt="fallback").captions(lq) == ["fallback", "fallback"]


# ------------------------------------------------------------------------------------------ training
def test_stage_encoder_trains_only_the_robust_encoder_with_the_papers_loss(tmp_path) -> None:
    module = _tiny(stage="encoder", gradient_checkpointing=True)
    assert not hasattr(module.prior.unet, "project_modules") and "control" not in module.trainable
    assert module.prior.vae.decoder.gradient_checkpointing  # the loss back-propagates through the frozen D
    before = {k: v.clone() for k, v in module.state_dict().items()}
    vae_before = {k: v.clone() for k, v in module.prior.vae.state_dict().items()}
    fit_on_cpu(module, tmp_path, steps=2)
    after = module.state_dict()
    assert set(after) == {k for k in before}  # the checkpoint holds E_dr only
    assert all(k.startswith("trainable.denoise_encoder.encoder.") for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert all(torch.equal(v, module.prior.vae.state_dict()[k]) for k, v in vae_before.items())  # D, E frozen
    # the loss is ||D(E_dr(LQ)) - D(E_dr(GT))||^2 on the LQ upsampled to the GT size
    batch = next(iter(torch.utils.data.DataLoader(EmbeddedPairs(), batch_size=2)))
    from restore.sampling.sampler import resize_bicubic

    lq_up = resize_bicubic(batch["lq"], (64, 64))
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(
            module._decode_moments(module.denoise_encoder(2 * lq_up - 1)),
            module._decode_moments(module.denoise_encoder(2 * batch["gt"] - 1)),
        )
    module.log = lambda *a, **k: None
    assert float(module._encoder_step(batch, 0)) == pytest.approx(float(expected), rel=1e-5)


def test_stage_adaptor_trains_control_and_connectors_on_a_stage_encoder_checkpoint(tmp_path) -> None:
    encoder_stage = _tiny(stage="encoder", seed=0)
    for p in encoder_stage.trainable_parameters():
        p.data.normal_(0, 0.02)
    ckpt = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": encoder_stage.state_dict()}, ckpt)
    module = _tiny(encoder_checkpoint=ckpt, gradient_checkpointing=True, null_prompt_prob=0.5)
    encoder_weights = {k: v.clone() for k, v in module.denoise_encoder.state_dict().items()}
    for k, v in encoder_stage.denoise_encoder.state_dict().items():
        assert torch.equal(encoder_weights[k], v)
    names = {n for n, p in module.named_parameters() if p.requires_grad and not module._is_frozen_key(n)}
    assert names and all(n.startswith(("trainable.control.", "prior.unet.project_modules.")) for n in names)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    unet_before = {
        k: v.clone() for k, v in module.prior.unet.state_dict().items() if "project_modules" not in k
    }
    fit_on_cpu(module, tmp_path, steps=2, data=EmbeddedPairs(prompts=True))
    after = module.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(k.startswith("trainable.control.") for k in changed)
    assert any(k.startswith("prior.unet.project_modules.") for k in changed)
    assert not any(k.startswith("trainable.denoise_encoder.") for k in changed)
    assert all(torch.equal(v, module.prior.unet.state_dict()[k]) for k, v in unet_before.items())
    with pytest.raises(CheckpointMismatchError, match="no trainable.denoise_encoder"):
        _tiny(encoder_checkpoint=_save(tmp_path / "other.ckpt", {"state_dict": {"x": torch.ones(1)}}))


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_adaptor_is_initialised_from_the_sdxl_encoder() -> None:
    module = _tiny()
    unet = module.prior.unet.state_dict()
    for key, value in module.control.state_dict().items():
        if key.startswith("input_hint_block"):
            assert not value.any()  # zero-initialised hint convolution
        else:
            assert torch.equal(value, unet[key]), key


# ------------------------------------------------------------------------------------------ inference
def test_restore_is_seeded_sized_and_colour_fixed_against_stage1() -> None:
    module = _tiny()
    lq = torch.rand(1, 3, 12, 16)
    out = module.restore(lq)
    assert out.shape == (1, 3, 48, 64) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(module.restore(lq), out)
    encoder_only = _tiny(stage="encoder").restore(lq)  # the stage-1 restoration, resized back
    control, stage1 = module.stage1(torch.nn.functional.interpolate(lq, (64, 80), mode="bicubic"))
    assert encoder_only.shape == out.shape and stage1.shape == (1, 3, 64, 80)


@pytest.mark.parametrize("preset", ["paper", "lightning"])
def test_presets_sample(preset: str, tmp_path) -> None:
    from tests.hydra_helpers import compose_config

    cfg = compose_config(
        "eval", ["method=supir", "benchmark=samples", f"method/supir_preset={preset}"], tmp_path
    )
    sampling = {k: v for k, v in cfg.method.sampling.items() if k != "seed"}
    module = _tiny(sampling={**sampling, "num_steps": 2, "progress": False})
    assert module.restore(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


def test_inference_dtypes_cast_the_parts_and_refuse_an_fp16_autoencoder() -> None:
    module = _tiny(inference_dtypes={"diffusion": "bf16", "autoencoder": "bf16"})
    out = module.restore(torch.rand(1, 3, 16, 16))
    assert module.prior.unet.dtype == torch.bfloat16 and module.control.conv_in.weight.dtype == torch.bfloat16
    assert module.prior.vae.dtype == torch.bfloat16 and module.denoise_encoder.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="NaN in float16"):
        _tiny(inference_dtypes={"autoencoder": "fp16"})


# ------------------------------------------------------------------------------------------ checkpoints
def test_released_layout_loads_every_trained_part(tmp_path) -> None:
    trained = _tiny(seed=0)
    for p in trained.trainable.parameters():
        p.data.normal_()
    for p in trained.prior.unet.project_modules.parameters():
        p.data.normal_()
    vae = trained.prior.vae
    official = {
        **glv_ours_to_official(trained.control.state_dict(), trained.control.layers_per_block),
        **ours_to_official(connector_state_dict(trained.prior.unet)),
        **denoise_encoder_ours_to_official(trained.denoise_encoder.encoder.state_dict(), vae),
        "model.control_model.mask_LQ": torch.ones(1, 4, 8, 8),  # a training leftover of the released files
        "model.diffusion_model.input_blocks.0.0.weight": torch.ones(1),  # frozen SDXL parts: the prior's
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(1),
    }
    path = _save(tmp_path / "SUPIR-v0Q.ckpt", {"state_dict": official})
    fresh = _tiny(pretrained=path)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    encoder_only = _tiny(stage="encoder", pretrained=path)
    for key, value in trained.denoise_encoder.state_dict().items():
        assert torch.equal(encoder_only.denoise_encoder.state_dict()[key], value)
    cross_attention = next(k for k in official if k.endswith(".attn.to_q.weight"))
    del official[cross_attention]
    _save(path, {"state_dict": official})
    with pytest.raises(CheckpointMismatchError, match="SUPIR-v0Q.ckpt: connectors: 1 missing"):
        _tiny(pretrained=path)
    with pytest.raises(
        WeightFileNotFoundError, match="Google Drive / Baidu .*Fanghua-Yu/SUPIR.*method.pretrained"
    ):
        _tiny(pretrained=tmp_path / "SUPIR-v0F.ckpt")


def test_full_size_trained_parts_are_the_released_delta() -> None:
    module = SUPIR(partial(sdxl_base_prior, "meta"), sampling=EDM)
    tensors = [p for p in module.trainable_parameters()]
    stored = module.state_dict()
    # SUPIR-v0Q.ckpt holds 1,035 tensors / 1,332.4M parameters beside SDXL: these 1,034 plus mask_LQ [1, 4, 64, 64]
    assert len(stored) == 1034
    assert sum(v.numel() for v in stored.values()) == 1_332_339_912
    assert sum(p.numel() for p in tensors) == 54_797_440 + 1_243_378_880  # E_dr is frozen in this stage
    encoder = SUPIR(partial(sdxl_base_prior, "meta"), stage="encoder", sampling=EDM)
    assert sum(p.numel() for p in encoder.trainable_parameters()) == 34_163_592
    assert math.isclose(sum(v.numel() for v in stored.values()) + 4 * 64 * 64, 1_332.4e6, rel_tol=1e-4)


def test_negative_quality_samples_carry_the_negative_prompt() -> None:
    from restore.data.hr_datasets import EmbeddedPhotos, FixedPrompt, MixtureDataset

    photos = EmbeddedPhotos(names=["astronaut"], crop_size=32)
    mix = MixtureDataset(
        [photos, FixedPrompt(EmbeddedPhotos(names=["coffee"], crop_size=32), "lowres, blurry")],
        weights=[1, 1],
        length=20,
        seed=0,
    )
    which, _ = mix.assignment()
    items = [mix[i] for i in range(20)]
    assert {it.get("prompt") for it, w in zip(items, which) if w == 1} == {"lowres, blurry"}
    assert all("prompt" not in it for it, w in zip(items, which) if w == 0)
    assert 0 < int(which.sum()) < 20


# ------------------------------------------------------------------------------------ the whole chain
def _cli(*args: str, timeout: int = 300) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, *args, "extras.print_config=false"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_both_stages_train_then_eval_with_captions_through_the_clis(tmp_path) -> None:
    import json

    from restore.data.testsets import prepare_samples

    data = tmp_path / "data"
    prepare_samples(data / "benchmarks/samples", progress=False)
    quiet = ["trainer.max_steps=2", "callbacks.progress_bar=null", f"paths.data_root={data}"]
    _cli("train.py", "experiment=supir_encoder_tiny", *quiet, f"hydra.run.dir={tmp_path / 'a'}")
    stage_a = tmp_path / "a/checkpoints/last.ckpt"
    _cli(
        "train.py",
        "experiment=supir_tiny",
        f"method.encoder_checkpoint={stage_a}",
        *quiet,
        f"hydra.run.dir={tmp_path / 'b'}",
    )
    stage_b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    encoder = torch.load(stage_a, weights_only=True)["state_dict"]
    assert all(torch.equal(stage_b[k], v) for k, v in encoder.items())  # stage B kept stage A's E_dr
    assert any(k.startswith("trainable.control.") for k in stage_b)
    assert any(k.startswith("prior.unet.project_modules.") for k in stage_b)

    lq = sorted((data / "benchmarks/samples/lq").glob("*.png"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"path": p.name, "caption": "a photo. "}) + "\n" for p in lq))
    _cli(
        "eval.py",
        "benchmark=samples",
        "method=supir_tiny",
        f"ckpt_path={tmp_path / 'b/checkpoints/last.ckpt'}",
        f"benchmark.prompts={prompts}",
        "benchmark.metrics=[psnr,ssim]",
        "method.sampling.num_steps=2",
        "trainer=cpu",
        "num_workers=0",
        "progress=false",
        f"paths.data_root={data}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        timeout=600,
    )
    assert "supir_tiny" in (tmp_path / "eval/table.md").read_text()
    assert len(list((tmp_path / "eval/images/samples").glob("*.png"))) == len(lq) == 8


def test_an_8bit_captioner_needs_a_cuda_device_and_says_so() -> None:
    from restore.models.captioners import MLLMCaptioner

    with pytest.raises(ValueError, match=r"load_in_8bit needs a CUDA device .*captioner.device=cuda:0"):
        MLLMCaptioner.from_pretrained("llava-hf/llava-1.5-13b-hf", "describe", load_in_8bit=True)


def test_the_vae_tiles_run_for_the_robust_encoder_the_decoder_and_the_encoder(monkeypatch) -> None:
    import restore.sampling.tiled_vae as tiled_vae

    calls = []
    run_tiled = tiled_vae._run_tiled

    def spy(program, x, *args, **kwargs):
        calls.append(tuple(x.shape[-2:]))
        return run_tiled(program, x, *args, **kwargs)

    monkeypatch.setattr(tiled_vae, "_run_tiled", spy)
    module = _tiny(sampling={"vae_encoder_tile": 64, "vae_decoder_tile": 8, "num_steps": 2})
    out = module.restore(torch.rand(1, 3, 64, 64))  # 256 px / 32 latent px: beyond a tile and its padding
    assert torch.isfinite(out).all()
    # E_dr on the 256 px input, D on its 32x32 latent (stage 1), E on the stage-1 image, D on the sample
    assert calls == [(256, 256), (32, 32), (256, 256), (32, 32)]
