"""Stable Diffusion 1.x / 2.x priors: VAE, ``UNet2DConditionModel``, one CLIP text encoder, epsilon (or v) DDPM.

SeeSR builds on SD-2-base, XPSR on SD-1.5, StableSR on SD-2.1-base: each official trainer loads tokenizer, text
encoder, VAE, ``DDPMScheduler`` and UNet from the diffusers folder of its base model and scales latents by 0.18215
(cswry/SeeSR ``train_seesr.py``, qyp2000/XPSR ``train.py``; StableSR reads the same weights from the original
``v2-1_512-ema-pruned.ckpt``). :meth:`SDPrior.from_pretrained` reads that layout (``vae/ unet/ text_encoder/
tokenizer/ scheduler/``).

Text: the tokenizer pads to its 77 positions and the encoder's last hidden state conditions the UNet (every
position attended, as the official pipelines). The null condition is the encoded ``""``.

Configs: the full-size structures are the hub ``config.json`` files of ``stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-2-base`` / ``-2-1-base`` (same architecture); the parameter counts are tested.
:func:`tiny_prior` keeps every number that matters to training (scheduler betas, VAE scaling 0.18215, 8x VAE
downscale, 4 latent channels) and shrinks only the widths, for CPU tests.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from restore.models.priors.base import LatentPrior
from restore.models.priors.loading import freeze
from restore.models.priors.text import TextCondition

__all__ = [
    "SD_SCALING_FACTOR",
    "SDPrior",
    "sd15_prior",
    "sd15_unet_config",
    "sd21_base_prior",
    "sd2_base_prior",
    "sd2_base_unet_config",
    "sd_scheduler_config",
    "sd_vae_config",
    "tiny_clip_tokenizer",
    "tiny_prior",
    "tiny_unet_config",
]

#: Latent scaling of the SD 1.x / 2.x VAE (``latent_dist.sample() x 0.18215`` in the official trainers).
SD_SCALING_FACTOR = 0.18215

#: diffusers folder layout of an SD checkpoint (part -> subfolder).
SD_SUBFOLDERS: dict[str, str] = {
    "vae": "vae",
    "unet": "unet",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}
# What each subfolder must hold, for the error message of a missing prior.
_EXPECTED_FILES = {
    "vae": "config.json, diffusion_pytorch_model.safetensors",
    "unet": "config.json, diffusion_pytorch_model.safetensors",
    "text_encoder": "config.json, model.safetensors",
    "tokenizer": "tokenizer_config.json + vocab.json/merges.txt (or tokenizer.json)",
    "scheduler": "scheduler_config.json",
}


def sd_scheduler_config() -> dict[str, Any]:
    """DDPMScheduler numbers of SD 1.x / 2.x training (1000 steps, scaled_linear 0.00085 -> 0.012, epsilon)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "steps_offset": 1,
    }


# ---------------------------------------------------------------------------------------------- configs
# SD-2-base UNet (stabilityai/stable-diffusion-2-base unet/config.json; 2-1-base is the same architecture):
# block_out 320/640/1280/1280, layers_per_block 2, cross_attention_dim 1024 (OpenCLIP-H text width),
# attention_head_dim [5,10,20,20] = *number of heads* in diffusers (head dim 64), linear proj_in/out; 64x64
# latents of 4 channels. 865,910,724 parameters.
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

# SD-1.5 UNet (stable-diffusion-v1-5 unet/config.json): attention_head_dim 8 = 8 heads everywhere,
# cross_attention_dim 768 = CLIP ViT-L, 1x1-conv proj_in/out. 859,520,964 parameters.
_SD15_UNET: dict[str, Any] = {
    **_SD2_BASE_UNET,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}
del _SD15_UNET["upcast_attention"]

# Test-sized, same layout as SD-2 (cross-attention in the first down / last up block, plain blocks at the deep
# end, cross-attention mid block), so that every kind of attachment site of SeeSR / XPSR exists.
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

# The SD VAE (same config in SD-1.5, SD-2(-1)-base and PixArt's sd-vae-ft-ema): 83,653,863 parameters.
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": SD_SCALING_FACTOR,
}

