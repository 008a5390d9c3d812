"""The PixArt-α prior (DreamClear's): a DiT (diffusers ``PixArtTransformer2DModel``) on sd-vae-ft-ema latents,
conditioned on T5-v1.1-XXL features of 120 tokens with their attention mask, trained with learned-range variance.

- Denoiser: XL/2 1024-MS (28 blocks, 1152 wide, patch 2, 8 output channels = epsilon + the variance
  interpolation of improved DDPM); 611,349,152 parameters, as the official ``PixArtMS_XL_2``
  (``PixArt-alpha/PixArt-alpha: diffusion/model/nets/PixArtMS.py``). The 1024 model takes the image size and
  aspect ratio as micro-conditions; DreamClear always passes 1024 x 1024 and 1.0
  (``shallowdream204/DreamClear: test.py``), the default here.
- Text: the prompt padded / truncated to 120 tokens, ``T5EncoderModel(ids, attention_mask)`` (4,762,310,656
  parameters in bf16 on the GPU or, as DreamClear's ``test.py``, on the CPU); the DiT attends only the valid
  tokens. T5-XXL does not fit next to the DiT on one 24 GB GPU: load the prior without its text encoder
  (``load_text_encoder=False``) and read features precomputed into side-files
  (``scripts/precompute_text_features.py``, :class:`~restore.models.priors.text.TextFeatureStore`).
- Null condition: the learned null caption ``y_embedder.y_embedding`` ([120, 4096]) that PixArt trains with
  (caption dropout replaces the whole T5 tensor by it and keeps the caption's mask; DreamClear's CFG uses it for
  the unconditional row). diffusers' conversion drops it from the transformer, so it is read from a checkpoint
  that has it (``null_caption=<file>``: the original ``PixArt-XL-2-1024-MS.pth``, ``DreamClear-1024.pth`` or any
  file with a key ending in ``y_embedding``; the default ``auto`` also looks into the transformer's weights
  file, where older conversions kept it as ``caption_projection.y_embedding``). Without one, the null condition
  is T5("") with its own mask, what the diffusers pipeline uses.
- Schedule: linear betas 1e-4 -> 0.02 over 1000 steps, epsilon, ``variance_type="learned_range"``; the stored
  scheduler config (a DPM-Solver) is read as the ``DDPMScheduler`` of the same betas.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
from torch import Tensor, nn
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from restore.models.priors.base import LatentPrior
from restore.models.priors.loading import freeze
from restore.models.priors.sd import sd_vae_config, tiny_vae
from restore.models.priors.text import TextCondition
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = [
    "PIXART_TEXT_LENGTH",
    "PixArtPrior",
    "pixart_alpha_prior",
    "pixart_scheduler_config",
    "read_null_caption",
    "tiny_pixart_prior",
    "tiny_t5_tokenizer",
]

log = logging.getLogger(__name__)

#: T5 tokens per caption (PixArt-α ``model_max_length`` 120).
PIXART_TEXT_LENGTH = 120

PIXART_SUBFOLDERS: dict[str, str] = {
    "vae": "vae",
    "transformer": "transformer",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}
_EXPECTED_FILES = {
    "vae": "config.json, diffusion_pytorch_model.safetensors (sd-vae-ft-ema)",
    "transformer": "config.json, diffusion_pytorch_model.safetensors",
    "text_encoder": "config.json, model-*.safetensors (T5-v1.1-XXL encoder)",
    "tokenizer": "spiece.model / tokenizer.json + tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}

# PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json (the hub file's inert keys left out).
_PIXART_XL_2_1024: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "attention_type": "default",
}
# text_encoder/config.json: google/t5-v1_1-xxl's encoder
_T5_V1_1_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# Tiny: 2 heads x 12 = 24 wide (a multiple of 3: the size and aspect-ratio embeddings take a third each).
_TINY_PIXART: dict[str, Any] = {
    **_PIXART_XL_2_1024,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "num_layers": 2,
    "cross_attention_dim": 24,
    "sample_size": 8,
    "caption_channels": 32,
    "use_additional_conditions": True,
}
_TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def pixart_scheduler_config() -> dict[str, Any]:
    """PixArt-α's training schedule as a ``DDPMScheduler`` config (``IDDPM`` of
    ``PixArt-alpha/PixArt-alpha: diffusion/__init__.py``: linear betas, learned-range variance, epsilon)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": "learned_range",
        "clip_sample": False,
        "timestep_spacing": "linspace",
    }


