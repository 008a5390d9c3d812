"""StableSR's stage-2 decoder: Controllable Feature Wrapping (CFW) on the frozen SD VAE.

StableSR (Wang et al., IJCV 2024), Sec. 3.3 "Controllable Feature Wrapping". The diffusion prior produces a
latent that is faithful in content but not always to the low-quality (LQ) input; CFW lets the VAE decoder look
at the LQ image once more. The VAE encoder, run on the LQ image, hands two intermediate feature maps to the
decoder, and at the same two resolutions the decoder adds a learned correction::

    F_d <- F_d + w * C(cat(F_e, F_d))

``C`` is a small trainable network (ResBlock 2C->C, two RRDBs, ResBlock C->C); ``w`` trades fidelity (w -> 1)
against the prior's realism (w -> 0). Everything but ``C`` is the SD VAE, frozen in the official training.

Official code (``IceClear/StableSR``): ``ldm/models/autoencoder.py`` (``AutoencoderKLResi``: encode returns the
posterior and the features, decode takes both), ``ldm/modules/diffusionmodules/model.py`` (``Encoder.forward``
with ``return_fea=True``, ``Decoder_Mix``, ``Fuse_sft_block_RRDB``, ``ResBlock``), the RRDB from BasicSR
(``basicsr/archs/rrdbnet_arch.py``), the config ``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml`` and the
released weights ``vqgan_cfw_00011.ckpt`` (Hugging Face ``Iceclear/StableSR``).

Where the features are taken and given back, in the official level numbering (level ``i`` has channel width
``ch * ch_mult[i]``; level 0 is full resolution):

- the encoder hands over, for levels 1 and 2, the output of the level's last res block, before its downsampler
  (SD VAE: 256 channels at 1/2 and 512 channels at 1/4 of the image size);
- the decoder, at levels 1 and 2, after the level's res blocks and before its upsampler, applies
  ``fusion_layer_i`` to ``cat([encoder feature of level i, decoder feature])`` (encoder first) and adds it
  with weight ``w``; ``fusion_layer_1`` sits at level 1 (256 ch), ``fusion_layer_2`` at level 2 (512 ch).

Here the VAE is a stock diffusers ``AutoencoderKL`` (what the priors load; no fork of its code): forward hooks
on ``encoder.down_blocks[i].resnets[-1]`` capture the features and hooks on the decoder's matching
``up_blocks[n - 1 - i].resnets[-1]`` (diffusers lists the decoder levels coarse to fine, LDM fine to coarse)
replace their output with the fused one. The hooks live only for the duration of one call, so the same
``AutoencoderKL`` decodes normally everywhere else. The fusion layers are not zero-initialised (neither are the
official ones): with ``w > 0`` an untrained CFW changes the image.

Checkpoints: :func:`official_to_ours` / :func:`ours_to_official` map the official layout (the VAE in LDM names,
``decoder.fusion_layer_{1,2}.*``) to ours (``vae.*`` in diffusers names, ``fusion_layer_{1,2}.*`` unchanged
below the prefix) and back; :func:`load_cfw_checkpoint` reads the released Lightning checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from restore.models.priors.sd import SD_SCALING_FACTOR, sd_vae_config  # the priors' SD VAE
from restore.models.rrdbnet import RRDB
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = [
    "FUSION_LEVELS",
    "INFERENCE_FUSION_WEIGHT",
    "TRAIN_FUSION_WEIGHT",
    "CFWAutoencoder",
    "CFWFusionBlock",
    "CFWLoadReport",
    "CFWResBlock",
    "build_cfw_autoencoder",
    "cfw_vae_config",
    "load_cfw_checkpoint",
    "official_to_ours",
    "ours_to_official",
    "pretrained_cfw_autoencoder",
    "tiny_cfw_autoencoder",
    "tiny_cfw_vae_config",
]

#: The official levels (``Encoder`` / ``Decoder_Mix`` numbering) that carry a fusion layer: every level but the
#: finest and the coarsest (``Decoder_Mix.__init__``: ``i_level != num_resolutions - 1 and i_level != 0``).
FUSION_LEVELS = (1, 2)
#: ``fusion_w: 1.0`` in ``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml``: the weight CFW is trained with.
TRAIN_FUSION_WEIGHT = 1.0
#: ``--dec_w`` default 0.5 of the official test scripts (``scripts/sr_val_ddpm_text_T_vqganfin_old.py`` and the
#: other ``sr_val_*`` scripts, which set ``vq_model.decoder.fusion_w = opt.dec_w``); the README runs use 0.5 too.
INFERENCE_FUSION_WEIGHT = 0.5
#: Official ``Normalize``: every GroupNorm of the LDM autoencoder, fusion layers included, has 32 groups and
#: eps 1e-6, whatever the width (so a tiny build needs widths that are multiples of 32).
_OFFICIAL_NORM_GROUPS = 32
_OFFICIAL_NORM_EPS = 1e-6
#: ``Fuse_sft_block_RRDB(num_block=2)`` via ``Decoder_Mix(num_fuse_block=2)``; growth 32 is the class default.
_OFFICIAL_NUM_FUSE_BLOCKS = 2
_OFFICIAL_GROW_CHANNELS = 32
#: What the released checkpoint holds besides the autoencoder: the LPIPS + discriminator training loss.
_LOSS_PREFIX = "loss."
_FUSION_OFFICIAL_PREFIX = "decoder.fusion_layer_"


# ---------------------------------------------------------------------------------------------- modules
class CFWResBlock(nn.Module):
    """The fusion network's residual block (official ``ResBlock`` in ``model.py``): GroupNorm-SiLU-conv3x3 twice,
    plus the input (through a 1x1 ``conv_out`` when the width changes). Unlike the VAE's ``ResnetBlock`` it has no
    time embedding and no dropout, and its shortcut is called ``conv_out``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = _OFFICIAL_NORM_GROUPS,
        eps: float = _OFFICIAL_NORM_EPS,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_out is None else self.conv_out(x))


