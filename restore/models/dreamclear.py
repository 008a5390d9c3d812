"""DreamClear's ControlFormer with Mixture of Adaptive Modulators on a frozen PixArt-α DiT.

DreamClear (Ai et al., NeurIPS 2024) §3; official: ``shallowdream204/DreamClear:
diffusion/model/nets/pixart_controlnet.py`` (``ControlPixArtMSHalfSR2Branch`` and its modules). The frozen DiT is
diffusers' ``PixArtTransformer2DModel`` (the prior's ``transformer``); :class:`DreamClearControlFormer` holds the
trainable parts under the official attribute names, so the released ``DreamClear-1024.pth`` maps onto it key for
key (:func:`official_to_ours` / :func:`ours_to_official`; the PixArt block keys differ only in diffusers' naming).

One call (:meth:`DreamClearControlFormer.forward`, the frozen DiT's forward with the two branches interleaved):

1. the noisy latent enters the frozen trunk through its patch embedder (+ sin-cos position embedding) and each
   branch through its own trainable copy of it; the LQ latent and the reference latent enter through zero-initialised
   patch convolutions *without* position embedding (``c_embedder_lq`` / ``c_embedder_pre``);
2. for every block k: the LQ branch's copy of block k (its input at k=0: noisy-latent tokens + LQ tokens), the
   reference branch's copy likewise, the frozen block k; then MoAM_k on the trunk tokens x:
   ``cross_de_k``: queries from LayerNorm(c_lq), keys/values from LayerNorm(c_ref) (affine, eps 1e-5), its output o
   gives ``ref = proj(o)`` (zero-initialised) and the degradation map ``D = de_proj(o)``; ``x = x + ref``;
   ``x = (1 + g_ref) x + b_ref`` with ``(g_ref, b_ref) = am_pre_k(c_ref)``; ``x = (1 + g_lq) x + b_lq`` with
   ``(g_lq, b_lq)`` the per-token mixture of 3 modulator experts on c_lq, weighted by ``softmax(gate(D))``;
3. the frozen final layer and unpatchify: epsilon and the variance interpolation (8 channels).

At initialisation (every zero-init at zero) the output equals the frozen prior's exactly. The official ``cross_de``
flattens the batch into one sequence, so each query attends to the reference tokens of *every* sample of the batch
(also across the CFG pair, and across the 4 images per GPU in training): ``cross_batch_attn=True`` reproduces it,
which the released weights were trained with; per-sample attention is the default for new trainings, where
images in a batch should not see each other (docs/dreamclear.md).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "MODULATIONS",
    "AdaptiveModulator",
    "DegradationCrossAttention",
    "DreamClearControlFormer",
    "MixtureOfAdaptiveModulators",
    "PatchEmbedZero",
    "official_pixart_block_to_diffusers",
    "official_to_ours",
    "ours_to_official",
]

#: How the LQ branch modulates the trunk (paper Tab. 4): ``moam`` (official: 3 experts routed by the degradation
#: map) or ``am`` (one adaptive modulator on c_lq, the "AM only" ablation).
MODULATIONS = ("moam", "am")


# ---------------------------------------------------------------------------------------------- modules
class PatchEmbedZero(nn.Module):
    """A condition latent to tokens: a zero-initialised ``patch x patch`` convolution, no position embedding
    (official ``PatchEmbed_Zero``)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, latents: Tensor) -> Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)


