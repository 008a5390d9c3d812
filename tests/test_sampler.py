"""restore.sampling.sampler on the tiny random priors (CPU, small images): timesteps, start latents, CFG batches,
tile crops of the spatial conditions, resize rule, start / colour references, decoder, steppers (the official
test scripts: cswry/SeeSR test_seesr.py, qyp2000/XPSR test.py; SUPIR's and DreamClear's samplers are checked
against their official numbers in tests/test_official_samplers.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from restore.models.priors import TextCondition, sd_scheduler_config, tiny_pixart_prior, tiny_prior
from restore.sampling.color_fix import adain_color_fix
from restore.sampling.lre import encode_lr_latent
from restore.sampling.sampler import (
    SamplingInputs,
    SamplingSettings,
    build_scheduler,
    resize_bicubic,
    sample,
    super_resolve,
    upscale_for_sampling,
)
from restore.sampling.steppers import DIFFUSERS_SCHEDULERS, build_stepper
from restore.sampling.tiling import tile_positions

FAST = SamplingSettings(num_steps=4, progress=False, seed=0)


def _sample(denoise, cond, uncond, lr_up, vae, scheduler, settings, generator=None, **inputs):
    """SeeSR's use of the loop: ``lr_up`` is the ControlNet image, the start and the colour reference."""
    fields = {"spatial": {"image": lr_up}, "start_reference": lr_up, "color_reference": lr_up, **inputs}
    return sample(denoise, SamplingInputs(cond, uncond, **fields), vae, scheduler, settings, generator)


def _expected_start(prior, reference: torch.Tensor, settings: SamplingSettings, seed: int) -> torch.Tensor:
    """The start latent the loop should make: encode (posterior draw) then the stepper's noising."""
    generator = torch.Generator().manual_seed(seed)
    latent = None
    if settings.start != "noise":
        latent = encode_lr_latent(prior.vae, reference, generator, sample=settings.start_encoding == "sample")
    shape = (reference.shape[0], 4, reference.shape[-2] // 8, reference.shape[-1] // 8)
    stepper = build_stepper(settings, prior.noise_scheduler)
    return stepper.start(None if latent is None else latent.float(), shape, generator, torch.device("cpu"))


@pytest.fixture(scope="module")
def prior():
    return tiny_prior()


@pytest.fixture(scope="module")
def texts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)


def _unet_denoiser(prior, calls: list | None = None):
    """The brief's plain denoiser: the tiny UNet on the text condition, ignoring the LR image."""

    def denoise(latents, t, condition, spatial):
        if calls is not None:
            calls.append(int(t))
        return prior.unet(latents, t, encoder_hidden_states=condition).sample

    return denoise


def _spy(records: list, value: float = 0.0):
    """A denoiser predicting a constant that records every call."""

    def denoise(latents, t, condition, spatial):
        records.append({"t": int(t), "latents": latents.clone(), "condition": condition, **spatial})
        return torch.full_like(latents, value)

    return denoise


def _lr_up(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ end to end
def test_super_resolve_shape_range_and_determinism(prior, texts) -> None:
    cond, uncond = texts
    lq = _lr_up(16, 20)
    settings = dataclasses.replace(
        FAST, process_size=64
    )  # 16 >= 64 // 4: no pre-resize; 64x80 px, 8x10 latent
    args = (_unet_denoiser(prior), cond, uncond, lq, prior.vae, prior.noise_scheduler, settings)
    out = super_resolve(*args)
    assert out.shape == (1, 3, 64, 80) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, super_resolve(*args))  # settings.seed
    assert torch.equal(out, super_resolve(*args, generator=torch.Generator().manual_seed(0)))
    other = super_resolve(*args[:-1], dataclasses.replace(settings, seed=1))
    assert not torch.equal(out, other)


