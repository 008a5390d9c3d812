"""XPSR's added modules on stock diffusers models: Semantic-Fusion Attention, Conditional (pixel) Attention and
the Degradation-Free Constraint heads.

XPSR (Qu et al., ECCV 2024); official: ``qyp2000/XPSR: models/xpsr/unet_2d_blocks.py`` (``attentions_lowlevel``,
``attentions_connect``, ``pixel_attentions``), ``models/xpsr/controlnet.py`` (the DFC heads), ``train.py`` (the DFC
loss). Every key, shape and their order are checked against the released ``unet/`` and ``controlnet/`` folders'
lists by ``tests/test_xpsr_models.py``.

As for SeeSR's RCA (:mod:`restore.models.seesr`), the official code forks diffusers 0.21's blocks; here the modules
are attached to the stock blocks under the official attribute names (so the released ``unet/`` and
``controlnet/`` folders load key for key) and run from forward hooks, in the official order:

- **SFA** (ControlNet, every cross-attention block of the down path and the mid block, 7 sites for SD-1.5):
  ``h_high = attentions[i](h, CLIP(high-level prompt))`` (the stock call), then in a hook on it
  ``h_low = attentions_lowlevel[i](h, CLIP(low-level prompt))`` on the *same input* and
  ``h = attentions_connect[i](h_high, context = h_low as [B, H*W, C] tokens)`` (XPSR Eq. 2). Each is a full
  ``Transformer2DModel`` (own residual). ``fusion="serial"`` (ablation) instead runs
  ``attentions_lowlevel[i](h_high, low-level prompt)`` and has no connect attention. The low-level prompt
  embeddings are a side input: call the ControlNet inside :func:`lowlevel_prompt`.
- **Conditional attention** ``pixel_attentions`` (UNet, one per resnet of every up block, 12 sites): after the
  resnet (``UpBlock2D``) or after the text attention (``CrossAttnUpBlock2D``), a ``Transformer2DModel`` whose
  cross-attention reads the *raw* ControlNet residual of the skip connection this layer consumes
  (``b c h w -> b (h w) c``; context width = that residual's channels). The residuals are taken from the
  UNet's own ``down_block_additional_residuals`` argument by a pre-hook, so the UNet is called exactly like a
  stock ControlNet-conditioned UNet; without residuals the pixel attentions are skipped (the plain prior).
- **DFC heads** (ControlNet): ``controlnet_cond_embedding.to_rgbs.{0,1,2}`` (Conv3x3 -> RGB after each stride-2
  conv + SiLU of the conditioning embedding: 1/2, 1/4, 1/8 of the LR image), ``conv_degradation.{0..11}.0`` and
  ``conv_degradation_mid.0`` (Conv3x3 -> latent channels on each zero-conv output, before
  ``conditioning_scale``). They only run inside :func:`degradation_free_predictions` (training): inference
  output is the same with or without them, so it does not pay for them.

Initialisation as the official ``from_unet``: ``attentions_lowlevel`` = copies of the
ControlNet's text attentions (themselves copies of the prior's), ``attentions_connect`` = copies too except
``attn2.to_k``/``to_v`` (other width: random); ``pixel_attentions``, ``to_rgbs`` and the latent heads random
(PyTorch default). ``zero_init=True`` on :func:`add_pixel_attention` zeroes each pixel attention's ``proj_out`` so
that at init the UNet equals the plain prior: a flagged deviation, off by default.

Gradient checkpointing: diffusers checkpoints the resnets. The pixel attentions of ``UpBlock2D`` hang off a
resnet, so their hook would run again in the recomputation during ``backward()``, after the UNet call (and its
residuals) are gone; those blocks therefore keep their resnets un-checkpointed. In SD-1.5 that is
``up_blocks.0``, at 1/64 of the image area (8x8 latents at 512 px): negligible memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, Transformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

from restore.models.attach import cross_attention_blocks, like_reference, place_after, transformer_like
from restore.models.controlnet import controlnet_from_unet
from restore.models.priors.sd import sd15_unet_config
from restore.models.side_inputs import attach_side_input, has_side_input, provide

__all__ = [
    "CONNECT_ATTR",
    "DFC_MODES",
    "FUSIONS",
    "LOWLEVEL_ATTR",
    "PIXEL_ATTR",
    "DegradationFreePredictions",
    "MissingLowLevelPromptError",
    "add_degradation_free_heads",
    "add_pixel_attention",
    "add_semantic_fusion",
    "build_xpsr_controlnet",
    "build_xpsr_trainable",
    "build_xpsr_unet",
    "degradation_free_loss",
    "degradation_free_predictions",
    "has_pixel_attention",
    "lowlevel_prompt",
]

#: Official attribute names (``models/xpsr/unet_2d_blocks.py``, ``controlnet.py``).
LOWLEVEL_ATTR = "attentions_lowlevel"
CONNECT_ATTR = "attentions_connect"
PIXEL_ATTR = "pixel_attentions"
RGB_HEADS_ATTR = "to_rgbs"
LATENT_HEADS_ATTR = "conv_degradation"
LATENT_MID_HEAD_ATTR = "conv_degradation_mid"

#: How the ControlNet fuses the two prompts (XPSR Tab. 3): ``sfa`` = Eq. 2 (official); ``serial`` = low-level
#: cross-attention stacked on the high-level one; ``high_only`` / ``low_only`` = a plain ControlNet whose text
#: attention reads one prompt (no added modules; the method decides which prompt).
FUSIONS = ("sfa", "serial", "high_only", "low_only")
#: Which DFC heads exist (XPSR Tab. 4): ``both`` (official), ``pixel`` (RGB heads), ``latent``, ``none``.
DFC_MODES = ("both", "pixel", "latent", "none")

_LOWLEVEL_SLOT = "lowlevel_prompt"
_RESIDUALS_SLOT = "controlnet_residuals"
_DFC_SLOT = "degradation_free_predictions"
ModelT = TypeVar("ModelT", bound=nn.Module)


class MissingLowLevelPromptError(RuntimeError):
    """A ControlNet with SFA ran without low-level prompt embeddings (call it inside :func:`lowlevel_prompt`)."""


# ---------------------------------------------------------------------------------------------- helpers
def _hidden_states_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _sample_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output: Any, sample: Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


# ---------------------------------------------------------------------------------------------- SFA
class _FusionHook:
    """Forward hook on ``attentions[i]`` of the ControlNet: fuses the low-level prompt into its output."""

    def __init__(
        self, lowlevel: Transformer2DModel, connect: Transformer2DModel | None, slot: Any, site: str
    ) -> None:
        self.lowlevel = lowlevel
        self.connect = connect  # None: serial fusion
        self.slot = slot
        self.site = site

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        low = self.slot.value
        if low is None:
            raise MissingLowLevelPromptError(
                f"{self.site} has XPSR semantic-fusion attention but the ControlNet was called without "
                "low-level prompt embeddings: call it inside `with lowlevel_prompt(controlnet, embeds):` "
                "(embeds = the text encoder's hidden states of the low-level prompt, [B, 77, C])"
            )
        high = _sample_of(output)
        if low.shape[0] != high.shape[0]:
            raise ValueError(
                f"{self.site}: low-level prompt embeddings have batch {low.shape[0]} but the features have "
                f"batch {high.shape[0]}; with classifier-free guidance batch them like the latents"
            )
        low = low.to(high.dtype)
        extra = {"cross_attention_kwargs": kwargs.get("cross_attention_kwargs")}
        if self.connect is None:  # serial: the low-level attention refines the high-level result
            fused = self.lowlevel(high, encoder_hidden_states=low, return_dict=False, **extra)[0]
        else:  # Eq. 2: parallel low-level branch on the same input, connected by cross-attention
            hidden = _hidden_states_arg(args, kwargs)
            h_low = self.lowlevel(hidden, encoder_hidden_states=low, return_dict=False, **extra)[0]
            tokens = h_low.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
            fused = self.connect(high, encoder_hidden_states=tokens, return_dict=False, **extra)[0]
        return _with_sample(output, fused)


def has_semantic_fusion(model: nn.Module) -> bool:
    """Whether :func:`add_semantic_fusion` added modules to ``model`` (``sfa`` or ``serial``)."""
    return has_side_input(model, _LOWLEVEL_SLOT)


def add_semantic_fusion(controlnet: ModelT, fusion: str = "sfa") -> ModelT:
    """Attach XPSR's low-level prompt fusion to a ControlNet (in place).

    ``sfa``: ``attentions_lowlevel`` + ``attentions_connect`` (official); ``serial``: ``attentions_lowlevel``
    only; ``high_only`` / ``low_only``: nothing (returns the model unchanged). Call the ControlNet inside
    :func:`lowlevel_prompt` afterwards. Initialised from the ControlNet's text attentions (call this right
    after ``ControlNetModel.from_unet``, as the official ``from_unet`` copies the prior's text attentions).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion in ("high_only", "low_only"):
        return controlnet
    if has_semantic_fusion(controlnet):
        raise ValueError(f"{type(controlnet).__name__} already has semantic-fusion attention")
    blocks = cross_attention_blocks(controlnet, up=False)
    if not blocks:
        raise ValueError(f"{type(controlnet).__name__} has no cross-attention blocks for semantic fusion")
    slot = attach_side_input(controlnet, _LOWLEVEL_SLOT)
    for block_name, block in blocks:
        lowlevel = nn.ModuleList()
        connects = nn.ModuleList()
        for text_attention in block.attentions:
            low = transformer_like(text_attention, "SFA")
            low.load_state_dict(text_attention.state_dict())
            lowlevel.append(low)
            if fusion == "sfa":
                channels = int(text_attention.config.in_channels)
                connect = transformer_like(text_attention, "SFA", cross_attention_dim=channels)
                # official from_unet copies the text attention except the shape-mismatched K/V of attn2
                # (C x 768 vs C x C): those keep their default init. Dropped by name here, so a config
                # whose widths happen to agree (tiny tests) initialises the same way.
                state = {
                    k: v
                    for k, v in text_attention.state_dict().items()
                    if not (".attn2.to_k." in k or ".attn2.to_v." in k)
                }
                missing = connect.load_state_dict(state, strict=False).missing_keys
                assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in missing), missing
                connects.append(connect)
        block.add_module(LOWLEVEL_ATTR, lowlevel)
        place_after(block, LOWLEVEL_ATTR, after="attentions")
        if fusion == "sfa":
            block.add_module(CONNECT_ATTR, connects)
            place_after(block, CONNECT_ATTR, after=LOWLEVEL_ATTR)
        for i, attn in enumerate(block.attentions):
            connect = connects[i] if fusion == "sfa" else None
            hook = _FusionHook(lowlevel[i], connect, slot, f"{block_name}.attentions.{i}")
            attn.register_forward_hook(hook, with_kwargs=True)
    controlnet.register_to_config(use_lowlevel_prompt=True, semantic_fusion=fusion)
    return controlnet