def read_null_caption(path: str | os.PathLike) -> Tensor | None:
    """The learned null caption (a key ending in ``y_embedding``, ``[L, C]``) of a checkpoint file, or
    ``None`` when the file has none. ``.safetensors`` is read key by key; ``.pth`` / ``.ckpt`` memory-mapped
    (``DreamClear-1024.pth`` is 8.9 GB), looking into a ``state_dict`` entry too."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"null_caption={path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            key = next((k for k in fh.keys() if k.endswith("y_embedding")), None)  # noqa: SIM118
            return None if key is None else fh.get_tensor(key).float()
    state = load_checkpoint_file(
        path,
        written_by="PixArt-alpha or DreamClear (a .pth state dict)",
        fix="pass the right file",
        mmap=True,
    )
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    key = next((k for k in state if str(k).endswith("y_embedding")), None)
    return None if key is None else state[key].float().clone()


def _transformer_weights(source: str, subfolder: str) -> Path | None:
    name = "diffusion_pytorch_model.safetensors"
    local = Path(source) / subfolder / name
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, f"{subfolder}/{name}")
    except Exception:  # noqa: BLE001 - not a hub id: nothing cached to look into
        return None
    return Path(cached) if isinstance(cached, str) else None


class PixArtPrior(LatentPrior):
    """The PixArt-α prior (see the module doc).

    Args:
        null_caption: ``[L, C]`` learned null caption embedding, or ``None`` (then T5("") is the null condition).
        resolution / aspect_ratio: the micro-conditions of every call of a 1024 model (DreamClear: 1024 x 1024,
            1.0); ignored by models without them.
        max_length: T5 tokens per caption (120).
    """

    denoiser_name = "transformer"
    subfolders = PIXART_SUBFOLDERS
    expected_files = _EXPECTED_FILES

    def __init__(
        self,
        vae: AutoencoderKL | None,
        transformer: PixArtTransformer2DModel | None,
        text_encoder: nn.Module | None,
        tokenizer: Any,
        noise_scheduler: DDPMScheduler,
        null_caption: Tensor | None = None,
        source: str | None = None,
        text_features: str | os.PathLike | None = None,
        text_cache_size: int = 0,
        resolution: Sequence[int] = (1024, 1024),
        aspect_ratio: float = 1.0,
        max_length: int = PIXART_TEXT_LENGTH,
    ) -> None:
        super().__init__(vae, noise_scheduler, source, text_features, text_cache_size)
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.resolution = tuple(float(v) for v in resolution)
        self.aspect_ratio = float(aspect_ratio)
        if null_caption is not None and null_caption.shape[0] != self.max_length:
            raise ValueError(
                f"null caption has {null_caption.shape[0]} tokens, the prior encodes {self.max_length}"
            )
        self.register_buffer("null_caption", null_caption, persistent=False)

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
        null_caption: str | os.PathLike | None = "auto",
        **conditions: Any,
    ) -> PixArtPrior:
        """Load a diffusers-layout PixArt-α folder or hub id (``PixArt-alpha/PixArt-XL-2-1024-MS``); see
        :meth:`restore.models.priors.sd.SDPrior.from_pretrained`. ``null_caption``: a file holding the learned
        null caption, ``auto`` (look into the transformer weights) or ``None`` (use T5(""))."""
        source = os.fspath(path_or_hub_id)
        classes = {
            "vae": (AutoencoderKL, {"torch_dtype": torch_dtype}),
            "transformer": (PixArtTransformer2DModel, {"torch_dtype": torch_dtype}),
            "text_encoder": (T5EncoderModel, {"dtype": torch_dtype or torch.float32}),
            "tokenizer": (AutoTokenizer, {}),
            "scheduler": (DDPMScheduler, {}),
        }
        parts = cls.load_parts(
            source, classes, subfolders, revision, local_files_only, load_text_encoder, load_denoiser
        )
        transformer = parts.get("transformer")
        scheduler = DDPMScheduler.from_config(
            parts["scheduler"].config,
            variance_type="learned_range" if transformer is None else _variance_type(transformer),
            clip_sample=False,
            timestep_spacing="linspace",
        )
        null = None
        if null_caption == "auto":
            folder = (subfolders or {}).get("transformer", PIXART_SUBFOLDERS["transformer"])
            weights = _transformer_weights(source, folder)
            null = read_null_caption(weights) if weights is not None else None
        elif null_caption is not None:
            null = read_null_caption(null_caption)
            if null is None:
                raise ValueError(f"null_caption={null_caption} holds no key ending in 'y_embedding'")
        if null is None:
            log.warning(
                f'{source}: no learned null caption (y_embedding) found; the null condition is T5(""), as the '
                "diffusers pipeline. Pass null_caption=<PixArt-XL-2-1024-MS.pth or DreamClear-1024.pth> for "
                "PixArt's own null embedding (DreamClear's CFG and caption dropout use it)"
            )
        return cls(
            parts.get("vae"),
            transformer,
            parts.get("text_encoder"),
            parts["tokenizer"],
            scheduler,
            null_caption=null,
            source=source,
            text_features=text_features,
            text_cache_size=text_cache_size,
            **conditions,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the diffusers layout, plus ``null_caption.safetensors`` (read back by ``null_caption=``)."""
        super().save_pretrained(directory)
        if self.null_caption is not None:
            from safetensors.torch import save_file

            path = os.path.join(directory, "null_caption.safetensors")
            save_file({"y_embedding": self.null_caption.cpu().contiguous()}, path)

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    def added_conditions(self, n: int, device: torch.device) -> dict[str, Tensor]:
        if self.transformer is not None and not self.transformer.use_additional_conditions:
            return {}
        return {
            "resolution": torch.tensor([self.resolution] * n, device=device),
            "aspect_ratio": torch.tensor([[self.aspect_ratio]] * n, device=device),
        }

    def run_text_encoder(self, prompts: list[str]) -> TextCondition:
        """T5 features of the prompts, ``max_length`` tokens, with their attention mask."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask)[0]
        return TextCondition(hidden, attention_mask=mask)

    def null_condition(self, n: int, like: TextCondition | None = None) -> TextCondition:
        """The learned null caption (with ``like``'s attention mask, as PixArt's caption dropout and DreamClear's
        CFG), or T5("") with its own mask when the prior has no learned one."""
        if self.null_caption is None:
            return self.encode_text([""] * n)
        device = like.hidden_states.device if like is not None else self.null_caption.device
        hidden = self.null_caption[None].to(device).expand(n, -1, -1)
        if like is not None:
            return TextCondition(hidden, like.attention_mask, added=dict(like.added))
        mask = torch.ones(n, self.max_length, dtype=torch.long, device=device)
        return TextCondition(hidden, mask, added=self.added_conditions(n, device))

    def denoiser_kwargs(self, text: TextCondition) -> dict[str, Any]:
        added = {"resolution": None, "aspect_ratio": None, **text.added}
        dtype = text.hidden_states.dtype
        added = {k: (v.to(dtype) if isinstance(v, Tensor) else v) for k, v in added.items()}
        return {
            "encoder_hidden_states": text.hidden_states,
            "encoder_attention_mask": text.attention_mask,
            "added_cond_kwargs": added,
        }

    def predict(self, latents: Tensor, timesteps: Tensor, text: TextCondition, **kwargs: Any) -> Tensor:
        # the DiT's timestep embedding takes one timestep per sample
        t = torch.as_tensor(timesteps, device=latents.device)
        return super().predict(latents, t.expand(latents.shape[0]) if t.ndim == 0 else t, text, **kwargs)


def _variance_type(transformer: nn.Module) -> str | None:
    """``learned_range`` when the DiT outputs twice its input channels (epsilon + variance interpolation)."""
    config = transformer.config
    return "learned_range" if config.out_channels == 2 * config.in_channels else None


# ---------------------------------------------------------------------------------------------- tiny prior
def tiny_t5_tokenizer(max_length: int = PIXART_TEXT_LENGTH) -> Any:
    """A real fast tokenizer with T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, Metaspace pieces, ``</s>``
    appended), built offline from a small Unigram vocabulary; unknown words fall back to letters."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    words = [
        "a",
        "photo",
        "of",
        "the",
        "cat",
        "dog",
        "on",
        "street",
        "with",
        "trees",
        "clean",
        "high",
        "resolution",
        "sharp",
        "detailed",
        "image",
        "quality",
    ]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [
        (c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-"
    ]
    model = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def tiny_pixart_prior(
    seed: int = 0, text_features: str | os.PathLike | None = None, text_cache_size: int = 0
) -> PixArtPrior:
    """A random-weight, CPU-sized PixArt-α-like prior (frozen): the tiny VAE, a 2-block DiT 24 wide with
    learned variance (8 output channels) and the size / aspect-ratio micro-conditions, a 2-layer T5 encoder 32
    wide, a random null caption and PixArt's schedule. Deterministic for a given ``seed``."""
    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae()
        transformer = PixArtTransformer2DModel(**_TINY_PIXART)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **_TINY_T5))
        null_caption = torch.randn(PIXART_TEXT_LENGTH, _TINY_T5["d_model"]) * 0.1
    for module in (vae, transformer, text_encoder):
        freeze(module)
    return PixArtPrior(
        vae,
        transformer,
        text_encoder,
        tokenizer,
        DDPMScheduler(**pixart_scheduler_config()),
        null_caption=null_caption,
        text_features=text_features,
        text_cache_size=text_cache_size,
        resolution=(64, 64),
    )


def pixart_transformer_config() -> dict[str, Any]:
    """The PixArt-α XL/2 1024-MS transformer config (a fresh copy)."""
    return copy.deepcopy(_PIXART_XL_2_1024)


def pixart_alpha_prior(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> PixArtPrior:
    """PixArt-α XL/2 1024-MS at full size with random weights (frozen): DiT 611,349,152, sd-vae-ft-ema
    83,653,863, T5-v1.1-XXL encoder 4,762,310,656 parameters; for meta-device checks and timing runs."""
    with torch.device(device):
        vae = AutoencoderKL(**sd_vae_config())
        transformer = PixArtTransformer2DModel(**pixart_transformer_config())
        text_encoder = T5EncoderModel(T5Config(**_T5_V1_1_XXL))
        null_caption = torch.zeros(PIXART_TEXT_LENGTH, _T5_V1_1_XXL["d_model"])
    for module in (vae, transformer, text_encoder):
        if dtype is not None:
            module.to(dtype=dtype)
        freeze(module)
    return PixArtPrior(
        vae,
        transformer,
        text_encoder,
        tiny_t5_tokenizer(),
        DDPMScheduler(**pixart_scheduler_config()),
        null_caption=null_caption,
    )