class CFWFusionBlock(nn.Module):
    """The CFW correction ``C`` (official ``Fuse_sft_block_RRDB``): ``dec + w * C(cat(enc, dec))``.

    ``encode_enc_1`` squeezes the concatenation (encoder feature first) from 2C to C channels, ``encode_enc_2``
    is ``num_block`` RRDBs (BasicSR's, growth ``num_grow_ch``), ``encode_enc_3`` a C->C residual block. The
    attribute names are the official ones, so ``decoder.fusion_layer_i.*`` of the released checkpoint load with
    the prefix changed only.
    """

    def __init__(
        self,
        channels: int,
        num_block: int = _OFFICIAL_NUM_FUSE_BLOCKS,
        num_grow_ch: int = _OFFICIAL_GROW_CHANNELS,
        norm_num_groups: int = _OFFICIAL_NORM_GROUPS,
    ) -> None:
        super().__init__()
        self.encode_enc_1 = CFWResBlock(2 * channels, channels, norm_num_groups)
        # restore.models.rrdbnet.RRDB has BasicSR's names (rdb1..3.conv1..5) and numerics (0.2 residual scales,
        # LeakyReLU 0.2, init kaiming x 0.1), so it is the official block; tests/test_rrdbnet.py checks it.
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, num_grow_ch) for _ in range(num_block)))
        self.encode_enc_3 = CFWResBlock(channels, channels, norm_num_groups)

    def correction(self, enc_feat: Tensor, dec_feat: Tensor) -> Tensor:
        """``C(cat(enc, dec))``, the term that is added with weight ``w``."""
        h = self.encode_enc_1(torch.cat([enc_feat, dec_feat], dim=1))
        return self.encode_enc_3(self.encode_enc_2(h))

    def forward(self, enc_feat: Tensor, dec_feat: Tensor, weight: float = TRAIN_FUSION_WEIGHT) -> Tensor:
        return dec_feat + weight * self.correction(enc_feat, dec_feat)


