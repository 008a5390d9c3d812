"""StableSR's CFW autoencoder (restore.models.cfw) against the official network.

``tests/fixtures/stablesr_cfw_official_tiny.npz`` holds numbers only. It was made in a scratch environment outside
the repository from ``IceClear/StableSR`` @ 398ee9383777e255540ea027a704c8ce1f32145b: ``AutoencoderKLResi``
(``ldm/models/autoencoder.py``) with its ``Encoder`` / ``Decoder_Mix`` / ``Fuse_sft_block_RRDB``
(``ldm/modules/diffusionmodules/model.py``) and BasicSR 1.4.2's RRDB (identical to the repo's vendored
``basicsr/archs/rrdbnet_arch.py``); training-only imports (taming, the degradation helpers) stubbed, the loss an
``nn.Identity``. Tiny ``ddconfig``: ch 32, ch_mult (1, 1, 1, 2), 1 res block, z 4, no level attention (widths
stay multiples of 32: the official GroupNorms always have 32 groups; the fusion layers keep the official
num_fuse_block 2 and growth 32). Every parameter was redrawn from ``torch.Generator`` seed 0 as a random sign
times a power of two (conv/linear ``±2^round(log2(fan_in^-1/2))``, GroupNorm weight ``1 ± 1/8`` and bias
``± 1/16``, conv bias ``± 1/32``): exact in float32 and float64, and the 2.57M weights deflate to < 1 MB. Stored:
the official-layout state dict (float32), a 1x3x32x40 image in [-1, 1] and a 1x4x4x5 latent ``z`` (``in/``), and
the official outputs in float32 (``out/``) and, with the network cast to float64, in float64 (``out64/``):
posterior mean / logvar, the two encoder features (float32 only), ``decode`` of the posterior mean at
``fusion_w`` 0.5 and 1.0 and of ``z`` at 0.0 and 0.5; ``meta/config_json`` has the config, commit and seed.

``tests/fixtures/stablesr_cfw_official_keys.tsv``: the full-size official ``AutoencoderKLResi`` (the config
``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml``) built on the meta device, keys and shapes in state-dict
order (``loss.*`` left out): the layout of the released ``vqgan_cfw_00011.ckpt``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from restore.models.cfw import (
    FUSION_LEVELS,
    INFERENCE_FUSION_WEIGHT,
    TRAIN_FUSION_WEIGHT,
    CFWAutoencoder,
    build_cfw_autoencoder,
    load_cfw_checkpoint,
    official_to_ours,
    ours_to_official,
    tiny_cfw_autoencoder,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "stablesr_cfw_official_tiny.npz"
KEYS = FIXTURES / "stablesr_cfw_official_keys.tsv"
#: Sum over decoder.fusion_layer_{1,2} of the full-size official AutoencoderKLResi (also in the TSV).
FULL_FUSION_PARAMS = 44_393_728


@pytest.fixture(scope="module")
def official() -> dict[str, np.ndarray]:
    with np.load(TINY) as data:
        return dict(data)


def _official_state(official) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in official.items() if "/" not in k}


@pytest.fixture(scope="module")
def model(official) -> CFWAutoencoder:
    cfw = tiny_cfw_autoencoder().eval()
    cfw.load_state_dict(official_to_ours(_official_state(official)), strict=True)
    return cfw


def _t(official, key: str) -> torch.Tensor:
    return torch.from_numpy(official[key])


def _official_keys() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in KEYS.read_text().splitlines() if line and not line.startswith("#")]
    return {k: tuple(int(s) for s in shape.split("x")) for k, shape in rows}


# ---------------------------------------------------------------------------------------------- (a) numerics
def test_fixture_config_is_the_tiny_config(official):
    meta = json.loads(str(official["meta/config_json"]))
    ddconfig = meta["ddconfig"]
    vae = tiny_cfw_autoencoder().vae.config
    assert tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]) == tuple(vae.block_out_channels)
    assert (
        ddconfig["num_res_blocks"] == vae.layers_per_block and ddconfig["z_channels"] == vae.latent_channels
    )
    assert ddconfig["attn_resolutions"] == []


def test_official_state_dict_loads_with_no_missing_or_unexpected_keys(official):
    cfw = tiny_cfw_autoencoder()
    result = cfw.load_state_dict(official_to_ours(_official_state(official)), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_encoder_features_and_posterior_equal_official(model, official):
    with torch.no_grad():
        posterior, features = model.encode_with_features(_t(official, "in/image"))
    assert sorted(features) == list(FUSION_LEVELS)
    # Level 1: 1/2 of the image size, level 2: 1/4 (before each level's downsampler).
    assert features[1].shape == (1, 32, 16, 20) and features[2].shape == (1, 32, 8, 10)
    for level in FUSION_LEVELS:
        torch.testing.assert_close(
            features[level], _t(official, f"out/enc_fea_{level}"), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(posterior.mean, _t(official, "out/posterior_mean"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(posterior.logvar, _t(official, "out/posterior_logvar"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("latent", "weight"), [("mean", 0.5), ("mean", 1.0), ("z", 0.5), ("z", 0.0)], ids=lambda v: str(v)
)
def test_decode_equals_official_float32(model, official, latent, weight):
    image = _t(official, "in/image")
    with torch.no_grad():
        posterior, features = model.encode_with_features(image)
        z = posterior.mean if latent == "mean" else _t(official, "in/z")
        out = model.decode(z, features, weight)
    # float32 rounding only (max 9.2e-6 on outputs up to 3.5; the float64 test below shows the maths is equal).
    torch.testing.assert_close(out, _t(official, f"out/dec_{latent}_w{weight}"), atol=1e-5, rtol=1e-5)


def test_decode_equals_official_float64(model, official):
    """Weights and inputs are exact in float64: the official network's float64 outputs must come out to ~1e-13."""
    cfw = tiny_cfw_autoencoder().eval().double()
    cfw.load_state_dict(official_to_ours(_official_state(official)))
    with torch.no_grad():
        posterior, features = cfw.encode_with_features(_t(official, "in/image").double())
        torch.testing.assert_close(posterior.mean, _t(official, "out64/posterior_mean"), atol=1e-12, rtol=0)
        torch.testing.assert_close(
            posterior.logvar, _t(official, "out64/posterior_logvar"), atol=1e-12, rtol=0
        )
        for latent, weight in (("mean", 0.5), ("mean", 1.0), ("z", 0.5), ("z", 0.0)):
            z = posterior.mean if latent == "mean" else _t(official, "in/z").double()
            out = cfw.decode(z, features, weight)
            torch.testing.assert_close(out, _t(official, f"out64/dec_{latent}_w{weight}"), atol=1e-11, rtol=0)


