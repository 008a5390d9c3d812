"""StableSR's stage-1 networks: the time-aware encoder and SFT (SPADE) layers on a stock diffusers SD-2.1 UNet.

StableSR (Wang et al., IJCV 2024, Sec. 3.1-3.2); official: ``IceClear/StableSR``
``ldm/modules/diffusionmodules/openaimodel.py`` (``EncoderUNetModelWT``, ``ResBlockDual``, ``UNetModelDualcondV2``)
and ``ldm/modules/spade.py`` (``SPADE``), configured by ``configs/stableSRNew/v2-finetune_text_T_512.yaml``.

- :class:`TimeAwareEncoder` (official ``EncoderUNetModelWT``, the checkpoint's ``structcond_stage_model``): a
  half UNet on the *clean* LQ latent and the diffusion timestep. It keeps the features just before every
  downsample and after the middle block, passes each through its own time-conditioned ResBlock to 256 channels
  and returns them keyed by their width: ``{"64": [B, 256, 64, 64], "32": ..., "16": ..., "8": ...}`` for a 64x64
  latent. Parameter names are the official ones (``time_embed``, ``input_blocks``, ``middle_block``,
  ``fea_tran``), so ``structcond_stage_model.*`` loads as is.
- SFT: every ResBlock of the frozen UNet (SD-2.1: 8 down, 2 middle, 12 up = 22) modulates its residual branch
  after its second convolution, before the skip is added: ``h <- GN(h) * (1 + gamma(f)) + beta(f)`` with ``f`` the
  encoder feature of the same width (:class:`SPADE`; plain PyTorch init, *not* zero-init: the UNet's output changes
  from the first step). Here :func:`add_sft` attaches a ``spade`` module to each stock diffusers
  ``ResnetBlock2D`` and runs it from a forward hook on ``conv2``; :func:`structure_features` provides the encoder
  features around the UNet call (the side-input mechanism of :mod:`restore.models.side_inputs`).

Full size (SD-2.1-base UNet): encoder 52,494,080 + SFT 53,020,160 = 105,514,240 trainable parameters
(``tests/test_stablesr_models.py``). The released ``stablesr_000117.ckpt`` keeps the SFT weights under the LDM
UNet names (``model.diffusion_model.input_blocks.1.0.spade.*``); :func:`official_to_ours` /
:func:`ours_to_official` rename them to and from the diffusers block names. Why hooks and not a forked UNet:
docs/stablesr.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

from restore.models.side_inputs import attach_side_input, has_side_input, provide, side_input_of

__all__ = [
    "OFFICIAL_ENCODER_PREFIX",
    "OFFICIAL_UNET_PREFIX",
    "SFT_HIDDEN_CHANNELS",
    "STRUCTURE_INPUT",
    "SPADE",
    "MissingStructureFeaturesError",
    "StableSRCheckpointError",
    "TimeAwareEncoder",
    "add_sft",
    "has_sft",
    "hold_structure_features",
    "official_to_ours",
    "ours_to_official",
    "sft_state_dict",
    "split_stablesr_checkpoint",
    "stablesr_encoder_config",
    "structure_features",
    "tiny_stablesr_encoder_config",
]

#: Prefix of the UNet (and its SFT layers) in the official Lightning checkpoints.
OFFICIAL_UNET_PREFIX = "model.diffusion_model."
#: Prefix of the time-aware encoder in the official Lightning checkpoints.
OFFICIAL_ENCODER_PREFIX = "structcond_stage_model."
#: Hidden width of SPADE's shared convolution (fixed in the official ``ldm/modules/spade.py``).
SFT_HIDDEN_CHANNELS = 128
#: Name of the UNet's side input holding the encoder features (width string -> feature map).
STRUCTURE_INPUT = "stablesr_structure"
_SPADE_ATTR = "spade"


class MissingStructureFeaturesError(RuntimeError):
    """A UNet with SFT layers was called without encoder features (see :func:`structure_features`)."""


class StableSRCheckpointError(ValueError):
    """A checkpoint is not (or not entirely) a StableSR stage-1 checkpoint of the expected architecture."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (LDM's ``GroupNorm32``), so half-precision runs normalise as
    the official code does."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm(channels: int, groups: int = 32) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=1e-5)


