"""SeeSR UNet / ControlNet with RCA (restore/models/seesr.py) against the official networks (cswry/SeeSR).

Full size on the meta device: keys, shapes, order and parameter counts equal the official ones (the spec's TSV
lists when present next to the checkout; the counts are asserted either way). Tiny models on CPU: the hooks
run RCA in the official order, as a residual branch, with the RAM tokens from the context.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from restore.models.priors.sd import sd2_base_unet_config, tiny_unet_config
from restore.models.seesr import (
    RCA_ATTR,
    MissingRepresentationTokensError,
    add_representation_cross_attention,
    build_seesr_unet,
    forward_with_representation,
    representation_tokens,
    seesr_controlnet_from_unet,
)

REPO = Path(__file__).resolve().parents[1]
TSV_DIR = REPO.parent / "shared" / "specs" / "seesr_xpsr_statedict"

# The released models' numbers (counted on the official networks).
UNET_TENSORS, UNET_PARAMS, SD2_PARAMS, UNET_RCA_PARAMS = 1102, 1_126_760_324, 865_910_724, 260_849_600
CN_TENSORS, CN_PARAMS, CN_RCA_PARAMS = 522, 489_031_440, 124_803_200
RCA_PARAMS_PER_CHANNELS = {320: 2_382_400, 640: 8_860_800, 1280: 34_105_600}
UNET_RCA_SITES = [
    *(f"down_blocks.{b}.image_attentions.{i}" for b in range(3) for i in range(2)),
    *(f"up_blocks.{b}.image_attentions.{i}" for b in (1, 2, 3) for i in range(3)),
    "mid_block.image_attentions.0",
]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _read_tsv(name: str) -> list[tuple[str, str]]:
    path = TSV_DIR / f"seesr_{name}.tsv"
    if not path.is_file():
        pytest.skip(f"spec key list {path} not present")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#")
    return [tuple(line.split("\t")) for line in lines[1:]]  # type: ignore[misc]


def _key_shapes(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(k, "x".join(str(d) for d in v.shape)) for k, v in model.state_dict().items()]


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- full size, meta device


@pytest.fixture(scope="module")
def meta_unet() -> UNet2DConditionModel:
    return build_seesr_unet(device="meta")


@pytest.fixture(scope="module")
def meta_controlnet(meta_unet):
    return seesr_controlnet_from_unet(meta_unet)


def test_full_unet_parameter_counts(meta_unet) -> None:
    sd = meta_unet.state_dict()
    assert len(sd) == UNET_TENSORS
    assert _numel(meta_unet) == UNET_PARAMS
    rca_keys = [k for k in sd if f".{RCA_ATTR}." in k]
    assert len(rca_keys) == 416
    assert sum(sd[k].numel() for k in rca_keys) == UNET_RCA_PARAMS == UNET_PARAMS - SD2_PARAMS
    sites = sorted({re.sub(r"\.image_attentions\.(\d+)\..*", r".image_attentions.\1", k) for k in rca_keys})
    assert sites == sorted(UNET_RCA_SITES)
    for name, channels in [("down_blocks.0", 320), ("down_blocks.1", 640), ("down_blocks.2", 1280)]:
        block = meta_unet.get_submodule(name)
        assert _numel(block.image_attentions[0]) == RCA_PARAMS_PER_CHANNELS[channels]
    for name, channels in [("up_blocks.1", 1280), ("up_blocks.2", 640), ("up_blocks.3", 320)]:
        assert all(
            _numel(m) == RCA_PARAMS_PER_CHANNELS[channels]
            for m in meta_unet.get_submodule(name).image_attentions
        )
    assert _numel(meta_unet.mid_block.image_attentions[0]) == RCA_PARAMS_PER_CHANNELS[1280]
    # the base (non-RCA) model is SD-2-base, and the flag is in the config for rebuilding
    with torch.device("meta"):
        plain = UNet2DConditionModel(**sd2_base_unet_config())
    assert _numel(plain) == SD2_PARAMS
    assert meta_unet.config.use_image_cross_attention is True
    assert sd["up_blocks.2.image_attentions.1.transformer_blocks.0.attn2.to_k.weight"].shape == (640, 512)


def test_full_controlnet_parameter_counts(meta_controlnet) -> None:
    sd = meta_controlnet.state_dict()
    assert len(sd) == CN_TENSORS
    assert _numel(meta_controlnet) == CN_PARAMS
    rca_keys = [k for k in sd if f".{RCA_ATTR}." in k]
    assert len(rca_keys) == 7 * 26
    assert sum(sd[k].numel() for k in rca_keys) == CN_RCA_PARAMS
    assert meta_controlnet.config.use_image_cross_attention is True


@pytest.mark.parametrize("part", ["unet", "controlnet"])
def test_full_state_dict_equals_official_key_list(part, meta_unet, meta_controlnet) -> None:
    expected = _read_tsv(part)
    actual = _key_shapes(meta_unet if part == "unet" else meta_controlnet)
    exp, act = dict(expected), dict(actual)
    assert sorted(exp.keys() - act.keys()) == []  # missing
    assert sorted(act.keys() - exp.keys()) == []  # unexpected
    assert {k: v for k, v in act.items() if exp[k] != v} == {}
    assert len(actual) == {"unet": UNET_TENSORS, "controlnet": CN_TENSORS}[part]
    assert actual == expected  # same order too (image_attentions registered after resnets, as officially)


# --------------------------------------------------------------------------- tiny models, CPU

TOKENS = 145  # RAM: 1 pooled + 12x12 spatial tokens


def _tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return build_seesr_unet(tiny_unet_config()).eval()


def _inputs(batch: int = 2, seed: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),
    }


def _ram(batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, TOKENS, 512, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(model, tokens, **extra):
    return forward_with_representation(model, **_inputs(), **extra, image_encoder_hidden_states=tokens).sample


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    return _tiny_unet()


def test_tiny_forward_shape_and_tokens_matter(tiny_unet) -> None:
    out = _run(tiny_unet, _ram())
    assert out.shape == (2, 4, 8, 8)
    assert torch.isfinite(out).all()
    other = _run(tiny_unet, _ram(seed=8))
    assert (out - other).abs().max() > 1e-3
    # per-sample: changing only sample 1's tokens leaves sample 0 unchanged
    mixed = torch.cat([_ram()[:1], _ram(seed=8)[1:]])
    out_mixed = _run(tiny_unet, mixed)
    torch.testing.assert_close(out_mixed[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out_mixed[1], other[1], rtol=0, atol=0)


def test_rca_is_residual_branch_equal_to_plain_unet_when_proj_out_is_zero() -> None:
    unet = _tiny_unet()
    plain = UNet2DConditionModel(**tiny_unet_config()).eval()
    base = {k: v for k, v in unet.state_dict().items() if f".{RCA_ATTR}." not in k}
    plain.load_state_dict(base, strict=True)
    with torch.no_grad():
        reference = plain(**_inputs()).sample
    assert (_run(unet, _ram()) - reference).abs().max() > 1e-3  # random (not zero) init acts from the start
    rcas = [m for name, m in unet.named_modules() if re.fullmatch(rf".*\.{RCA_ATTR}\.\d+", name)]
    assert len(rcas) == 4  # down 1 + mid 1 + up 2
    with torch.no_grad():
        for rca in rcas:
            rca.proj_out.weight.zero_()
            rca.proj_out.bias.zero_()
    torch.testing.assert_close(_run(unet, _ram()), reference, rtol=0, atol=0)


def test_missing_tokens_and_bad_tokens_raise(tiny_unet) -> None:
    missing = pytest.raises(MissingRepresentationTokensError, match=r"representation_tokens\(model, tokens\)")
    with missing, torch.no_grad():
        tiny_unet(**_inputs())
    with pytest.raises(ValueError, match="batch 1 but the features have batch 2"):
        _run(tiny_unet, _ram(batch=1))
    with pytest.raises(ValueError, match="width 256, the RCA expects 512"):
        _run(tiny_unet, torch.zeros(2, TOKENS, 256))
    plain = UNet2DConditionModel(**tiny_unet_config())
    with (
        pytest.raises(ValueError, match="no representation cross-attention"),
        representation_tokens(plain, _ram()),
    ):
        pass
    with pytest.raises(ValueError, match="already has representation cross-attention"):
        add_representation_cross_attention(tiny_unet)


def test_context_nests_and_restores(tiny_unet) -> None:
    t1, t2 = _ram(seed=1), _ram(seed=2)
    with torch.no_grad(), representation_tokens(tiny_unet, t1):
        a1 = tiny_unet(**_inputs()).sample
        with representation_tokens(tiny_unet, t2):
            a2 = tiny_unet(**_inputs()).sample
        a1_again = tiny_unet(**_inputs()).sample
    torch.testing.assert_close(a1_again, a1, rtol=0, atol=0)
    torch.testing.assert_close(a2, _run(tiny_unet, t2), rtol=0, atol=0)
    assert (a1 - a2).abs().max() > 1e-3
    # restored on exceptions too, and nothing is left behind after the outermost context
    with pytest.raises(KeyError), representation_tokens(tiny_unet, t1):
        raise KeyError("boom")
    with pytest.raises(MissingRepresentationTokensError), torch.no_grad():
        tiny_unet(**_inputs())


def test_order_resnet_text_attention_then_rca(tiny_unet) -> None:
    """Pre-hooks log when each layer starts; RCA must start right after its text attention, before the next
    resnet/sampler, and receive exactly the text attention's output."""
    pattern = re.compile(
        r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)(resnets|attentions|image_attentions|"
        r"downsamplers|upsamplers)\.\d+"
    )
    log: list[str] = []
    text_out: dict[str, torch.Tensor] = {}
    rca_in: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in tiny_unet.named_modules():
        if not pattern.fullmatch(name):
            continue
        handles.append(module.register_forward_pre_hook(lambda m, args, n=name: log.append(n)))
        if ".attentions." in name:  # prepend: runs before the RCA hook, so it sees the raw text-attn output
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, n=name: text_out.__setitem__(n, out[0]), prepend=True
                )
            )
        if f".{RCA_ATTR}." in name:
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, n=name: rca_in.__setitem__(n.replace(RCA_ATTR, "attentions"), args[0])
                )
            )
    try:
        _run(tiny_unet, _ram())
    finally:
        for h in handles:
            h.remove()
    assert log == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0",
        "down_blocks.0.image_attentions.0",
        "down_blocks.0.downsamplers.0",
        "down_blocks.1.resnets.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0",
        "mid_block.image_attentions.0",
        "mid_block.resnets.1",
        "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.1",
        "up_blocks.0.upsamplers.0",
        "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.image_attentions.0",
        "up_blocks.1.resnets.1",
        "up_blocks.1.attentions.1",
        "up_blocks.1.image_attentions.1",
    ]
    assert sorted(rca_in) == sorted(text_out) and len(rca_in) == 4
    for site, tensor in rca_in.items():
        assert tensor is text_out[site]