def test_fusion_matters_in_the_fixture(official):
    """The outputs at w = 0, 0.5 and 1 differ clearly, so the equalities above test the fusion path."""
    stock, half = _t(official, "out/dec_z_w0.0"), _t(official, "out/dec_z_w0.5")
    assert (stock - half).abs().max() > 0.1
    assert (_t(official, "out/dec_mean_w0.5") - _t(official, "out/dec_mean_w1.0")).abs().max() > 0.1


def test_default_fusion_weight_follows_the_mode(model, official):
    """eval: 0.5 (official test --dec_w); train: 1.0 (official config fusion_w)."""
    assert (INFERENCE_FUSION_WEIGHT, TRAIN_FUSION_WEIGHT) == (0.5, 1.0)
    image = _t(official, "in/image")
    with torch.no_grad():
        posterior, features = model.encode_with_features(image)
        torch.testing.assert_close(
            model.decode(posterior.mean, features), _t(official, "out/dec_mean_w0.5"), atol=1e-5, rtol=1e-5
        )
        model.train()
        try:
            trained_default = model.decode(posterior.mean, features)
        finally:
            model.eval()
    torch.testing.assert_close(trained_default, _t(official, "out/dec_mean_w1.0"), atol=1e-5, rtol=1e-5)


def test_forward_is_features_of_lq_then_decode(model, official):
    with torch.no_grad():
        out = model(_t(official, "in/image"), _t(official, "in/z"), 0.5)
    torch.testing.assert_close(out, _t(official, "out/dec_z_w0.5"), atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_after_each_call(model, official):
    with torch.no_grad():
        _, features = model.encode_with_features(_t(official, "in/image"))
        model.decode(_t(official, "in/z"), features, 1.0)
    assert all(not m._forward_hooks for m in model.vae.modules())


def test_mismatched_features_are_refused(model, official):
    with torch.no_grad():
        _, features = model.encode_with_features(_t(official, "in/image"))
        with pytest.raises(ValueError, match="CFW level 2"):
            model.decode(torch.zeros(1, 4, 5, 5), features, 0.5)
        with pytest.raises(KeyError, match=r"levels \[1\]"):
            model.decode(_t(official, "in/z"), {2: features[2]}, 0.5)
    assert all(not m._forward_hooks for m in model.vae.modules())


def test_training_reaches_only_the_fusion_layers_also_with_gradient_checkpointing(official):
    """Official stage 2 (freeze_dec): the VAE frozen, the fusion layers trained at w = 1 (train-mode default).
    diffusers' decoder checkpointing is paused while fusing, so the gradients are those without it."""
    grads = []
    for checkpointing in (False, True):
        cfw = tiny_cfw_autoencoder()
        cfw.load_state_dict(official_to_ours(_official_state(official)))
        cfw.train().vae.requires_grad_(False)
        if checkpointing:
            cfw.vae.enable_gradient_checkpointing()
        cfw(_t(official, "in/image"), _t(official, "in/z")).square().mean().backward()
        assert cfw.vae.decoder.gradient_checkpointing == checkpointing  # restored after the call
        trained = {n: p.grad for n, p in cfw.named_parameters() if p.grad is not None}
        assert set(trained) == {n for n, _ in cfw.named_parameters() if n.startswith("fusion_layer_")}
        grads.append(trained)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_tiled_vae_is_refused(official):
    cfw = tiny_cfw_autoencoder().eval()
    cfw.vae.enable_tiling()
    with pytest.raises(ValueError, match="tiling"):
        cfw.encode_with_features(_t(official, "in/image"))


# ---------------------------------------------------------------------------------------------- (b) round trip
def test_round_trip_ours_official_ours_is_identity(model):
    ours = model.state_dict()
    back = official_to_ours(ours_to_official(ours))
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key


def test_round_trip_official_ours_official_is_identity(official):
    state = _official_state(official)
    back = ours_to_official(official_to_ours(state))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].shape == value.shape, key  # attention projections are 1x1 convs again
        assert torch.equal(back[key], value), key


