"""Each degradation op equals BasicSR 1.4.2's implementation given the same kernel / parameters / RNG state.

Reference: XPixelGroup/BasicSR's ops in xinntao/Real-ESRGAN's ``feed_data`` order (docs/references.md).
BasicSR is imported here only, as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference.basicsr_ref import BasicSROps, feed_data, import_basicsr

from restore.data.degradation import RealESRGANDegradation
from restore.data.degradation.filtering import USMSharpen, blur_per_sample, filter2d, separable_blur
from restore.data.degradation.jpeg import JPEGCompression
from restore.data.degradation.kernels import (
    KERNEL_TYPES,
    circular_lowpass_kernels,
    mixed_kernels,
    sample_blur_kernels,
    sample_final_sinc_kernels,
)
from restore.data.degradation.noise import count_levels, gaussian_noise, poisson_noise

try:
    import_basicsr()
except ImportError:  # `make install` always installs it (dev extra basicsr-fixed)
    pytest.skip("BasicSR reference missing: pip install -e '.[dev]'", allow_module_level=True)
from basicsr.data import degradations as ref_deg  # noqa: E402
from basicsr.utils.diffjpeg import DiffJPEG  # noqa: E402
from basicsr.utils.img_process_util import USMSharp  # noqa: E402
from basicsr.utils.img_process_util import filter2D as ref_filter2D  # noqa: E402


def _pad21(kernel: np.ndarray) -> np.ndarray:
    pad = (21 - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


@pytest.mark.parametrize("size", [7, 13, 21])
@pytest.mark.parametrize("type_name", KERNEL_TYPES)
def test_mixed_kernel_equals_basicsr(type_name: str, size: int) -> None:
    sx, sy, theta, beta = 1.7, 0.6, 0.9, 1.6
    iso = type_name.endswith("_iso") or type_name == "iso"
    if type_name in ("iso", "aniso"):
        ref = ref_deg.bivariate_Gaussian(size, sx, sy, theta, isotropic=iso)
    elif type_name.startswith("generalized"):
        ref = ref_deg.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=iso)
    else:
        ref = ref_deg.bivariate_plateau(size, sx, sy, theta, beta, isotropic=iso)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    ours = mixed_kernels(
        torch.tensor([KERNEL_TYPES.index(type_name)]), torch.tensor([size]), t(sx), t(sy), t(theta), t(beta)
    )[0]
    np.testing.assert_allclose(ours.numpy(), _pad21(ref), rtol=0, atol=1e-13)


@pytest.mark.parametrize("size", [7, 11, 15, 21])
def test_sinc_kernel_equals_basicsr(size: int) -> None:
    omega = 1.3
    ref = ref_deg.circular_lowpass_kernel(omega, size, pad_to=21)
    ours = circular_lowpass_kernels(torch.tensor([omega], dtype=torch.float64), torch.tensor([size]))[0]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-13)


def test_sampled_kernels_are_the_kernels_of_their_parameters() -> None:
    """A sampled batch is exactly what BasicSR builds from the drawn parameters (size, type, σ, θ, β, ω)."""
    from restore.data.degradation.pipeline import DegradationConfig

    batch = sample_blur_kernels(64, DegradationConfig().kernel_spec(1), torch.Generator().manual_seed(3))
    for i in range(64):
        size = int(batch.sizes[i])
        if batch.is_sinc[i]:
            ref = ref_deg.circular_lowpass_kernel(float(batch.omega[i]), size, pad_to=21)
        else:
            name = KERNEL_TYPES[int(batch.kernel_type[i])]
            iso = name in ("iso", "generalized_iso", "plateau_iso")
            args = (size, float(batch.sigma_x[i]), float(batch.sigma_y[i]), float(batch.theta[i]))
            if name in ("iso", "aniso"):
                ref = _pad21(ref_deg.bivariate_Gaussian(*args, isotropic=iso))
            elif name.startswith("generalized"):
                ref = _pad21(
                    ref_deg.bivariate_generalized_Gaussian(*args, float(batch.beta[i]), isotropic=iso)
                )
            else:
                ref = _pad21(ref_deg.bivariate_plateau(*args, float(batch.beta[i]), isotropic=iso))
        np.testing.assert_allclose(batch.kernels[i].numpy(), ref.astype(np.float32), rtol=0, atol=1e-7)


def test_blur_equals_basicsr_filter2d(photos_128: torch.Tensor) -> None:
    batch = sample_blur_kernels(4, _spec(), torch.Generator().manual_seed(0))
    ref = ref_filter2D(photos_128, batch.kernels)
    torch.testing.assert_close(filter2d(photos_128, batch.kernels), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        blur_per_sample(photos_128, batch.kernels, batch.sizes), ref, rtol=0, atol=1e-6
    )


def test_final_sinc_with_pulses_equals_basicsr(photos_128: torch.Tensor) -> None:
    sinc = sample_final_sinc_kernels(4, 0.5, torch.Generator().manual_seed(4))
    assert 0 < int(sinc.is_sinc.sum()) < 4  # both branches present in this draw
    ref = ref_filter2D(photos_128, sinc.kernels)
    torch.testing.assert_close(blur_per_sample(photos_128, sinc.kernels, sinc.sizes), ref, rtol=0, atol=1e-6)


def test_usm_equals_basicsr(photos_256: torch.Tensor) -> None:
    ours, ref = USMSharpen(), USMSharp()
    # the Gaussian blur itself
    ref_blur = ref_filter2D(photos_256, ref.kernel)
    torch.testing.assert_close(separable_blur(photos_256, ours.kernel_1d), ref_blur, rtol=0, atol=5e-6)
    # the whole sharpening; a threshold-mask flip at |r|·255 == 10 could move a pixel by < 1e-3
    diff = (ours(photos_256) - ref(photos_256)).abs()
    assert diff.max() < 1e-3
    assert (diff > 1e-5).float().mean() < 1e-4


def test_usm_gpu_path_equals_cpu_path(photos_128: torch.Tensor) -> None:
    """The torch two-pass path (used on GPU, and for float64) gives the OpenCV path's values."""
    usm = USMSharpen()
    cpu = separable_blur(photos_128, usm.kernel_1d)
    torch_path = separable_blur(photos_128.double(), usm.kernel_1d).float()
    torch.testing.assert_close(torch_path, cpu, rtol=0, atol=2e-6)