class CFWAutoencoder(nn.Module):
    """The CFW autoencoder (official ``AutoencoderKLResi``): a stock diffusers ``AutoencoderKL`` plus the two
    fusion layers, wired in with forward hooks (see the module docstring for the exact places).

    Args:
        vae: the SD VAE (``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` levels, at least 4 of them as in SD, so that
            levels 1 and 2 are inner levels). It is held, not copied: its weights are ``vae.*`` of our state dict.
        num_fuse_block: RRDBs per fusion layer (official ``num_fuse_block``, 2).
        num_grow_ch: RRDB growth channels (official 32).
        norm_num_groups: GroupNorm groups of the fusion layers; the official ``Normalize`` uses 32 regardless of
            the VAE's own setting.
        fusion_weight: ``w`` used in eval mode when a call gives none: 0.5, the official test scripts' ``dec_w``.
        train_fusion_weight: ``w`` used in train mode when a call gives none: 1.0, the official config's
            ``fusion_w`` (CFW is trained at full strength and dialled down at test time).

    Latents are the VAE's own (unscaled): divide a diffusion latent by ``vae.config.scaling_factor`` first, as the
    official scripts do (``vq_model.decode(samples * 1. / model.scale_factor, enc_fea_lq)``).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        num_fuse_block: int = _OFFICIAL_NUM_FUSE_BLOCKS,
        num_grow_ch: int = _OFFICIAL_GROW_CHANNELS,
        norm_num_groups: int = _OFFICIAL_NORM_GROUPS,
        fusion_weight: float = INFERENCE_FUSION_WEIGHT,
        train_fusion_weight: float = TRAIN_FUSION_WEIGHT,
    ) -> None:
        super().__init__()
        config = vae.config
        levels = len(config.block_out_channels)
        if levels < max(FUSION_LEVELS) + 2:
            raise ValueError(f"CFW needs a VAE with at least {max(FUSION_LEVELS) + 2} levels, got {levels}")
        if set(config.down_block_types) != {"DownEncoderBlock2D"} or set(config.up_block_types) != {
            "UpDecoderBlock2D"
        }:
            raise ValueError("CFW hooks expect the SD VAE's DownEncoderBlock2D / UpDecoderBlock2D levels")
        self.vae = vae
        self.fusion_weight = fusion_weight
        self.train_fusion_weight = train_fusion_weight
        for level in FUSION_LEVELS:
            width = config.block_out_channels[level]
            # Official attribute name fusion_layer_{level}; the decoder width at a level equals the encoder's.
            setattr(
                self,
                f"fusion_layer_{level}",
                CFWFusionBlock(width, num_fuse_block, num_grow_ch, norm_num_groups),
            )

    # ------------------------------------------------------------------ structure
    @property
    def num_levels(self) -> int:
        return len(self.vae.config.block_out_channels)

    def fusion_layer(self, level: int) -> CFWFusionBlock:
        """The fusion layer at official level ``level`` (1 or 2)."""
        return getattr(self, f"fusion_layer_{level}")

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        """What the official stage-2 training optimises (``freeze_dec=True``: every ``fusion_layer`` parameter,
        the VAE frozen)."""
        for level in FUSION_LEVELS:
            yield from self.fusion_layer(level).parameters()

    def _encoder_tap(self, level: int) -> nn.Module:
        # Official Encoder.forward appends h after the level's last block (and its attention; the SD VAE has
        # none there) and before the downsampler: diffusers' last resnet of the same down block.
        return self.vae.encoder.down_blocks[level].resnets[-1]

    def _decoder_tap(self, level: int) -> nn.Module:
        # Decoder_Mix fuses after the level's num_res_blocks + 1 blocks, before upsampling; diffusers numbers the
        # decoder's levels from the coarsest, so LDM level i is up_blocks[n - 1 - i].
        return self.vae.decoder.up_blocks[self.num_levels - 1 - level].resnets[-1]

    def _check_whole_image_mode(self) -> None:
        # Tiled / sliced VAE calls would run the hooks once per tile or sample, with features of other sizes.
        if getattr(self.vae, "use_tiling", False) or getattr(self.vae, "use_slicing", False):
            raise ValueError(
                "CFWAutoencoder needs the VAE with tiling and slicing disabled "
                "(vae.disable_tiling(), vae.disable_slicing()): the features must cover the whole image"
            )

    # ------------------------------------------------------------------ encode / decode
    def encode_with_features(self, image: Tensor) -> tuple[DiagonalGaussianDistribution, dict[int, Tensor]]:
        """Encode ``image`` (in [-1, 1]) to the posterior and the CFW features (official
        ``AutoencoderKLResi.encode``): ``{level: feature}`` for levels 1 and 2."""
        self._check_whole_image_mode()
        features: dict[int, Tensor] = {}

        def capture(level: int):
            def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
                features[level] = output

            return hook

        handles = [self._encoder_tap(level).register_forward_hook(capture(level)) for level in FUSION_LEVELS]
        try:
            posterior = self.vae.encode(image).latent_dist
        finally:
            for handle in handles:
                handle.remove()
        return posterior, features

    def resolve_fusion_weight(self, fusion_weight: float | None) -> float:
        """``fusion_weight`` if given, else the train- or eval-mode default (1.0 / 0.5, see the class doc)."""
        if fusion_weight is not None:
            return float(fusion_weight)
        return self.train_fusion_weight if self.training else self.fusion_weight

    @contextmanager
    def fusing(self, features: Mapping[int, Tensor], fusion_weight: float | None = None) -> Iterator[None]:
        """While inside, every call of ``self.vae``'s decoder applies CFW with ``features`` (from
        :meth:`encode_with_features`) and weight ``w``: for callers that drive the VAE themselves."""
        weight = self.resolve_fusion_weight(fusion_weight)
        missing = [level for level in FUSION_LEVELS if level not in features]
        if missing:
            raise KeyError(f"CFW features for levels {missing} missing (have {sorted(features)})")

        def fuse(level: int):
            layer = self.fusion_layer(level)
            enc_feat = features[level]

            def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
                if enc_feat.shape[0] != output.shape[0] or enc_feat.shape[2:] != output.shape[2:]:
                    raise ValueError(
                        f"CFW level {level}: encoder feature {tuple(enc_feat.shape)} does not match the decoder's "
                        f"{tuple(output.shape)}; the LQ image must be the size the latent decodes to"
                    )
                return layer(enc_feat.to(output.dtype), output, weight)

            return hook

        decoder = self.vae.decoder
        # diffusers' gradient checkpointing would rerun the up blocks in backward, after these hooks are gone
        # (torch then refuses the mismatching recomputation): pause it for the fused decode.
        checkpointing = getattr(decoder, "gradient_checkpointing", False)
        decoder.gradient_checkpointing = False
        handles = [self._decoder_tap(level).register_forward_hook(fuse(level)) for level in FUSION_LEVELS]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            decoder.gradient_checkpointing = checkpointing

    def decode(
        self, z: Tensor, features: Mapping[int, Tensor] | None, fusion_weight: float | None = None
    ) -> Tensor:
        """Decode the (unscaled) latent ``z`` with CFW (official ``AutoencoderKLResi.decode``).

        ``features``: from :meth:`encode_with_features` on the LQ image; ``None`` decodes with the plain VAE.
        ``fusion_weight``: ``w``; ``None`` takes 0.5 in eval mode (official test ``dec_w``) and 1.0 in train mode
        (official training ``fusion_w``). ``w = 0`` gives the stock decoder's output.
        """
        if features is None:
            return self.vae.decode(z).sample
        self._check_whole_image_mode()
        with self.fusing(features, fusion_weight):
            return self.vae.decode(z).sample

    def forward(self, lq_image: Tensor, z: Tensor, fusion_weight: float | None = None) -> Tensor:
        """Official ``AutoencoderKLResi.forward`` minus the posterior: features of ``lq_image``, decode ``z``."""
        _, features = self.encode_with_features(lq_image)
        return self.decode(z, features, fusion_weight)


# ---------------------------------------------------------------------------------------------- builders
def cfw_vae_config() -> dict[str, Any]:
    """The full-size VAE of StableSR (SD-2.1's, the official ``ddconfig``: ch 128, ch_mult 1,2,4,4, 2 res blocks,
    z 4, no attention but the middle one) as diffusers ``AutoencoderKL`` kwargs; scaling factor 0.18215."""
    return sd_vae_config()


def tiny_cfw_vae_config() -> dict[str, Any]:
    """A tiny VAE for CPU tests. Widths are multiples of 32 because the official ``Normalize`` always has 32
    groups (the fusion layers' too); the last level is wider so the res-block shortcuts are exercised. This is the
    official ``ddconfig`` ch 32, ch_mult (1, 1, 1, 2), 1 res block, z 4 of ``tests/fixtures``."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 32, 32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": _OFFICIAL_NORM_GROUPS,
        "sample_size": 32,
        "scaling_factor": SD_SCALING_FACTOR,
    }