@contextmanager
def lowlevel_prompt(controlnet: nn.Module, embeddings: Tensor) -> Iterator[None]:
    """Use ``embeddings`` (text-encoder states of the low-level prompt, ``[B, 77, C]``) inside the block."""
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 3:
        raise ValueError(
            f"low-level prompt embeddings must be [B, N, C], got {getattr(embeddings, 'shape', embeddings)}"
        )
    missing = (
        f"{type(controlnet).__name__} has no semantic-fusion attention; apply add_semantic_fusion() first"
    )
    with provide(controlnet, _LOWLEVEL_SLOT, embeddings, missing):
        yield


# ---------------------------------------------------------------------------------------------- pixel attention
class _PixelAttentionHook:
    """Forward hook after layer ``j`` of an up block: pixel attention on the ControlNet residual it consumes."""

    def __init__(self, attention: Transformer2DModel, slot: Any, index: int) -> None:
        self.attention = attention
        self.slot = slot
        self.index = index  # position in down_block_additional_residuals

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        residuals = self.slot.value
        if residuals is None:  # UNet called without ControlNet residuals: the plain prior
            return output
        hidden = output if isinstance(output, Tensor) else _sample_of(output)
        tokens = residuals[self.index].to(hidden.dtype).flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        out = self.attention(hidden, encoder_hidden_states=tokens, return_dict=False)[0]
        return out if isinstance(output, Tensor) else _with_sample(output, out)


