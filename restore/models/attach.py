"""Attaching extra modules to the blocks of stock diffusers models (SeeSR's RCA, XPSR's SFA, pixel attention
and DFC heads), so that their keys, order and settings are the official forks' (``cswry/SeeSR`` and
``qyp2000/XPSR``: ``models/unet_2d_blocks.py``)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from diffusers import Transformer2DModel
from torch import nn

__all__ = ["cross_attention_blocks", "like_reference", "place_after", "transformer_like"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place_after(parent: nn.Module, name: str, after: str) -> None:
    """Move child ``name`` right behind child ``after`` in registration order.

    The official blocks create their extra ModuleLists at given places (e.g. ``image_attentions`` after
    ``resnets``, before the samplers, in the released checkpoints); matching that order makes ``state_dict()`` list the keys in
    exactly the official order.
    """
    modules = parent._modules
    keys = list(modules)
    if after not in modules:
        return
    for key in keys[keys.index(after) + 1 :]:
        if key != name:
            modules[key] = modules.pop(key)  # re-inserting moves it to the end


def cross_attention_blocks(model: nn.Module, up: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every block with text ``attentions``: the down blocks, the up blocks (``up``; a
    ControlNet has none), then the mid block."""
    lists = ("down_blocks", "up_blocks") if up else ("down_blocks",)
    blocks: list[tuple[str, nn.Module]] = []
    for list_name in lists:
        for i, block in enumerate(getattr(model, list_name, None) or []):
            if getattr(block, "attentions", None) is not None:
                blocks.append((f"{list_name}.{i}", block))
    mid = getattr(model, "mid_block", None)
    if mid is not None and getattr(mid, "attentions", None) is not None:
        blocks.append(("mid_block", mid))
    return blocks


def like_reference(module: ModuleT, reference: nn.Module) -> ModuleT:
    """``module`` (built on ``reference``'s device) in ``reference``'s dtype and train mode."""
    param = next(reference.parameters())
    if param.dtype != torch.get_default_dtype():  # skip no-op casts: ModelMixin.to() logs a warning each time
        module.to(dtype=param.dtype)
    module.train(reference.training)
    return module


def transformer_like(text_attention: nn.Module, method: str, **overrides: Any) -> Transformer2DModel:
    """A new ``Transformer2DModel`` with the registered settings of ``text_attention`` except ``overrides``.

    Heads, head dim, channels, norm groups, linear projection, upcast, only-cross, norm type... exactly as the
    text attention (SD-2: 5/10/20 heads of 64, linear projections; SD-1.5: 8 heads, 1x1 convolutions). Built
    on its device (on "meta" a full-size set costs nothing), in its dtype, train mode and checkpointing state.
    """
    if type(text_attention) is not Transformer2DModel:
        raise TypeError(
            f"{method} needs Transformer2DModel text attentions, got {type(text_attention).__name__} "
            "(dual cross-attention and simple cross-attention blocks are not supported)"
        )
    kwargs = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    kwargs.update(overrides)
    with torch.device(next(text_attention.parameters()).device):
        module = like_reference(Transformer2DModel(**kwargs), text_attention)
    if getattr(text_attention, "gradient_checkpointing", False):
        module.gradient_checkpointing = True
        module._gradient_checkpointing_func = text_attention._gradient_checkpointing_func
    return module