def build_cfw_autoencoder(
    vae_config: Mapping[str, Any] | None = None,
    vae: AutoencoderKL | None = None,
    **kwargs: Any,
) -> CFWAutoencoder:
    """A CFW autoencoder around ``vae`` or a fresh ``AutoencoderKL(**vae_config)`` (default: the full-size SD VAE;
    build it under ``torch.device("meta")`` for counts and shapes). ``kwargs`` go to :class:`CFWAutoencoder`."""
    if vae is None:
        vae = AutoencoderKL(**dict(vae_config if vae_config is not None else cfw_vae_config()))
    return CFWAutoencoder(vae, **kwargs)


def tiny_cfw_autoencoder(**kwargs: Any) -> CFWAutoencoder:
    """The tiny random CFW autoencoder of the CPU tests (:func:`tiny_cfw_vae_config`)."""
    return build_cfw_autoencoder(tiny_cfw_vae_config(), **kwargs)


# ---------------------------------------------------------------------------------------------- checkpoints
# Our diffusers VAE names -> LDM names, for everything but the level-indexed blocks (handled in _vae_key_to_ldm).
_DIFFUSERS_TO_LDM_PARTS = (
    ("conv_norm_out.", "norm_out."),
    ("mid_block.resnets.0.", "mid.block_1."),
    ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
    ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
    ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
    ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
    ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
)
_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)$")
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$")
_ATTN_LINEAR = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _vae_key_to_ldm(key: str, num_levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key (no ``vae.`` prefix) in the LDM autoencoder's naming: the inverse of
    diffusers' ``convert_ldm_vae_checkpoint`` renaming."""
    if m := _DOWN.match(key):
        level, kind, index, rest = m.groups()
        if kind == "downsamplers":
            return f"encoder.down.{level}.downsample.{rest}"
        return f"encoder.down.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    if m := _UP.match(key):
        up_block, kind, index, rest = m.groups()
        level = num_levels - 1 - int(up_block)  # diffusers counts decoder levels from the coarsest
        if kind == "upsamplers":
            return f"decoder.up.{level}.upsample.{rest}"
        return f"decoder.up.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    for ours, ldm in _DIFFUSERS_TO_LDM_PARTS:
        key = key.replace(ours, ldm)
    return key


def _num_levels(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        raise ValueError(f"no VAE level keys ({pattern}) in the state dict")
    return max(found) + 1


def _our_key_to_official(key: str, num_levels: int) -> str:
    if key.startswith("fusion_layer_"):
        return "decoder." + key
    if key.startswith("vae."):
        return _vae_key_to_ldm(key[len("vae.") :], num_levels)
    raise KeyError(f"not a CFWAutoencoder key: {key}")


def ours_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (``vae.*`` diffusers names, ``fusion_layer_{1,2}.*``) in the official ``AutoencoderKLResi``
    layout: LDM names, ``decoder.fusion_layer_{1,2}.*``, attention projections back to 1x1 conv weights."""
    num_levels = _num_levels(state_dict, r"^vae\.decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vae.") and _ATTN_LINEAR.search(key) and value.ndim == 2:
            value = value.reshape(
                *value.shape, 1, 1
            )  # LDM's AttnBlock uses 1x1 convs, diffusers Linear layers
        out[_our_key_to_official(key, num_levels)] = value
    return out


def _split_official(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """(VAE part, fusion part, ignored loss keys) of an official state dict."""
    vae, fusion, ignored = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(_LOSS_PREFIX):
            ignored.append(key)
        elif key.startswith(_FUSION_OFFICIAL_PREFIX):
            fusion[key] = value
        else:
            vae[key] = value
    return vae, fusion, ignored


def _official_to_ours(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """(our state dict, official keys nothing of ours came from, ignored ``loss.*`` keys)."""
    vae_part, fusion_part, ignored = _split_official(state_dict)
    num_levels = _num_levels(vae_part, r"^encoder\.down\.(\d+)\.")
    # diffusers reads only the number of levels from the config.
    config = {
        "down_block_types": ("DownEncoderBlock2D",) * num_levels,
        "up_block_types": ("UpDecoderBlock2D",) * num_levels,
    }
    converted = convert_ldm_vae_checkpoint(dict(vae_part), config)
    ours = {f"vae.{k}": v for k, v in converted.items()}
    ours.update({key[len("decoder.") :]: value for key, value in fusion_part.items()})
    # convert_ldm_vae_checkpoint drops what it does not know silently; an official key that no converted key
    # maps back to was not taken.
    taken = {_vae_key_to_ldm(k, num_levels) for k in converted}
    unused = [k for k in vae_part if k not in taken]
    return ours, unused, ignored


def official_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official CFW state dict (``AutoencoderKLResi``: ``encoder.*``, ``decoder.*`` with
    ``decoder.fusion_layer_{1,2}.*``, ``quant_conv.*``, ``post_quant_conv.*``) in our layout, loadable into
    :class:`CFWAutoencoder`. The VAE part goes through diffusers' ``convert_ldm_vae_checkpoint`` (renaming and
    attention 1x1 conv -> linear weights); fusion keys lose ``decoder.``; ``loss.*`` (LPIPS + discriminator of
    the training loss, not part of the autoencoder) is dropped. Keys it cannot place raise ``KeyError``."""
    ours, unused, _ = _official_to_ours(state_dict)
    if unused:
        raise KeyError(f"official keys with no place in CFWAutoencoder: {unused}")
    return ours


@dataclass
class CFWLoadReport:
    """What :func:`load_cfw_checkpoint` did, in official key names."""

    missing: list[str] = field(default_factory=list)  # official keys the model needs and the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys that fit nothing of the model
    ignored: list[str] = field(default_factory=list)  # loss.* (discriminator / LPIPS): dropped on purpose


def _unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Tensor]:
    # Lightning checkpoints keep the weights under "state_dict" next to epoch/optimizer entries.
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        return checkpoint["state_dict"]
    return checkpoint


def load_cfw_checkpoint(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    model: CFWAutoencoder | None = None,
    strict: bool = True,
) -> tuple[CFWAutoencoder, CFWLoadReport]:
    """Load an official CFW checkpoint (e.g. ``vqgan_cfw_00011.ckpt``) into ``model`` (default: a full-size
    :class:`CFWAutoencoder`, built on the meta device and filled by assignment, so no second copy is made).

    Accepts a path, the Lightning dict (weights under ``state_dict``) or a bare state dict in the official layout.
    ``loss.*`` is ignored and listed in the report. With ``strict`` a missing or unexpected key raises
    ``KeyError`` naming the keys (official names); otherwise what could be loaded is loaded and reported.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        # Lightning pickles more than tensors (hyper-parameters, callback states), hence weights_only=False as
        # restore.methods.stablesr does for the stage-1 checkpoint; mmap reads tensors lazily.
        checkpoint = load_checkpoint_file(
            path_or_state,
            written_by="StableSR (vqgan_cfw_00011.ckpt)",
            fix="download the CFW release again",
            weights_only=False,
            mmap=True,
        )
    else:
        checkpoint = path_or_state
    state = _unwrap(checkpoint)
    ours, unused, ignored = _official_to_ours(state)
    assign = model is None
    if model is None:
        with torch.device("meta"):
            model = build_cfw_autoencoder()
    expected = model.state_dict()
    num_levels = model.num_levels
    missing = [_our_key_to_official(k, num_levels) for k in expected if k not in ours]
    unexpected = unused + [_our_key_to_official(k, num_levels) for k in ours if k not in expected]
    report = CFWLoadReport(missing=missing, unexpected=unexpected, ignored=ignored)
    if strict and (missing or unexpected):
        raise KeyError(f"CFW checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    if missing and assign:
        raise KeyError(f"CFW checkpoint lacks {missing}: a model built on the meta device needs every weight")
    model.load_state_dict({k: v for k, v in ours.items() if k in expected}, strict=False, assign=assign)
    return model, report


def pretrained_cfw_autoencoder(
    path: str | os.PathLike, fusion_weight: float = INFERENCE_FUSION_WEIGHT
) -> CFWAutoencoder:
    """The released CFW autoencoder (``vqgan_cfw_00011.ckpt``, HF ``Iceclear/StableSR``) for inference, frozen,
    with fusion weight ``w`` (``--dec_w``); a missing file raises :class:`restore.weights.MissingWeightsError`
    naming where to get it."""
    from restore.weights import missing_weight_file

    if not os.path.isfile(path):
        raise missing_weight_file(path, "method.decoder.path")
    model, _ = load_cfw_checkpoint(path)
    model.fusion_weight = float(fusion_weight)
    return model.eval().requires_grad_(False)