class _ResidualsCapture:
    """UNet pre-hook (stores ``down_block_additional_residuals``) and always-called post-hook (restores)."""

    def __init__(self, slot: Any, signature: inspect.Signature) -> None:
        self.slot = slot
        self.signature = signature
        self.previous: list[Any] = []

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        self.previous.append(self.slot.value)
        self.slot.value = bound.get("down_block_additional_residuals")

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.slot.value = self.previous.pop() if self.previous else None


def _no_resnet_checkpointing(block: nn.Module, args: tuple[Any, ...]) -> None:
    # see the module docstring: a resnet hook must not be re-run by a checkpoint recomputation
    block.gradient_checkpointing = False


def _up_block_heads(config: Any) -> list[int]:
    """Attention heads per up block, as diffusers derives them (``num_attention_heads or attention_head_dim``)."""
    heads = config.num_attention_heads or config.attention_head_dim
    n = len(config.down_block_types)
    heads = [heads] * n if isinstance(heads, int) else list(heads)
    return list(reversed(heads))


def has_pixel_attention(unet: nn.Module) -> bool:
    """Whether :func:`add_pixel_attention` was applied to ``unet``."""
    return has_side_input(unet, _RESIDUALS_SLOT)


def add_pixel_attention(unet: ModelT, zero_init: bool = False) -> ModelT:
    """Attach XPSR's ``pixel_attentions`` (paper: Conditional Attention) to every up block (in place).

    One ``Transformer2DModel`` per resnet: heads of that up block, ``in_channels`` = the block's output
    channels, ``cross_attention_dim`` = the channels of the skip residual the layer consumes, one layer,
    norm groups / projection / upcast as the UNet. Random init (official); ``zero_init=True`` zeroes
    ``proj_out`` so each starts as the identity (deviation, for "starts as the prior" experiments).
    """
    if has_pixel_attention(unet):
        raise ValueError(f"{type(unet).__name__} already has pixel attention")
    config = unet.config
    heads = _up_block_heads(config)
    reversed_channels = list(reversed(config.block_out_channels))
    only_cross = config.only_cross_attention
    only_cross = [only_cross] * len(heads) if isinstance(only_cross, bool) else list(reversed(only_cross))
    total = sum(len(block.resnets) for block in unet.up_blocks)
    slot = attach_side_input(unet, _RESIDUALS_SLOT)
    ref = unet.conv_in
    consumed = 0
    for i, block in enumerate(unet.up_blocks):
        out_channels = reversed_channels[i]
        in_channels = reversed_channels[min(i + 1, len(reversed_channels) - 1)]
        n = len(block.resnets)
        attentions = nn.ModuleList()
        with torch.device(ref.weight.device):
            for j in range(n):
                skip_channels = in_channels if j == n - 1 else out_channels
                attention = Transformer2DModel(
                    num_attention_heads=heads[i],
                    attention_head_dim=out_channels // heads[i],
                    in_channels=out_channels,
                    num_layers=1,
                    cross_attention_dim=skip_channels,
                    norm_num_groups=config.norm_num_groups,
                    use_linear_projection=config.use_linear_projection,
                    only_cross_attention=only_cross[i],
                    upcast_attention=config.upcast_attention,
                )
                if zero_init:
                    nn.init.zeros_(attention.proj_out.weight)
                    nn.init.zeros_(attention.proj_out.bias)
                attentions.append(like_reference(attention, ref))
        block.add_module(PIXEL_ATTR, attentions)
        place_after(block, PIXEL_ATTR, after="resnets")
        cross = getattr(block, "attentions", None)
        for j in range(n):
            # layer j of block i consumes the residual popped (j + 1)-th from the end of what is left
            hook = _PixelAttentionHook(attentions[j], slot, total - 1 - consumed - j)
            (cross[j] if cross is not None else block.resnets[j]).register_forward_hook(hook)
        if cross is None:
            block.register_forward_pre_hook(_no_resnet_checkpointing)
        consumed += n
    capture = _ResidualsCapture(slot, inspect.signature(unet.forward))
    unet.register_forward_pre_hook(capture.before, with_kwargs=True)
    unet.register_forward_hook(capture.after, with_kwargs=True, always_call=True)
    unet.register_to_config(use_pixelwise_attention=True)
    return unet