# return_dict=True makes diffusers itself build its deprecated Transformer2DModelOutput subclass
@pytest.mark.filterwarnings("ignore:`Transformer2DModelOutput` is deprecated:FutureWarning")
def test_tuple_and_dict_outputs_of_hooked_attention(tiny_unet) -> None:
    attn, rca = tiny_unet.mid_block.attentions[0], tiny_unet.mid_block.image_attentions[0]
    x, text = torch.randn(2, 64, 2, 2), torch.randn(2, 7, 32)
    with torch.no_grad():
        with representation_tokens(tiny_unet, _ram()):
            as_tuple = attn(x, encoder_hidden_states=text, return_dict=False)
            as_dict = attn(x, encoder_hidden_states=text)
        text_only = attn.forward(x, encoder_hidden_states=text, return_dict=False)[0]  # forward() skips hooks
        expected = rca(text_only, encoder_hidden_states=_ram(), return_dict=False)[0]
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(as_dict.sample, expected, rtol=0, atol=0)


def test_state_dict_round_trip_into_fresh_model_and_config_rebuild() -> None:
    source = _tiny_unet(seed=0)
    fresh = build_seesr_unet(dict(source.config)).eval()  # rebuilt from the recorded config
    assert fresh.config.use_image_cross_attention is True and fresh.config.image_cross_attention_dim == 512
    assert _key_shapes(fresh) == _key_shapes(source)
    before = _run(fresh, _ram())
    fresh.load_state_dict(source.state_dict(), strict=True)
    after = _run(fresh, _ram())
    assert (before - after).abs().max() > 1e-3  # the load really changed the weights
    torch.testing.assert_close(after, _run(source, _ram()), rtol=0, atol=0)