def test_seesr_defaults() -> None:
    s = SamplingSettings()  # test_seesr.py
    assert (s.scheduler, s.num_steps, s.guidance_scale, s.start, s.start_timestep) == (
        "ddpm",
        50,
        5.5,
        "lr",
        999,
    )
    assert (s.color_fix, s.latent_tile, s.latent_tile_overlap) == ("adain", 96, 4)
    assert (s.vae_encoder_tile, s.vae_decoder_tile, s.process_size, s.upscale, s.seed) == (
        1024,
        224,
        512,
        4,
        None,
    )


# ---------------------------------------------------------------------------------------- timesteps / start
def test_lr_start_runs_the_50_leading_steps(prior, texts) -> None:
    cond, uncond = texts
    calls: list = []
    settings = SamplingSettings(progress=False, seed=0, guidance_scale=1.0)
    _sample(_spy(calls), cond, None, _lr_up(), prior.vae, prior.noise_scheduler, settings)
    assert [c["t"] for c in calls] == list(range(981, 0, -20))  # DDPM 50 leading steps: 981, 961, ..., 1
    calls.clear()
    _sample(
        _spy(calls),
        cond,
        None,
        _lr_up(),
        prior.vae,
        prior.noise_scheduler,
        dataclasses.replace(settings, start_timestep=500),
    )
    assert [c["t"] for c in calls] == list(range(481, 0, -20))  # steps above 500 skipped


@pytest.mark.parametrize("start", ["lr", "lr_double", "noise"])
def test_start_latent_is_what_the_first_step_sees(prior, start: str) -> None:
    settings = SamplingSettings(
        num_steps=20, guidance_scale=1.0, start=start, second_timestep=800, progress=False, seed=3
    )
    calls: list = []
    lr_up = _lr_up()
    _sample(_spy(calls), torch.zeros(1, 2), None, lr_up, prior.vae, prior.noise_scheduler, settings)
    assert calls[0]["t"] == 951 and len(calls) == 20  # XPSR's 20 leading steps: 951, ..., 1 (XPSR test.py)
    expected = _expected_start(prior, lr_up, settings, seed=3)
    assert expected.shape == (1, 4, 8, 8)
    torch.testing.assert_close(calls[0]["latents"], expected, atol=0, rtol=0)
    if start == "noise":
        return
    # The noised LR latent keeps sqrt(alpha_bar) of the LR latent: SeeSR t=999 0.0683, XPSR 0.0903 * 0.1920.
    z = prior.vae.encode(2 * lr_up - 1).latent_dist.mean * prior.vae.config.scaling_factor
    coeff = 0.0683 if start == "lr" else 0.0903 * 0.1920
    resid = expected - coeff * z  # noise of std ~1 (+ the tiny posterior spread)
    assert abs(resid.std().item() - 1.0) < 0.25


# ----------------------------------------------------------------------------------------------------- CFG
def test_cfg_batches(prior) -> None:
    cond, uncond = torch.full((1, 2), 3.0), torch.full((1, 2), -1.0)
    calls: list = []
    settings = dataclasses.replace(FAST, guidance_scale=1.0)
    lr_up = _lr_up()
    _sample(_spy(calls), cond, uncond, lr_up, prior.vae, prior.noise_scheduler, settings)
    assert len(calls) == 4
    for c in calls:  # conditional batch only
        assert c["latents"].shape[0] == 1 and c["condition"] is cond and torch.equal(c["image"], lr_up)
    calls.clear()
    _sample(
        _spy(calls),
        cond,
        uncond,
        lr_up,
        prior.vae,
        prior.noise_scheduler,
        dataclasses.replace(FAST, guidance_scale=5.5),
    )
    for c in calls:  # doubled [uncond, cond] batch, the same latent and LR image in both halves
        assert c["latents"].shape[0] == 2 and torch.equal(c["latents"][0], c["latents"][1])
        assert torch.equal(c["condition"], torch.cat([uncond, cond]))
        assert torch.equal(c["image"], torch.cat([lr_up, lr_up]))
    with pytest.raises(ValueError, match="needs an uncond"):
        _sample(_spy([]), cond, None, lr_up, prior.vae, prior.noise_scheduler, FAST)


