"""SeeSR's networks: Representation Cross-Attention (RCA) on a stock diffusers UNet and its ControlNet copy.

SeeSR (Wu et al., CVPR 2024); official: ``cswry/SeeSR: models/unet_2d_blocks.py`` (the blocks with
``image_attentions``), ``models/controlnet.py`` (``from_unet``) and ``test_seesr.py`` (docs/references.md).

SeeSR puts an ``image_attentions`` ``nn.ModuleList`` next to ``attentions`` in every cross-attention block of
the UNet (down / mid / up) and of the ControlNet (down / mid). Each entry is a full diffusers
``Transformer2DModel`` with the settings of the text attention it follows, except ``cross_attention_dim=512``
(the RAM image tokens, ``[B, 145, 512]``) and one layer; default PyTorch init, *not* zero-init. The official
code forks diffusers 0.21's blocks to call it. Here the modules are attached to the stock blocks (same attribute
names, so the state-dict keys are the official ones: ``tests/test_seesr_models.py`` checks every key, shape and
their order against the released models' lists) and run from a forward hook on ``attentions[i]``. A forward hook
fires on the module's output, before the block carries on, so the order is the official one: ``resnets[i] ->
attentions[i] (text) -> image_attentions[i] (RAM) -> resnets[i + 1]`` (mid block: ``resnets[0] -> attentions[0]
-> image_attentions[0] -> resnets[1]``).

Passing the RAM tokens: :func:`representation_tokens` is a context manager that stores the tokens on the
model for the duration of the call(s); :func:`forward_with_representation` is a one-call wrapper around it.
Why a context and not a new forward argument:

- the stock ``forward`` signatures stay unchanged, so diffusers pipelines, ``DistributedDataParallel`` and
  ``torch.compile`` call the model exactly as before; the tokens only have to be set around the call;
- ``cross_attention_kwargs`` would reach every ``Attention`` processor, and diffusers logs a warning per call
  for keys a processor does not accept;
- it nests: leaving a context restores whatever was set before (also on exceptions), and a hooked model
  called outside any context raises :class:`MissingRepresentationTokensError` instead of silently skipping RCA.

Gradient checkpointing is safe: diffusers checkpoints the resnets and, inside ``Transformer2DModel``, the
transformer blocks with the tokens passed as an explicit argument, so a recomputation during ``backward()``
(after the context has exited) never reads the stored tokens. Not supported: ``nn.DataParallel`` (its replicas
share the hook objects, which point at the original device's modules; use DDP).

Full size (SD-2-base + RCA): UNet 1102 tensors / 1,126,760,324 parameters, ControlNet 522 tensors /
489,031,440 parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from diffusers import ControlNetModel, Transformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

from restore.models.attach import cross_attention_blocks, place_after, transformer_like
from restore.models.controlnet import controlnet_from_unet
from restore.models.priors.sd import sd2_base_unet_config
from restore.models.side_inputs import SideInput, attach_side_input, has_side_input, provide, side_input_of

__all__ = [
    "CONFIG_DIM_KEY",
    "CONFIG_FLAG",
    "RAM_TOKEN_DIM",
    "RCA_ATTR",
    "MissingRepresentationTokensError",
    "add_representation_cross_attention",
    "build_seesr_trainable",
    "build_seesr_unet",
    "forward_with_representation",
    "has_representation_cross_attention",
    "representation_tokens",
    "seesr_controlnet_from_unet",
]

#: Attribute name of the official ModuleList (keys ``…blocks.N.image_attentions.i.…``).
RCA_ATTR = "image_attentions"
#: Config flag of the official models (their registered config carries ``use_image_cross_attention``).
CONFIG_FLAG = "use_image_cross_attention"
#: Our extra config key: the token width, so a model built with another width can be rebuilt from its config.
CONFIG_DIM_KEY = "image_cross_attention_dim"
#: RAM ``image_proj`` output width (``Linear 1536 -> 512``, tokens ``[B, 145, 512]``).
RAM_TOKEN_DIM = 512

#: Name of the side input (:mod:`restore.models.side_inputs`) holding the RAM tokens of the current call.
TOKENS_SLOT = "ram_tokens"
_NO_RCA = "{} has no representation cross-attention; apply add_representation_cross_attention() first"
ModelT = TypeVar("ModelT", bound=nn.Module)


class MissingRepresentationTokensError(RuntimeError):
    """A model with RCA ran without RAM tokens (call it inside :func:`representation_tokens`)."""


class _RCAHook:
    """Forward hook on ``attentions[i]``: runs ``image_attentions[i]`` on its output with the RAM tokens.

    A callable object rather than a closure: ``copy.deepcopy(model)`` (EMA copies, for instance) deep-copies
    the hook's references together with the model, so the copy's hook runs the copy's RCA module; a closure
    would be shared and keep calling the original's weights.
    """

    def __init__(self, image_attention: Transformer2DModel, slot: SideInput, site: str) -> None:
        self.image_attention = image_attention
        self.slot = slot
        self.site = site

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        tokens = self.slot.value
        if tokens is None:
            raise MissingRepresentationTokensError(
                f"{self.site} has SeeSR representation cross-attention but the model was called without RAM "
                f"tokens: call it inside `with representation_tokens(model, tokens):` or use "
                f"`forward_with_representation(model, ..., image_encoder_hidden_states=tokens)`, "
                f"tokens shaped [B, N, {self.slot.width}]."
            )
        # Transformer2DModel returns a 1-tuple with return_dict=False (what the blocks use) or an output
        # dataclass with return_dict=True; hand back the same form.
        hidden = output[0] if isinstance(output, tuple) else output.sample
        if tokens.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"{self.site}: RAM tokens have batch {tokens.shape[0]} but the features have batch "
                f"{hidden.shape[0]}; with classifier-free guidance pass the tokens batched like the latents "
                f"(SeeSR uses the same tokens for both halves)."
            )
        # Like diffusers pipelines do for prompt embeddings: RAM runs in fp32 while the UNet may be fp16.
        context = tokens.to(hidden.dtype)
        out = self.image_attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
        if isinstance(output, tuple):
            return (out, *output[1:])
        # A fresh object of this call: update it rather than re-create it (that re-triggers a deprecation).
        output.sample = out
        return output


def _rca_like(text_attention: nn.Module, token_dim: int) -> Transformer2DModel:
    """A Transformer2DModel with the text attention's settings, ``cross_attention_dim=token_dim``, one layer."""
    return transformer_like(text_attention, "RCA", cross_attention_dim=token_dim, num_layers=1)


