"""Classifier-free guidance (CFG) on a doubled ``[uncond, cond]`` batch.

As the official pipelines (``cswry/SeeSR: pipelines/pipeline_seesr.py``): batch ``[uncond, cond]``, uncond = the
negative prompt, ``eps = eps_u + s (eps_c - eps_u)`` (SeeSR 5.5, XPSR 4.5). DreamClear's DiT guides only the first
3 of the 4 latent channels, the rest come from the conditional half (``shallowdream204/DreamClear:
diffusion/model/nets/pixart_controlnet.py`` ``forward_with_cfg``, inherited from DiT).

The denoiser is a generic callable ``denoise(latents_2b, t, cond_2b) -> eps_2b``; ``cond`` may be a tensor or a
nested dict/list/tuple/dataclass of tensors (text conditions, RAM tokens, the LR image, ...). Tensors are
concatenated ``[uncond, cond]`` along the batch dimension; any other leaf (``None``, numbers, strings) must be
equal in both and is passed through once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["cfg_denoise", "classifier_free_guidance", "concat_conditions"]


def classifier_free_guidance(
    eps_uncond: Tensor, eps_cond: Tensor, scale: float, guided_channels: int | None = None
) -> Tensor:
    """``eps_u + scale * (eps_c - eps_u)``; with ``guided_channels=k`` only channels ``[:k]`` are guided.

    ``guided_channels=3`` reproduces DreamClear's DiT quirk: the remaining channels (the 4th latent channel
    and learned-variance channels) are taken from ``eps_cond`` unchanged.
    """
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"shape mismatch: {tuple(eps_uncond.shape)} vs {tuple(eps_cond.shape)}")
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if guided_channels is None or guided_channels >= guided.shape[1]:
        return guided
    return torch.cat([guided[:, :guided_channels], eps_cond[:, guided_channels:]], dim=1)


def concat_conditions(uncond: Any, cond: Any) -> Any:
    """Concatenate two condition structures leafwise along dim 0 as ``[uncond, cond]``."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor):
            raise TypeError(f"cond is a tensor but uncond is {type(uncond).__name__}")
        return torch.cat([uncond, cond], dim=0)
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):  # e.g. a TextCondition
        if type(uncond) is not type(cond):
            raise TypeError(f"cond is a {type(cond).__name__} but uncond is {type(uncond).__name__}")
        fields = {
            f.name: concat_conditions(getattr(uncond, f.name), getattr(cond, f.name))
            for f in dataclasses.fields(cond)
        }
        return dataclasses.replace(cond, **fields)
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError("uncond and cond must be mappings with the same keys")
        return {k: concat_conditions(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError("uncond and cond must be sequences of the same length")
        return type(cond)(concat_conditions(u, c) for u, c in zip(uncond, cond))
    if uncond is not cond and uncond != cond:
        raise ValueError(f"non-tensor condition leaves differ: {uncond!r} vs {cond!r}")
    return cond


def cfg_denoise(
    denoise: Callable[[Tensor, Any, Any], Tensor],
    latents: Tensor,
    t: Any,
    cond: Any,
    uncond: Any,
    scale: float,
    guided_channels: int | None = None,
    skip_uncond_at_unit_scale: bool = True,
) -> Tensor:
    """Guided noise prediction from one call of ``denoise`` on ``[latents, latents]`` with ``[uncond, cond]``.

    At ``scale == 1`` guidance is the identity on the conditional half, so by default only the conditional
    batch is run (half the compute, what diffusers pipelines do, e.g. SeeSR-turbo at CFG 1.0). Models whose
    rows interact across the batch (DreamClear's ``cross_de``) give a different ``eps_c`` alone than inside the
    doubled batch: pass ``skip_uncond_at_unit_scale=False`` for them.
    """
    if scale == 1.0 and skip_uncond_at_unit_scale:
        return denoise(latents, t, cond)
    # A per-sample timestep tensor is doubled with the batch; a scalar (or 0-d tensor) is shared.
    if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == latents.shape[0]:
        t = torch.cat([t, t], dim=0)
    eps = denoise(torch.cat([latents, latents], dim=0), t, concat_conditions(uncond, cond))
    if eps.shape[0] != 2 * latents.shape[0]:
        raise ValueError(
            f"denoiser returned batch {eps.shape[0]} for a doubled batch of {2 * latents.shape[0]}"
        )
    eps_uncond, eps_cond = eps.chunk(2, dim=0)
    return classifier_free_guidance(eps_uncond, eps_cond, scale, guided_channels)