# -------------------------------------------------------------------------------------------------- tiling
def test_tiled_equals_untiled_when_the_latent_fits_one_tile(prior, texts) -> None:
    cond, uncond = texts
    calls: list = []
    spy = _spy(calls)

    def denoise(latents, t, condition, spatial):
        spy(latents, t, condition, spatial)
        return prior.unet(latents, t, encoder_hidden_states=condition).sample

    args = (denoise, cond, uncond, _lr_up(), prior.vae, prior.noise_scheduler)
    exact_fit = _sample(*args, dataclasses.replace(FAST, latent_tile=8))  # 8x8 latent, tile 8: area 64 = 64
    assert {tuple(c["latents"].shape[-2:]) for c in calls} == {(8, 8)}
    default = _sample(*args, FAST)
    assert torch.equal(exact_fit, default)


def test_tiles_see_their_latent_and_lr_crops(prior) -> None:
    h, w = 96, 128  # latent 12x16; tile 8, overlap 2 -> rows [0, 4], cols [0, 6, 8]
    ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) / 1000
    xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) / 1000
    lr_up = torch.stack([ys, xs, torch.zeros(h, w)])[None]  # pixel coordinates readable from the crop
    settings = SamplingSettings(
        num_steps=2, guidance_scale=1.0, latent_tile=8, latent_tile_overlap=2, progress=False, seed=5
    )
    calls: list = []
    _sample(_spy(calls), torch.zeros(1, 2), None, lr_up, prior.vae, prior.noise_scheduler, settings)
    first = [c for c in calls if c["t"] == calls[0]["t"]]
    rows, cols = tile_positions(12, 8, 2), tile_positions(16, 8, 2)
    assert (rows, cols) == ([0, 4], [0, 6, 8]) and len(first) == 6
    start = _expected_start(prior, lr_up, settings, seed=5)
    seen = []
    for c in first:
        assert c["latents"].shape == (1, 4, 8, 8) and c["image"].shape == (1, 3, 64, 64)
        y0, x0 = round(c["image"][0, 0, 0, 0].item() * 1000), round(c["image"][0, 1, 0, 0].item() * 1000)
        assert y0 % 8 == 0 and x0 % 8 == 0
        ly, lx = y0 // 8, x0 // 8
        torch.testing.assert_close(c["image"], lr_up[..., y0 : y0 + 64, x0 : x0 + 64], atol=0, rtol=0)
        torch.testing.assert_close(c["latents"], start[..., ly : ly + 8, lx : lx + 8], atol=0, rtol=0)
        seen.append((ly, lx))
    assert sorted(seen) == [(r, c) for r in rows for c in cols]


# ------------------------------------------------------------------------------------------------- resize
@pytest.mark.parametrize(
    ("lr", "process_size", "up", "out"),
    [
        ((50, 70), 512, (512, 712), (200, 280)),  # short side 50 < 128 -> 128x179 -> 512x716 -> floor /8
        ((128, 200), 512, (512, 800), (512, 800)),
        ((129, 131), 512, (512, 520), (516, 524)),  # 516x524 -> floor /8
        ((140, 130), 512, (560, 520), (560, 520)),
        ((16, 20), 64, (64, 80), (64, 80)),
        ((10, 20), 64, (64, 128), (40, 80)),  # 10 < 16 -> 16x32
    ],
)
def test_upscale_for_sampling_sizes(lr, process_size, up, out) -> None:
    lr_up, size = upscale_for_sampling(_lr_up(*lr), 4, process_size)
    assert tuple(lr_up.shape[-2:]) == up and size == out