# ---------------------------------------------------------------------------------------------- DFC heads
@dataclass
class DegradationFreePredictions:
    """What the DFC heads predicted in one ControlNet call (filled by the hooks)."""

    #: RGB at 1/2, 1/4, 1/8 of the conditioning image (``to_rgbs``), in the order computed
    rgb: list[Tensor] = field(default_factory=list)
    #: latents at each ControlNet residual (``conv_degradation.{0..11}``), then the mid one
    latent: list[Tensor] = field(default_factory=list)


class _HeadHook:
    """Forward hook on a module whose output a DFC head reads; records the head's prediction when collecting."""

    def __init__(self, head: nn.Module, slot: Any, kind: str, silu: bool = False) -> None:
        self.head = head
        self.slot = slot
        self.kind = kind
        self.silu = silu  # the conditioning embedding applies SiLU after the conv (functional, not hookable)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        predictions: DegradationFreePredictions | None = self.slot.value
        if predictions is None:
            return
        features = F.silu(output) if self.silu else output
        getattr(predictions, self.kind).append(self.head(features))


def add_degradation_free_heads(controlnet: ModelT, pixel: bool = True, latent: bool = True) -> ModelT:
    """Attach XPSR's DFC heads (in place): ``to_rgbs`` (``pixel``) and ``conv_degradation`` +
    ``conv_degradation_mid`` (``latent``). Random init. Read them with :func:`degradation_free_predictions`."""
    if not (pixel or latent):
        return controlnet
    if has_side_input(controlnet, _DFC_SLOT):
        raise ValueError(f"{type(controlnet).__name__} already has degradation-free heads")
    slot = attach_side_input(controlnet, _DFC_SLOT)
    ref = controlnet.conv_in
    latent_channels = int(controlnet.config.in_channels)
    with torch.device(ref.weight.device):
        if pixel:
            embedding = controlnet.controlnet_cond_embedding
            strided = [b for b in embedding.blocks if tuple(b.stride) == (2, 2)]
            heads = nn.ModuleList(nn.Conv2d(b.out_channels, 3, kernel_size=3, padding=1) for b in strided)
            embedding.add_module(RGB_HEADS_ATTR, like_reference(heads, ref))
            place_after(embedding, RGB_HEADS_ATTR, after="blocks")
            for block, head in zip(strided, heads, strict=True):
                block.register_forward_hook(_HeadHook(head, slot, "rgb", silu=True))
        if latent:
            zero_convs = list(controlnet.controlnet_down_blocks)
            heads = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c.out_channels, latent_channels, kernel_size=3, padding=1))
                for c in zero_convs
            )
            controlnet.add_module(LATENT_HEADS_ATTR, like_reference(heads, ref))
            place_after(controlnet, LATENT_HEADS_ATTR, after="controlnet_down_blocks")
            mid_conv = controlnet.controlnet_mid_block
            mid_head = nn.Sequential(
                nn.Conv2d(mid_conv.out_channels, latent_channels, kernel_size=3, padding=1)
            )
            controlnet.add_module(LATENT_MID_HEAD_ATTR, like_reference(mid_head, ref))
            place_after(controlnet, LATENT_MID_HEAD_ATTR, after="controlnet_mid_block")
            for conv, head in zip([*zero_convs, mid_conv], [*heads, mid_head], strict=True):
                conv.register_forward_hook(_HeadHook(head, slot, "latent"))
    controlnet.register_to_config(return_rgbs=pixel, use_latent_pred=latent)
    return controlnet