class AdaptiveModulator(nn.Module):
    """Per-token scale and shift from branch features (official ``Adaptive_Modulator``):
    ``a = GELU_tanh(shared_proj(c))``, ``gamma = proj_mul(a)``, ``beta = proj_add(a)`` (both zero-initialised)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.shared_proj = nn.Linear(hidden_size, hidden_size // 2)
        self.proj_add = nn.Linear(hidden_size // 2, hidden_size)
        self.proj_mul = nn.Linear(hidden_size // 2, hidden_size)
        for layer in (self.proj_add, self.proj_mul):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.act(self.shared_proj(features))
        return self.proj_mul(hidden), self.proj_add(hidden)


class MixtureOfAdaptiveModulators(nn.Module):
    """``num_experts`` adaptive modulators on c_lq mixed per token by a soft router on the degradation map
    (official ``Adaptive_Modulator_MoE``): ``w = softmax(gate(D))``, ``gate = Linear(C, 8 E) -> GELU_tanh ->
    Linear(8 E, E)`` (the last zero-initialised: uniform weights at init); dense, no top-k, no balancing loss."""

    def __init__(self, hidden_size: int, num_experts: int = 3) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.experts = nn.ModuleList(AdaptiveModulator(hidden_size) for _ in range(num_experts))
        router = 8 * num_experts  # the official router width (24 for its 3 experts)
        self.gate = nn.Sequential(
            nn.Linear(hidden_size, router), nn.GELU(approximate="tanh"), nn.Linear(router, num_experts)
        )
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)

    def routing(self, degradation: Tensor) -> Tensor:
        """The experts' weights per token, ``[B, T, E]``."""
        return self.gate(degradation).softmax(dim=-1)

    def forward(self, features: Tensor, degradation: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.routing(degradation)
        gamma = beta = 0
        for e, expert in enumerate(self.experts):
            g, b = expert(features)
            w = weights[..., e : e + 1]
            gamma, beta = gamma + w * g, beta + w * b
        return gamma, beta


class DegradationCrossAttention(nn.Module):
    """LQ-query / reference-key cross-attention (official ``Zero_MultiHeadCrossAttentionDe``): its output o gives
    the reference injection ``proj(o)`` (zero-initialised) and the token-wise degradation map ``de_proj(o)``.

    ``cross_batch=True`` attends over the reference tokens of the whole batch, as the official code (which views
    the batch as one sequence); ``False``: each sample's own tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.de_proj = nn.Linear(hidden_size, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, lq: Tensor, reference: Tensor, cross_batch: bool = False) -> tuple[Tensor, Tensor]:
        b, t, c = lq.shape
        h = self.num_heads
        q = self.q_linear(self.norm1(lq)).view(b, t, h, c // h)
        kv = self.kv_linear(self.norm2(reference)).view(b, reference.shape[1], 2, h, c // h)
        k, v = kv.unbind(dim=2)
        if cross_batch:  # [1, B*T, h, d]: every query sees every sample's keys
            q, k, v = (x.reshape(1, -1, h, c // h) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, t, c)
        return self.proj(out), self.de_proj(out)


class ControlBlock(nn.Module):
    """One branch block: a trainable copy of the frozen DiT block (official ``ControlT2IDitBlockHalfSR``); no
    projection on its output."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.copied_block = copy.deepcopy(block)
        self.copied_block.requires_grad_(True)

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        return self.copied_block(hidden_states, **kwargs)


# ---------------------------------------------------------------------------------------------- ControlFormer
class DreamClearControlFormer(nn.Module):
    """The trainable parts of DreamClear, built from the frozen ``PixArtTransformer2DModel`` (see the module doc).

    Args:
        transformer: the prior's DiT; its blocks and patch embedder are copied (their current weights).
        num_experts: modulator experts of MoAM (official 3).
        modulation: ``moam`` (official) or ``am`` (one modulator on c_lq, ablation).
        cross_batch_attn: ``cross_de`` attends across the batch (official; the released weights) or per sample.
    """

    def __init__(
        self,
        transformer: nn.Module,
        num_experts: int = 3,
        modulation: str = "moam",
        cross_batch_attn: bool = False,
    ) -> None:
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {modulation!r}")
        config = transformer.config
        hidden = int(config.num_attention_heads * config.attention_head_dim)
        heads = int(config.num_attention_heads)
        blocks = transformer.transformer_blocks
        self.cross_batch_attn = bool(cross_batch_attn)
        self.gradient_checkpointing = False
        with torch.device(transformer.pos_embed.proj.weight.device):
            # registration order = the official state_dict order
            self.controlnet_lq = nn.ModuleList(ControlBlock(b) for b in blocks)
            if modulation == "moam":
                self.am_lq = nn.ModuleList(MixtureOfAdaptiveModulators(hidden, num_experts) for _ in blocks)
            else:
                self.am_lq = nn.ModuleList(AdaptiveModulator(hidden) for _ in blocks)
            self.controlnet_pre = nn.ModuleList(ControlBlock(b) for b in blocks)
            self.am_pre = nn.ModuleList(AdaptiveModulator(hidden) for _ in blocks)
            self.cross_de = nn.ModuleList(DegradationCrossAttention(hidden, heads) for _ in blocks)
            patch, channels = int(config.patch_size), int(config.in_channels)
            self.c_embedder_lq = PatchEmbedZero(channels, hidden, patch)
            self.c_embedder_pre = PatchEmbedZero(channels, hidden, patch)
            self.x_embedder_lq = copy.deepcopy(transformer.pos_embed)
            self.x_embedder_pre = copy.deepcopy(transformer.pos_embed)
        self.requires_grad_(True)
        self.to(dtype=transformer.pos_embed.proj.weight.dtype)

    _supports_gradient_checkpointing = True

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the branch blocks (and the frozen blocks they interleave with) in the backward pass."""
        self.gradient_checkpointing = True

    def _block(self, block: nn.Module, hidden: Tensor, **kwargs: Any) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(lambda x: block(x, **kwargs), hidden, use_reentrant=False)
        return block(hidden, **kwargs)

    def _modulate_lq(self, k: int, c_lq: Tensor, degradation: Tensor) -> tuple[Tensor, Tensor]:
        modulator = self.am_lq[k]
        if isinstance(modulator, MixtureOfAdaptiveModulators):
            return modulator(c_lq, degradation)
        return modulator(c_lq)

    def forward(
        self,
        transformer: nn.Module,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        lq_latent: Tensor,
        ref_latent: Tensor,
        encoder_attention_mask: Tensor | None = None,
        added_cond_kwargs: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """The DiT's output ``[B, 2C, H, W]`` for noisy latents ``hidden_states`` with the LQ and reference
        latents (``[B, C, H, W]``) as conditions; the other arguments as ``PixArtTransformer2DModel.forward``."""
        config = transformer.config
        batch, _, height, width = hidden_states.shape
        patch = int(config.patch_size)
        h, w = height // patch, width // patch
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        mask = None
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:  # as diffusers: a bias
            mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        elif encoder_attention_mask is not None:
            mask = encoder_attention_mask

        x = transformer.pos_embed(hidden_states)
        x_lq = self.x_embedder_lq(hidden_states)
        x_ref = self.x_embedder_pre(hidden_states)
        c_lq = self.c_embedder_lq(lq_latent.to(hidden_states.dtype))
        c_ref = self.c_embedder_pre(ref_latent.to(hidden_states.dtype))
        t, embedded_t = transformer.adaln_single(
            timestep, dict(added_cond_kwargs or {}), batch_size=batch, hidden_dtype=x.dtype
        )
        text = transformer.caption_projection(encoder_hidden_states).view(batch, -1, x.shape[-1])
        call = {"encoder_hidden_states": text, "encoder_attention_mask": mask, "timestep": t}

        for k, block in enumerate(transformer.transformer_blocks):
            c_lq = self._block(self.controlnet_lq[k], x_lq + c_lq if k == 0 else c_lq, **call)
            c_ref = self._block(self.controlnet_pre[k], x_ref + c_ref if k == 0 else c_ref, **call)
            x = self._block(block, x, **call)
            ref, degradation = self.cross_de[k](c_lq, c_ref, self.cross_batch_attn)
            x = x + ref
            gamma, beta = self.am_pre[k](c_ref)
            x = (1 + gamma) * x + beta
            gamma, beta = self._modulate_lq(k, c_lq, degradation)
            x = (1 + gamma) * x + beta

        # the frozen final layer and unpatchify, as PixArtTransformer2DModel.forward
        shift, scale = (transformer.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        x = transformer.norm_out(x) * (1 + scale) + shift
        x = transformer.proj_out(x)
        channels = transformer.out_channels
        x = x.reshape(batch, h, w, patch, patch, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, h * patch, w * patch)


# ---------------------------------------------------------------------------------------------- key layouts
# Official PixArt block keys -> diffusers BasicTransformerBlock keys. A value with several targets is split
# along dim 0 (qkv -> q, k, v; kv -> k, v), as diffusers' scripts/convert_pixart_alpha_to_diffusers.py does.
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "scale_shift_table": ("scale_shift_table",),
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
# Official PixArtMS keys outside the blocks -> diffusers PixArtTransformer2DModel keys.
_BASE_KEYS: dict[str, str] = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.scale_shift_table": "scale_shift_table",
    "final_layer.linear": "proj_out",
}
_BLOCK = re.compile(
    r"^(?P<prefix>.*?)(?P<module>attn\.qkv|attn\.proj|cross_attn\.q_linear|cross_attn\.kv_linear|"
    r"cross_attn\.proj|mlp\.fc1|mlp\.fc2|scale_shift_table)(?P<suffix>(\.weight|\.bias)?)$"
)


def official_pixart_block_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official PixArt block keys (anywhere in the key, e.g. ``controlnet_lq.0.copied_block.attn.qkv.weight``)
    converted to diffusers' names, fused tensors split; other keys unchanged."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match is None:
            out[key] = value
            continue
        targets = _BLOCK_KEYS[match["module"]]
        parts = value.chunk(len(targets), dim=0) if len(targets) > 1 else (value,)
        for target, part in zip(targets, parts, strict=True):
            out[f"{match['prefix']}{target}{match['suffix']}"] = part.contiguous()
    return out


# diffusers block key -> (official key, its index in the fused tensor, the number of parts)
_PART_OF = {t: (source, i, len(ts)) for source, ts in _BLOCK_KEYS.items() for i, t in enumerate(ts)}
_DIFFUSERS_BLOCK = re.compile(
    r"^(?P<prefix>.*?)(?P<module>"
    + "|".join(re.escape(t) for t in sorted(_PART_OF, key=len, reverse=True))
    + r")(?P<suffix>(\.weight|\.bias)?)$"
)


def _diffusers_block_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor | None] = {}
    fused: dict[str, list[Tensor | None]] = {}
    for key, value in state.items():
        match = _DIFFUSERS_BLOCK.match(key)
        if match is None:
            out[key] = value
            continue
        source, index, count = _PART_OF[match["module"]]
        target = f"{match['prefix']}{source}{match['suffix']}"
        out.setdefault(target, None)  # keeps the position of the fused key (the official order)
        fused.setdefault(target, [None] * count)[index] = value
    for target, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"{target}: not every part of the fused tensor is present")
        out[target] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return out


def official_to_ours(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an official ``ControlPixArtMSHalfSR2Branch`` state dict (``DreamClear-1024.pth``'s ``state_dict``)
    into (the ControlFormer's state dict in our layout, the frozen PixArt's in diffusers' layout). The base's
    ``pos_embed`` (recomputed) and ``y_embedder.y_embedding`` (the prior's null caption) are left out of both."""
    trained, base = {}, {}
    for key, value in official_pixart_block_to_diffusers(state).items():
        if not key.startswith("base_model."):
            trained[key] = value
            continue
        key = key[len("base_model.") :]
        if key in ("pos_embed", "y_embedder.y_embedding"):
            continue
        if key.startswith("blocks."):
            base["transformer_blocks." + key[len("blocks.") :]] = value
            continue
        module, _, param = key.rpartition(".")
        if module not in _BASE_KEYS and key not in _BASE_KEYS:
            raise KeyError(f"unknown PixArt key base_model.{key}")
        base[_BASE_KEYS[key] if key in _BASE_KEYS else f"{_BASE_KEYS[module]}.{param}"] = value
    return trained, base


def ours_to_official(trained: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ControlFormer's state dict in the official key layout (inverse of :func:`official_to_ours` for the
    trained parts)."""
    return _diffusers_block_to_official(trained)
