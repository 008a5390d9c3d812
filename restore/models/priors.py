"""The frozen text-to-image prior the diffusion SR methods build on: VAE, UNet, text encoder, tokenizer, scheduler.

Spec: ``../shared/specs/seesr_xpsr.md`` §1.5 (SeeSR loads tokenizer / text encoder / VAE / DDPMScheduler /
UNet from the SD-2-base folder, latents ``x 0.18215``, epsilon target), §0 (XPSR: SD-1.5, same layout);
``dreamclear_supir_stablesr.md`` §3.4 (StableSR: SD-2.1-base, epsilon). All of them use the diffusers folder
layout (``vae/ unet/ text_encoder/ tokenizer/ scheduler/``), which :meth:`FrozenPrior.from_pretrained` reads.

:func:`tiny_prior` builds the same five parts from configs in code (random weights, CPU-sized) for tests: the
SD numbers that matter to training (scheduler betas, VAE scaling 0.18215, 8x VAE downscale, 4 latent
channels) are kept, only the widths shrink.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from restore.models.seesr import sd2_base_unet_config, tiny_unet_config
from restore.models.xpsr import sd15_unet_config

__all__ = [
    "DEFAULT_SUBFOLDERS",
    "SD_SCALING_FACTOR",
    "FrozenPrior",
    "PriorNotFoundError",
    "freeze",
    "sd15_prior",
    "sd2_base_prior",
    "sd_scheduler_config",
    "tiny_prior",
]

#: Latent scaling of the SD 1.x / 2.x VAE (spec §1.5: ``latent_dist.sample() x 0.18215``).
SD_SCALING_FACTOR = 0.18215

#: diffusers folder layout of a Stable Diffusion checkpoint (part -> subfolder).
DEFAULT_SUBFOLDERS: dict[str, str] = {
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


class PriorNotFoundError(FileNotFoundError):
    """A prior part could not be loaded from the local folder / the offline Hugging Face cache."""


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop gradients to all its parameters; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


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


class FrozenPrior(nn.Module):
    """Container of a latent T2I prior. The three networks are submodules (they follow ``.to()`` / precision
    plugins); the tokenizer and the scheduler hold no tensors and are plain attributes.

    ``source`` records where the weights came from (a folder or hub id, ``None`` for in-code models): methods do
    not write the prior into their checkpoints and name this source when it has to be reloaded.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: nn.Module,
        tokenizer: Any,
        noise_scheduler: DDPMScheduler,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.source = source

    @property
    def scaling_factor(self) -> float:
        """Latent scaling of the VAE (its config's ``scaling_factor``; 0.18215 for SD 1.x/2.x)."""
        return float(self.vae.config.scaling_factor)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        revision: str | None = None,
        subfolders: Mapping[str, str] | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
    ) -> FrozenPrior:
        """Load the five parts from a diffusers-layout folder or a hub id (e.g. ``stabilityai/stable-diffusion-2-base``).

        ``subfolders`` overrides entries of :data:`DEFAULT_SUBFOLDERS`. ``local_files_only=None`` follows
        ``HF_HUB_OFFLINE``. A part that cannot be found raises :class:`PriorNotFoundError` naming the source,
        the expected layout and ``HF_HOME``.
        """
        source = os.fspath(path_or_hub_id)
        folders = {**DEFAULT_SUBFOLDERS, **(subfolders or {})}
        if local_files_only is None:
            from huggingface_hub import constants

            local_files_only = bool(constants.HF_HUB_OFFLINE)
        common = {"revision": revision, "local_files_only": local_files_only}
        loaders = {
            "vae": lambda sub: AutoencoderKL.from_pretrained(
                source, subfolder=sub, torch_dtype=torch_dtype, **common
            ),
            "unet": lambda sub: UNet2DConditionModel.from_pretrained(
                source, subfolder=sub, torch_dtype=torch_dtype, **common
            ),
            "text_encoder": lambda sub: CLIPTextModel.from_pretrained(
                source, subfolder=sub, dtype=torch_dtype or torch.float32, **common
            ),
            "tokenizer": lambda sub: CLIPTokenizer.from_pretrained(source, subfolder=sub, **common),
            "scheduler": lambda sub: DDPMScheduler.from_pretrained(source, subfolder=sub, **common),
        }
        parts: dict[str, Any] = {}
        for name, load in loaders.items():
            try:
                parts[name] = load(folders[name])
            except (OSError, ValueError) as err:  # hub "not found" errors subclass one of these
                raise PriorNotFoundError(
                    _missing_message(source, name, folders, local_files_only, err)
                ) from err
        for name in ("vae", "unet", "text_encoder"):
            freeze(parts[name])
        return cls(
            parts["vae"],
            parts["unet"],
            parts["text_encoder"],
            parts["tokenizer"],
            parts.pop("scheduler"),
            source=source,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the parts in the diffusers folder layout (what :meth:`from_pretrained` reads)."""
        for name, sub in DEFAULT_SUBFOLDERS.items():
            part = self.noise_scheduler if name == "scheduler" else getattr(self, name)
            part.save_pretrained(os.path.join(directory, sub))


def _missing_message(
    source: str, part: str, folders: Mapping[str, str], offline: bool, err: BaseException
) -> str:
    layout = "\n".join(f"  {source}/{folders[p]}/  ({files})" for p, files in _EXPECTED_FILES.items())
    return (
        f"cannot load the prior's {part!r} from {source!r} ({loading_mode(offline)}): {type(err).__name__}: "
        f"{err}\nExpected either a local folder in the diffusers layout:\n{layout}\n{hub_cache_fix(source)}"
    )


def loading_mode(offline: bool) -> str:
    """How a Hugging Face load was attempted, for error messages."""
    return "offline (HF_HUB_OFFLINE / local_files_only)" if offline else "online"


def hub_cache_fix(source: str) -> str:
    """The fix for a model missing from the Hugging Face cache (priors, captioners): names HF_HOME and the
    download command."""
    hf_home = os.environ.get("HF_HOME", "<unset: ~/.cache/huggingface>")
    return (
        f"or the hub repo {source!r} already in the Hugging Face cache under HF_HOME={hf_home}. "
        f"Fix: on a machine with internet run `huggingface-cli download {source}` (same HF_HOME) and copy the "
        "cache, or pass the local folder path instead of the hub id."
    )


# ---------------------------------------------------------------------------------------------- tiny prior
def _tiny_tokenizer(num_merges: int = 200) -> CLIPTokenizer:
    """A real :class:`CLIPTokenizer` with a byte-level vocab (512 byte symbols) + a few merges, built offline.

    Merges are the most frequent letter pairs of a fixed English sample, so common words use fewer tokens.
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_prior(seed: int = 0, unet_config: Mapping[str, Any] | None = None) -> FrozenPrior:
    """A random-weight, CPU-sized SD-like prior (frozen), for tests and smoke runs.

    VAE: 4 blocks (8x downscale like SD, so latent geometry and ControlNet conditioning match production),
    32/64 channels, 4 latent channels, scaling 0.18215. UNet: :func:`restore.models.seesr.tiny_unet_config`
    (cross-attention dim 32 = the text encoder width). Text encoder: CLIP, hidden 32, 2 layers, 77 positions.
    Scheduler: :func:`sd_scheduler_config`. Deterministic for a given ``seed``.
    """
    unet_cfg = dict(tiny_unet_config() if unet_config is None else unet_config)
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
            scaling_factor=SD_SCALING_FACTOR,
        )
        unet = UNet2DConditionModel(**unet_cfg)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=int(unet_cfg["cross_attention_dim"]),
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    for module in (vae, unet, text_encoder):
        freeze(module)
    return FrozenPrior(vae, unet, text_encoder, tokenizer, DDPMScheduler(**sd_scheduler_config()))