# ---------------------------------------------------------------------------------------------- SFT (SPADE)
class SPADE(nn.Module):
    """Spatial feature transform of StableSR's ResBlocks: ``GN(h) * (1 + gamma(f)) + beta(f)``.

    ``f`` is looked up by ``h``'s width in the encoder's feature dict (as the official ``SPADE.forward``), so one
    SPADE works at the width of its block for any latent size. The normalisation is an affine GroupNorm with 32
    groups in float32; the official config string (``spadeinstance3x3``) is parsed there but not used.
    """

    def __init__(
        self, channels: int, cond_channels: int, hidden: int = SFT_HIDDEN_CHANNELS, groups: int = 32
    ) -> None:
        super().__init__()
        self.param_free_norm = _norm(channels, groups)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, h: Tensor, features: Mapping[str, Tensor]) -> Tensor:
        key = str(h.shape[-1])
        if key not in features:
            raise MissingStructureFeaturesError(
                f"no encoder feature of width {key} (have {sorted(features, key=int)}): the time-aware encoder must "
                "see a latent of the same size as the UNet (one level per UNet level)"
            )
        actv = self.mlp_shared(features[key].to(h.dtype))
        return self.param_free_norm(h) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def _resnets(unet: UNet2DConditionModel) -> list[tuple[str, ResnetBlock2D]]:
    """Every ResnetBlock2D of the UNet with its diffusers path, in the official order (down, mid, up)."""
    found = []
    for prefix, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        for b, block in enumerate(blocks):
            found += [(f"{prefix}.{b}.resnets.{r}", res) for r, res in enumerate(block.resnets)]
        if prefix == "down_blocks":
            found += [(f"mid_block.resnets.{r}", res) for r, res in enumerate(unet.mid_block.resnets)]
    return found


class _SFTHook:
    """Forward hook on a ResnetBlock2D's ``conv2``: its output goes through the block's SPADE."""

    def __init__(self, resnet: ResnetBlock2D, slot: Any) -> None:
        self.resnet = resnet
        self.slot = slot

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        features = self.slot.value
        if features is None:
            raise MissingStructureFeaturesError(
                "this UNet has StableSR's SFT layers: call it inside restore.models.stablesr.structure_features("
                "unet, encoder(lq_latent, t))"
            )
        return getattr(self.resnet, _SPADE_ATTR)(output, features)


def add_sft(
    unet: UNet2DConditionModel,
    cond_channels: int = 256,
    hidden: int = SFT_HIDDEN_CHANNELS,
    groups: int = 32,
) -> list[SPADE]:
    """Attach a :class:`SPADE` (named ``spade``) to every ResnetBlock2D of ``unet`` and hook it after ``conv2``.

    ``cond_channels``: the encoder's output width (``semb_channels`` 256). The SPADEs take the UNet's device and
    dtype; their parameters are trainable, the UNet's are left as they are. Returns them in the official order.
    """
    if has_sft(unet):
        raise ValueError("this UNet already has SFT layers")
    slot = attach_side_input(unet, STRUCTURE_INPUT)
    reference = next(unet.parameters())
    added = []
    for _, resnet in _resnets(unet):
        spade = SPADE(resnet.conv2.out_channels, cond_channels, hidden, groups)
        spade.to(device=reference.device, dtype=reference.dtype)
        resnet.add_module(_SPADE_ATTR, spade)
        resnet.conv2.register_forward_hook(_SFTHook(resnet, slot))
        added.append(spade)
    return added


def has_sft(unet: nn.Module) -> bool:
    """Whether :func:`add_sft` was applied to ``unet``."""
    return has_side_input(unet, STRUCTURE_INPUT)


@contextmanager
def structure_features(unet: nn.Module, features: Mapping[str, Tensor]) -> Iterator[None]:
    """Provide the time-aware encoder's features to the SFT layers of ``unet`` for the calls in the block."""
    with provide(unet, STRUCTURE_INPUT, dict(features), missing="this UNet has no SFT layers (add_sft)"):
        yield


def hold_structure_features(unet: nn.Module, features: Mapping[str, Tensor] | None) -> None:
    """Set (or, with ``None``, clear) the features without a context, for a training step whose checkpointed
    ResBlocks run again during backward; clear them when the step is done."""
    side_input_of(unet, STRUCTURE_INPUT, "this UNet has no SFT layers (add_sft)").value = (
        None if features is None else dict(features)
    )


