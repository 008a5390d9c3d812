"""SeeSR's UNet and ControlNet: stock diffusers models plus Representation Cross-Attention (:mod:`.rca`).

Spec: ``../shared/specs/seesr_xpsr.md`` §1.2 (UNet = SD-2-base config + RCA), §1.3 (ControlNet),
§1.8 / ``seesr_xpsr_statedict/seesr_{unet,controlnet}.tsv`` (every key and shape; checked by
``tests/test_seesr_models.py``). Full size: UNet 1102 tensors / 1,126,760,324 params, ControlNet 522 tensors /
489,031,440 params.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from restore.models.rca import (
    CONFIG_DIM_KEY,
    CONFIG_FLAG,
    RAM_TOKEN_DIM,
    add_representation_cross_attention,
    seesr_controlnet_from_unet,
)

__all__ = [
    "build_seesr_controlnet",
    "build_seesr_unet",
    "sd2_base_unet_config",
    "tiny_unet_config",
]

# SD-2-base UNet (spec §1.2): block_out 320/640/1280/1280, layers_per_block 2, cross_attention_dim 1024 (the
# 1024-d CLIP text embeddings, §0), attention_head_dim [5,10,20,20] = *number of heads* in diffusers (head dim
# 64), linear proj_in/out; 64x64 latents of 4 channels (512 px SD, VAE /8). Block types as the spec's TSV shows:
# cross-attention in down 0-2 and up 1-3, plain DownBlock2D/UpBlock2D at the deep end. norm groups 32 per §1.2;
# the rest is UNet2DConditionModel's default (eps 1e-5, silu, flip_sin_to_cos). upcast_attention is not stated
# by the spec and changes no shape. With these numbers the stock model has exactly the TSV's 686 non-RCA
# tensors / 865,910,724 params (§1.2).
_SD2_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "upcast_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# Test-sized, same layout as SD-2 (cross-attention in the first down / last up block, plain blocks at the
# deep end, cross-attention mid block) so every kind of RCA site exists: down 1, mid 1, up 2.
_TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),  # heads, as in SD-2; head dim 16 everywhere
    "use_linear_projection": True,
    "norm_num_groups": 8,
}


def sd2_base_unet_config() -> dict[str, Any]:
    """The SD-2-base UNet config SeeSR builds on (a fresh copy; see the comment above for the sources)."""
    return copy.deepcopy(_SD2_BASE_UNET)


def tiny_unet_config() -> dict[str, Any]:
    """A tiny UNet config for CPU tests (32/64 channels, one layer per block, 8 norm groups)."""
    return copy.deepcopy(_TINY_UNET)


def build_seesr_unet(
    config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> UNet2DConditionModel:
    """SeeSR UNet: ``UNet2DConditionModel(config)`` with RCA attached, randomly initialised.

    ``config`` defaults to :func:`sd2_base_unet_config`; a saved config (e.g. ``dict(unet.config)`` or a
    ``config.json``) works too: ``image_cross_attention_dim`` sets the RAM token width (default 512),
    ``use_image_cross_attention`` must not be false. ``device="meta"`` builds the structure without memory
    (shapes, key lists, parameter counts); load weights into it with ``load_state_dict(..., assign=True)``.
    """
    config = dict(sd2_base_unet_config() if config is None else config)
    if not config.pop(CONFIG_FLAG, True):
        raise ValueError(f"config has {CONFIG_FLAG}=False: not a SeeSR UNet config")
    token_dim = int(config.pop(CONFIG_DIM_KEY, RAM_TOKEN_DIM))
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    if dtype is not None:
        unet.to(dtype=dtype)
    return add_representation_cross_attention(unet, cross_attention_dim=token_dim)


def build_seesr_controlnet(unet: UNet2DConditionModel, **from_unet_kwargs: Any) -> ControlNetModel:
    """SeeSR ControlNet from a SeeSR UNet (same device/dtype); see :func:`seesr_controlnet_from_unet`."""
    return seesr_controlnet_from_unet(unet, **from_unet_kwargs)