# SD-2's text encoder: OpenCLIP ViT-H's text tower without its last layer (SD-2 conditions on the penultimate
# layer; diffusers ships 23 layers). 340,387,840 parameters.
_SD2_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

# SD-1.5's text encoder, CLIP ViT-L/14's text tower: 123,060,480 parameters.
_SD15_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def sd2_base_unet_config() -> dict[str, Any]:
    """The SD-2-base / 2.1-base UNet config (a fresh copy)."""
    return copy.deepcopy(_SD2_BASE_UNET)


def sd15_unet_config() -> dict[str, Any]:
    """The SD-1.5 UNet config (a fresh copy)."""
    return copy.deepcopy(_SD15_UNET)


def tiny_unet_config() -> dict[str, Any]:
    """A tiny UNet config for CPU tests (32/64 channels, one layer per block, 8 norm groups)."""
    return copy.deepcopy(_TINY_UNET)


def sd_vae_config() -> dict[str, Any]:
    """The full-size SD VAE config (a fresh copy)."""
    return copy.deepcopy(_SD_VAE)


# ---------------------------------------------------------------------------------------------- prior
class SDPrior(LatentPrior):
    """An SD-1.x / 2.x prior. The networks are submodules (they follow ``.to()`` and precision plugins); the
    tokenizer and the scheduler hold no tensors and are plain attributes."""

    denoiser_name = "unet"
    null_prompt = ""
    subfolders = SD_SUBFOLDERS
    expected_files = _EXPECTED_FILES

    def __init__(
        self,
        vae: AutoencoderKL | None,
        unet: UNet2DConditionModel | None,
        text_encoder: nn.Module | None,
        tokenizer: Any,
        noise_scheduler: DDPMScheduler,
        source: str | None = None,
        text_features: str | os.PathLike | None = None,
        text_cache_size: int = 0,
    ) -> None:
        super().__init__(vae, noise_scheduler, source, text_features, text_cache_size)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        revision: str | None = None,
        subfolders: Mapping[str, str] | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        load_text_encoder: bool = True,
        load_denoiser: bool = True,
        text_features: str | os.PathLike | None = None,
        text_cache_size: int = 0,
    ) -> SDPrior:
        """Load the five parts from a diffusers-layout folder or a hub id (e.g. ``stabilityai/stable-diffusion-2-base``;
        see :meth:`~.base.LatentPrior.load_parts`). The stored scheduler (PNDM for SD-2.1-base) is read as the
        ``DDPMScheduler`` of the same betas, the schedule the UNet was trained with. ``load_text_encoder=False``
        skips the text encoder (prompts then come from ``text_features``)."""
        source = os.fspath(path_or_hub_id)
        classes = {
            "vae": (AutoencoderKL, {"torch_dtype": torch_dtype}),
            "unet": (UNet2DConditionModel, {"torch_dtype": torch_dtype}),
            "text_encoder": (CLIPTextModel, {"dtype": torch_dtype or torch.float32}),
            "tokenizer": (CLIPTokenizer, {}),
            "scheduler": (DDPMScheduler, {}),
        }
        parts = cls.load_parts(
            source, classes, subfolders, revision, local_files_only, load_text_encoder, load_denoiser
        )
        return cls(
            parts.get("vae"),
            parts.get("unet"),
            parts.get("text_encoder"),
            parts["tokenizer"],
            parts["scheduler"],
            source=source,
            text_features=text_features,
            text_cache_size=text_cache_size,
        )

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    def run_text_encoder(self, prompts: list[str]) -> TextCondition:
        """Last hidden states of the prompts padded to the tokenizer's 77 positions."""
        tok = self.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return TextCondition(self.text_encoder(ids)[0])

    def null_condition(self, n: int, like: TextCondition | None = None) -> TextCondition:
        return self.encode_text([self.null_prompt] * n)

    def denoiser_kwargs(self, text: TextCondition) -> dict[str, Any]:
        return {"encoder_hidden_states": text.hidden_states}