def sft_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The SFT parameters of ``unet`` under their diffusers paths (``down_blocks.0.resnets.0.spade.*``)."""
    return {k: v for k, v in unet.state_dict().items() if f".{_SPADE_ATTR}." in k}


# ------------------------------------------------------------------------------------- time-aware encoder
class TimestepResBlock(nn.Module):
    """LDM's ``ResBlock`` (official names ``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``):
    GN-SiLU-conv, + time embedding, GN-SiLU-dropout-conv, + skip (1x1 conv when the width changes)."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)  # LDM's zero_module: a fresh block is the identity
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class SpatialSelfAttention(nn.Module):
    """LDM's ``AttentionBlock`` with the legacy head order (``QKVAttentionLegacy``): GN, a 1x1 ``qkv``
    projection split per head into q, k, v, softmax attention over all positions, zero-init ``proj_out``, + x."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        length, head = qkv.shape[-1], c // self.num_heads
        # legacy order: the 3C channels are [head][q|k|v][head_dim]
        q, k, v = qkv.reshape(b * self.num_heads, 3 * head, length).split(head, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (official name ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """``nn.Sequential`` passing the time embedding to the blocks that take it (LDM's
    ``TimestepEmbedSequential``; its indices are the official key names)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepResBlock) else layer(x)
        return x


class TimeAwareEncoder(ModelMixin, ConfigMixin):
    """StableSR's time-aware encoder (official ``EncoderUNetModelWT``): clean LQ latent + timestep -> one feature
    map of ``out_channels`` per UNet level, keyed by width (see the module doc).

    Defaults: ``v2-finetune_text_T_512.yaml`` ``structcond_stage_config`` (model_channels 256, channel_mult
    (1, 1, 2, 2), 2 ResBlocks per level, attention with 4 heads at downsample rates 1, 2, 4, output 256).
    ``timesteps`` are the original 0..999 indices (the official sampler passes them, not respaced ones).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 256,
        out_channels: int = 256,
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (4, 2, 1),
        channel_mult: tuple[int, ...] = (1, 1, 2, 2),
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        feature_channels = []
        ch, rate = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [TimestepResBlock(ch, emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(SpatialSelfAttention(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                feature_channels.append(ch)
                rate *= 2
        self.middle_block = TimestepSequential(
            TimestepResBlock(ch, emb_dim, dropout=dropout),
            SpatialSelfAttention(ch, num_heads),
            TimestepResBlock(ch, emb_dim, dropout=dropout),
        )
        feature_channels.append(ch)
        self.fea_tran = nn.ModuleList(
            TimestepResBlock(c, emb_dim, out_channels, dropout) for c in feature_channels
        )
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, emb)
        return block(h, emb)

    def forward(self, latent: Tensor, timesteps: Tensor) -> dict[str, Tensor]:
        """``latent`` ``[B, C, H, W]`` and ``timesteps`` ``[B]`` (or a scalar) -> ``{str(width): [B, out, h, w]}``."""
        timesteps = torch.as_tensor(timesteps, device=latent.device).reshape(-1).expand(latent.shape[0])
        t_emb = get_timestep_embedding(
            timesteps, self.config.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0
        )  # LDM: cos first, frequencies exp(-ln(1e4) i / half)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        h = latent.to(emb.dtype)
        taken = []
        for block in self.input_blocks:
            out = self._run(block, h, emb)
            if out.shape[-1] != h.shape[-1]:  # a downsample: keep what went into it
                taken.append(h)
            h = out
        taken.append(self._run(self.middle_block, h, emb))
        return {
            str(f.shape[-1]): self._run(tran, f, emb) for tran, f in zip(self.fea_tran, taken, strict=True)
        }


def stablesr_encoder_config() -> dict[str, Any]:
    """The full-size encoder (``v2-finetune_text_T_512.yaml``): 52,494,080 parameters."""
    return {
        "in_channels": 4,
        "model_channels": 256,
        "out_channels": 256,
        "num_res_blocks": 2,
        "attention_resolutions": (4, 2, 1),
        "channel_mult": (1, 1, 2, 2),
        "num_heads": 4,
    }


def tiny_stablesr_encoder_config() -> dict[str, Any]:
    """A CPU-sized encoder for a two-level tiny UNet: 64 channels (so that GroupNorm(32) keeps two channels per
    group and the time embedding survives the normalisation), one ResBlock per level, output 64."""
    return {
        "in_channels": 4,
        "model_channels": 64,
        "out_channels": 64,
        "num_res_blocks": 1,
        "attention_resolutions": (1,),
        "channel_mult": (1, 2),
        "num_heads": 4,
    }


# -------------------------------------------------------------------------------------------- key layout
def _ldm_resblock_names(layers_per_block: int, levels: int) -> list[str]:
    """LDM names of the UNet's ResBlocks in the order of :func:`_resnets` (down, middle, up)."""
    names, index = [], 1
    for level in range(levels):
        for _ in range(layers_per_block):
            names.append(f"input_blocks.{index}.0")
            index += 1
        if level != levels - 1:
            index += 1  # the downsampler
    names += ["middle_block.0", "middle_block.2"]
    names += [f"output_blocks.{j}.0" for j in range(levels * (layers_per_block + 1))]
    return names