# ---------------------------------------------------------------------------------------------- full size
# SD-2-base's VAE and OpenCLIP-ViT-H text tower as diffusers/transformers configure them
# (stabilityai/stable-diffusion-2-base vae/config.json, text_encoder/config.json): the structure only, for
# meta-device checks and random-init timing runs; real weights come from FrozenPrior.from_pretrained.
_SD2_VAE: dict[str, Any] = {
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
_SD2_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,  # OpenCLIP-H has 24; SD 2 uses the penultimate layer, diffusers drops the last
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}


def _full_size_prior(
    unet_config: dict[str, Any],
    text_config: dict[str, Any],
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> FrozenPrior:
    with torch.device(device):
        vae = AutoencoderKL(**_SD2_VAE)
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    if dtype is not None:
        for module in (vae, unet, text_encoder):
            module.to(dtype=dtype)
    for module in (vae, unet, text_encoder):
        freeze(module)
    return FrozenPrior(vae, unet, text_encoder, _tiny_tokenizer(), DDPMScheduler(**sd_scheduler_config()))


def sd2_base_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> FrozenPrior:
    """The SD-2-base prior's structure at full size with random weights (frozen).

    ``device="meta"`` allocates nothing: parameter counts and the trainable set of a full-size method can be
    checked on any machine. On a GPU it is the random-init model of ``benchmarks/train_step.py``. The tokenizer
    is the tiny in-code one (the real vocabulary ships with the weights); its ids fit the full embedding table.
    """
    return _full_size_prior(sd2_base_unet_config(), _SD2_TEXT_ENCODER, device, dtype)


# SD-1.5's text encoder, CLIP ViT-L/14's text tower (stable-diffusion-v1-5 text_encoder/config.json): 123,060,480
# parameters; the VAE is the same as SD-2's (same config, 83,653,863 parameters).
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


def sd15_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> FrozenPrior:
    """The SD-1.5 prior's structure at full size with random weights (frozen): XPSR's base (spec §0).

    As :func:`sd2_base_prior`: for meta-device checks and random-init timing runs; real weights come from
    :meth:`FrozenPrior.from_pretrained` (``configs/model/prior/sd15.yaml``).
    """
    return _full_size_prior(sd15_unet_config(), _SD15_TEXT_ENCODER, device, dtype)
