"""The sampled degradation parameters follow the reference distribution (Real-ESRGAN's dataset-side kernel
draws and ``feed_data`` draws, x4plus and StableSR options).

Statistical tests with fixed seeds (deterministic, so never flaky) and enough samples that a wrong range,
probability or granularity fails: KS tests against the stated uniforms, chi-square / binomial tests on
frequencies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from restore.data.degradation import DegradationConfig, RealESRGANDegradation
from restore.data.degradation.kernels import (
    KERNEL_SIZES,
    KERNEL_TYPES,
    sample_blur_kernels,
    sample_final_sinc_kernels,
)

N = 40_000
P_MIN = 1e-3  # reject at 0.1 %; the seed is fixed, so a pass is a pass


def _uniform_ks(x: torch.Tensor, low: float, high: float) -> float:
    return stats.kstest(x.numpy(), stats.uniform(loc=low, scale=high - low).cdf).pvalue


def _binomial_ok(hits: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def kernels1():
    return sample_blur_kernels(N, DegradationConfig().kernel_spec(1), torch.Generator().manual_seed(0))


def test_kernel_size_uniform_over_odd_7_to_21(kernels1) -> None:
    counts = [(kernels1.sizes == s).sum().item() for s in KERNEL_SIZES]
    assert sum(counts) == N
    assert stats.chisquare(counts).pvalue > P_MIN


def test_sinc_probability_and_cutoff_ranges(kernels1) -> None:
    assert _binomial_ok(int(kernels1.is_sinc.sum()), N, 0.1)
    small = kernels1.omega[kernels1.sizes < 13]
    large = kernels1.omega[kernels1.sizes >= 13]
    assert _uniform_ks(small, math.pi / 3, math.pi) > P_MIN
    assert _uniform_ks(large, math.pi / 5, math.pi) > P_MIN


def test_kernel_family_frequencies(kernels1) -> None:
    mixed = kernels1.kernel_type[~kernels1.is_sinc]
    observed = [(mixed == i).sum().item() for i in range(len(KERNEL_TYPES))]
    expected = np.array([0.45, 0.25, 0.12, 0.03, 0.12, 0.03]) * len(mixed)
    assert stats.chisquare(observed, expected).pvalue > P_MIN


def test_sigma_theta_ranges(kernels1) -> None:
    assert _uniform_ks(kernels1.sigma_x, 0.2, 3.0) > P_MIN
    assert _uniform_ks(kernels1.sigma_y, 0.2, 3.0) > P_MIN
    assert _uniform_ks(kernels1.theta, -math.pi, math.pi) > P_MIN
    spec2 = DegradationConfig().kernel_spec(2)
    k2 = sample_blur_kernels(5000, spec2, torch.Generator().manual_seed(1))
    assert _uniform_ks(k2.sigma_x, 0.2, 1.5) > P_MIN


def test_beta_two_sided_rule(kernels1) -> None:
    family = kernels1.kernel_type // 2
    beta_g = kernels1.beta[(family == 1) & ~kernels1.is_sinc]
    beta_p = kernels1.beta[(family == 2) & ~kernels1.is_sinc]
    # generalized: half U(0.5, 1), half U(1, 4)
    below = beta_g < 1
    assert _binomial_ok(int(below.sum()), len(beta_g), 0.5)
    assert _uniform_ks(beta_g[below], 0.5, 1.0) > P_MIN
    assert _uniform_ks(beta_g[~below], 1.0, 4.0) > P_MIN
    # plateau with betap (1, 2): U(1, 1) = exactly 1 half of the time, else U(1, 2)
    exactly_one = beta_p == 1.0
    assert _binomial_ok(int(exactly_one.sum()), len(beta_p), 0.5)
    assert _uniform_ks(beta_p[~exactly_one], 1.0, 2.0) > P_MIN


def test_isotropic_kernels_are_rotation_symmetric(kernels1) -> None:
    iso = (kernels1.kernel_type % 2 == 0) & ~kernels1.is_sinc
    k = kernels1.kernels[iso][:200]
    torch.testing.assert_close(k, k.transpose(1, 2))
    torch.testing.assert_close(k, torch.flip(k, dims=(1,)))
    torch.testing.assert_close(kernels1.kernels.sum(dim=(1, 2)), torch.ones(N), rtol=0, atol=1e-5)


def test_kernels_zero_outside_their_support(kernels1) -> None:
    for size in (7, 13):
        k = kernels1.kernels[kernels1.sizes == size]
        pad = (21 - size) // 2
        border = k.clone()
        border[:, pad : pad + size, pad : pad + size] = 0
        assert border.abs().max() == 0


def test_final_sinc_distribution() -> None:
    sinc = sample_final_sinc_kernels(N, 0.8, torch.Generator().manual_seed(2))
    assert _binomial_ok(int(sinc.is_sinc.sum()), N, 0.8)
    assert _uniform_ks(sinc.omega[sinc.is_sinc], math.pi / 3, math.pi) > P_MIN  # no size-dependent range
    pulses = sinc.kernels[~sinc.is_sinc]
    assert torch.all(pulses[:, 10, 10] == 1) and torch.all(pulses.sum(dim=(1, 2)) == 1)


@pytest.fixture(scope="module")
def batch_draws():
    deg = RealESRGANDegradation()
    g = torch.Generator().manual_seed(7)
    return [deg.sample_params(8, g) for _ in range(2000)]


@pytest.mark.parametrize(
    ("stage", "probs", "down_low", "up_high"),
    [("stage1", (0.2, 0.7, 0.1), 0.15, 1.5), ("stage2", (0.3, 0.4, 0.3), 0.3, 1.2)],
)
def test_resize_draws_per_batch(batch_draws, stage, probs, down_low, up_high) -> None:
    draws = [getattr(p, stage) for p in batch_draws]
    directions = [d.resize_direction for d in draws]
    observed = [directions.count(k) for k in ("up", "down", "keep")]
    assert stats.chisquare(observed, np.array(probs) * len(draws)).pvalue > P_MIN
    ups = torch.tensor([d.resize_scale for d in draws if d.resize_direction == "up"])
    downs = torch.tensor([d.resize_scale for d in draws if d.resize_direction == "down"])
    assert _uniform_ks(ups, 1.0, up_high) > P_MIN
    assert _uniform_ks(downs, down_low, 1.0) > P_MIN
    assert all(d.resize_scale == 1.0 for d in draws if d.resize_direction == "keep")
    modes = [d.resize_mode for d in draws]
    assert stats.chisquare([modes.count(m) for m in ("area", "bilinear", "bicubic")]).pvalue > P_MIN


def test_batch_level_coins(batch_draws) -> None:
    n = len(batch_draws)
    assert _binomial_ok(sum(p.stage1.gaussian for p in batch_draws), n, 0.5)
    assert _binomial_ok(sum(p.stage2.gaussian for p in batch_draws), n, 0.5)
    assert _binomial_ok(sum(p.second_blur for p in batch_draws), n, 0.8)
    assert _binomial_ok(sum(p.sinc_then_jpeg for p in batch_draws), n, 0.5)


@pytest.mark.parametrize(
    ("stage", "sigma", "poisson", "jpeg"),
    [("stage1", (1, 30), (0.05, 3), (30, 95)), ("stage2", (1, 25), (0.05, 2.5), (30, 95))],
)
def test_per_sample_noise_and_jpeg_draws(batch_draws, stage, sigma, poisson, jpeg) -> None:
    draws = [getattr(p, stage) for p in batch_draws]
    sig = torch.cat([d.noise_sigma for d in draws])
    assert _uniform_ks(sig, *sigma) > P_MIN
    assert _uniform_ks(torch.cat([d.poisson_scale for d in draws]), *poisson) > P_MIN
    quality = torch.cat([d.jpeg_quality for d in draws])
    assert _uniform_ks(quality, *jpeg) > P_MIN
    assert len(torch.unique(quality[:1000])) == 1000  # continuous, not integer qualities
    gray = torch.cat([d.gray_noise for d in draws])
    assert _binomial_ok(int(gray.sum()), len(gray), 0.4)
    # per sample: the 8 values within one batch differ
    assert all(len(torch.unique(d.noise_sigma)) == 8 for d in draws[:100])


def test_granularity_per_batch_vs_per_sample() -> None:
    """Reference mode: one resize/noise-family/order draw per batch; per_sample: one per image."""
    g = torch.Generator().manual_seed(0)
    reference = RealESRGANDegradation().draw(8, g)
    assert len(reference) == 1 and isinstance(reference[0].stage1.resize_scale, float)
    assert reference[0].kernel1.kernels.shape == (8, 21, 21)
    per_sample = RealESRGANDegradation(per_sample=True).draw(8, g)
    assert len(per_sample) == 8 and all(p.kernel1.kernels.shape == (1, 21, 21) for p in per_sample)
    scales = {p.stage1.resize_scale for p in per_sample}
    assert len(scales) > 1


def test_stablesr_mild_preset_ranges() -> None:
    deg = RealESRGANDegradation.from_preset("stablesr_mild")
    c = deg.config
    assert c.noise_range == (1, 15) and c.jpeg_range2 == (60, 100) and c.second_blur_prob == 0.5
    assert not c.round_output and c.usm_sharpen_gt
    g = torch.Generator().manual_seed(3)
    draws = [deg.sample_params(4, g) for _ in range(800)]
    downs = torch.tensor([p.stage1.resize_scale for p in draws if p.stage1.resize_direction == "down"])
    assert _uniform_ks(downs, 0.3, 1.0) > P_MIN
    assert _uniform_ks(torch.cat([p.stage2.jpeg_quality for p in draws]), 60, 100) > P_MIN
    assert _binomial_ok(sum(p.second_blur for p in draws), len(draws), 0.5)