def test_upscale_for_sampling_is_the_pil_bicubic_chain() -> None:
    lq = _lr_up(50, 70)
    lr_up, _ = upscale_for_sampling(lq, 4, 512)
    expected = []
    for c in range(3):  # PIL float images, the official chain of resizes (default resample: bicubic),
        plane = lq[0, c].numpy()  # clipped after each resize as the official 8-bit images are
        for size in ((179, 128), (716, 512), (712, 512)):
            plane = np.clip(np.asarray(Image.fromarray(plane, mode="F").resize(size, Image.BICUBIC)), 0, 1)
        expected.append(plane)
    np.testing.assert_allclose(lr_up[0].numpy(), np.stack(expected), atol=1e-4)
    assert resize_bicubic(lq, (50, 70)) is lq


# --------------------------------------------------------------------------------------------- colour fix
def test_color_fix_is_applied_against_lr_up(prior, texts) -> None:
    cond, uncond = texts
    lr_up = 0.3 + 0.4 * _lr_up()
    args = (_unet_denoiser(prior), cond, uncond, lr_up, prior.vae, prior.noise_scheduler)
    raw = _sample(*args, dataclasses.replace(FAST, color_fix="none"))
    adain = _sample(*args, FAST)
    torch.testing.assert_close(adain, adain_color_fix(raw, lr_up), atol=1e-6, rtol=0)
    torch.testing.assert_close(adain.mean((2, 3)), lr_up.mean((2, 3)), atol=2e-3, rtol=0)
    assert (raw.mean((2, 3)) - lr_up.mean((2, 3))).abs().max() > 0.01
    wavelet = _sample(*args, dataclasses.replace(FAST, color_fix="wavelet"))
    assert wavelet.shape == raw.shape and not torch.equal(wavelet, raw)


# -------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", sorted(DIFFUSERS_SCHEDULERS) + ["edm"])
def test_every_scheduler_runs_4_steps(prior, texts, name: str) -> None:
    calls: list = []
    out = _sample(
        _unet_denoiser(prior, calls),
        *texts,
        _lr_up(),
        prior.vae,
        prior.noise_scheduler,
        dataclasses.replace(FAST, scheduler=name),
    )
    assert len(calls) == 4 and calls == sorted(calls, reverse=True)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    if name in DIFFUSERS_SCHEDULERS:
        built = build_scheduler(name, prior.noise_scheduler)
        assert isinstance(built, DIFFUSERS_SCHEDULERS[name][0]) and built.config.timestep_spacing == "leading"


def test_v_prediction_prior(prior, texts) -> None:
    config = {**sd_scheduler_config(), "prediction_type": "v_prediction"}
    out = _sample(_unet_denoiser(prior), *texts, _lr_up(), prior.vae, config, FAST)
    assert torch.isfinite(out).all()
    assert build_scheduler("ddim", config).config.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("field", "value", "choices"),
    [
        ("scheduler", "euler", "ddpm, ddim, dpmsolver\\+\\+, sde-dpmsolver\\+\\+, unipc, iddpm, edm"),
        ("start", "gt", "lr, lr_double, noise"),
        ("color_fix", "nofix", "adain, wavelet, none"),
    ],
)
def test_bad_names_list_the_choices(field: str, value: str, choices: str) -> None:
    with pytest.raises(ValueError, match=f"{field}='{value}' is not one of: {choices}"):
        SamplingSettings(**{field: value})


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="is not one of: ddpm"):
        build_scheduler("pndm", sd_scheduler_config())
    with pytest.raises(ValueError, match="second_timestep"):
        SamplingSettings(start="lr_double")
    with pytest.raises(ValueError, match="num_steps"):
        SamplingSettings(num_steps=0)