def test_deepcopy_runs_its_own_rca_weights() -> None:
    unet = _tiny_unet()
    reference = _run(unet, _ram())
    clone = copy.deepcopy(unet)
    with torch.no_grad():
        clone.mid_block.image_attentions[0].proj_out.weight.add_(0.5)
    assert (_run(clone, _ram()) - reference).abs().max() > 1e-3
    torch.testing.assert_close(_run(unet, _ram()), reference, rtol=0, atol=0)


def test_gradient_checkpointing_backward_outside_the_context() -> None:
    grads = []
    for checkpointing in (False, True):
        unet = _tiny_unet().train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
            assert unet.mid_block.image_attentions[0].gradient_checkpointing
        with representation_tokens(unet, _ram()):
            loss = unet(**_inputs()).sample.square().mean()
        loss.backward()  # recomputation (if any) must not need the tokens context
        grads.append({n: p.grad for n, p in unet.named_parameters() if f".{RCA_ATTR}." in n})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
    # RCA attached after enable_gradient_checkpointing() inherits it from its text attention
    plain = UNet2DConditionModel(**tiny_unet_config())
    plain.enable_gradient_checkpointing()
    add_representation_cross_attention(plain)
    assert all(m.gradient_checkpointing for m in plain.up_blocks[1].image_attentions)


