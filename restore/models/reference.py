"""Reference restorers: a frozen network (or bicubic) that turns the LR into a first restoration at the output size.

DreamClear conditions its second branch on such a reference (official: SwinIR from DiffBIR v1,
``XPixelGroup/DiffBIR: configs/inference/swinir.yaml``, run on the bicubic-upsampled LR) and starts sampling from
its noised latent; the paper's "w/o reference branch" ablation uses the plain bicubic upsampling. The same
networks are the GAN / regression baselines of the SR tables (Real-ESRGAN, BSRGAN, SwinIR-GAN, ...).

:class:`SpandrelRestorer` loads any architecture that spandrel (chaiNNer-org/spandrel) detects from a state dict
file; the input is the LR resized to ``size / network scale`` (the LR itself for a x4 network and a x4 output, the
upsampled LR for a x1 restorer such as DiffBIR's SwinIR), and the output is resized to ``size`` when it differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from restore.sampling.sampler import resize_bicubic
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = ["BicubicReference", "ReferenceWeightsError", "SpandrelRestorer", "tiny_reference"]


class ReferenceWeightsError(FileNotFoundError):
    """A restorer's weights file is missing or not an architecture spandrel knows; the message names the fix."""


def _missing_message(path: Path) -> str:
    from restore.weights import missing_weight_file

    return str(missing_weight_file(path, "method.weights / method.reference.weights"))


class BicubicReference(nn.Module):
    """The LR bicubic-upsampled (PIL's filter) to the requested size: no network ("w/o reference branch")."""

    def forward(self, lq: Tensor, size: tuple[int, int]) -> Tensor:
        return resize_bicubic(lq.float(), size)


class SpandrelRestorer(nn.Module):
    """A frozen restoration network that spandrel detected from a state dict (see the module doc); float32, no
    gradients. Build it with :meth:`from_file` (a ``.pth`` / ``.ckpt`` / ``.safetensors`` file) or
    :meth:`from_state_dict`. ``scale`` overrides the network scale spandrel reports."""

    def __init__(self, descriptor: Any, scale: int | None = None, source: str | None = None) -> None:
        super().__init__()
        self.model = descriptor.model.eval().requires_grad_(False)
        self.architecture = descriptor.architecture.name
        self.scale = int(scale or descriptor.scale)
        self.source = source

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], scale: int | None = None) -> SpandrelRestorer:
        """Detect the architecture of ``state`` (wrappers such as ``params_ema`` / ``state_dict`` and a
        ``module.`` prefix are spandrel's to strip) and load it."""
        import spandrel

        try:
            descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state))
        except spandrel.UnsupportedModelError as err:
            names = ", ".join(a.architecture.name for a in spandrel.MAIN_REGISTRY.architectures())
            raise ReferenceWeightsError(
                f"no architecture spandrel knows ({err}); supported: {names}"
            ) from err
        return cls(descriptor, scale)

    @classmethod
    def from_file(cls, weights: str | os.PathLike, scale: int | None = None) -> SpandrelRestorer:
        """Load ``weights``; a missing file or an unknown architecture raises :class:`ReferenceWeightsError`."""
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ReferenceWeightsError(_missing_message(path))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_checkpoint_file(
                path,
                written_by="a restorer release (a .pth state dict spandrel reads)",
                fix="download the release again or pass another file",
            )
        try:
            restorer = cls.from_state_dict(state, scale)
        except ReferenceWeightsError as err:
            raise ReferenceWeightsError(f"'{path}': {err}") from err
        restorer.source = str(path)
        return restorer

    @torch.no_grad()
    def forward(self, lq: Tensor, size: tuple[int, int]) -> Tensor:
        inputs = resize_bicubic(lq.float(), (size[0] // self.scale, size[1] // self.scale))
        with torch.autocast(device_type=lq.device.type, enabled=False):
            out = self.model(inputs)
        return resize_bicubic(out.float().clamp(0, 1), size)


def tiny_reference(seed: int = 0) -> SpandrelRestorer:
    """A random x4 RRDBNet (8 features, one block) in BasicSR's layout, loaded through spandrel's detection: the
    reference restorer of the tiny DreamClear (CPU, no download)."""
    from restore.models.rrdbnet import RRDBNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=8, num_block=1, num_grow_ch=32)
    return SpandrelRestorer.from_state_dict({"params_ema": net.state_dict()})