@contextmanager
def degradation_free_predictions(controlnet: nn.Module) -> Iterator[DegradationFreePredictions]:
    """Collect the DFC heads' predictions of the ControlNet calls inside the block."""
    predictions = DegradationFreePredictions()
    missing = f"{type(controlnet).__name__} has no degradation-free heads; apply add_degradation_free_heads()"
    with provide(controlnet, _DFC_SLOT, predictions, missing):
        yield predictions


def degradation_free_loss(
    predictions: DegradationFreePredictions, gt: Tensor, gt_latents: Tensor, weight: float = 0.05
) -> Tensor:
    """XPSR's DFC loss (``train.py``): ``weight`` x L1 of every head to the bilinearly resized target, summed.

    RGB heads against the GT in ``[-1, 1]`` (``gt`` is given in ``[0, 1]``), latent heads against the scaled
    GT latents (the posterior sample the diffusion loss noises). Means per term, float32, as the official step.
    """
    target_rgb = gt.float() * 2 - 1
    total = gt.new_zeros((), dtype=torch.float32)
    for pred, target in [(p, target_rgb) for p in predictions.rgb] + [
        (p, gt_latents.float()) for p in predictions.latent
    ]:
        resized = F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False)
        total = total + weight * F.l1_loss(pred.float(), resized)
    return total


