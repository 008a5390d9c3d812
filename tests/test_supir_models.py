"""SUPIR's connectors (restore.models.supir) against the official code.

Fixture ``tests/fixtures/supir_connectors_official_tiny.npz`` was made outside this repository from
Fanghua-Yu/SUPIR (``SUPIR/modules/SUPIR_v0.py`` with the repository's ``sgm`` package) on CPU in float32: an sgm
``UNetModel`` shaped like SDXL but narrow (model_channels 64, channel_mult (1, 2, 4), 2 ResBlocks per level,
attention at rates 2 and 4 with 16-channel heads and depth 1, context 32, ``adm_in_channels`` 80 = 32 pooled + 6
time ids x 8) carrying ``LightGLVUNet``'s ``project_modules`` built by its own construction with the XL-base
lists scaled from 320 to 64 (ZeroCrossAttn inserted at 6 then 3), run through ``LightGLVUNet.forward`` at
control_scale 1, 0.5 and 0. No weights are stored: every tensor (prefix ``model.diffusion_model.``), in sorted
key order, was drawn from one ``torch.Generator`` seeded 1 (:func:`_official_weights` repeats it); the inputs
(seed 2), the 10 control tensors and the outputs are. ``supir_connectors_official_keys.tsv``: the full-size
official ``project_modules`` keys and shapes (``options/SUPIR_v0.yaml``, built on the meta device).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from restore.models.priors import sdxl_base_prior
from restore.models.supir import (
    GLVControl,
    MissingControlError,
    ZeroCrossAttn,
    ZeroSFT,
    add_connectors,
    connector_plan,
    connector_state_dict,
    control_features,
    denoise_encoder_ours_to_official,
    glv_official_to_ours,
    glv_ours_to_official,
    official_to_ours,
    ours_to_official,
    split_supir_checkpoint,
)
from tests.official_fixtures import parse_key_list, seeded_official_weights

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = np.load(FIXTURES / "supir_connectors_official_tiny.npz")

# The diffusers form of the official tiny UNet (SDXL's layout: attention_head_dim = heads per level).
TINY_SDXL = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (64, 128, 256),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 1),
    "cross_attention_dim": 32,
    "attention_head_dim": (4, 8, 16),
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}


def _official_weights() -> dict[str, torch.Tensor]:
    return seeded_official_weights(parse_key_list(str(OFFICIAL["keys"])), seed=1)


def _tiny_unet() -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**TINY_SDXL).eval()
    add_connectors(unet)
    official = _official_weights()
    frozen = {k: v for k, v in official.items() if ".project_modules." not in k}
    state = {**convert_ldm_unet_checkpoint(frozen, unet.config), **official_to_ours(official)}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return unet


def _call(unet: UNet2DConditionModel, scale: float) -> torch.Tensor:
    control = [torch.from_numpy(OFFICIAL[f"control/{i}"]) for i in range(10)]
    added = {
        "text_embeds": torch.from_numpy(OFFICIAL["pooled"]),
        "time_ids": torch.from_numpy(OFFICIAL["time_ids"]),
    }
    with torch.no_grad(), control_features(unet, control, scale):
        return unet(
            torch.from_numpy(OFFICIAL["x"]),
            torch.from_numpy(OFFICIAL["t"]),
            torch.from_numpy(OFFICIAL["context"]),
            added_cond_kwargs=added,
        ).sample


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_connectors_equal_the_official_lightglvunet(scale: float) -> None:
    unet = _tiny_unet()
    expected = torch.from_numpy(OFFICIAL[f"eps/{scale}"])
    torch.testing.assert_close(_call(unet, scale), expected, atol=5e-5, rtol=1e-5)


def test_scale_zero_is_the_plain_unet_and_control_is_required() -> None:
    unet = _tiny_unet()
    plain = UNet2DConditionModel(**TINY_SDXL).eval()
    plain.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if not k.startswith("project_modules.")}
    )
    added = {
        "text_embeds": torch.from_numpy(OFFICIAL["pooled"]),
        "time_ids": torch.from_numpy(OFFICIAL["time_ids"]),
    }
    args = (
        torch.from_numpy(OFFICIAL["x"]),
        torch.from_numpy(OFFICIAL["t"]),
        torch.from_numpy(OFFICIAL["context"]),
    )
    with torch.no_grad():
        reference = plain(*args, added_cond_kwargs=added).sample
    torch.testing.assert_close(_call(unet, 0.0), reference, atol=1e-6, rtol=0)
    with pytest.raises(MissingControlError, match="control_features"):
        unet(*args, added_cond_kwargs=added)
    with pytest.raises(ValueError, match="already has"):
        add_connectors(unet)


def test_full_size_connectors_are_the_official_ones() -> None:
    with torch.device("meta"):
        unet = sdxl_base_prior(device="meta").unet
    add_connectors(unet)
    plan = connector_plan(unet)
    assert [p.kind for p in plan].count("upsample") == 2 and len(plan) == 12
    assert [type(m).__name__ for m in unet.project_modules] == ["ZeroSFT"] * 3 + ["ZeroCrossAttn"] + [
        "ZeroSFT"
    ] * 3 + ["ZeroCrossAttn"] + ["ZeroSFT"] * 4
    state = connector_state_dict(unet)
    assert sum(v.numel() for v in state.values()) == 54_797_440 and len(state) == 118
    expected = list(parse_key_list((FIXTURES / "supir_connectors_official_keys.tsv").read_text()).items())
    assert [(k, tuple(v.shape)) for k, v in ours_to_official(state).items()] == expected


def test_fresh_modules_are_zero_initialised_where_upstream_is() -> None:
    sft, attn = ZeroSFT(8, 32, 32), ZeroCrossAttn(32, 64)
    assert all(float(p.abs().sum()) == 0 for n, p in sft.named_parameters() if n.startswith("zero_"))
    assert float(attn.attn.to_out[0].weight.abs().sum()) > 0  # not zero-init (commented out upstream)
    c, skip, dec = torch.randn(1, 8, 4, 4), torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4)
    out = sft(c, skip, dec, 1.0)
    torch.testing.assert_close(out, sft.param_free_norm(torch.cat([dec, skip], 1)))  # GN(x), not x, at init


# ------------------------------------------------------------------------------------------------ adaptor
def _official_glv_weights() -> dict[str, torch.Tensor]:
    return seeded_official_weights(parse_key_list(str(OFFICIAL["glv_keys"])), seed=3)


def test_adaptor_equals_the_official_glvcontrol() -> None:
    control = GLVControl(UNet2DConditionModel(**TINY_SDXL)).eval()
    official = _official_glv_weights()
    control.load_state_dict(
        glv_official_to_ours({**official, "model.control_model.mask_LQ": torch.zeros(1)}, control)
    )
    added = {
        "text_embeds": torch.from_numpy(OFFICIAL["pooled"]),
        "time_ids": torch.from_numpy(OFFICIAL["time_ids"]),
    }
    with torch.no_grad():
        hidden = control(
            torch.from_numpy(OFFICIAL["lq"]),
            torch.from_numpy(OFFICIAL["t"]),
            torch.from_numpy(OFFICIAL["x"]),
            torch.from_numpy(OFFICIAL["context"]),
            added,
        )
    assert len(hidden) == 10
    for i, h in enumerate(hidden):
        torch.testing.assert_close(h, torch.from_numpy(OFFICIAL[f"glv/{i}"]), atol=5e-5, rtol=1e-5)
    # our names agree with diffusers' own LDM converter, and the conversion round-trips
    renamed = {k.replace("model.control_model.", "model.diffusion_model."): v for k, v in official.items()}
    by_diffusers = convert_ldm_unet_checkpoint(renamed, UNet2DConditionModel(**TINY_SDXL).config)
    ours = glv_official_to_ours(official, control)
    assert all(torch.equal(ours[k], v) for k, v in by_diffusers.items())
    assert glv_ours_to_official(ours).keys() == official.keys()
    dropped = {k: v for k, v in official.items() if not k.endswith("input_hint_block.0.bias")}
    with pytest.raises(KeyError, match="1 missing"):
        glv_official_to_ours(dropped, control)


def test_full_size_adaptor_is_the_released_one() -> None:
    with torch.device("meta"):
        control = GLVControl(sdxl_base_prior(device="meta").unet)
    assert sum(p.numel() for p in control.parameters()) == 1_243_378_880
    expected = parse_key_list((FIXTURES / "supir_glvcontrol_official_keys.tsv").read_text())
    ours = {k: tuple(v.shape) for k, v in glv_ours_to_official(control.state_dict()).items()}
    assert ours == expected and len(ours) == 810


def test_released_layout_splits_into_the_trained_parts() -> None:
    """A generated tiny checkpoint in the SUPIR-v0Q layout: adaptor, connectors and degradation-robust encoder
    load with zero missing / unexpected keys; the frozen SDXL keys in the file are left alone."""
    import copy

    from restore.models.priors.sd import tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL).eval()
    control = GLVControl(unet)
    add_connectors(unet)
    vae = tiny_vae()
    denoise_encoder = copy.deepcopy(vae.encoder)
    for module in (control, unet.project_modules, denoise_encoder):
        for p in module.parameters():
            p.data.normal_()
    state = {
        **glv_ours_to_official(control.state_dict()),
        **ours_to_official(connector_state_dict(unet)),
        **denoise_encoder_ours_to_official(denoise_encoder.state_dict(), vae),
        "model.control_model.mask_LQ": torch.zeros(1, 4, 64, 64),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),  # frozen SDXL: not ours to load
        "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
    }
    assert any(k.startswith("first_stage_model.denoise_encoder.down.0.block.0.") for k in state)
    glv, connectors, encoder = split_supir_checkpoint(
        {"state_dict": state}, control, unet, denoise_encoder, vae
    )
    assert all(torch.equal(glv[k], v) for k, v in control.state_dict().items())
    assert all(torch.equal(connectors[k], v) for k, v in connector_state_dict(unet).items())
    assert all(torch.equal(encoder[k], v) for k, v in denoise_encoder.state_dict().items())
    del state["model.diffusion_model.project_modules.11.zero_add.bias"]
    with pytest.raises(KeyError, match="connectors: 1 missing"):
        split_supir_checkpoint(state, control, unet, denoise_encoder, vae)