def _diffusers_resblock_names(layers_per_block: int, levels: int) -> list[str]:
    names = [f"down_blocks.{b}.resnets.{r}" for b in range(levels) for r in range(layers_per_block)]
    names += ["mid_block.resnets.0", "mid_block.resnets.1"]
    names += [f"up_blocks.{b}.resnets.{r}" for b in range(levels) for r in range(layers_per_block + 1)]
    return names


def official_to_ours(
    state: Mapping[str, Tensor], layers_per_block: int = 2, levels: int = 4
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The trained parts of an official checkpoint -> ``(encoder_state, sft_state)``.

    ``encoder_state`` has the :class:`TimeAwareEncoder` keys (the official ones without
    ``structcond_stage_model.``); ``sft_state`` the diffusers UNet keys of the SPADEs
    (``down_blocks.0.resnets.0.spade.*``). Other keys (the frozen SD-2.1 UNet, VAE, text encoder) are ignored.
    """
    renames = dict(
        zip(
            _ldm_resblock_names(layers_per_block, levels),
            _diffusers_resblock_names(layers_per_block, levels),
            strict=True,
        )
    )
    encoder, sft = {}, {}
    for key, value in state.items():
        if key.startswith(OFFICIAL_ENCODER_PREFIX):
            encoder[key[len(OFFICIAL_ENCODER_PREFIX) :]] = value
        elif key.startswith(OFFICIAL_UNET_PREFIX) and f".{_SPADE_ATTR}." in key:
            block, rest = key[len(OFFICIAL_UNET_PREFIX) :].split(f".{_SPADE_ATTR}.", 1)
            if block not in renames:
                raise StableSRCheckpointError(
                    f"{key}: an SFT layer at {block}, which a UNet with {levels} levels of {layers_per_block} "
                    "ResBlocks does not have"
                )
            sft[f"{renames[block]}.{_SPADE_ATTR}.{rest}"] = value
    return encoder, sft


def ours_to_official(
    encoder_state: Mapping[str, Tensor],
    sft_state: Mapping[str, Tensor],
    layers_per_block: int = 2,
    levels: int = 4,
) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_ours`: the official key layout of the trained parts."""
    renames = dict(
        zip(
            _diffusers_resblock_names(layers_per_block, levels),
            _ldm_resblock_names(layers_per_block, levels),
            strict=True,
        )
    )
    out = {}  # the UNet (model.*) precedes structcond_stage_model in the Lightning state dict
    order = {name: i for i, name in enumerate(renames)}  # input, middle, output blocks, as LDM registers them
    for key, value in sorted(sft_state.items(), key=lambda kv: order[kv[0].split(f".{_SPADE_ATTR}.", 1)[0]]):
        block, rest = key.split(f".{_SPADE_ATTR}.", 1)
        out[f"{OFFICIAL_UNET_PREFIX}{renames[block]}.{_SPADE_ATTR}.{rest}"] = value
    out.update({OFFICIAL_ENCODER_PREFIX + k: v for k, v in encoder_state.items()})
    return out


def split_stablesr_checkpoint(
    state: Mapping[str, Tensor],
    encoder: TimeAwareEncoder,
    unet: UNet2DConditionModel,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Convert an official checkpoint for ``encoder`` and the SFT layers of ``unet``, checking that every
    trained key is there with its shape (the Lightning wrapper ``state_dict`` is unwrapped).

    Raises :class:`StableSRCheckpointError` naming the missing, unexpected or mis-shaped keys; a checkpoint without
    SFT layers is named as such (e.g. a plain SD-2.1 checkpoint or a CFW autoencoder).
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    levels = len(unet.config.block_out_channels)
    encoder_state, sft_state = official_to_ours(state, unet.config.layers_per_block, levels)
    if not encoder_state and not sft_state:
        raise StableSRCheckpointError(
            "no StableSR stage-1 weights in this checkpoint (no structcond_stage_model.* and no "
            "model.diffusion_model.*.spade.* keys): is it a CFW autoencoder (vqgan_cfw_*.ckpt) or a plain SD model?"
        )
    problems = []
    for name, got, expected in (
        ("encoder", encoder_state, encoder.state_dict()),
        ("SFT", sft_state, sft_state_dict(unet)),
    ):
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        shapes = [k for k in set(got) & set(expected) if got[k].shape != expected[k].shape]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", sorted(shapes)),
        ):
            if keys:
                problems.append(f"{name}: {len(keys)} {label}, e.g. {keys[:3]}")
    if problems:
        raise StableSRCheckpointError(
            "the checkpoint does not fit this StableSR model: " + "; ".join(problems)
        )
    return encoder_state, sft_state
