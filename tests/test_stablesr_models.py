"""StableSR's stage-1 networks (restore.models.stablesr) against the official code.

Fixture ``tests/fixtures/stablesr_official_tiny.npz`` was made outside this repository from IceClear/StableSR at
commit 398ee9383777e255540ea027a704c8ce1f32145b (``ldm/modules/diffusionmodules/openaimodel.py``:
``UNetModelDualcondV2`` + ``EncoderUNetModelWT``, their ``ldm/modules/spade.py`` and ``attention.py``), on CPU in
float32: a two-level UNet (model_channels 64, channel_mult (1, 2), 1 ResBlock per level, attention at rate 1 with
16-channel heads, linear transformer projections, context 32, semb 64) and a matching encoder (64 channels,
channel_mult (1, 2), 1 ResBlock per level, attention at rate 1, 4 heads, output 64). No weights are stored: every
tensor of the official state dict (prefixes ``model.diffusion_model.`` / ``structcond_stage_model.``), in sorted
key order, was drawn from one ``torch.Generator`` seeded 1 (:func:`_official_weights` repeats the recipe). The file
holds the official key list, the inputs (seed 2), the encoder features and the UNet's epsilon.
``stablesr_official_keys.tsv``: the trained keys and shapes of the full-size official model
(``configs/stableSRNew/v2-finetune_text_T_512.yaml``) built on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from restore.models.priors.sd import sd2_base_unet_config
from restore.models.stablesr import (
    MissingStructureFeaturesError,
    StableSRCheckpointError,
    TimeAwareEncoder,
    add_sft,
    official_to_ours,
    ours_to_official,
    sft_state_dict,
    split_stablesr_checkpoint,
    stablesr_encoder_config,
    structure_features,
    tiny_stablesr_encoder_config,
)
from tests.official_fixtures import parse_key_list, seeded_official_weights

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = np.load(FIXTURES / "stablesr_official_tiny.npz")

# The diffusers form of the official tiny UNet (attention_head_dim = number of heads, as in SD-2's config).
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": (4, 8),
    "use_linear_projection": True,
    "norm_num_groups": 32,
}


def _official_weights() -> dict[str, torch.Tensor]:
    """The fixture's weights (tests/official_fixtures.py, seed 1)."""
    return seeded_official_weights(parse_key_list(str(OFFICIAL["tiny_keys"])), seed=1)


def _tiny_models() -> tuple[TimeAwareEncoder, UNet2DConditionModel]:
    config = json.loads(str(OFFICIAL["config"]))
    assert config["encoder"]["model_channels"] == 64 and config["unet"]["semb_channels"] == 64
    encoder = TimeAwareEncoder(**tiny_stablesr_encoder_config()).eval()
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    add_sft(unet, cond_channels=64)
    return encoder, unet


def _load_official(encoder: TimeAwareEncoder, unet: UNet2DConditionModel) -> None:
    official = _official_weights()
    encoder_state, sft_state = split_stablesr_checkpoint({"state_dict": official}, encoder, unet)
    encoder.load_state_dict(encoder_state)
    frozen = {
        k: v for k, v in official.items() if k.startswith("model.diffusion_model.") and ".spade." not in k
    }
    unet_state = convert_ldm_unet_checkpoint(frozen, unet.config)
    missing, unexpected = unet.load_state_dict({**unet_state, **sft_state}, strict=False)
    assert not missing and not unexpected


def test_forward_equals_the_official_encoder_and_sft_unet() -> None:
    encoder, unet = _tiny_models()
    _load_official(encoder, unet)
    t = torch.from_numpy(OFFICIAL["t"])
    with torch.no_grad():
        features = encoder(torch.from_numpy(OFFICIAL["z_lq"]), t)
        assert sorted(features) == ["16", "8"]
        for width, feature in features.items():
            torch.testing.assert_close(
                feature, torch.from_numpy(OFFICIAL[f"features/{width}"]), atol=2e-5, rtol=1e-5
            )
        with structure_features(unet, features):
            eps = unet(torch.from_numpy(OFFICIAL["x"]), t, torch.from_numpy(OFFICIAL["context"])).sample
    torch.testing.assert_close(eps, torch.from_numpy(OFFICIAL["eps"]), atol=5e-5, rtol=1e-5)


