"""restore's separable SSIM gives pyiqa's SSIM: to < 1e-6 against pyiqa's metric (whose window is stored in
float32) and to 1e-12 against pyiqa's own ssim() run with the exact float64 Gaussian window."""

from __future__ import annotations

import pyiqa
import pytest
import torch
from pyiqa.archs.func_util import preprocess_rgb
from pyiqa.archs.ssim_arch import ssim as pyiqa_ssim

from restore.metrics import MetricSuite
from restore.metrics.ssim import SeparableSSIM


@pytest.fixture(scope="module")
def pairs(photos_128: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real photos vs noisy and blurred versions (SSIM from ~0.3 to ~0.95)."""
    gen = torch.Generator().manual_seed(0)
    noisy = (photos_128[:2] + 0.05 * torch.randn(photos_128[:2].shape, generator=gen)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(photos_128[2:], 3, stride=1, padding=1, count_include_pad=False)
    return photos_128, torch.cat([noisy, blurred])


@pytest.mark.parametrize(
    ("registry", "options"),
    [
        ("ssim", {"test_y_channel": True, "color_space": "ycbcr"}),  # the paper setting
        ("ssim", {}),  # pyiqa's default: Y of YIQ
        ("ssimc", {}),  # per RGB channel
    ],
)
def test_equals_pyiqa_metric(registry: str, options: dict, pairs) -> None:
    gt, sr = pairs
    reference = pyiqa.create_metric(registry, device="cpu", **options)(sr, gt).double().flatten()
    defaults = {"test_y_channel": registry == "ssim"}
    ours = SeparableSSIM(**{**defaults, **options})(sr, gt)
    assert ours.dtype == torch.float64 and ours.shape == (4,)
    assert reference.min() > 0.2 and reference.max() < 0.99  # a real range of qualities
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6)


def test_equals_pyiqa_ssim_with_the_exact_window(pairs) -> None:
    gt, sr = pairs
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = torch.outer(g, g) / torch.outer(g, g).sum()  # MATLAB fspecial('gaussian', 11, 1.5) in float64
    x = preprocess_rgb(sr, True, 255, "ycbcr").double()
    y = preprocess_rgb(gt, True, 255, "ycbcr").double()
    reference = pyiqa_ssim(x, y, win=window[None, None], data_range=255)
    ours = SeparableSSIM(test_y_channel=True, color_space="ycbcr")(sr, gt)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)


def test_suite_switches_implementation_with_the_same_numbers(pairs) -> None:
    gt, sr = pairs
    fast = MetricSuite(["ssim"], crop_border=4)
    slow = MetricSuite([{"name": "ssim", "implementation": "pyiqa"}], crop_border=4)
    assert "SeparableSSIM" in fast.describe()["ssim"]["implementation"]
    assert slow.describe()["ssim"]["implementation"] == "pyiqa"
    assert torch.allclose(fast.score(sr, gt)["ssim"], slow.score(sr, gt)["ssim"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="implementation must be 'pyiqa' or, for"):
        MetricSuite([{"name": "psnr", "implementation": "restore"}])
    with pytest.raises(ValueError, match="downsample=False"):
        SeparableSSIM(downsample=True)
