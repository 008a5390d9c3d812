"""Randomly initialised weight files in exactly the layouts the real loaders read, for offline use.

Tests and the metric throughput benchmark need learned metrics (LPIPS, DISTS, FID's Inception, MUSIQ) on
machines without the real checkpoints. Writing random tensors under the real file names, in the real
key/shape layout, at the real destinations lets pyiqa's and torchvision's own loading code run unmodified
(including strict ``load_state_dict``), so what is exercised is the production path minus the numbers.

Safety: random files in a real cache would silently poison every later evaluation, so
:func:`materialize_random_weights` refuses to write when any target file already exists, refuses the default
cache location (``~/.cache/torch/hub``, i.e. neither TORCH_HOME nor ``torch.hub.set_dir`` used) unless
``allow_default_cache=True``, and leaves a ``<file>.random-init.json`` marker next to each file (the metric
suite reports such weights as random).

pyiqa resolves its cache directory once at import; build metrics under
:func:`restore.weights.pyiqa_cache_synced` (the metric suite does) so it reads the directory written here.

Initialisation: He-normal convolutions (std sqrt(2/fan_in), keeps activations O(1) through deep ReLU nets,
so FID features are well scaled), identity batch-norm statistics, N(0, 0.01) linear layers, non-negative
LPIPS/DISTS layer weights (as the trained ones are). Each file is seeded from ``seed`` and its name, so a
file's content does not depend on which other files are written with it.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from restore.atomic_write import atomic_path
from restore.weights.manifest import (
    WeightFile,
    files_for_metric,
    get,
    manifest_metrics,
    random_marker,
    torch_hub_dir,
)


def _reinit(state: OrderedDict, gen: torch.Generator) -> OrderedDict:
    """Re-draw every tensor of a torchvision-style state dict (conv/linear/bn naming by shape)."""
    out = OrderedDict()
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = torch.zeros_like(value)  # num_batches_tracked
        elif key.endswith("running_mean") or (value.ndim == 1 and key.endswith("bias")):
            out[key] = torch.zeros_like(value)
        elif key.endswith("running_var") or value.ndim == 1:
            out[key] = torch.ones_like(value)
        elif value.ndim == 4:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        else:
            out[key] = torch.randn(value.shape, generator=gen) * 0.01
    return out


def _alexnet(gen: torch.Generator) -> OrderedDict:
    from torchvision.models import alexnet

    return _reinit(alexnet(weights=None).state_dict(), gen)


def _vgg16(gen: torch.Generator) -> OrderedDict:
    from torchvision.models import vgg16

    return _reinit(vgg16(weights=None).state_dict(), gen)


def _fid_inception(gen: torch.Generator) -> OrderedDict:
    # pyiqa's fid_inception_v3 is torchvision's inception_v3(num_classes=1008, aux_logits=False) with the
    # Mixed blocks swapped for FID variants that subclass the torchvision blocks (same parameters); it loads
    # this file with strict=True, so any key/shape difference fails loudly.
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    return _reinit(net.state_dict(), gen)


def _lpips_lins(channels: Iterable[int]) -> Callable[[torch.Generator], OrderedDict]:
    def build(gen: torch.Generator) -> OrderedDict:
        # pyiqa's NetLinLayer is Sequential(Dropout, Conv2d(C, 1, 1, bias=False)): key lin{k}.model.1.weight
        return OrderedDict(
            (f"lin{k}.model.1.weight", torch.rand((1, c, 1, 1), generator=gen) / c)
            for k, c in enumerate(channels)
        )

    return build


def _dists(gen: torch.Generator) -> OrderedDict:
    channels = 3 + 64 + 128 + 256 + 512 + 512  # DISTS.chns
    draw = lambda: (0.1 + 0.01 * torch.randn((1, channels, 1, 1), generator=gen)).abs()  # noqa: E731
    return OrderedDict(alpha=draw(), beta=draw())


def _musiq_koniq(gen: torch.Generator) -> OrderedDict:
    # Built by pyiqa's own class (no weights loaded with pretrained=False); KonIQ head has one output.
    from pyiqa.archs.musiq_arch import MUSIQ

    state = MUSIQ(pretrained=False, num_class=1).state_dict()
    return OrderedDict(
        (k, torch.randn(v.shape, generator=gen) * 0.02 if v.is_floating_point() and v.ndim > 1 else v.clone())
        for k, v in state.items()
    )


#: manifest file name -> builder of its state dict
GENERATORS: dict[str, Callable[[torch.Generator], OrderedDict]] = {
    "LPIPS_v0.1_alex-df73285e.pth": _lpips_lins([64, 192, 384, 256, 256]),
    "LPIPS_v0.1_vgg-a78928a0.pth": _lpips_lins([64, 128, 256, 512, 512]),
    "alexnet-owt-7be5be79.pth": _alexnet,
    "vgg16-397923af.pth": _vgg16,
    "DISTS_weights-f5e65c96.pth": _dists,
    "pt_inception-2015-12-05-6726825d.pth": _fid_inception,
    "musiq_koniq_ckpt-e95806b9.pth": _musiq_koniq,
}


def supported() -> list[str]:
    """File names, and the metrics all of whose files, this module can write."""
    metrics = [
        m for m in manifest_metrics() if (fs := files_for_metric(m)) and all(f.name in GENERATORS for f in fs)
    ]
    return list(GENERATORS) + metrics


def _resolve(names_or_metrics: Iterable[str]) -> list[WeightFile]:
    chosen: dict[str, WeightFile] = {}
    for item in names_or_metrics:
        files = [get(item)] if item in GENERATORS else files_for_metric(item)
        unsupported = [wf.name for wf in files if wf.name not in GENERATORS]
        if not files or unsupported:
            hint = " (niqe: use `python -m restore.weights fetch niqe_modelparameters.mat --from-basicsr`)"
            raise ValueError(
                f"cannot write random weights for {item!r}"
                + (f": no generator for {unsupported}" if unsupported else ": no weight files")
                + f"; supported: {', '.join(supported())}"
                + (hint if item.startswith("niqe") else "")
            )
        chosen.update((wf.name, wf) for wf in files)
    return list(chosen.values())


def _default_hub_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(xdg) / "torch" / "hub"


def materialize_random_weights(
    names_or_metrics: Iterable[str], seed: int = 0, *, allow_default_cache: bool = False
) -> list[Path]:
    """Write random weights for the given manifest file names and/or pyiqa metric names; return their paths.

    Raises FileExistsError (writing nothing) if any target exists, and PermissionError for the default
    cache location unless ``allow_default_cache``.
    """
    files = _resolve(names_or_metrics)
    hub = torch_hub_dir()
    if not allow_default_cache and hub.resolve() == _default_hub_dir().resolve():
        raise PermissionError(
            f"refusing to write random weights into the default cache {hub}; point TORCH_HOME at a scratch "
            "directory (or pass allow_default_cache=True)"
        )
    existing = [str(wf.path) for wf in files if wf.path.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing weight files with random ones: {existing}")
    paths = []
    for wf in files:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(wf.name.encode()))
        state = GENERATORS[wf.name](gen)
        dest = wf.path
        with atomic_path(dest) as tmp:
            torch.save(state, tmp)
        random_marker(dest).write_text(
            json.dumps({"random_init": True, "seed": seed, "file": wf.name}) + "\n"
        )
        paths.append(dest)
    return paths
