"""Weights of the official-code fixtures, re-drawn instead of stored: every tensor of an official state dict, in
sorted key order, from one ``torch.Generator``: ``r = randn(shape)``; >= 2-D: ``r / sqrt(fan_in)``; 1-D keys
ending in ``weight`` (norms): ``1 + 0.1 r``; other 1-D: ``0.1 r``. The scratch scripts that made the fixtures
used this recipe on the official modules (tests/test_stablesr_models.py, tests/test_supir_models.py)."""

from __future__ import annotations

import math

import torch


def parse_key_list(text: str) -> dict[str, tuple[int, ...]]:
    """``key<TAB>d0,d1,...`` lines (a fixture's key list) -> ``{key: shape}`` in file order."""
    rows = [line.split("\t") for line in text.splitlines() if line]
    return {k: tuple(int(d) for d in s.split(",")) if s else () for k, s in rows}


def seeded_official_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """The fixture weights for ``shapes`` (see the module doc)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key in sorted(shapes):
        r = torch.randn(shapes[key], generator=generator)
        if len(shapes[key]) >= 2:
            weights[key] = r / math.sqrt(math.prod(shapes[key][1:]))
        else:
            weights[key] = 1 + 0.1 * r if key.endswith("weight") else 0.1 * r
    return weights