# ------------------------------------------------------------------------------------- what a method passes
def test_references_decoder_and_spatial_conditions_are_the_methods(prior) -> None:
    """DreamClear-style inputs: the start and colour reference are another image than the ControlNet's, the
    start latent is the posterior mode, a latent-size condition is cropped per tile, the decoder is the method's."""
    lr_up, reference = _lr_up(96, 128, seed=1), 0.2 + 0.5 * _lr_up(96, 128, seed=2)
    lq_latent = torch.arange(12 * 16, dtype=torch.float32).view(1, 1, 12, 16)  # latent coordinates, 1x scale
    settings = SamplingSettings(
        num_steps=2, guidance_scale=1.0, latent_tile=8, latent_tile_overlap=2, start_encoding="mode",
        progress=False, seed=5,
    )  # fmt: skip
    calls: list = []
    decoded: list = []

    def decode(latents):
        decoded.append(latents)
        return torch.full((1, 3, 96, 128), 0.5)

    inputs = SamplingInputs(
        torch.zeros(1, 2),
        spatial={"image": lr_up, "lq_latent": lq_latent},
        start_reference=reference,
        color_reference=reference,
        decode=decode,
    )
    out = sample(_spy(calls), inputs, prior.vae, prior.noise_scheduler, settings)
    start = _expected_start(prior, reference, settings, seed=5)
    first = [c for c in calls if c["t"] == calls[0]["t"]]
    for c in first:  # each tile: its latent crop, its 8x image crop and its 1x latent-condition crop
        ly, lx = int(c["lq_latent"][0, 0, 0, 0]) // 16, int(c["lq_latent"][0, 0, 0, 0]) % 16
        assert torch.equal(c["lq_latent"], lq_latent[..., ly : ly + 8, lx : lx + 8])
        assert torch.equal(c["image"], lr_up[..., 8 * ly : 8 * ly + 64, 8 * lx : 8 * lx + 64])
        assert torch.equal(c["latents"], start[..., ly : ly + 8, lx : lx + 8])
    assert len(first) == 6 and len(decoded) == 1
    # the colour fix is against the colour reference, not the ControlNet image
    torch.testing.assert_close(out, adain_color_fix(torch.full_like(out, 0.5), reference), atol=1e-6, rtol=0)


def test_pixart_learned_variance_is_sampled_and_never_guided() -> None:
    pixart = tiny_pixart_prior()
    text = pixart.encode_text(["a photo of the cat"])
    null = pixart.null_condition(1, like=text)
    reference = _lr_up(64, 64, seed=3)

    def denoise(latents, t, condition: TextCondition, spatial):
        return pixart.predict(latents, t, condition)

    for scheduler in ("iddpm", "ddpm", "dpmsolver++"):  # the diffusers ones take the epsilon half
        settings = SamplingSettings(
            scheduler=scheduler, num_steps=3, guidance_scale=4.5, progress=False, seed=0
        )
        out = sample(denoise, SamplingInputs(text, null, start_reference=reference), pixart.vae,
                     pixart.noise_scheduler, settings)  # fmt: skip
        assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all(), scheduler

    # equal epsilon halves, different variance halves: CFG at 4.5 must equal the conditional output alone
    def split(latents, t, condition, spatial):
        v = condition.view(-1, 1, 1, 1).expand(-1, 4, *latents.shape[-2:])
        return torch.cat([0.1 * latents, v], dim=1)

    results = []
    for scale in (1.0, 4.5):
        settings = SamplingSettings(
            scheduler="iddpm", num_steps=3, guidance_scale=scale, progress=False, seed=0
        )
        inputs = SamplingInputs(torch.tensor([0.5]), torch.tensor([-0.9]), start_reference=reference)
        results.append(sample(split, inputs, pixart.vae, pixart.noise_scheduler, settings))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="learned variance"):  # an epsilon-only prior cannot use iddpm
        _sample(_unet_denoiser(tiny_prior()), torch.zeros(1, 77, 32), None, reference, pixart.vae,
                pixart.noise_scheduler, SamplingSettings(scheduler="iddpm", num_steps=2, guidance_scale=1.0,
                                                         progress=False))  # fmt: skip