@pytest.fixture(scope="module")
def tiny_pair():
    unet = _tiny_unet(seed=3)
    torch.manual_seed(4)
    return unet, seesr_controlnet_from_unet(unet).eval()


def test_controlnet_rca_starts_identical_to_unet_rca(tiny_pair) -> None:
    unet, controlnet = tiny_pair
    unet_sd, cn_sd = unet.state_dict(), controlnet.state_dict()
    rca = [k for k in cn_sd if f".{RCA_ATTR}." in k]
    assert len(rca) == 2 * 26  # down_blocks.0 x1 + mid_block x1
    copied = [
        k for k in cn_sd if k.split(".")[0] in {"conv_in", "time_embedding", "down_blocks", "mid_block"}
    ]
    assert set(rca) <= set(copied)
    for key in copied:
        assert torch.equal(cn_sd[key], unet_sd[key]), key
    assert controlnet.config.use_image_cross_attention is True
    assert controlnet.down_blocks[0].image_attentions[0] is not unet.down_blocks[0].image_attentions[0]


def test_controlnet_residuals_zero_at_init_and_rca_needs_tokens(tiny_pair) -> None:
    unet, controlnet = tiny_pair
    cond = torch.rand(2, 3, 64, 64)  # 4 stride-2 stages of the default cond embedding: 8x the latent
    down, mid = forward_with_representation(
        controlnet, **_inputs(), controlnet_cond=cond, return_dict=False, image_encoder_hidden_states=_ram()
    )
    assert [tuple(r.shape) for r in down] == [(2, 32, 8, 8), (2, 32, 8, 8), (2, 32, 4, 4), (2, 64, 4, 4)]
    assert tuple(mid.shape) == (2, 64, 4, 4)
    assert all(torch.count_nonzero(r) == 0 for r in [*down, mid])
    # zero residuals leave the UNet output unchanged
    torch.testing.assert_close(
        _run(unet, _ram(), down_block_additional_residuals=down, mid_block_additional_residual=mid),
        _run(unet, _ram()),
        rtol=0,
        atol=0,
    )
    with pytest.raises(MissingRepresentationTokensError, match="down_blocks.0.attentions.0"), torch.no_grad():
        controlnet(**_inputs(), controlnet_cond=cond)
    # one context can serve both models (SeeSR feeds them the same tokens)
    with torch.no_grad(), representation_tokens((controlnet, unet), _ram()):
        down2, mid2 = controlnet(**_inputs(), controlnet_cond=cond, return_dict=False)
        out = unet(
            **_inputs(), down_block_additional_residuals=down2, mid_block_additional_residual=mid2
        ).sample
    torch.testing.assert_close(out, _run(unet, _ram()), rtol=0, atol=0)


# --------------------------------------------------------------------------- scripts/inspect_model.py


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "inspect_model.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )


def test_inspect_model_script_prints_unet_key_list() -> None:
    result = _inspect("model=seesr", "part=unet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == UNET_TENSORS
    assert lines[0] == "conv_in.weight\t320x4x3x3" and lines[-1] == "conv_out.bias\t4"
    if (TSV_DIR / "seesr_unet.tsv").is_file():
        assert lines == ["\t".join(kv) for kv in _read_tsv("unet")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=seesr", "part=vae"], "unknown part 'vae' for model 'seesr'; options: controlnet, unet"),
        (
            ["model=no_such_model", "part=unet"],
            "unknown model 'no_such_model'; options: dreamclear, pixart_alpha, sd15, sd2_base, sdxl_base, seesr,",
        ),
        (["model=seesr"], "missing argument(s): part"),
        (["seesr", "unet"], "expected arguments model=... part=..."),
    ],
)
def test_inspect_model_script_rejects_bad_arguments(args, message) -> None:
    result = _inspect(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
