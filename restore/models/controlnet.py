"""A ControlNet copied from a UNet that carries extra modules, shared by the ControlNet-style methods.

diffusers' ``ControlNetModel.from_unet`` copies ``conv_in``, the time / class / added embeddings, the down blocks
and the mid block with a strict ``load_state_dict``, so it refuses a UNet with added modules in those blocks
(SeeSR's RCA) and knows nothing of modules the method adds to the ControlNet itself. The official forks
(``cswry/SeeSR: models/controlnet.py``, ``qyp2000/XPSR: models/controlnet.py``) copy the same submodules.
:func:`controlnet_from_unet` builds the structure with ``from_unet(load_weights_from_unet=False)``, lets the
method attach the modules that must be copied *with* the UNet's weights (``attach``), then copies the same
submodules strictly, on the UNet's device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import ControlNetModel
from torch import nn

__all__ = ["COPIED_FROM_UNET", "controlnet_from_unet"]

#: the UNet submodules a ControlNet is initialised from (diffusers' ``from_unet``; the official forks)
COPIED_FROM_UNET = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding")


def controlnet_from_unet(
    unet: nn.Module, attach: Callable[[ControlNetModel], Any] | None = None, **from_unet_kwargs: Any
) -> ControlNetModel:
    """A ControlNet initialised from ``unet`` (see the module doc); ``attach(controlnet)`` runs before the copy."""
    ref = unet.conv_in.weight
    with torch.device(ref.device):
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False, **from_unet_kwargs)
    if ref.dtype != torch.get_default_dtype():
        controlnet.to(dtype=ref.dtype)
    if attach is not None:
        attach(controlnet)
    for name in COPIED_FROM_UNET:
        target = getattr(controlnet, name, None)
        if target is not None:
            target.load_state_dict(getattr(unet, name).state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict())
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())
    return controlnet