# ---------------------------------------------------------------------------------------------- builders
def build_xpsr_unet(
    config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    zero_init: bool = False,
) -> UNet2DConditionModel:
    """XPSR UNet: ``UNet2DConditionModel(config)`` (default SD-1.5) with ``pixel_attentions``, random init.

    ``device="meta"`` builds the structure without memory (shapes, key lists, parameter counts).
    """
    config = dict(sd15_unet_config() if config is None else config)
    config.pop("use_pixelwise_attention", None)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    if dtype is not None:
        unet.to(dtype=dtype)
    return add_pixel_attention(unet, zero_init=zero_init)


def build_xpsr_controlnet(
    unet: UNet2DConditionModel, fusion: str = "sfa", dfc: str = "both", **from_unet_kwargs: Any
) -> ControlNetModel:
    """XPSR ControlNet from the prior UNet (same device/dtype): the ``from_unet`` copy (the UNet's added up-block
    modules are not copied; :func:`restore.models.controlnet.controlnet_from_unet`), then SFA (initialised from
    the copied text attentions) and the DFC heads."""
    if dfc not in DFC_MODES:
        raise ValueError(f"dfc must be one of {DFC_MODES}, got {dfc!r}")
    controlnet = controlnet_from_unet(unet, **from_unet_kwargs)
    add_semantic_fusion(controlnet, fusion)
    add_degradation_free_heads(controlnet, pixel=dfc in ("both", "pixel"), latent=dfc in ("both", "latent"))
    return controlnet


def build_xpsr_trainable(
    unet: UNet2DConditionModel,
    fusion: str = "sfa",
    dfc: str = "both",
    pixel_attention_zero_init: bool = False,
    **controlnet: Any,
) -> nn.ModuleDict:
    """XPSR's trainable modules on a prior UNet: ``pixel_attentions`` attached to the UNet (in place; they train)
    unless already there, and the SFA + DFC ControlNet copied from it, as ``{"controlnet": ...}``."""
    if not has_pixel_attention(unet):
        add_pixel_attention(unet, zero_init=pixel_attention_zero_init)
    return nn.ModuleDict({"controlnet": build_xpsr_controlnet(unet, fusion, dfc, **controlnet)})
