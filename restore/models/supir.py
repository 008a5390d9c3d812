"""SUPIR's networks: the GLVControl adaptor and the ZeroSFT / ZeroCrossAttn connectors on a stock diffusers SDXL
UNet, and the key layout of the released checkpoints.

SUPIR (Yu et al., CVPR 2024, Sec. 3.1, Fig. 3); official: ``Fanghua-Yu/SUPIR: SUPIR/modules/SUPIR_v0.py``
(``ZeroSFT``, ``ZeroCrossAttn``, ``LightGLVUNet``), configured by ``options/SUPIR_v0.yaml`` (``mode: XL-base``,
``project_channel_scale: 2``).

The adaptor (GLVControl, a copy of the SDXL encoder fed the LQ latent) returns one hidden state per encoder
output of the UNet (conv_in, each ResBlock / transformer, each downsampler) plus the middle block's: 10 for SDXL.
The frozen UNet takes them through 12 ``project_modules`` (the official names, so
``model.diffusion_model.project_modules.*`` of ``SUPIR-v0Q.ckpt`` / ``SUPIR-v0F.ckpt`` load as they are):

- a :class:`ZeroSFT` replaces each decoder skip concatenation: with ``h`` the decoder state and ``s`` the skip,
  ``s' = s + zero_conv(c)``, ``x = cat(h, s')``, ``out = GN(x) (1 + zero_mul(a)) + zero_add(a)`` with
  ``a = SiLU(conv(c))``, and the result ``scale * out + (1 - scale) * cat(h, s)``; after the middle block one
  without concatenation;
- a :class:`ZeroCrossAttn` before each upsampler (output blocks 2 and 5 of SDXL): ``x + scale *
  Attn(GN(x) -> GN(c))`` (``to_out`` is not zero-initialised upstream either).

``control_scale`` 0 gives the plain UNet exactly (``tests/test_supir_models.py``); at scale 1 and fresh weights
the ZeroSFT output is ``GN(x)``, not ``x``, as in the official code (do not "fix" it: released weights expect it).

Here the modules are a ``project_modules`` ``ModuleList`` on the stock UNet, run from hooks: a forward pre-hook on
each decoder ResBlock rewrites its input (diffusers concatenates ``[h, s]`` right before it, the official order),
a pre-hook on each upsampler and a forward hook on the middle block. :func:`control_features` provides the
adaptor's hidden states and the scale around the UNet call (:mod:`restore.models.side_inputs`). Full size
(SDXL base): 12 modules, 118 tensors, 54,797,440 parameters.

:class:`GLVControl` (the adaptor) is built from the UNet's own diffusers blocks (a ControlNet-style copy);
:func:`split_supir_checkpoint` takes the adaptor (``model.control_model.*``), the connectors and the
degradation-robust encoder (``first_stage_model.denoise_encoder.*``) out of ``SUPIR-v0Q.ckpt`` / ``SUPIR-v0F.ckpt``
with converters in both directions. All three are checked against the official code in
``tests/test_supir_models.py`` (numbers of the official modules at a tiny width, full-size key lists and counts).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from restore.models.side_inputs import attach_side_input, has_side_input, provide, side_input_of

__all__ = [
    "CONTROL_INPUT",
    "OFFICIAL_UNET_PREFIX",
    "ConnectorPlan",
    "DegradationRobustEncoder",
    "GLVControl",
    "MissingControlError",
    "ZeroCrossAttn",
    "ZeroSFT",
    "add_connectors",
    "checkpoint_diffusers_blocks",
    "connector_plan",
    "connector_state_dict",
    "control_features",
    "denoise_encoder_official_to_ours",
    "denoise_encoder_ours_to_official",
    "has_connectors",
    "hold_control_features",
    "glv_official_to_ours",
    "glv_ours_to_official",
    "official_to_ours",
    "ours_to_official",
    "split_supir_checkpoint",
]

#: Prefix of the UNet (with its project_modules) in the official checkpoints.
OFFICIAL_UNET_PREFIX = "model.diffusion_model."
#: Prefix of the adaptor in the official checkpoints.
OFFICIAL_CONTROL_PREFIX = "model.control_model."
#: Name of the UNet's side input holding ``(hidden states, control_scale)``.
CONTROL_INPUT = "supir_control"
#: Hidden width of ZeroSFT's shared convolution and head width of ZeroCrossAttn (fixed upstream).
SFT_HIDDEN_CHANNELS = 128
ATTENTION_HEAD_DIM = 64


class MissingControlError(RuntimeError):
    """A UNet with SUPIR's connectors was called without the adaptor's hidden states."""


class GroupNorm32(nn.GroupNorm):
    """sgm's ``GroupNorm32``: 32 groups, affine, computed in float32 and cast back."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ZeroSFT(nn.Module):
    """SUPIR's zero-initialised spatial feature transform (see the module doc), official parameter names.

    ``label_channels``: the control's channels; ``channels``: the skip's; ``concat_channels``: the decoder state's
    (0 after the middle block, where the input is modulated alone).
    """

    def __init__(self, label_channels: int, channels: int, concat_channels: int = 0) -> None:
        super().__init__()
        total = channels + concat_channels
        self.param_free_norm = GroupNorm32(total)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_channels, SFT_HIDDEN_CHANNELS, 3, padding=1), nn.SiLU()
        )
        self.zero_mul = nn.Conv2d(SFT_HIDDEN_CHANNELS, total, 3, padding=1)
        self.zero_add = nn.Conv2d(SFT_HIDDEN_CHANNELS, total, 3, padding=1)
        self.zero_conv = nn.Conv2d(label_channels, channels, 1)
        for conv in (self.zero_mul, self.zero_add, self.zero_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.concat_channels = concat_channels

    def forward(
        self, control: Tensor, skip: Tensor, decoder: Tensor | None = None, scale: float = 1.0
    ) -> Tensor:
        concat = decoder is not None and self.concat_channels > 0
        raw = torch.cat([decoder, skip], dim=1) if concat else skip
        h = skip + self.zero_conv(control)
        if concat:
            h = torch.cat([decoder, h], dim=1)
        actv = self.mlp_shared(control)
        out = self.param_free_norm(h) * (self.zero_mul(actv) + 1) + self.zero_add(actv)
        return out * scale + raw * (1 - scale)


class ZeroCrossAttn(nn.Module):
    """``x + scale * Attn(GN(x) tokens -> GN(control) tokens)`` (official ``ZeroCrossAttn``; ``attn`` has sgm's
    ``CrossAttention`` names: ``to_q/k/v`` without bias, ``to_out.0`` with bias; heads of 64 channels)."""

    def __init__(self, context_channels: int, query_channels: int) -> None:
        super().__init__()
        self.attn = Attention(
            query_channels,
            cross_attention_dim=context_channels,
            heads=query_channels // ATTENTION_HEAD_DIM,
            dim_head=ATTENTION_HEAD_DIM,
            bias=False,
            out_bias=True,
        )
        self.norm1 = GroupNorm32(query_channels)
        self.norm2 = GroupNorm32(context_channels)

    def forward(self, control: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
        b, c, h, w = x.shape
        query = self.norm1(x).flatten(2).transpose(1, 2)
        context = self.norm2(control).flatten(2).transpose(1, 2)
        out = self.attn(query, encoder_hidden_states=context)
        return x + out.transpose(1, 2).reshape(b, c, h, w) * scale


# ------------------------------------------------------------------------------------------------- wiring
@dataclass(frozen=True)
class ConnectorPlan:
    """Where each project module sits: ``kind`` (``mid`` | ``skip`` | ``upsample``), the diffusers block it hooks
    (``mid_block``, ``up_blocks.b.resnets.r``, ``up_blocks.b.upsamplers.0``), the control it reads and its widths."""

    index: int
    kind: str
    block: str
    control: int
    label_channels: int
    channels: int
    concat_channels: int


def _encoder_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of the encoder outputs the decoder concatenates (conv_in, every ResBlock, every downsampler)."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [res.conv2.out_channels for res in block.resnets]
        if block.downsamplers:
            channels += [block.downsamplers[0].out_channels]
    return channels


def connector_plan(unet: UNet2DConditionModel) -> list[ConnectorPlan]:
    """The official module order for ``unet`` (``LightGLVUNet``: one ZeroSFT per control, indexed by the control
    it reads, the middle one last; a ZeroCrossAttn inserted before the ZeroSFT of each output block that ends in an
    upsampler). For SDXL: ZeroSFT 0-2, ZeroCrossAttn 3, ZeroSFT 4-6, ZeroCrossAttn 7, ZeroSFT 8-11."""
    skips = _encoder_channels(unet)
    mid_channels = unet.mid_block.resnets[-1].conv2.out_channels
    n_out = len(skips)
    entries: list[tuple[int, str, str, int, int, int]] = []  # (sort key, kind, block, control, ...)
    j = 0
    for b, block in enumerate(unet.up_blocks):
        for r, res in enumerate(block.resnets):
            control = n_out - 1 - j
            skip = skips[control]
            decoder = res.conv1.in_channels - skip
            entries.append((2 * control + 1, "skip", f"up_blocks.{b}.resnets.{r}", control, skip, decoder))
            if r == len(block.resnets) - 1 and block.upsamplers:
                query = res.conv2.out_channels
                entries.append((2 * control, "upsample", f"up_blocks.{b}.upsamplers.0", control, skip, query))
            j += 1
    entries.append((2 * n_out + 1, "mid", "mid_block", n_out, mid_channels, 0))
    plan = []
    for index, (_, kind, block, control, width, other) in enumerate(sorted(entries)):
        if kind == "upsample":
            plan.append(ConnectorPlan(index, kind, block, control, width, other, 0))
        else:
            plan.append(ConnectorPlan(index, kind, block, control, width, width, other))
    return plan


class _ConnectorHook:
    def __init__(self, unet: UNet2DConditionModel, slot: Any, plan: ConnectorPlan) -> None:
        self.unet, self.slot, self.plan = unet, slot, plan

    def _control(self) -> tuple[Tensor, float]:
        if self.slot.value is None:
            raise MissingControlError(
                "this UNet has SUPIR's connectors: call it inside restore.models.supir.control_features(unet, "
                "hidden_states, scale)"
            )
        hidden, scale = self.slot.value
        return hidden[self.plan.control], scale

    def module(self) -> nn.Module:
        return self.unet.project_modules[self.plan.index]

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        control, scale = self._control()
        x = args[0]
        if self.plan.kind == "skip":
            split = x.shape[1] - self.plan.channels
            out = self.module()(control.to(x.dtype), x[:, split:], x[:, :split], scale)
        else:
            out = self.module()(control.to(x.dtype), x, scale)
        return (out, *args[1:])

    def post(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        control, scale = self._control()
        return self.module()(control.to(output.dtype), output, None, scale)


def add_connectors(unet: UNet2DConditionModel) -> nn.ModuleList:
    """Attach SUPIR's ``project_modules`` to ``unet`` (in the official order, zero-initialised as upstream) and
    hook them in; they take the UNet's device and dtype. Returns the ``ModuleList``."""
    if has_connectors(unet):
        raise ValueError("this UNet already has SUPIR's connectors")
    slot = attach_side_input(unet, CONTROL_INPUT)
    reference = next(unet.parameters())
    modules = nn.ModuleList()
    for entry in connector_plan(unet):
        if entry.kind == "upsample":
            module: nn.Module = ZeroCrossAttn(entry.label_channels, entry.channels)
        else:
            module = ZeroSFT(entry.label_channels, entry.channels, entry.concat_channels)
        modules.append(module.to(device=reference.device, dtype=reference.dtype))
        hook = _ConnectorHook(unet, slot, entry)
        target = unet.get_submodule(entry.block)
        if entry.kind == "mid":
            target.register_forward_hook(hook.post)
        else:
            target.register_forward_pre_hook(hook.pre)
    unet.add_module("project_modules", modules)
    return modules


def has_connectors(unet: nn.Module) -> bool:
    """Whether :func:`add_connectors` was applied to ``unet``."""
    return has_side_input(unet, CONTROL_INPUT)


@contextmanager
def control_features(unet: nn.Module, hidden_states: Sequence[Tensor], scale: float = 1.0) -> Iterator[None]:
    """Provide the adaptor's hidden states (encoder order, the middle block's last) and ``control_scale`` to the
    connectors of ``unet`` for the calls in the block."""
    with provide(
        unet, CONTROL_INPUT, (list(hidden_states), float(scale)), missing="this UNet has no connectors"
    ):
        yield


def hold_control_features(
    unet: nn.Module, hidden_states: Sequence[Tensor] | None, scale: float = 1.0
) -> None:
    """Set (or, with ``None``, clear) the adaptor's hidden states without a context, for a training step whose
    checkpointed UNet blocks run again during backward (after the forward call returned); clear them when the
    step is done."""
    side_input_of(unet, CONTROL_INPUT, "this UNet has no connectors").value = (
        None if hidden_states is None else (list(hidden_states), float(scale))
    )


def connector_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The connectors' parameters under the UNet's keys (``project_modules.*``)."""
    return {k: v for k, v in unet.state_dict().items() if k.startswith("project_modules.")}


def official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model.diffusion_model.project_modules.*`` of an official checkpoint -> the UNet's ``project_modules.*``
    (same names below the prefix); other keys are left out."""
    prefix = OFFICIAL_UNET_PREFIX + "project_modules."
    return {k[len(OFFICIAL_UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(prefix)}


def ours_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_ours`."""
    return {OFFICIAL_UNET_PREFIX + k: v for k, v in state.items() if k.startswith("project_modules.")}


# ------------------------------------------------------------------------------------------------- adaptor
#: The parts of the UNet the adaptor copies (its encoder half with the time and size embeddings).
_ENCODER_PARTS = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "add_time_proj",
    "add_embedding",
    "down_blocks",
    "mid_block",
)


def _copy_without_hooks(module: nn.Module) -> nn.Module:
    copied = copy.deepcopy(module)
    for sub in copied.modules():  # a copy of a hooked block (connectors) must not run the hooks
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    return copied


def checkpoint_diffusers_blocks(module: nn.Module) -> None:
    """Gradient checkpointing for the diffusers blocks inside any module (diffusers' own switch on each block:
    ``gradient_checkpointing`` + ``_gradient_checkpointing_func``, non-reentrant), also where the module itself is
    not a diffusers ``ModelMixin`` (the adaptor, E_dr, a VAE's decoder)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            sub.gradient_checkpointing = True


class GLVControl(nn.Module):
    """SUPIR's adaptor (official ``GLVControl``): a copy of the SDXL UNet's encoder and middle block with its own
    time and size embeddings; a zero-initialised 3x3 convolution of the LQ latent (``input_hint_block``) is added
    to the first block's output. Returns the 10 hidden states the connectors read (encoder outputs, then the
    middle block's). The released v0 is not trimmed (the paper's "half of the ViT blocks" is not what shipped):
    1,243,378,880 parameters at full size. Built from a UNet (ControlNet-style initialisation when training)."""

    #: :meth:`enable_gradient_checkpointing` exists (what LatentDiffusionSR's ``gradient_checkpointing`` looks for)
    _supports_gradient_checkpointing = True

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        for name in _ENCODER_PARTS:
            self.add_module(name, _copy_without_hooks(getattr(unet, name)))
        channels = unet.conv_in.out_channels
        self.input_hint_block = nn.Conv2d(unet.config.in_channels, channels, 3, padding=1)
        nn.init.zeros_(self.input_hint_block.weight)
        nn.init.zeros_(self.input_hint_block.bias)
        self.layers_per_block = int(unet.config.layers_per_block)
        self.requires_grad_(True)  # a trainable copy, whatever the (frozen) UNet it was copied from

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each copied diffusers block's activations in the backward pass."""
        checkpoint_diffusers_blocks(self)

    def embedding(
        self, timesteps: Tensor, added_cond_kwargs: dict[str, Tensor], dtype: torch.dtype
    ) -> Tensor:
        """Time embedding + the SDXL size/pooled-text embedding (as diffusers' UNet computes them)."""
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        return emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

    def forward(
        self,
        lq_latent: Tensor,
        timesteps: Tensor,
        noisy: Tensor,
        encoder_hidden_states: Tensor,
        added_cond_kwargs: dict[str, Tensor],
    ) -> list[Tensor]:
        """``lq_latent`` (the degradation-robust encoding), ``noisy`` (the UNet's input, already scaled by the
        sampler) -> the hidden states, in the order the connectors read them."""
        dtype = self.conv_in.weight.dtype
        noisy, lq_latent = noisy.to(dtype), lq_latent.to(dtype)
        timesteps = torch.as_tensor(timesteps, device=noisy.device).reshape(-1).expand(noisy.shape[0])
        emb = self.embedding(timesteps, added_cond_kwargs, dtype)
        context = encoder_hidden_states.to(dtype)
        h = self.conv_in(noisy) + self.input_hint_block(lq_latent)
        hidden = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=emb)
            hidden.extend(res)
        hidden.append(self.mid_block(h, emb, encoder_hidden_states=context))
        return hidden


_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _glv_key_to_official(key: str, layers_per_block: int) -> str:
    """One adaptor key, diffusers -> the official LDM name (``model.control_model.`` included)."""
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "input_hint_block": "input_hint_block.0",
    }
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{OFFICIAL_CONTROL_PREFIX}{fixed[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, r, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + b * (layers_per_block + 1) + r
        if kind == "attentions":
            return f"{OFFICIAL_CONTROL_PREFIX}input_blocks.{index}.1.{rest}"
        name, _, leaf = rest.rpartition(".")
        return f"{OFFICIAL_CONTROL_PREFIX}input_blocks.{index}.0.{_RESNET_NAMES[name]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        index = 1 + int(m[1]) * (layers_per_block + 1) + layers_per_block
        return f"{OFFICIAL_CONTROL_PREFIX}input_blocks.{index}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        name, _, leaf = m[2].rpartition(".")
        return f"{OFFICIAL_CONTROL_PREFIX}middle_block.{2 * int(m[1])}.{_RESNET_NAMES[name]}.{leaf}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"{OFFICIAL_CONTROL_PREFIX}middle_block.1.{m[1]}"
    raise KeyError(f"no official name for adaptor key {key!r}")


def glv_ours_to_official(state: dict[str, Tensor], layers_per_block: int = 2) -> dict[str, Tensor]:
    """The adaptor's state dict in the official layout (``model.control_model.*``)."""
    return {_glv_key_to_official(k, layers_per_block): v for k, v in state.items()}


#: Official adaptor keys that carry no weights of the network (a training leftover dropped by strict=False).
GLV_IGNORED_KEYS = ("model.control_model.mask_LQ",)


def glv_official_to_ours(state: dict[str, Tensor], control: GLVControl) -> dict[str, Tensor]:
    """``model.control_model.*`` of an official checkpoint -> ``control``'s keys; refuses missing, unexpected or
    mis-shaped keys, naming them (``mask_LQ``, a leftover, is ignored)."""
    names = {_glv_key_to_official(k, control.layers_per_block): k for k in control.state_dict()}
    given = {
        k: v for k, v in state.items() if k.startswith(OFFICIAL_CONTROL_PREFIX) and k not in GLV_IGNORED_KEYS
    }
    missing, unexpected = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    expected = control.state_dict()
    shapes = sorted(k for k in set(names) & set(given) if given[k].shape != expected[names[k]].shape)
    if missing or unexpected or shapes:
        raise KeyError(
            f"the adaptor weights do not fit: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}), {len(shapes)} with another shape (e.g. {shapes[:3]})"
        )
    return {names[k]: v for k, v in given.items()}


# --------------------------------------------------------------------------------- released checkpoints
#: Prefix of the degradation-robust encoder (a fine-tuned copy of the VAE encoder) in the official checkpoints.
OFFICIAL_DENOISE_ENCODER_PREFIX = "first_stage_model.denoise_encoder."


def denoise_encoder_official_to_ours(state: dict[str, Tensor], vae: nn.Module) -> dict[str, Tensor]:
    """``first_stage_model.denoise_encoder.*`` (LDM names) -> keys of a copy of ``vae.encoder`` (diffusers
    names), through diffusers' own VAE converter (attention 1x1 convolutions become linear weights)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    encoder = {
        "encoder." + k[len(OFFICIAL_DENOISE_ENCODER_PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(OFFICIAL_DENOISE_ENCODER_PREFIX)
    }
    converted = convert_ldm_vae_checkpoint(encoder, vae.config)
    return {k[len("encoder.") :]: v for k, v in converted.items() if k.startswith("encoder.")}


def denoise_encoder_ours_to_official(state: dict[str, Tensor], vae: nn.Module) -> dict[str, Tensor]:
    """Inverse of :func:`denoise_encoder_official_to_ours` (names from :mod:`restore.models.cfw`'s VAE mapping)."""
    from restore.models.cfw import ours_to_official as vae_ours_to_official

    full = {f"vae.{k}": v for k, v in vae.state_dict().items() if not k.startswith("encoder.")}
    full.update({f"vae.encoder.{k}": v for k, v in state.items()})
    official = vae_ours_to_official(full)
    return {
        OFFICIAL_DENOISE_ENCODER_PREFIX + k[len("encoder.") :]: v
        for k, v in official.items()
        if k.startswith("encoder.")
    }


def split_supir_checkpoint(
    state: dict[str, Tensor], control: GLVControl, unet: nn.Module, denoise_encoder: nn.Module, vae: nn.Module
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The trained parts of a released SUPIR checkpoint (``SUPIR-v0Q.ckpt`` / ``SUPIR-v0F.ckpt``): the adaptor,
    the connectors and the degradation-robust encoder, each checked key for key and shape for shape against
    ``control``, ``unet``'s connectors and ``denoise_encoder`` (a ``KeyError`` names what does not fit). The
    frozen SDXL parts in the file are left to the prior."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    glv = glv_official_to_ours(state, control)
    connectors = official_to_ours(state)
    encoder = denoise_encoder_official_to_ours(state, vae)
    for name, got, expected in (
        ("connectors", connectors, connector_state_dict(unet)),
        ("denoise_encoder", encoder, denoise_encoder.state_dict()),
    ):
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(got) & set(expected) if got[k].shape != expected[k].shape)
        if missing or unexpected or shapes:
            raise KeyError(
                f"{name}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}), {len(shapes)} with another shape (e.g. {shapes[:3]})"
            )
    return glv, connectors, encoder


# ------------------------------------------------------------------------------- degradation-robust encoder
class DegradationRobustEncoder(nn.Module):
    """SUPIR's degradation-robust encoder E_dr (Sec. 3.1; official ``first_stage_model.denoise_encoder``): a
    trainable copy of the VAE's encoder that shares the frozen VAE's ``quant_conv`` (and decoder). It looks
    enough like an ``AutoencoderKL`` (``encoder``, ``quant_conv``, ``config``, ``dtype``) for
    :class:`~restore.sampling.tiled_vae.TiledAutoencoderKL` to tile it with merged GroupNorm statistics.

    Only ``encoder.*`` is its state (the keys :func:`denoise_encoder_official_to_ours` gives, under
    ``encoder.``); the VAE stays the prior's.
    """

    _supports_gradient_checkpointing = True

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder).requires_grad_(True)
        self.__dict__["vae"] = vae  # shared and frozen: not a submodule (not trained, not saved twice)

    @property
    def quant_conv(self) -> nn.Module | None:
        return self.vae.quant_conv

    @property
    def config(self) -> Any:
        return self.vae.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def enable_gradient_checkpointing(self) -> None:
        checkpoint_diffusers_blocks(self.encoder)

    def forward(self, images: Tensor) -> Tensor:
        """Posterior moments ``quant_conv(E_dr(images))`` of ``images`` in ``[-1, 1]`` (untiled)."""
        h = self.encoder(images.to(self.dtype))
        quant = self.quant_conv
        return quant(h.to(quant.weight.dtype)) if quant is not None else h
