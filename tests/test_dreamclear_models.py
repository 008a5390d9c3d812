"""DreamClear's ControlFormer + MoAM (restore.models.dreamclear) against the official network.

``tests/fixtures/dreamclear_official_tiny.npz`` holds numbers only: ``shallowdream204/DreamClear`` @ fbe0938
(``diffusion/model/nets/{pixart_controlnet,PixArtMS,PixArt_blocks}.py``) built in a scratch environment around a
tiny ``PixArtMS`` (depth 2, hidden 48, 4 heads, patch 2, caption width 32 with 8 tokens, 8x8 latents, the MS size
embedders, lewei_scale 2), with the three constants the wrapper hard-codes for the 1152-wide model (the
``cross_de`` width / heads and the zero patch embedders' width) set to that size, xformers replaced by plain
attention with the same masks, every parameter (the zero-initialised ones and the null caption too) drawn at
random from seed 0; the state dict in the official layout (what ``DreamClear-1024.pth`` holds), batch-2 inputs
(two caption lengths, 5 and 8 tokens) and the official outputs: as released (``cross_de`` across the batch) and
with ``cross_de`` per sample, with a null caption, and ``forward_with_cfg`` at scale 4.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

from restore.models.dreamclear import (
    DreamClearControlFormer,
    MixtureOfAdaptiveModulators,
    official_to_ours,
    ours_to_official,
)
from restore.models.priors import pixart_alpha_prior, tiny_pixart_prior
from restore.sampling.guidance import classifier_free_guidance

FIXTURE = Path(__file__).parent / "fixtures" / "dreamclear_official_tiny.npz"
TINY_OFFICIAL = dict(
    num_attention_heads=4,
    attention_head_dim=12,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    caption_channels=32,
    cross_attention_dim=48,
    use_additional_conditions=True,
    interpolation_scale=2,  # lewei_scale 2 with base size 4, as the official tiny model
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
)


@pytest.fixture(scope="module")
def official() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return dict(data)


def _official_state(official) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in official.items() if "/" not in k}


def _build(official, cross_batch: bool) -> tuple[PixArtTransformer2DModel, DreamClearControlFormer]:
    trained, base = official_to_ours(_official_state(official))
    transformer = PixArtTransformer2DModel(**TINY_OFFICIAL).eval()
    transformer.load_state_dict(base, strict=True)
    controlformer = DreamClearControlFormer(transformer, cross_batch_attn=cross_batch).eval()
    controlformer.load_state_dict(trained, strict=True)
    return transformer, controlformer


def _inputs(official, prefix: str = "") -> dict:
    t = lambda k: torch.from_numpy(official[f"in/{prefix}{k}"])  # noqa: E731
    return {
        "hidden_states": t("x" if prefix else "z_t"),
        "timestep": t("t" if prefix else "timesteps"),
        "encoder_hidden_states": t("y")[:, 0],
        "encoder_attention_mask": t("mask"),
        "lq_latent": t("c_lq"),
        "ref_latent": t("c_pre"),
        "added_cond_kwargs": {"resolution": t("img_hw").float(), "aspect_ratio": t("aspect_ratio").float()},
    }


@pytest.mark.parametrize(("cross_batch", "key"), [(True, "out_batchmix"), (False, "out_persample")])
def test_forward_equals_the_official_network(official, cross_batch, key) -> None:
    transformer, controlformer = _build(official, cross_batch)
    with torch.no_grad():
        out = controlformer(transformer, **_inputs(official))
    np.testing.assert_allclose(out.numpy(), official[f"out/{key}"], rtol=1e-4, atol=2e-5)


def test_the_frozen_base_alone_equals_the_official_pixart(official) -> None:
    transformer, _ = _build(official, cross_batch=False)
    x = _inputs(official)
    with torch.no_grad():
        out = transformer(
            x["hidden_states"],
            encoder_hidden_states=x["encoder_hidden_states"],
            timestep=x["timestep"],
            added_cond_kwargs=x["added_cond_kwargs"],
            encoder_attention_mask=x["encoder_attention_mask"],
            return_dict=False,
        )[0]
    np.testing.assert_allclose(out.numpy(), official["out/base_out"], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("cross_batch", [True, False])
def test_cfg_with_the_null_caption_and_three_guided_channels(official, cross_batch) -> None:
    """The official forward_with_cfg: [cond, null] rows on the same latent, the null caption with the caption's
    mask, guidance on latent channels 0-2 only."""
    transformer, controlformer = _build(official, cross_batch)
    x = _inputs(official, prefix="cfg_")
    mask = x["encoder_attention_mask"].expand(2, -1)  # the null row keeps the caption's mask
    resolution = {k: v.expand(2, -1) for k, v in x["added_cond_kwargs"].items()}
    with torch.no_grad():
        raw = controlformer(
            transformer,
            x["hidden_states"],
            x["timestep"],
            x["encoder_hidden_states"],
            x["lq_latent"].expand(2, -1, -1, -1),
            x["ref_latent"].expand(2, -1, -1, -1),
            encoder_attention_mask=mask,
            added_cond_kwargs=resolution,
        )
    suffix = "batchmix" if cross_batch else "persample"
    np.testing.assert_allclose(raw.numpy(), official[f"out/cfg_raw_{suffix}"], rtol=1e-4, atol=2e-5)
    cond, uncond = raw[:1], raw[1:]
    guided = classifier_free_guidance(uncond, cond, float(official["in/cfg_scale"]), guided_channels=3)
    np.testing.assert_allclose(guided.numpy(), official[f"out/cfg_out_{suffix}"][:1], rtol=1e-4, atol=1e-4)


def test_key_layout_round_trips_and_matches_the_official_one(official) -> None:
    state = _official_state(official)
    trained, base = official_to_ours(state)
    transformer = PixArtTransformer2DModel(**TINY_OFFICIAL)
    ours = DreamClearControlFormer(transformer)
    assert set(ours.state_dict()) == set(trained)  # every trained key of the release, nothing else
    back = ours_to_official(trained)
    official_trained = {k: v for k, v in state.items() if not k.startswith("base_model.")}
    assert list(back) == list(official_trained)
    assert all(torch.equal(back[k], v) for k, v in official_trained.items())
    assert set(base) == set(transformer.state_dict())  # every base key maps onto diffusers' PixArt


def test_with_every_zero_init_at_zero_the_output_is_the_frozen_priors() -> None:
    prior = tiny_pixart_prior()
    torch.manual_seed(0)
    controlformer = DreamClearControlFormer(prior.transformer, cross_batch_attn=True).eval()
    g = torch.Generator().manual_seed(1)
    latents, lq, ref = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    text = prior.encode_text(["a photo of the cat", "a dog"])
    with torch.no_grad():
        ours = controlformer(
            prior.transformer, latents, torch.tensor([3, 800]), lq_latent=lq, ref_latent=ref,
            **prior.denoiser_kwargs(text),
        )  # fmt: skip
        plain = prior.predict(latents, torch.tensor([3, 800]), text)
        weights = controlformer.am_lq[0].routing(torch.randn(2, 16, 24, generator=g))
    assert torch.equal(ours, plain)
    assert torch.equal(weights, torch.full_like(weights, 1 / 3))  # the router starts uniform


def test_cross_batch_attention_couples_the_samples_and_per_sample_does_not(official) -> None:
    for cross_batch, coupled in ((True, True), (False, False)):
        transformer, controlformer = _build(official, cross_batch)
        x = _inputs(official)
        with torch.no_grad():
            both = controlformer(transformer, **x)
            x["ref_latent"] = x["ref_latent"].clone()
            x["ref_latent"][1] += 1.0  # change only sample 1's reference
            changed = controlformer(transformer, **x)
        assert (not torch.allclose(both[0], changed[0], atol=1e-6)) == coupled


def test_full_size_parameter_counts_equal_the_released_model() -> None:
    transformer = pixart_alpha_prior(device="meta").transformer
    controlformer = DreamClearControlFormer(transformer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(controlformer) == 1_600_527_060
    assert count(controlformer) + count(transformer) == 2_211_876_212
    per_block = {
        "lq copy": count(controlformer.controlnet_lq[0]),
        "am": count(controlformer.am_pre[0]),
        "moam": count(controlformer.am_lq[0]),
        "cross_de": count(controlformer.cross_de[0]),
    }
    assert per_block == {"lq copy": 21_255_552, "am": 1_993_536, "moam": 6_008_355, "cross_de": 6_645_888}
    assert all(p.requires_grad for p in controlformer.parameters())
    am_only = DreamClearControlFormer(transformer, modulation="am")
    assert count(am_only) == 1_600_527_060 - 28 * (6_008_355 - 1_993_536)
    five = DreamClearControlFormer(transformer, num_experts=5).am_lq[0]
    assert isinstance(five, MixtureOfAdaptiveModulators) and len(five.experts) == 5
    assert five.gate[0].out_features == 40  # the official router width: 8 per expert


def test_inspect_model_prints_the_released_key_layout() -> None:
    """Every key, shape and their order of the released trained parts (the official wrapper's state dict
    without base_model.*), from scripts/inspect_model.py model=dreamclear part=official."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "inspect_model.py"
    proc = subprocess.run(
        [sys.executable, str(script), "model=dreamclear", "part=official"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    expected = FIXTURE.with_name("dreamclear_official_keys.tsv").read_text().splitlines()
    assert proc.stdout.splitlines() == [line for line in expected if not line.startswith("#")]