# ---------------------------------------------------------------------------------------------- tiny prior
def tiny_clip_tokenizer(num_merges: int = 200, pad_token: str | None = None) -> CLIPTokenizer:
    """A real :class:`CLIPTokenizer` with a byte-level vocab (512 byte symbols) + a few merges, built offline.

    Merges are the most frequent letter pairs of a fixed English sample, so common words use fewer tokens.
    ``pad_token``: e.g. ``"!"`` as SDXL's second tokenizer (OpenCLIP pads with id 0); default ``<|endoftext|>``.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    sample = "a photo of the cat and the dog on a street with trees clean high resolution sharp detailed"
    pairs: dict[tuple[str, str], int] = {}
    for word in sample.split():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for pair in zip(symbols, symbols[1:], strict=False):
            pairs[pair] = pairs.get(pair, 0) + 1
    merges = sorted(pairs, key=lambda p: (-pairs[p], p))[:num_merges]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **extra)


def tiny_vae(scaling_factor: float = SD_SCALING_FACTOR) -> AutoencoderKL:
    """The tiny SD-like VAE of the test priors: 4 blocks (8x downscale, like SD), 32/64 channels, 4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden: int, **extra: Any) -> CLIPTextConfig:
    """A 2-layer CLIP text config of width ``hidden`` matching ``tokenizer``'s vocabulary and special ids."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_prior(
    seed: int = 0,
    unet_config: Mapping[str, Any] | None = None,
    text_features: str | os.PathLike | None = None,
    text_cache_size: int = 0,
) -> SDPrior:
    """A random-weight, CPU-sized SD-like prior (frozen), for tests and smoke runs.

    VAE: :func:`tiny_vae`. UNet: :func:`tiny_unet_config` (cross-attention dim 32 = the text encoder width).
    Text encoder: CLIP, hidden 32, 2 layers, 77 positions. Scheduler: :func:`sd_scheduler_config`.
    Deterministic for a given ``seed``.
    """
    unet_cfg = dict(tiny_unet_config() if unet_config is None else unet_config)
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae()
        unet = UNet2DConditionModel(**unet_cfg)
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, int(unet_cfg["cross_attention_dim"])))
    for module in (vae, unet, text_encoder):
        freeze(module)
    return SDPrior(
        vae,
        unet,
        text_encoder,
        tokenizer,
        DDPMScheduler(**sd_scheduler_config()),
        text_features=text_features,
        text_cache_size=text_cache_size,
    )


# ---------------------------------------------------------------------------------------------- full size
def _full_size(
    unet_config: dict[str, Any],
    text_config: dict[str, Any],
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> SDPrior:
    with torch.device(device):
        vae = AutoencoderKL(**sd_vae_config())
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module in (vae, unet, text_encoder):
        if dtype is not None:
            module.to(dtype=dtype)
        freeze(module)
    return SDPrior(vae, unet, text_encoder, tiny_clip_tokenizer(), DDPMScheduler(**sd_scheduler_config()))


def sd2_base_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> SDPrior:
    """SD-2-base's structure at full size with random weights (frozen): VAE 83,653,863, UNet 865,910,724,
    OpenCLIP-H text 340,387,840 parameters.

    ``device="meta"`` allocates nothing: parameter counts and the trainable set of a full-size method can be
    checked on any machine; on a GPU it is the random-init model of ``benchmarks/train_step.py``. The tokenizer
    is the tiny in-code one (the real vocabulary ships with the weights); its ids fit the full embedding table.
    Real weights: :meth:`SDPrior.from_pretrained`.
    """
    return _full_size(sd2_base_unet_config(), _SD2_TEXT_ENCODER, device, dtype)


def sd21_base_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> SDPrior:
    """SD-2.1-base (StableSR's prior): the same structure as :func:`sd2_base_prior`, other weights."""
    return sd2_base_prior(device, dtype)


def sd15_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> SDPrior:
    """SD-1.5's structure at full size with random weights (frozen): VAE 83,653,863, UNet 859,520,964,
    CLIP-L text 123,060,480 parameters (XPSR's base). As :func:`sd2_base_prior`."""
    return _full_size(sd15_unet_config(), _SD15_TEXT_ENCODER, device, dtype)
