"""BasicSR 1.4.2 as the reference for the degradation: exactness tests and ``benchmarks/degradation.py``.

Plain ``basicsr`` 1.4.2 imports ``torchvision.transforms.functional_tensor``, removed from torchvision;
``basicsr-fixed`` (our dev extra) patches that import. ``import_basicsr`` aliases the module so either
package imports. The package itself never imports BasicSR.

``feed_data`` is Real-ESRGAN's ``RealESRGANModel.feed_data`` (spec §A.3) composed from BasicSR's own ops,
driven by a parameter container; ``sample_params_basicsr`` fills that container the way Real-ESRGAN does
(dataset-side numpy kernels per sample with python ``random`` / ``np.random``, per-batch choices with
``random`` / ``np.random``, per-sample noise levels with ``torch.rand``), so the pair is the reference
pipeline end to end.
"""

from __future__ import annotations

import math
import random
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F


def import_basicsr():
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
    except ImportError:
        import torchvision.transforms.functional as functional

        sys.modules["torchvision.transforms.functional_tensor"] = functional
    import basicsr

    return basicsr


class BasicSROps:
    """The BasicSR modules and functions the pipeline uses, built once (on ``device``)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import_basicsr()
        from basicsr.data import degradations
        from basicsr.utils.diffjpeg import DiffJPEG
        from basicsr.utils.img_process_util import USMSharp, filter2D

        self.degradations, self.filter2D = degradations, filter2D
        self.jpeger = DiffJPEG(differentiable=False).to(device)
        self.usm = USMSharp().to(device)

    def jpeg(self, img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        # BasicSR's DiffJPEG returns channels-last strides that its own filter2D cannot .view() on recent
        # torch (spec §A.6); .contiguous() is value-neutral.
        return self.jpeger(torch.clamp(img, 0, 1), quality=quality.float().clone()).contiguous()

    def noise(self, img: torch.Tensor, stage) -> torch.Tensor:
        d = self.degradations
        if stage.gaussian:
            return d.add_gaussian_noise_pt(
                img, sigma=stage.noise_sigma.float(), gray_noise=stage.gray_noise.float()
            )
        return d.add_poisson_noise_pt(
            img, scale=stage.poisson_scale.float(), gray_noise=stage.gray_noise.float()
        )


@torch.no_grad()
def feed_data(ops: BasicSROps, hq: torch.Tensor, params, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(gt_usm, lq) by Real-ESRGAN's feed_data with the given draws; noise fields from the global RNG."""
    dev = hq.device
    gt = ops.usm(hq)
    h, w = hq.shape[-2:]
    out = ops.filter2D(gt, params.kernel1.kernels.to(dev))
    s1 = params.stage1
    out = F.interpolate(out, scale_factor=s1.resize_scale, mode=s1.resize_mode)
    out = ops.noise(out, s1)
    out = ops.jpeg(out, s1.jpeg_quality.to(dev))
    if params.second_blur:
        out = ops.filter2D(out, params.kernel2.kernels.to(dev))
    s2 = params.stage2
    size2 = (int(h / scale * s2.resize_scale), int(w / scale * s2.resize_scale))
    out = F.interpolate(out, size=size2, mode=s2.resize_mode)
    out = ops.noise(out, s2)
    if params.sinc_then_jpeg:
        out = F.interpolate(out, size=(h // scale, w // scale), mode=params.final_resize_mode)
        out = ops.filter2D(out, params.sinc.kernels.to(dev))
        out = ops.jpeg(out, s2.jpeg_quality.to(dev))
    else:
        out = ops.jpeg(out, s2.jpeg_quality.to(dev))
        out = F.interpolate(out, size=(h // scale, w // scale), mode=params.final_resize_mode)
        out = ops.filter2D(out, params.sinc.kernels.to(dev))
    return gt, torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def _dataset_kernel(ops: BasicSROps, opt, stage: int) -> np.ndarray:
    """RealESRGANDataset.__getitem__'s kernel synthesis for one sample (sizes 7..21, padded to 21)."""
    sfx = "" if stage == 1 else "2"
    d = ops.degradations
    size = random.choice([7, 9, 11, 13, 15, 17, 19, 21])
    if np.random.uniform() < getattr(opt, f"sinc_prob{sfx}"):
        omega = np.random.uniform(np.pi / 3, np.pi) if size < 13 else np.random.uniform(np.pi / 5, np.pi)
        kernel = d.circular_lowpass_kernel(omega, size, pad_to=False)
    else:
        sigma = getattr(opt, f"blur_sigma{sfx}")
        kernel = d.random_mixed_kernels(
            list(getattr(opt, f"kernel_list{sfx}")),
            list(getattr(opt, f"kernel_prob{sfx}")),
            size,
            sigma,
            sigma,
            [-math.pi, math.pi],
            getattr(opt, f"betag_range{sfx}"),
            getattr(opt, f"betap_range{sfx}"),
            noise_range=None,
        )
    pad = (21 - size) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def _final_sinc(ops: BasicSROps, opt) -> np.ndarray:
    if np.random.uniform() < opt.final_sinc_prob:
        size = random.choice([7, 9, 11, 13, 15, 17, 19, 21])
        return ops.degradations.circular_lowpass_kernel(np.random.uniform(np.pi / 3, np.pi), size, pad_to=21)
    pulse = np.zeros((21, 21))
    pulse[10, 10] = 1
    return pulse


def _stage(opt, stage: int, batch: int, device) -> SimpleNamespace:
    sfx = "" if stage == 1 else "2"
    direction = random.choices(["up", "down", "keep"], getattr(opt, f"resize_prob{sfx}"))[0]
    lo, hi = getattr(opt, f"resize_range{sfx}")
    scale = {
        "up": lambda: np.random.uniform(1, hi),
        "down": lambda: np.random.uniform(lo, 1),
        "keep": lambda: 1,
    }
    s = SimpleNamespace(
        resize_scale=float(scale[direction]()), resize_mode=random.choice(["area", "bilinear", "bicubic"])
    )
    s.gaussian = np.random.uniform() < getattr(opt, f"gaussian_noise_prob{sfx}")
    rng = getattr(opt, f"noise_range{sfx}") if s.gaussian else getattr(opt, f"poisson_scale_range{sfx}")
    level = torch.rand(batch, device=device) * (rng[1] - rng[0]) + rng[0]
    s.noise_sigma = s.poisson_scale = level
    s.gray_noise = (torch.rand(batch, device=device) < getattr(opt, f"gray_noise_prob{sfx}")).float()
    q = getattr(opt, f"jpeg_range{sfx}")
    s.jpeg_quality = torch.empty(batch, device=device).uniform_(*q)
    return s


def sample_params_basicsr(ops: BasicSROps, opt, batch: int, device="cpu") -> SimpleNamespace:
    """Real-ESRGAN's draws for one batch: dataset-side kernels, then feed_data's batch/sample choices."""
    kernels = [
        (_dataset_kernel(ops, opt, 1), _dataset_kernel(ops, opt, 2), _final_sinc(ops, opt))
        for _ in range(batch)
    ]
    stack = lambda i: SimpleNamespace(  # noqa: E731
        kernels=torch.from_numpy(np.stack([k[i] for k in kernels])).float().to(device)
    )
    p = SimpleNamespace(kernel1=stack(0), kernel2=stack(1), sinc=stack(2))
    p.stage1 = _stage(opt, 1, batch, device)
    p.second_blur = np.random.uniform() < opt.second_blur_prob
    p.stage2 = _stage(opt, 2, batch, device)
    p.sinc_then_jpeg = np.random.uniform() < 0.5
    p.final_resize_mode = random.choice(["area", "bilinear", "bicubic"])
    return p