def test_ours_to_official_names_match_the_official_tiny_layout(model, official):
    assert set(ours_to_official(model.state_dict())) == set(_official_state(official))


# ---------------------------------------------------------------------------------------------- (c) full size
@pytest.fixture(scope="module")
def full_meta() -> CFWAutoencoder:
    with torch.device("meta"):
        return build_cfw_autoencoder()


def test_full_size_fusion_parameter_count(full_meta):
    assert sum(p.numel() for p in full_meta.fusion_parameters()) == FULL_FUSION_PARAMS
    per_level = {
        level: sum(p.numel() for p in full_meta.fusion_layer(level).parameters()) for level in FUSION_LEVELS
    }
    assert per_level == {1: 10_496_000, 2: 33_897_728}  # 256 channels at level 1, 512 at level 2
    official = _official_keys()
    assert sum(int(np.prod(s)) for k, s in official.items() if "fusion_layer" in k) == FULL_FUSION_PARAMS


def test_full_size_keys_and_shapes_equal_the_official_layout(full_meta):
    official = _official_keys()
    ours = {k: tuple(v.shape) for k, v in ours_to_official(full_meta.state_dict()).items()}
    assert ours == official
    # Each fusion layer is named exactly as the official one, in the same order (the official decoder registers
    # fusion_layer_2 first: it builds its levels coarse to fine).
    for level in FUSION_LEVELS:
        prefix = f"decoder.fusion_layer_{level}."
        assert [k for k in ours if k.startswith(prefix)] == [k for k in official if k.startswith(prefix)]
    assert {m.group(1) for k in official if (m := re.match(r"decoder\.fusion_layer_(\d)\.", k))} == {"1", "2"}


