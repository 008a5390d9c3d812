"""The SDXL prior (SUPIR's): VAE (scaling 0.13025), ``UNet2DConditionModel`` with ``text_time`` added
conditions, two CLIP text encoders (ViT-L and OpenCLIP-bigG with projection), epsilon DDPM.

Text, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and the original ``sgm`` conditioner: each
tokenizer pads to 77 positions, each encoder's *penultimate* hidden state is taken and the two are concatenated
(768 + 1280 = 2048 channels); the pooled embedding is the bigG encoder's projected output (1280). The UNet also
takes ``time_ids`` = (original size, crop top-left, target size), 6 numbers per sample; SUPIR fixes them to
1024 x 1024 with crop (0, 0) (``Fanghua-Yu/SUPIR: SUPIR/models/SUPIR_model.py``), the default here.

Null condition: zeros for the hidden states and the pooled embedding (``force_zeros_for_empty_prompt`` of the
SDXL base ``model_index.json``; the ``sgm`` conditioner zeroes the embeddings of dropped captions), with the
size conditions kept.

Full size (``stabilityai/stable-diffusion-xl-base-1.0`` configs): UNet 2,567,463,684, VAE 83,653,863, CLIP-L
123,060,480, OpenCLIP-bigG with projection 694,659,840 parameters (tested on the meta device).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from restore.models.priors.base import LatentPrior
from restore.models.priors.loading import freeze
from restore.models.priors.sd import (
    sd_scheduler_config,
    sd_vae_config,
    tiny_clip_config,
    tiny_clip_tokenizer,
    tiny_vae,
)
from restore.models.priors.text import TextCondition

__all__ = ["SDXL_SCALING_FACTOR", "SDXLPrior", "sdxl_base_prior", "sdxl_unet_config", "tiny_sdxl_prior"]

#: Latent scaling of the SDXL VAE (its ``vae/config.json``).
SDXL_SCALING_FACTOR = 0.13025

SDXL_SUBFOLDERS: dict[str, str] = {
    "vae": "vae",
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "tokenizer": "tokenizer",
    "tokenizer_2": "tokenizer_2",
    "scheduler": "scheduler",
}
_EXPECTED_FILES = {
    "vae": "config.json, diffusion_pytorch_model.safetensors",
    "unet": "config.json, diffusion_pytorch_model.safetensors",
    "text_encoder": "config.json, model.safetensors (CLIP ViT-L)",
    "text_encoder_2": "config.json, model.safetensors (OpenCLIP bigG, with projection)",
    "tokenizer": "tokenizer_config.json + vocab.json/merges.txt",
    "tokenizer_2": "tokenizer_config.json + vocab.json/merges.txt (pad token '!')",
    "scheduler": "scheduler_config.json",
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults).
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled bigG + 6 time ids x 256
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
_SDXL_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# Tiny: two 32-wide CLIPs -> 64-channel context; 8-dim time-id embedding -> 32 + 6 x 8 = 80 added inputs.
_TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 64,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 8,
}


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL base 1.0 UNet config (a fresh copy)."""
    return copy.deepcopy(_SDXL_UNET)


def _size_pair(value: Sequence[int]) -> tuple[int, int]:
    h, w = (int(v) for v in value)
    return h, w