def has_representation_cross_attention(model: nn.Module) -> bool:
    """True when :func:`add_representation_cross_attention` was applied to ``model``."""
    return has_side_input(model, TOKENS_SLOT)


def add_representation_cross_attention(model: ModelT, cross_attention_dim: int = RAM_TOKEN_DIM) -> ModelT:
    """Attach SeeSR's ``image_attentions`` to a diffusers ``UNet2DConditionModel`` or ``ControlNetModel``.

    Every block with text ``attentions`` gets ``block.image_attentions = nn.ModuleList`` with one
    ``Transformer2DModel`` per text attention (settings copied from it, ``cross_attention_dim`` =
    ``cross_attention_dim``, one layer, default init), and a forward hook on each ``attentions[i]`` that
    applies ``image_attentions[i]`` to its output with the RAM tokens given by :func:`representation_tokens`.
    The config records ``use_image_cross_attention=True`` (and ``image_cross_attention_dim``) so the model
    can be rebuilt from it. Modifies ``model`` in place and returns it.
    """
    if has_representation_cross_attention(model):
        raise ValueError(f"{type(model).__name__} already has representation cross-attention")
    blocks = cross_attention_blocks(model, up=True)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no cross-attention blocks to attach RCA to")
    slot = attach_side_input(model, TOKENS_SLOT, width=cross_attention_dim)
    for block_name, block in blocks:
        if hasattr(block, RCA_ATTR):
            raise ValueError(f"{block_name} already has an `{RCA_ATTR}` attribute")
        rcas = nn.ModuleList(_rca_like(attn, cross_attention_dim) for attn in block.attentions)
        block.add_module(RCA_ATTR, rcas)
        place_after(block, RCA_ATTR, after="resnets")
        for i, (attn, rca) in enumerate(zip(block.attentions, rcas)):
            attn.register_forward_hook(_RCAHook(rca, slot, f"{block_name}.attentions.{i}"))
    model.register_to_config(**{CONFIG_FLAG: True, CONFIG_DIM_KEY: cross_attention_dim})
    return model