def test_full_size_official_layout_loads_strictly(full_meta):
    state = {k: torch.empty(shape, device="meta") for k, shape in _official_keys().items()}
    result = full_meta.load_state_dict(official_to_ours(state), strict=False, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


# ---------------------------------------------------------------------------------------------- (d) w = 0
def test_fusion_weight_zero_is_the_stock_decoder_exactly(model, official):
    z = _t(official, "in/z")
    with torch.no_grad():
        _, features = model.encode_with_features(_t(official, "in/image"))
        fused = model.decode(z, features, 0.0)
        stock = model.vae.decode(z).sample
        plain = model.decode(z, None)
    assert torch.equal(fused, stock)
    assert torch.equal(plain, stock)
    # ... and the stock diffusers path equals the official decoder at fusion_w 0.
    torch.testing.assert_close(stock, _t(official, "out/dec_z_w0.0"), atol=1e-5, rtol=1e-5)


def test_encode_with_features_leaves_the_posterior_of_the_stock_vae(model, official):
    image = _t(official, "in/image")
    with torch.no_grad():
        posterior, _ = model.encode_with_features(image)
        stock = model.vae.encode(image).latent_dist
    assert torch.equal(posterior.mean, stock.mean) and torch.equal(posterior.logvar, stock.logvar)


# ---------------------------------------------------------------------------------------------- (e) checkpoints
def _lightning_checkpoint(official) -> dict:
    state = dict(_official_state(official))
    # What the released file has besides the autoencoder: the training loss (LPIPS + discriminator).
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    return {"epoch": 0, "global_step": 11, "state_dict": state}


def test_lightning_checkpoint_loads_and_reports_the_ignored_loss_keys(official, tmp_path):
    path = tmp_path / "vqgan_cfw_tiny.ckpt"
    torch.save(_lightning_checkpoint(official), path)
    cfw, report = load_cfw_checkpoint(path, tiny_cfw_autoencoder().eval())
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == sorted(
        ["loss.logvar", "loss.perceptual_loss.net.slice1.0.weight", "loss.discriminator.main.0.weight"]
    )
    with torch.no_grad():
        out = cfw(_t(official, "in/image"), _t(official, "in/z"), 0.5)
    torch.testing.assert_close(out, _t(official, "out/dec_z_w0.5"), atol=1e-5, rtol=1e-5)


def test_checkpoint_missing_a_fusion_key_is_refused_naming_it(official):
    checkpoint = _lightning_checkpoint(official)
    del checkpoint["state_dict"]["decoder.fusion_layer_2.encode_enc_2.1.rdb3.conv5.weight"]
    with pytest.raises(KeyError, match=re.escape("decoder.fusion_layer_2.encode_enc_2.1.rdb3.conv5.weight")):
        load_cfw_checkpoint(checkpoint, tiny_cfw_autoencoder())
    # Not strict: loaded as far as possible, the gap reported.
    _, report = load_cfw_checkpoint(checkpoint, tiny_cfw_autoencoder(), strict=False)
    assert report.missing == ["decoder.fusion_layer_2.encode_enc_2.1.rdb3.conv5.weight"]


def test_checkpoint_with_an_unknown_key_is_refused_naming_it(official):
    checkpoint = _lightning_checkpoint(official)
    checkpoint["state_dict"]["decoder.fusion_layer_3.encode_enc_1.conv1.weight"] = torch.zeros(1)
    checkpoint["state_dict"]["encoder.down.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="fusion_layer_3") as error:
        load_cfw_checkpoint(checkpoint, tiny_cfw_autoencoder())
    assert "encoder.down.0.extra.weight" in str(error.value)


def test_default_model_is_full_size_and_filled_by_assignment(full_meta):
    state = {k: torch.zeros(shape, device="meta") for k, shape in _official_keys().items()}
    cfw, report = load_cfw_checkpoint({"state_dict": state})
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert sum(p.numel() for p in cfw.fusion_parameters()) == FULL_FUSION_PARAMS
    assert cfw.vae.config.block_out_channels == (128, 256, 512, 512)