class SDXLPrior(LatentPrior):
    """The SDXL prior. ``original_size`` / ``crops_coords_top_left`` / ``target_size``: the micro-conditions
    every prompt gets as ``time_ids`` (SUPIR: 1024 x 1024, (0, 0), 1024 x 1024)."""

    denoiser_name = "unet"
    subfolders = SDXL_SUBFOLDERS
    expected_files = _EXPECTED_FILES
    text_encoder_parts = ("text_encoder", "text_encoder_2")

    def __init__(
        self,
        vae: AutoencoderKL | None,
        unet: UNet2DConditionModel | None,
        text_encoder: nn.Module | None,
        text_encoder_2: nn.Module | None,
        tokenizer: Any,
        tokenizer_2: Any,
        noise_scheduler: DDPMScheduler,
        source: str | None = None,
        text_features: str | os.PathLike | None = None,
        text_cache_size: int = 0,
        original_size: Sequence[int] = (1024, 1024),
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Sequence[int] = (1024, 1024),
    ) -> None:
        super().__init__(vae, noise_scheduler, source, text_features, text_cache_size)
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.time_ids = (
            *_size_pair(original_size),
            *_size_pair(crops_coords_top_left),
            *_size_pair(target_size),
        )

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
        **size_conditions: Sequence[int],
    ) -> SDXLPrior:
        """Load the seven parts from a diffusers-layout folder or a hub id
        (``stabilityai/stable-diffusion-xl-base-1.0``; see :meth:`~.base.LatentPrior.load_parts`). The stored
        ``EulerDiscreteScheduler`` config is read as the ``DDPMScheduler`` of the same betas."""
        source = os.fspath(path_or_hub_id)
        text_dtype = {"dtype": torch_dtype or torch.float32}
        classes = {
            "vae": (AutoencoderKL, {"torch_dtype": torch_dtype}),
            "unet": (UNet2DConditionModel, {"torch_dtype": torch_dtype}),
            "text_encoder": (CLIPTextModel, text_dtype),
            "text_encoder_2": (CLIPTextModelWithProjection, text_dtype),
            "tokenizer": (CLIPTokenizer, {}),
            "tokenizer_2": (CLIPTokenizer, {}),
            "scheduler": (DDPMScheduler, {}),
        }
        parts = cls.load_parts(
            source, classes, subfolders, revision, local_files_only, load_text_encoder, load_denoiser
        )
        return cls(
            parts.get("vae"),
            parts.get("unet"),
            parts.get("text_encoder"),
            parts.get("text_encoder_2"),
            parts["tokenizer"],
            parts["tokenizer_2"],
            parts["scheduler"],
            source=source,
            text_features=text_features,
            text_cache_size=text_cache_size,
            **size_conditions,
        )

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None and self.text_encoder_2 is not None

    def added_conditions(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"time_ids": torch.tensor([self.time_ids] * n, dtype=torch.float32, device=device)}

    def run_text_encoder(self, prompts: list[str]) -> TextCondition:
        """Penultimate hidden states of both encoders, concatenated; pooled = bigG's projection."""
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected text embedding is the one kept
        return TextCondition(torch.cat(hidden, dim=-1), pooled=pooled)

    def null_condition(self, n: int, like: TextCondition | None = None) -> TextCondition:
        if like is None:
            like = self._null_shapes(n)
        return TextCondition(
            torch.zeros_like(like.hidden_states[:1]).expand(n, -1, -1),
            pooled=torch.zeros_like(like.pooled[:1]).expand(n, -1),
            added=self.added_conditions(n, like.hidden_states.device),
        )

    def _null_shapes(self, n: int) -> TextCondition:
        if not self.has_text_encoder:
            raise ValueError(
                "SDXL's null condition without text encoders needs `like=` (a condition to shape it)"
            )
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        length = self.tokenizer.model_max_length
        dtype = self.text_encoder_2.dtype
        hidden = torch.zeros(1, length, width, dtype=dtype, device=self.device)
        pooled = torch.zeros(1, self.text_encoder_2.config.projection_dim, dtype=dtype, device=self.device)
        return TextCondition(hidden, pooled=pooled)

    def denoiser_kwargs(self, text: TextCondition) -> dict[str, Any]:
        added = {"text_embeds": text.pooled, "time_ids": text.added["time_ids"]}
        return {"encoder_hidden_states": text.hidden_states, "added_cond_kwargs": added}


def tiny_sdxl_prior(
    seed: int = 0,
    text_features: str | os.PathLike | None = None,
    text_cache_size: int = 0,
    unet: Mapping[str, Any] | None = None,
) -> SDXLPrior:
    """A random-weight, CPU-sized SDXL-like prior (frozen): the tiny VAE with SDXL's scaling 0.13025, a tiny
    ``text_time`` UNet (2 levels, context 64), two 32-wide CLIP encoders (the second with projection and ``!``
    padding) and SD's DDPM schedule. Deterministic for a given ``seed``. ``unet``: UNet config keys to change
    (SUPIR's connectors need SDXL's three levels, 64+ channels: ``configs/method/prior/tiny_sdxl_supir.yaml``)."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(scaling_factor=SDXL_SCALING_FACTOR)
        unet_model = UNet2DConditionModel(**{**_TINY_SDXL_UNET, **dict(unet or {})})
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 32))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2, 32, projection_dim=32))
    for module in (vae, unet_model, text_encoder, text_encoder_2):
        freeze(module)
    return SDXLPrior(
        vae,
        unet_model,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        DDPMScheduler(**sd_scheduler_config()),
        text_features=text_features,
        text_cache_size=text_cache_size,
        original_size=(64, 64),
        target_size=(64, 64),
    )


def sdxl_base_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> SDXLPrior:
    """SDXL base 1.0's structure at full size with random weights (frozen), for meta-device checks and timing
    runs (see :func:`restore.models.priors.sd.sd2_base_prior`); tokenizers are the tiny in-code ones."""
    with torch.device(device):
        vae = AutoencoderKL(
            **{**sd_vae_config(), "scaling_factor": SDXL_SCALING_FACTOR, "force_upcast": True}
        )
        unet = UNet2DConditionModel(**sdxl_unet_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**_SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_SDXL_TEXT_ENCODER_2))
    for module in (vae, unet, text_encoder, text_encoder_2):
        if dtype is not None:
            module.to(dtype=dtype)
        freeze(module)
    return SDXLPrior(
        vae,
        unet,
        text_encoder,
        text_encoder_2,
        tiny_clip_tokenizer(),
        tiny_clip_tokenizer(pad_token="!"),
        DDPMScheduler(**sd_scheduler_config()),
    )
