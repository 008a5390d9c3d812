"""restore.sampling: colour fix, LRE start, CFG, latent tiling, tiled VAE (as the official SeeSR / XPSR / StableSR
test scripts and their shared wavelet_color_fix.py and mixture-of-diffusers tiles). Numbers are checked against hand computations or independent
NumPy/float64 re-implementations; the tiled VAE against the untiled network on a tiny random AutoencoderKL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from restore.sampling.color_fix import adain_color_fix, wavelet_color_fix, wavelet_decompose
from restore.sampling.guidance import cfg_denoise, classifier_free_guidance
from restore.sampling.lre import double_noised_start, encode_lr_latent, noised_start, start_timestep_index
from restore.sampling.tiled_vae import TiledAutoencoderKL, split_axis, tiled_decode, tiled_encode
from restore.sampling.tiling import gaussian_tile_weights, side_exceeds_tile, tile_positions, tiled_apply


# ------------------------------------------------------------------------------------------------ colour fix
def _np_atrous_lowpass(x: np.ndarray, levels: int = 5) -> np.ndarray:
    """Independent float64 reference: separable [1,2,1]/4 taps at dilation 2^i with edge padding, per level."""
    low = x
    h, w = x.shape[-2:]
    for i in range(levels):
        d = 2**i
        p = np.pad(low, [(0, 0)] * (x.ndim - 2) + [(d, d), (d, d)], mode="edge")
        v = p[..., 0:h, :] + 2 * p[..., d : d + h, :] + p[..., 2 * d : 2 * d + h, :]
        low = (v[..., 0:w] + 2 * v[..., d : d + w] + v[..., 2 * d : 2 * d + w]) / 16.0
    return low


def test_wavelet_matches_numpy_reference(photos_128: torch.Tensor) -> None:
    ref, img = photos_128, photos_128.roll(1, dims=0)
    out = wavelet_color_fix(img, ref, clamp=False)
    expected = img.double().numpy() - _np_atrous_lowpass(img.double().numpy())
    expected += _np_atrous_lowpass(ref.double().numpy())
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)
    clamped = wavelet_color_fix(img, ref)
    assert clamped.min() >= 0 and clamped.max() <= 1
    np.testing.assert_allclose(clamped.numpy(), np.clip(expected, 0, 1), atol=2e-6)


def test_wavelet_keeps_reference_low_frequencies(photos_128: torch.Tensor) -> None:
    # A colour-shifted copy of each photo, as a diffusion output with a colour drift would be.
    ref = photos_128.double()
    img = ref * torch.tensor([1.25, 0.85, 0.7], dtype=torch.float64)[None, :, None, None] + 0.05
    out = wavelet_color_fix(img, ref, clamp=False)
    _, low_out = wavelet_decompose(out)
    _, low_ref = wavelet_decompose(ref)
    _, low_img = wavelet_decompose(img)
    # Measured: 0.0038 after the fix vs 0.079 before (the low-pass of a low-pass is not exactly itself).
    assert (low_out - low_ref).abs().mean() < 0.01
    assert (low_out - low_ref).abs().mean() < 0.1 * (low_img - low_ref).abs().mean()
    # Channel means follow the reference (measured max 0.0009 vs 0.21 before).
    assert (out.mean((2, 3)) - ref.mean((2, 3))).abs().max() < 0.005


def test_wavelet_decomposition_and_identity(photos_128: torch.Tensor) -> None:
    high, low = wavelet_decompose(photos_128)
    torch.testing.assert_close(high + low, photos_128, atol=1e-6, rtol=0)
    torch.testing.assert_close(wavelet_color_fix(photos_128, photos_128), photos_128, atol=1e-6, rtol=0)
    half = wavelet_color_fix(photos_128.half(), photos_128.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), photos_128, atol=1e-3, rtol=0)


def test_adain_matches_reference_statistics(photos_128: torch.Tensor) -> None:
    ref = photos_128.double().numpy()
    img = photos_128.roll(1, dims=0)  # in range, another photo with other statistics
    out = adain_color_fix(img, photos_128, clamp=False).double().numpy()
    np.testing.assert_allclose(out.mean(axis=(2, 3)), ref.mean(axis=(2, 3)), atol=1e-6)
    # The +1e-5 inside both stds makes std(out) = sqrt(vx / (vx + eps)) * sqrt(vr + eps), not exactly
    # sqrt(vr): relative gap eps/2 * |1/vr - 1/vx|, 1.1e-4 here (smallest variance 0.011). With eps=0 it is exact.
    np.testing.assert_allclose(out.std(axis=(2, 3), ddof=1), ref.std(axis=(2, 3), ddof=1), atol=2e-4)
    exact = adain_color_fix(img, photos_128, eps=0.0, clamp=False).double().numpy()
    np.testing.assert_allclose(exact.std(axis=(2, 3), ddof=1), ref.std(axis=(2, 3), ddof=1), atol=1e-6)
    # Exact formula with unbiased variance + 1e-5, in float64 NumPy.
    x = img.double().numpy()
    mx, sx = x.mean(axis=(2, 3), keepdims=True), np.sqrt(x.var(axis=(2, 3), ddof=1, keepdims=True) + 1e-5)
    mr, sr = ref.mean(axis=(2, 3), keepdims=True), np.sqrt(ref.var(axis=(2, 3), ddof=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, (x - mx) / sx * sr + mr, atol=1e-5)
    clamped = adain_color_fix(img, photos_128)
    assert clamped.min() >= 0 and clamped.max() <= 1
    np.testing.assert_allclose(clamped.numpy(), np.clip(out, 0, 1), atol=1e-6)
    torch.testing.assert_close(adain_color_fix(photos_128, photos_128), photos_128, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------ LRE
def _sd_ddpm(steps: int) -> DDPMScheduler:
    # SD's scheduler_config (SeeSR: SD-2-base, XPSR: SD-1.5): leading spacing, steps_offset 1.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _hand_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_noised_start_matches_add_noise_and_hand_formula() -> None:
    scheduler = _sd_ddpm(50)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = noised_start(scheduler, z, 999, torch.Generator().manual_seed(7))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, scheduler.add_noise(z, eps, torch.tensor([999, 999])), atol=0, rtol=0)
    a = _hand_alphas_cumprod()[999]
    assert (
        round(math.sqrt(a), 4) == 0.0683 and round(math.sqrt(1 - a), 4) == 0.9977
    )  # SeeSR's LR-embedding start at t=999
    torch.testing.assert_close(out, math.sqrt(a) * z + math.sqrt(1 - a) * eps, atol=1e-6, rtol=0)


def test_double_noised_start_xpsr() -> None:
    scheduler = _sd_ddpm(20)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t1 = int(scheduler.timesteps[0])
    assert t1 == 951
    out = double_noised_start(scheduler, z, t1, 800, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    n1, n2 = torch.randn(z.shape, generator=gen), torch.randn(z.shape, generator=gen)
    ac = _hand_alphas_cumprod()
    a1, a2 = ac[951], ac[800]
    assert round(math.sqrt(a1 * a2), 4) == 0.0173  # XPSR's double noising: effective coefficient of z
    assert abs(math.sqrt(a2 * (1 - a1) + 1 - a2) - 1.0) < 2e-4  # total noise std ~1.0
    expected = math.sqrt(a2) * (math.sqrt(a1) * z + math.sqrt(1 - a1) * n1) + math.sqrt(1 - a2) * n2
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_start_timestep_index() -> None:
    seesr = _sd_ddpm(50)
    assert seesr.timesteps.tolist() == list(range(981, 0, -20))
    assert start_timestep_index(seesr, 999) == 0
    assert start_timestep_index(seesr, 980) == 1
    assert start_timestep_index(seesr, 500) == 25 and int(seesr.timesteps[25]) == 481
    xpsr = _sd_ddpm(20)
    assert xpsr.timesteps.tolist() == list(range(951, 0, -50))
    assert start_timestep_index(xpsr, 951) == 0
    assert start_timestep_index(xpsr, 950) == 1
    with pytest.raises(ValueError):
        start_timestep_index(xpsr, 0)


# -------------------------------------------------------------------------------------------------- CFG
def test_classifier_free_guidance_formula() -> None:
    eps_u, eps_c = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0)
    assert torch.all(classifier_free_guidance(eps_u, eps_c, 5.5) == 12.0)  # 1 + 5.5 * (3 - 1)
    dreamclear = classifier_free_guidance(eps_u, eps_c, 4.5, guided_channels=3)
    assert torch.all(dreamclear[:, :3] == 10.0) and torch.all(dreamclear[:, 3] == 3.0)


def test_cfg_denoise_doubles_and_splits() -> None:
    calls = []

    def denoise(x: torch.Tensor, t: int, cond: dict) -> torch.Tensor:
        calls.append((x.shape[0], cond["text"][:, 0].tolist()))
        return x * cond["text"][:, :, None, None] + t

    latents = torch.full((2, 1, 2, 2), 2.0)
    cond = {"text": torch.tensor([[3.0], [5.0]]), "lr": None}
    uncond = {"text": torch.tensor([[1.0], [1.0]]), "lr": None}
    out = cfg_denoise(denoise, latents, 10, cond, uncond, scale=2.0)
    assert calls == [(4, [1.0, 1.0, 3.0, 5.0])]  # [uncond, cond] order
    # eps_u = 2*1+10 = 12; eps_c = 2*3+10 = 16 / 2*5+10 = 20; guided = 12 + 2 * (eps_c - 12)
    assert out[0].unique().tolist() == [20.0] and out[1].unique().tolist() == [28.0]
    calls.clear()
    torch.testing.assert_close(
        cfg_denoise(denoise, latents, 10, cond, uncond, scale=1.0), denoise(latents, 10, cond)
    )
    assert calls[0][0] == 2  # unit scale: conditional half only
    calls.clear()
    cfg_denoise(denoise, latents, 10, cond, uncond, scale=1.0, skip_uncond_at_unit_scale=False)
    assert calls[0][0] == 4


# ------------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(
    ("size", "tile", "overlap", "expected"),
    [
        (128, 64, 32, [0, 32, 64]),  # StableSR 128^2 latent: 3x3 = 9 tiles
        (128, 96, 4, [0, 32]),
        (200, 96, 4, [0, 92, 104]),
        (100, 32, 8, [0, 24, 48, 68]),
        (96, 96, 4, [0]),
        (64, 96, 4, [0]),
    ],
)
def test_tile_positions(size: int, tile: int, overlap: int, expected: list[int]) -> None:
    assert tile_positions(size, tile, overlap) == expected


def test_tile_positions_rejects_overlap_ge_tile() -> None:
    with pytest.raises(ValueError):
        tile_positions(100, 32, 32)


def test_gaussian_tile_weights_hand_values() -> None:
    w = gaussian_tile_weights(64, 64, var=0.01, dtype=torch.float64)
    norm = 2 * math.pi * 0.01

    def hand(j: float, i: float) -> float:
        # y centred at h/2 = 32, x at (w-1)/2 = 31.5
        return math.exp(-(((j - 32) / 64) ** 2) / 0.02) * math.exp(-(((i - 31.5) / 64) ** 2) / 0.02) / norm

    for j, i in [(0, 0), (32, 31), (63, 10), (17, 63)]:
        assert w[j, i].item() == pytest.approx(hand(j, i), rel=1e-12)
    assert w[32, 0].item() / w[32, 31].item() == pytest.approx(
        5.5e-6, rel=0.01
    )  # mixture-of-diffusers' window: edge / centre
    torch.testing.assert_close(w[:, 0], w[:, 63])  # x symmetric
    assert w[0, 20] < w[63, 20]  # y: row 0 is 32 from the centre, row 63 only 31
    sym = gaussian_tile_weights(64, 64, symmetric=True, dtype=torch.float64)
    torch.testing.assert_close(sym[0], sym[63])


def test_tiled_apply_single_tile_is_untiled() -> None:
    latents = torch.randn(1, 4, 8, 12)
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x.sum(dim=(2, 3), keepdim=True) + x  # not pointwise: tiling would change it

    torch.testing.assert_close(tiled_apply(fn, latents, tile=96, overlap=4), fn(latents), atol=0, rtol=0)
    assert calls[0] == latents.shape

    # SeeSR's area rule: 64x128 has area 8192 <= 96^2 -> one call although w > 96; the side rule tiles.
    def record(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x

    calls.clear()
    tiled_apply(record, torch.zeros(1, 1, 64, 128), 96, 4)
    assert calls == [torch.Size([1, 1, 64, 128])]
    calls.clear()
    tiled_apply(record, torch.zeros(1, 1, 64, 128), 96, 4, needs_tiling=side_exceeds_tile)
    assert calls == [torch.Size([1, 1, 64, 64])] * 3  # square tile min(96, 64, 128); columns 0, 60, 64
    calls.clear()
    tiled_apply(record, torch.zeros(1, 1, 64, 160), 96, 4)  # area 10240 > 96^2: tiled, columns 0, 60, 96
    assert calls == [torch.Size([1, 1, 64, 64])] * 3


@pytest.mark.parametrize("weights", ["gaussian", "uniform"])
def test_tiled_apply_pointwise_equals_untiled(weights: str) -> None:
    latents = torch.randn(2, 4, 30, 44, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lr = torch.rand(2, 4, 240, 352, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shapes = []

    def fn(x: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        shapes.append((x.shape[-2:], lr.shape[-2:]))
        return x * 2 + 1 + F.avg_pool2d(lr, 8)  # depends on the LR crop being aligned at 8x

    out = tiled_apply(fn, latents, tile=16, overlap=4, weights=weights, crop_conditions={"lr": lr})
    expected = latents * 2 + 1 + F.avg_pool2d(lr, 8)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # rows: 0, 12, 14; cols: 0, 12, 24, 28 -> 12 tiles of 16x16, LR crops 128x128
    assert len(shapes) == 12 and set(shapes) == {(torch.Size([16, 16]), torch.Size([128, 128]))}


def test_tiled_apply_blends_with_weights() -> None:
    # fn returns a per-tile constant; the blend at a pixel is the weighted mean of the tiles covering it.
    latents = torch.zeros(1, 1, 8, 12, dtype=torch.float64)
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(seen))
        return torch.full_like(x, float(len(seen)))  # first tile 1, second 2

    uni = tiled_apply(fn, latents, tile=8, overlap=4, weights="uniform")  # cols 0 and 4
    assert uni[0, 0, 3, 2].item() == 1.0 and uni[0, 0, 3, 10].item() == 2.0 and uni[0, 0, 3, 6].item() == 1.5
    seen.clear()
    gau = tiled_apply(fn, latents, tile=8, overlap=4, weights="gaussian")
    # column 6 is x=6 in tile 1 (centre 3.5) and x=2 in tile 2: weights exp(-((6-3.5)/8)^2/0.02), ...
    w1, w2 = math.exp(-(((6 - 3.5) / 8) ** 2) / 0.02), math.exp(-(((2 - 3.5) / 8) ** 2) / 0.02)
    assert gau[0, 0, 3, 6].item() == pytest.approx((1 * w1 + 2 * w2) / (w1 + w2), rel=1e-12)


# ------------------------------------------------------------------------------------------------ tiled VAE
def _tiny_vae(attention: bool) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=attention,
    ).eval()


@pytest.fixture(scope="module")
def vae_with_attention() -> AutoencoderKL:
    return _tiny_vae(attention=True)


@pytest.fixture(scope="module")
def vae_without_attention() -> AutoencoderKL:
    return _tiny_vae(attention=False)


def test_split_axis() -> None:
    assert split_axis(96, 32, 24, align=2) == [(0, 32, 0, 56), (32, 64, 8, 88), (64, 96, 40, 96)]
    assert split_axis(100, 32, 4, align=4) == [
        (0, 28, 0, 32),
        (28, 56, 24, 60),
        (56, 84, 52, 88),
        (84, 100, 80, 100),
    ]
    assert split_axis(44, 16, 12) == [(0, 15, 0, 27), (15, 30, 3, 42), (30, 44, 18, 44)]


@torch.no_grad()
def test_tiled_vae_bypass_equals_stock(vae_with_attention: AutoencoderKL, photos_128: torch.Tensor) -> None:
    vae = vae_with_attention
    x = photos_128[:1, :, :64, :64]
    tiled = TiledAutoencoderKL(vae, encoder_tile=32, encoder_pad=16, decoder_tile=8, decoder_pad=4)
    stock = vae.encode(2 * x - 1).latent_dist
    ours = tiled.encode(2 * x - 1).latent_dist
    assert torch.equal(ours.mean, stock.mean) and torch.equal(ours.logvar, stock.logvar)
    z = torch.randn(1, 4, 16, 16)
    assert torch.equal(tiled.decode(z).sample, vae.decode(z).sample)
    # LRE through the wrapper: mode * scaling_factor
    torch.testing.assert_close(
        encode_lr_latent(tiled, x, sample=False), stock.mode() * vae.config.scaling_factor
    )
    gen_latent = encode_lr_latent(tiled, x, torch.Generator().manual_seed(5))
    eps = torch.randn(stock.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(gen_latent, (stock.mean + stock.std * eps) * vae.config.scaling_factor)


@torch.no_grad()
def test_tiled_vae_sync_is_exact_within_receptive_field(
    vae_without_attention: AutoencoderKL, photos_128: torch.Tensor
) -> None:
    # Without the mid-block attention every output pixel depends on a bounded window (radius ~19 px in the
    # encoder, 12 latent px in the decoder of this VAE): with pad >= that, the tile cores are exact, so
    # merged GroupNorm statistics are the whole map's and tiled == untiled up to float rounding.
    vae = vae_without_attention
    x = 2 * photos_128[:2, :, :96, :80] - 1
    ref = vae.quant_conv(vae.encoder(x))
    synced = tiled_encode(vae, x, tile=32, pad=24)  # 3x3 tiles
    plain = tiled_encode(vae, x, tile=32, pad=24, sync_group_norm=False)
    torch.testing.assert_close(synced, ref, atol=1e-5, rtol=0)
    assert (plain - ref).abs().max() > 0.05  # per-tile statistics: measured 0.08

    z = torch.randn(1, 4, 44, 34, generator=torch.Generator().manual_seed(0))
    ref = vae.decoder(vae.post_quant_conv(z))
    synced = tiled_decode(vae, z, tile=16, pad=12)  # 3x3 tiles
    plain = tiled_decode(vae, z, tile=16, pad=12, sync_group_norm=False)
    torch.testing.assert_close(synced, ref, atol=1e-4, rtol=0)
    assert (plain - ref).abs().max() > 0.05


@torch.no_grad()
def test_tiled_vae_with_attention_is_close(
    vae_with_attention: AutoencoderKL, photos_128: torch.Tensor
) -> None:
    # With attention the tiles attend only within themselves, so tiled != untiled even with synced
    # statistics; in this untrained VAE the attention is a large part of the output. Measured (mean |err|,
    # outputs of mean magnitude 0.22 / 0.30): encoder 0.0135 synced vs 0.032 plain, decoder 0.0056 vs 0.0138.
    # Bounds: ~1.5x the measured error, and sync must at least halve the plain-tiling error.
    vae = vae_with_attention
    x = 2 * photos_128[:2, :, :96, :80] - 1
    ref = vae.quant_conv(vae.encoder(x))
    synced = (tiled_encode(vae, x, tile=32, pad=24) - ref).abs().mean()
    plain = (tiled_encode(vae, x, tile=32, pad=24, sync_group_norm=False) - ref).abs().mean()
    assert synced < 0.02 and synced < 0.5 * plain

    z = torch.randn(1, 4, 44, 34, generator=torch.Generator().manual_seed(0))
    ref = vae.decoder(vae.post_quant_conv(z))
    synced = (tiled_decode(vae, z, tile=16, pad=12) - ref).abs().mean()
    plain = (tiled_decode(vae, z, tile=16, pad=12, sync_group_norm=False) - ref).abs().mean()
    assert synced < 0.008 and synced < 0.5 * plain