@pytest.mark.parametrize("gray", [(0, 0, 0, 0), (1, 0, 1, 0), (1, 1, 1, 1)])
def test_gaussian_noise_equals_basicsr(photos_128: torch.Tensor, gray: tuple[int, ...]) -> None:
    sigma = torch.tensor([1.0, 7.5, 20.0, 30.0])
    gray_t = torch.tensor(gray, dtype=torch.float32)
    torch.manual_seed(11)
    ref = ref_deg.add_gaussian_noise_pt(photos_128, sigma=sigma, gray_noise=gray_t, clip=True, rounds=False)
    torch.manual_seed(11)
    ours = torch.clamp(photos_128 + gaussian_noise(photos_128, sigma, gray_t), 0, 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("gray", [(0, 0, 0, 0), (0, 1, 0, 1)])
def test_poisson_noise_equals_basicsr(photos_128: torch.Tensor, gray: tuple[int, ...]) -> None:
    scale = torch.tensor([0.05, 1.0, 2.0, 3.0])
    gray_t = torch.tensor(gray, dtype=torch.float32)
    torch.manual_seed(5)
    ref = ref_deg.add_poisson_noise_pt(photos_128, scale=scale, gray_noise=gray_t, clip=True, rounds=False)
    torch.manual_seed(5)
    ours = torch.clamp(photos_128 + poisson_noise(photos_128, scale, gray_t), 0, 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_level_count_equals_unique(photos_128: torch.Tensor) -> None:
    x = torch.cat([photos_128, torch.full_like(photos_128[:1], 0.5), photos_128[:1] * 0.1])
    q = torch.clamp((x * 255).round(), 0, 255) / 255
    expected = torch.tensor([len(torch.unique(q[i])) for i in range(len(q))])
    assert torch.equal(count_levels(q), expected)
    assert count_levels(q)[4] == 1


def test_jpeg_equals_basicsr_diffjpeg(photos_256: torch.Tensor) -> None:
    quality = torch.tensor([30.0, 47.3, 80.0, 95.0])
    with torch.no_grad():
        ref = DiffJPEG(differentiable=False)(photos_256, quality=quality.clone())
    ours = JPEGCompression()(photos_256, quality)
    diff = (ours - ref).abs()
    # Identical up to float32 summation order: a coefficient exactly at a rounding tie may land on the
    # other side (~2e-4 of the pixels of clean 8-bit photos, never more than one 8-bit level).
    assert diff.max() <= 1 / 255
    assert (diff > 1e-5).float().mean() < 1e-3
    assert diff.mean() < 1e-5
    assert ours.is_contiguous()


def test_jpeg_handles_sizes_not_multiple_of_16(photos_128: torch.Tensor) -> None:
    x = photos_128[:, :, :37, :53]
    with torch.no_grad():
        ref = DiffJPEG(differentiable=False)(x, quality=torch.full((4,), 60.0))
    ours = JPEGCompression()(x, 60.0)
    assert ours.shape == x.shape
    assert (ours - ref).abs().mean() < 1e-5


def _spec():
    from restore.data.degradation.pipeline import DegradationConfig

    return DegradationConfig().kernel_spec(1)


@pytest.mark.parametrize("seed", range(6))
def test_whole_pipeline_equals_basicsr_composition(photos_256: torch.Tensor, seed: int) -> None:
    """Same drawn parameters + same RNG state for the noise → the same LR as BasicSR's feed_data.

    The per-batch branches are forced so that the six cases cover every resize direction and mode,
    both noise families in both stages, second blur on/off and both final orders.
    """
    deg = RealESRGANDegradation()
    params = deg.sample_params(4, torch.Generator().manual_seed(seed))
    modes = ("area", "bilinear", "bicubic")
    params.stage1.resize_scale = (0.3, 1.0, 1.4, 0.8, 0.15, 1.2)[seed]
    params.stage1.resize_mode = modes[seed % 3]
    params.stage2.resize_scale = (0.6, 1.1, 1.0, 0.35, 1.2, 0.9)[seed]
    params.stage2.resize_mode = modes[(seed + 1) % 3]
    params.final_resize_mode = modes[(seed + 2) % 3]
    params.stage1.gaussian, params.stage2.gaussian = seed % 2 == 0, seed in (1, 2, 5)
    params.second_blur, params.sinc_then_jpeg = seed != 3, seed < 3
    params.stage1.gray_noise[: seed % 3] = 1.0
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        _, ref = feed_data(BasicSROps(), photos_256, params)
    torch.manual_seed(100 + seed)
    ours = deg.apply(photos_256, params, generator=None).lq
    assert ours.shape == ref.shape == (4, 3, 64, 64)
    diff = (ours - ref).abs()
    # JPEG rounding ties (see test_jpeg_equals_basicsr_diffjpeg) can move a few pixels by a level or two
    assert (diff > 0.5 / 255).float().mean() < 2e-3, f"{(diff > 0.5 / 255).float().mean():.2e} pixels differ"
    assert diff.mean() < 2e-4
