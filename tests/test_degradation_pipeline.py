"""Behaviour of the RealESRGANDegradation module: API, presets, determinism, errors, devices."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from restore import CONFIG_DIR
from restore.data.degradation import DegradationConfig, RealESRGANDegradation


def test_realesrgan_preset_equals_documented_defaults() -> None:
    """configs/degradation/realesrgan.yaml and DegradationConfig() state the same x4plus numbers."""
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "degradation" / "realesrgan.yaml"))
    yaml.pop("_target_")
    assert dataclasses.asdict(DegradationConfig(**yaml)) == dataclasses.asdict(DegradationConfig())


def test_hydra_instantiate_builds_the_module() -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONFIG_DIR / "degradation" / "stablesr_mild.yaml")
    deg = instantiate(cfg)
    assert isinstance(deg, RealESRGANDegradation)
    assert deg.config.jpeg_range == (60, 95) and deg.config.round_output is False


def test_output_shapes_range_and_quantisation(photos_128: torch.Tensor) -> None:
    out = RealESRGANDegradation()(photos_128, torch.Generator().manual_seed(0))
    assert out.lq.shape == (4, 3, 32, 32) and out.gt.shape == photos_128.shape
    assert out.lq.min() >= 0 and out.lq.max() <= 1
    torch.testing.assert_close(out.lq * 255, (out.lq * 255).round(), rtol=0, atol=1e-4)
    assert not torch.equal(out.gt, photos_128)  # USM-sharpened target
    plain = RealESRGANDegradation(usm_sharpen_gt=False, round_output=False)(
        photos_128, torch.Generator().manual_seed(0)
    )
    assert torch.equal(plain.gt, photos_128)
    assert not torch.allclose(plain.lq * 255, (plain.lq * 255).round())


@pytest.mark.parametrize("per_sample", [False, True])
def test_same_seed_same_output(photos_128: torch.Tensor, per_sample: bool) -> None:
    deg = RealESRGANDegradation(per_sample=per_sample)
    a = deg(photos_128, torch.Generator().manual_seed(42)).lq
    b = deg(photos_128, torch.Generator().manual_seed(42)).lq
    c = deg(photos_128, torch.Generator().manual_seed(43)).lq
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_used_without_generator(photos_128: torch.Tensor) -> None:
    deg = RealESRGANDegradation()
    torch.manual_seed(3)
    a = deg(photos_128).lq
    torch.manual_seed(3)
    assert torch.equal(a, deg(photos_128).lq)


def test_per_sample_mode_degrades_each_image_with_its_own_draws(photos_128: torch.Tensor) -> None:
    """per_sample=True: each image gets its own full draw (including the per-batch choices) and the
    batch result equals degrading the images one by one with those draws."""
    deg = RealESRGANDegradation(per_sample=True)
    batch = deg(photos_128, torch.Generator().manual_seed(9)).lq
    g = torch.Generator().manual_seed(9)
    drawn = deg.draw(4, g)
    singles = torch.cat([deg.apply(photos_128[i : i + 1], p, g).lq for i, p in enumerate(drawn)])
    assert torch.equal(batch, singles)
    assert len({p.stage1.resize_scale for p in drawn}) == 4


def test_scale_option(photos_128: torch.Tensor) -> None:
    out = RealESRGANDegradation(scale=2)(photos_128, torch.Generator().manual_seed(0))
    assert out.lq.shape == (4, 3, 64, 64)


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((4, 1, 128, 128), torch.float32, "RGB batch"),
        ((3, 128, 128), torch.float32, "RGB batch"),
        ((2, 3, 128, 128), torch.uint8, "divide uint8 images by 255"),
        ((2, 3, 130, 128), torch.float32, "not divisible by scale"),
        ((2, 3, 64, 64), torch.float32, "use crops of at least 74 px"),
    ],
)
def test_bad_input_errors_name_the_fix(shape, dtype, message) -> None:
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises((ValueError, TypeError), match=message):
        RealESRGANDegradation()(x)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match="unknown degradation option.*noise_rang.*valid options"):
        RealESRGANDegradation(noise_rang=[1, 2])
    with pytest.raises(ValueError, match="resize_prob"):
        RealESRGANDegradation(resize_prob=[0.5, 0.5])
    with pytest.raises(FileNotFoundError, match="available: .*realesrgan"):
        RealESRGANDegradation.from_preset("nope")


def test_module_moves_with_to_and_adds_no_state_dict_entries() -> None:
    deg = RealESRGANDegradation()
    assert deg.state_dict() == {}  # buffers are non-persistent: checkpoints of methods stay clean
    assert all(b.device.type == "cpu" for b in deg.buffers())
    assert len(list(deg.buffers())) > 0


def test_no_gradients_flow(photos_128: torch.Tensor) -> None:
    x = photos_128.clone().requires_grad_(True)
    out = RealESRGANDegradation()(x, torch.Generator().manual_seed(0))
    assert not out.lq.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_statistics(photos_256: torch.Tensor) -> None:
    """On GPU the same parameters give the CPU result up to float differences (noise drawn on GPU)."""
    deg_cpu, deg_gpu = RealESRGANDegradation(), RealESRGANDegradation().cuda()
    params = deg_cpu.sample_params(4, torch.Generator().manual_seed(0))
    params.stage1.gaussian = params.stage2.gaussian = True
    params.stage1.noise_sigma[:] = 1e-6  # (nearly) noise-free so the device RNG difference is irrelevant
    params.stage2.noise_sigma[:] = 1e-6
    cpu = deg_cpu.apply(photos_256, params, torch.Generator().manual_seed(0)).lq
    gpu = deg_gpu.apply(photos_256.cuda(), params, torch.Generator("cuda").manual_seed(0)).lq.cpu()
    assert (cpu - gpu).abs().mean() < 2e-3