def test_sft_is_not_zero_init_and_needs_the_features() -> None:
    """Official: SPADE has plain PyTorch init, so the UNet's output changes from step 0."""
    torch.manual_seed(0)
    stock = UNet2DConditionModel(**TINY_UNET).eval()
    with_sft = UNet2DConditionModel(**TINY_UNET).eval()
    with_sft.load_state_dict(stock.state_dict())
    spades = add_sft(with_sft, cond_channels=64)
    assert len(spades) == 2 + 2 + 4  # 1 per down level, 2 middle, 2 per up level
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 5, 32)
    features = {"16": torch.randn(1, 64, 16, 16), "8": torch.randn(1, 64, 8, 8)}
    with torch.no_grad(), structure_features(with_sft, features):
        changed = with_sft(x, t, text).sample
    assert not torch.allclose(changed, stock(x, t, text).sample, atol=1e-3)
    with pytest.raises(MissingStructureFeaturesError, match="structure_features"):
        with_sft(x, t, text)
    with (
        pytest.raises(MissingStructureFeaturesError, match="no encoder feature of width 8"),
        structure_features(with_sft, {"16": features["16"]}),
    ):
        with_sft(x, t, text)
    with pytest.raises(ValueError, match="already has SFT"):
        add_sft(with_sft)


def test_full_size_counts_and_keys_are_the_official_ones() -> None:
    with torch.device("meta"):
        encoder = TimeAwareEncoder(**stablesr_encoder_config())
        unet = UNet2DConditionModel(**sd2_base_unet_config())
        frozen = sum(p.numel() for p in unet.parameters())
        add_sft(unet)
    encoder_count = sum(p.numel() for p in encoder.parameters())
    sft_count = sum(v.numel() for v in sft_state_dict(unet).values())
    assert (encoder_count, sft_count) == (52_494_080, 53_020_160)
    assert encoder_count + sft_count == 105_514_240
    assert frozen == 865_910_724  # the SD-2.1-base UNet itself is untouched
    official = ours_to_official(encoder.state_dict(), sft_state_dict(unet))
    expected = parse_key_list((FIXTURES / "stablesr_official_keys.tsv").read_text())
    assert [(k, tuple(v.shape)) for k, v in official.items()] == list(expected.items())  # keys, shapes, order
    assert len(expected) == 376


def test_key_layout_round_trips_both_ways() -> None:
    official = {k: v for k, v in _official_weights().items() if "spade" in k or k.startswith("structcond")}
    encoder_state, sft_state = official_to_ours(official, layers_per_block=1, levels=2)
    assert any(k.startswith("up_blocks.1.resnets.1.spade.") for k in sft_state)
    back = ours_to_official(encoder_state, sft_state, layers_per_block=1, levels=2)
    assert back.keys() == official.keys() and all(back[k] is official[k] for k in official)


def test_checkpoint_problems_are_named() -> None:
    encoder, unet = _tiny_models()
    official = _official_weights()
    dropped = dict(official)
    del dropped["model.diffusion_model.output_blocks.3.0.spade.mlp_beta.bias"]
    with pytest.raises(StableSRCheckpointError, match=r"SFT: 1 missing.*up_blocks\.1\.resnets\.1\.spade"):
        split_stablesr_checkpoint(dropped, encoder, unet)
    with pytest.raises(StableSRCheckpointError, match="no StableSR stage-1 weights"):
        split_stablesr_checkpoint({"decoder.conv_in.weight": torch.zeros(1)}, encoder, unet)
    wider = TimeAwareEncoder(**{**tiny_stablesr_encoder_config(), "model_channels": 32})
    with pytest.raises(StableSRCheckpointError, match="wrong shape"):
        split_stablesr_checkpoint(official, wider, unet)
