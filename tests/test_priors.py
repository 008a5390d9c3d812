"""The frozen priors (restore.models.priors): one interface over SD-1/2, SDXL and PixArt-α; full-size structures
counted on the meta device; loading from the diffusers layout; text conditions, null conditions, precomputed
features and the text cache."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from restore.models.priors import (
    SD_SCALING_FACTOR,
    SDXL_SCALING_FACTOR,
    MissingTextFeaturesError,
    PixArtPrior,
    PriorNotFoundError,
    SDPrior,
    SDXLPrior,
    TextCondition,
    TextFeatureStore,
    pixart_alpha_prior,
    sd2_base_prior,
    sd15_prior,
    sdxl_base_prior,
    tiny_pixart_prior,
    tiny_prior,
    tiny_sdxl_prior,
)
from restore.models.priors.pixart import read_null_caption

TINY = {"sd": tiny_prior, "sdxl": tiny_sdxl_prior, "pixart": tiny_pixart_prior}
CLASSES = {"sd": SDPrior, "sdxl": SDXLPrior, "pixart": PixArtPrior}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ full size
# Reference counts: the diffusers / transformers models built from the hub configs of stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-base (2-1-base: the same), stabilityai/stable-diffusion-xl-base-1.0 and
# PixArt-alpha/PixArt-XL-2-1024-MS. The PixArt DiT count equals the official PixArtMS_XL_2 (611,349,152); the
# T5 encoder is google/t5-v1_1-xxl's (4,762,310,656).
FULL_SIZE = {
    "sd15": (sd15_prior, {"vae": 83_653_863, "unet": 859_520_964, "text_encoder": 123_060_480}),
    "sd2_base": (sd2_base_prior, {"vae": 83_653_863, "unet": 865_910_724, "text_encoder": 340_387_840}),
    "sdxl_base": (
        sdxl_base_prior,
        {
            "vae": 83_653_863,
            "unet": 2_567_463_684,
            "text_encoder": 123_060_480,
            "text_encoder_2": 694_659_840,
        },
    ),
    "pixart_alpha": (
        pixart_alpha_prior,
        {"vae": 83_653_863, "transformer": 611_349_152, "text_encoder": 4_762_310_656},
    ),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_priors_have_the_released_parameter_counts(name: str) -> None:
    builder, counts = FULL_SIZE[name]
    prior = builder(device="meta")
    assert {part: _count(getattr(prior, part)) for part in counts} == counts
    assert all(p.device.type == "meta" for p in prior.parameters())
    assert not any(p.requires_grad for p in prior.parameters())


def test_full_size_schedules_scalings_and_conditions() -> None:
    sdxl, pixart = sdxl_base_prior(), pixart_alpha_prior()
    assert sdxl.scaling_factor == SDXL_SCALING_FACTOR == 0.13025 and sdxl.vae.config.force_upcast
    assert sdxl.unet.config.cross_attention_dim == 2048  # 768 (CLIP-L) + 1280 (bigG), concatenated
    assert sdxl.unet.config.projection_class_embeddings_input_dim == 1280 + 6 * 256  # pooled + time ids
    assert pixart.scaling_factor == SD_SCALING_FACTOR
    assert pixart.transformer.config.out_channels == 8 and pixart.transformer.use_additional_conditions
    assert pixart.learned_variance and pixart.variance_type == "learned_range"
    betas = pixart.noise_scheduler.betas
    assert (betas[0].item(), betas[-1].item()) == pytest.approx((1e-4, 0.02))
    assert pixart.null_caption.shape == (120, 4096)


# ------------------------------------------------------------------------------------------------ tiny priors
def test_tiny_sd_prior_has_sd_numbers_and_sdpa() -> None:
    prior = tiny_prior()
    sched = prior.noise_scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.prediction_type) == (
        1000,
        "scaled_linear",
        "epsilon",
    )
    assert sched.steps_offset == 1
    # scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012))^2
    betas = prior.noise_scheduler.betas
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert prior.scaling_factor == SD_SCALING_FACTOR == 0.18215
    z = prior.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)  # 8x downscale, 4 channels as SD
    assert all(isinstance(p, AttnProcessor2_0) for p in prior.unet.attn_processors.values())
    assert not any(p.requires_grad for p in prior.parameters())
    ids = prior.tokenizer(["the cat"], return_tensors="pt").input_ids[0].tolist()
    assert ids[0] == prior.tokenizer.bos_token_id and ids[-1] == prior.tokenizer.eos_token_id
    # same seed -> same weights; another seed -> different
    w = lambda p: p.unet.conv_in.weight  # noqa: E731
    assert torch.equal(w(prior), w(tiny_prior(seed=0)))
    assert not torch.equal(w(prior), w(tiny_prior(seed=1)))


@pytest.mark.parametrize("family", list(TINY))
def test_one_interface_encodes_text_and_predicts(family: str) -> None:
    prior = TINY[family]()
    text = prior.encode_text(["a photo of a cat", "a dog"])
    assert isinstance(text, TextCondition) and len(text) == 2
    latents = prior.encode_images(torch.rand(2, 3, 64, 64), torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    out = prior.predict(latents, torch.tensor(500), text)
    channels = 8 if family == "pixart" else 4  # PixArt outputs epsilon + the variance interpolation
    assert out.shape == (2, channels, 8, 8) and torch.isfinite(out).all()
    assert prior.learned_variance == (family == "pixart")
    # the prompt matters, and the same prompt in another batch gives the same row
    assert not torch.allclose(out[0], out[1])
    alone = prior.predict(latents[:1], torch.tensor(500), prior.encode_text(["a photo of a cat"]))
    torch.testing.assert_close(alone, out[:1], rtol=1e-4, atol=1e-5)


def test_text_conditions_carry_each_familys_extras() -> None:
    sd = tiny_prior().encode_text(["a cat"])
    assert set(sd.tensors()) == {"hidden_states"} and sd.hidden_states.shape == (1, 77, 32)
    sdxl = tiny_sdxl_prior().encode_text(["a cat"])
    assert set(sdxl.tensors()) == {"hidden_states", "pooled", "added.time_ids"}
    assert sdxl.hidden_states.shape == (1, 77, 64)  # two 32-wide encoders, penultimate layers, concatenated
    assert sdxl.added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    pixart = tiny_pixart_prior().encode_text(["a photo of the cat", ""])
    assert pixart.hidden_states.shape == (2, 120, 32)
    # T5 layout: one piece per known word, </s>, then padding
    assert pixart.attention_mask.sum(dim=1).tolist() == [6, 1]  # 5 words + </s>; </s>
    assert pixart.added["resolution"].tolist() == [[64.0, 64.0]] * 2


def test_null_conditions_follow_each_familys_training_code() -> None:
    prompts = ["a photo of the cat", "a dog on the street"]
    null = [True, False]
    # SD: the null condition is the encoded empty prompt (the prompt text is replaced before encoding)
    sd = tiny_prior()
    dropped = sd.encode_text(prompts, null=null)
    torch.testing.assert_close(dropped.hidden_states[0], sd.encode_text([""]).hidden_states[0])
    torch.testing.assert_close(dropped.hidden_states[1], sd.encode_text(prompts[1:]).hidden_states[0])
    # SDXL: zeros for the states and the pooled embedding, the size conditions kept
    sdxl = tiny_sdxl_prior()
    full, dropped = sdxl.encode_text(prompts), sdxl.encode_text(prompts, null=null)
    assert not dropped.hidden_states[0].any() and not dropped.pooled[0].any()
    assert torch.equal(dropped.hidden_states[1], full.hidden_states[1])
    assert torch.equal(dropped.added["time_ids"], full.added["time_ids"])
    # PixArt: the learned null caption, with the caption's own mask (PixArt's caption dropout)
    pixart = tiny_pixart_prior()
    full, dropped = pixart.encode_text(prompts), pixart.encode_text(prompts, null=null)
    assert torch.equal(dropped.hidden_states[0], pixart.null_caption)
    assert torch.equal(dropped.attention_mask, full.attention_mask)
    assert torch.equal(dropped.hidden_states[1], full.hidden_states[1])
    uncond = pixart.null_condition(2, like=full)
    assert torch.equal(uncond.attention_mask, full.attention_mask) and torch.equal(
        uncond.added["resolution"], full.added["resolution"]
    )
    # without a learned one, PixArt's null condition is T5("") (what the diffusers pipeline uses)
    pixart.null_caption = None
    torch.testing.assert_close(pixart.null_condition(1).hidden_states, pixart.encode_text([""]).hidden_states)


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", list(TINY))
def test_save_and_from_pretrained_round_trip(family: str, tmp_path) -> None:
    prior = TINY[family](seed=3)
    prior.save_pretrained(tmp_path / family)
    kwargs = {"null_caption": tmp_path / family / "null_caption.safetensors"} if family == "pixart" else {}
    loaded = CLASSES[family].from_pretrained(tmp_path / family, local_files_only=True, **kwargs)
    assert loaded.source == str(tmp_path / family)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.denoiser.training
    a, b = prior.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if family == "pixart":
        assert torch.equal(loaded.null_caption, prior.null_caption)
        assert loaded.noise_scheduler.config.variance_type == "learned_range"
    # the size micro-conditions are settings of the prior (the config's), not of the saved parts
    if family == "sdxl":
        loaded.time_ids = prior.time_ids
    if family == "pixart":
        loaded.resolution = prior.resolution
    prompts = ["a red car", ""]
    for p in (prior, loaded):
        text = p.encode_text(prompts)
        z = p.encode_images(
            torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), sample=False
        )
        p.out = p.predict(z, torch.tensor([10, 900]), text)
    # to float rounding: loaded models may pick other CPU kernels / memory layouts
    torch.testing.assert_close(prior.out, loaded.out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "hub_id", "parts"),
    [
        (SDPrior, "stabilityai/stable-diffusion-2-base", ["vae/", "text_encoder/", "scheduler_config.json"]),
        (SDXLPrior, "stabilityai/stable-diffusion-xl-base-1.0", ["text_encoder_2/", "tokenizer_2/", "'!'"]),
        (PixArtPrior, "PixArt-alpha/PixArt-XL-2-1024-MS", ["transformer/", "T5-v1.1-XXL"]),
    ],
)
def test_missing_prior_names_the_layout_and_the_fix(cls, hub_id, parts, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PriorNotFoundError) as info:
        cls.from_pretrained(hub_id, local_files_only=True)
    msg = str(info.value)
    assert hub_id in msg and "HF_HOME=" + str(tmp_path / "hf") in msg and "huggingface-cli download" in msg
    assert all(part in msg for part in parts), msg
    with pytest.raises(FileNotFoundError):  # PriorNotFoundError is one, for generic handlers
        cls.from_pretrained(tmp_path / "nope", local_files_only=True)


def test_null_caption_is_read_from_official_checkpoints(tmp_path) -> None:
    embedding = torch.randn(120, 8)
    # the layouts that hold it: PixArt's .pth (y_embedder.y_embedding), DreamClear's state_dict (base_model.*)
    torch.save({"y_embedder.y_embedding": embedding, "pos_embed": torch.zeros(1)}, tmp_path / "pixart.pth")
    torch.save({"state_dict": {"base_model.y_embedder.y_embedding": embedding}}, tmp_path / "dreamclear.pth")
    torch.save({"x_embedder.proj.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert torch.equal(read_null_caption(tmp_path / "pixart.pth"), embedding)
    assert torch.equal(read_null_caption(tmp_path / "dreamclear.pth"), embedding)
    assert read_null_caption(tmp_path / "other.pth") is None
    with pytest.raises(FileNotFoundError):
        read_null_caption(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------------ text features
def test_precomputed_features_replace_the_encoder(tmp_path) -> None:
    prior = tiny_pixart_prior()
    store = TextFeatureStore(tmp_path / "features", prior.text_encoder_id)
    prompts = ["a photo of the cat", "a dog"]
    for prompt in prompts:
        store.write(prompt, prior.encode_text([prompt]))
    reader = tiny_pixart_prior(text_features=tmp_path / "features")
    reader.text_encoder = None  # as loaded with load_text_encoder=false
    assert not reader.has_text_encoder
    read, computed = reader.encode_text(prompts), prior.encode_text(prompts)
    for name, value in computed.tensors().items():
        torch.testing.assert_close(read.tensors()[name], value, rtol=1e-5, atol=1e-6)
    # dropout still works from the stored features (the learned null caption, the stored mask)
    dropped = reader.encode_text(prompts, null=[True, False])
    assert torch.equal(dropped.hidden_states[0], reader.null_caption)
    with pytest.raises(MissingTextFeaturesError, match="precompute_text_features.py"):
        reader.encode_text(["a prompt nobody encoded"])
    with pytest.raises(ValueError, match="computed by"):  # features of another encoder are refused
        TextFeatureStore(tmp_path / "features", "PixArtPrior:another/source")


def test_text_cache_returns_the_uncached_encodings_and_evicts_lru() -> None:
    plain, cached = tiny_prior(), tiny_prior(text_cache_size=2)
    prompts = ["a", "b", "a", "c"]
    for p in (plain, cached):
        p.out = p.encode_text(prompts).hidden_states
    # up to the rounding of another batch composition inside the encoder
    torch.testing.assert_close(cached.out, plain.out, rtol=1e-6, atol=1e-6)
    assert len(cached.text_cache) == 2 and "a" in cached.text_cache and "c" in cached.text_cache


def test_precompute_script_writes_what_the_prior_then_reads(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    side = tmp_path / "prompts.jsonl"
    records = [{"path": "a.png", "prompt": "a photo of the cat"}, {"path": "b.png", "prompt": "a dog"}]
    side.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    args = [sys.executable, str(repo / "scripts/precompute_text_features.py"), "--prior", "tiny_pixart",
            "--prompts", str(side), "--out", str(tmp_path / "t5"), "--no-progress"]  # fmt: skip
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "3 distinct prompts, 0 already" in first.stdout  # the two prompts and ""
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert "3 distinct prompts, 3 already" in again.stdout and "wrote 0" in again.stdout  # resumable
    reader = tiny_pixart_prior(text_features=tmp_path / "t5")
    reader.text_encoder = None
    prompts = [r["prompt"] for r in records]
    read = reader.encode_text(prompts)
    expected = tiny_pixart_prior().encode_text(prompts)
    torch.testing.assert_close(read.hidden_states, expected.hidden_states, rtol=1e-5, atol=1e-6)
    assert (
        torch.equal(read.attention_mask, expected.attention_mask) and read.attention_mask.dtype == torch.long
    )