def _token_dim(model: nn.Module) -> int:
    """The RAM token width of ``model``'s RCA (through DDP / ``torch.compile`` wrappers)."""
    width = side_input_of(model, TOKENS_SLOT, _NO_RCA.format(type(model).__name__)).width
    assert width is not None  # always set by add_representation_cross_attention
    return width


@contextmanager
def representation_tokens(model: nn.Module | Sequence[nn.Module], tokens: Tensor) -> Iterator[None]:
    """Use ``tokens`` (RAM image embeddings ``[B, N, 512]``) as RCA context for every call inside the block.

    ``model`` may be one model or several (e.g. ``(controlnet, unet)``, which see the same tokens in SeeSR).
    The batch must equal the latent batch of each call (for CFG, the caller repeats the
    tokens). On exit the previous tokens are restored, so contexts nest and exceptions leave nothing behind.
    Not thread-safe for one model shared between threads (the tokens are stored on the model).
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        raise ValueError(
            f"RAM tokens must be a [B, N, C] tensor, got {getattr(tokens, 'shape', type(tokens))}"
        )
    models = [model] if isinstance(model, nn.Module) else list(model)
    for m in models:
        if tokens.shape[-1] != _token_dim(m):
            raise ValueError(f"RAM tokens have width {tokens.shape[-1]}, the RCA expects {_token_dim(m)}")
    with provide(models, TOKENS_SLOT, tokens):
        yield


def forward_with_representation(
    model: nn.Module, *args: Any, image_encoder_hidden_states: Tensor, **kwargs: Any
) -> Any:
    """``model(*args, **kwargs)`` with ``image_encoder_hidden_states`` as RAM tokens (the official kwarg name)."""
    with representation_tokens(model, image_encoder_hidden_states):
        return model(*args, **kwargs)


def seesr_controlnet_from_unet(unet: nn.Module, **from_unet_kwargs: Any) -> ControlNetModel:
    """SeeSR's ControlNet: diffusers' ``from_unet`` structure plus RCA, initialised from the UNet *including* its
    (random) RCA weights, as the official ``from_unet`` (:func:`restore.models.controlnet.controlnet_from_unet`).
    Built on the UNet's device and dtype."""
    if not has_representation_cross_attention(unet):
        raise ValueError("the UNet has no representation cross-attention; build it with build_seesr_unet()")
    width = _token_dim(unet)
    return controlnet_from_unet(
        unet,
        attach=lambda c: add_representation_cross_attention(c, cross_attention_dim=width),
        **from_unet_kwargs,
    )


# ---------------------------------------------------------------------------------------------- builders
def build_seesr_unet(
    config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> UNet2DConditionModel:
    """SeeSR UNet: ``UNet2DConditionModel(config)`` with RCA attached, randomly initialised.

    ``config`` defaults to SD-2-base's; a saved config (e.g. ``dict(unet.config)`` or a ``config.json``) works
    too: ``image_cross_attention_dim`` sets the RAM token width (default 512), ``use_image_cross_attention``
    must not be false. ``device="meta"`` builds the structure without memory (shapes, key lists, parameter
    counts); load weights into it with ``load_state_dict(..., assign=True)``.
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


def build_seesr_trainable(unet: UNet2DConditionModel, token_dim: int, **controlnet: Any) -> nn.ModuleDict:
    """SeeSR's trainable modules on a prior UNet: RCA attached to the UNet (in place; its ``image_attentions``
    train) unless already there, and the RCA ControlNet copied from it, as ``{"controlnet": ...}``."""
    if not has_representation_cross_attention(unet):
        add_representation_cross_attention(unet, cross_attention_dim=token_dim)
    return nn.ModuleDict({"controlnet": seesr_controlnet_from_unet(unet, **controlnet)})
