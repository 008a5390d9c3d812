"""The training memory/speed switches (docs/training_memory.md) leave the loss what it was.

Each switch is compared with the same tiny SeeSR (experiment=seesr_tiny's method: ControlNet + RCA + frozen
DAPE on the tiny SD prior) computing the loss of one training step on the same batch with the same draws.
Attention: every diffusers attention runs SDPA (``AttnProcessor2_0``), every text encoder ``sdpa``, and the
hand-written attentions equal an explicit softmax.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from hydra_helpers import compose_config
from tiny_training import EmbeddedPairs, fit_on_cpu
from torch import nn
from torch.utils.data import DataLoader

from restore.methods import latent_diffusion
from restore.methods.rank_generator import RankGenerator
from restore.methods.training_memory import parse_frozen_dtype
from restore.models.seesr import RCA_ATTR


def _seesr(tmp_path: Path, *overrides: str) -> L.LightningModule:
    cfg = compose_config("train", ["experiment=seesr_tiny", *overrides], tmp_path)
    torch.manual_seed(0)
    return instantiate(cfg.method)


def _batch() -> dict:
    data = EmbeddedPairs(size=64, prompts=True)
    return next(iter(DataLoader(data, batch_size=2)))


def _step_loss(module: L.LightningModule) -> torch.Tensor:
    """``training_step``'s loss on the fixed batch with the draws of a fresh generator (seed 0), outside a
    Trainer (no logging; the NaN guard, which asks the Trainer, is not under test here)."""
    module.generator = RankGenerator(0)
    module.log = lambda *args, **kwargs: None
    batch = module.on_after_batch_transfer(_batch(), 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latent_diffusion, "skip_nonfinite_loss", lambda *args: False)
        return module.training_step(batch, 0)


def _loss(module: L.LightningModule, autocast: torch.dtype | None = None) -> torch.Tensor:
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        return _step_loss(module).detach().float()


# ---------------------------------------------------------------------------------------------- frozen_dtype
def test_frozen_dtype_names() -> None:
    assert parse_frozen_dtype("bf16") is torch.bfloat16 and parse_frozen_dtype("fp16") is torch.float16
    assert parse_frozen_dtype(None) is None and parse_frozen_dtype("fp32") is None
    with pytest.raises(ValueError, match="bf16, fp16 or null"):
        parse_frozen_dtype("int8")


def test_frozen_prior_is_bf16_and_trainables_stay_fp32_after_fitting(tmp_path: Path) -> None:
    module = _seesr(tmp_path, "method.frozen_dtype=bf16")
    before = {n: p.detach().clone() for n, p in module.trainable.named_parameters()}
    trainer = fit_on_cpu(
        module, tmp_path, steps=1, data=EmbeddedPairs(size=64, prompts=True), precision="bf16-mixed"
    )
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    prior_frozen = [n for n in dtypes if n.startswith("prior.") and f".{RCA_ATTR}." not in n]
    assert prior_frozen and all(dtypes[n] == torch.bfloat16 for n in prior_frozen)  # VAE, CLIP, UNet base
    assert {n.split(".")[1] for n in prior_frozen} == {"vae", "unet", "text_encoder"}
    trainable = [n for n in dtypes if n.startswith("trainable.") or f".{RCA_ATTR}." in n]
    assert trainable and all(dtypes[n] == torch.float32 for n in trainable)  # fp32 masters
    assert all(p.dtype == torch.float32 for p in module.dape.parameters())  # other frozen nets untouched
    optimizer = trainer.optimizers[0]
    states = [s for s in optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    changed = [n for n, p in module.trainable.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the fp32 trainables did not train"


def test_frozen_dtype_needs_autocast(tmp_path: Path) -> None:
    module = _seesr(tmp_path, "method.frozen_dtype=bf16")
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", precision="32-true", logger=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=r"trainer.precision=bf16-mixed"):
        trainer.fit(module, DataLoader(EmbeddedPairs(size=64, prompts=True), batch_size=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_frozen_prior_loss_equals_the_fp32_frozen_prior_under_autocast(tmp_path: Path, dtype) -> None:
    # Under autocast every conv/linear/matmul already runs in `dtype` with the weights cast on the fly, so
    # storing them in `dtype` changes only the ops autocast keeps in fp32 (norm affine weights, embeddings,
    # residual adds of the frozen UNet): differences of the order of `dtype`'s rounding (bf16: 2^-8 ~ 4e-3
    # relative, fp16: 2^-11), far below the step-to-step loss noise (the timestep draw alone moves it ~x2).
    reference = _seesr(tmp_path)
    half = _seesr(tmp_path)
    assert half.cast_frozen_prior(dtype) > 0
    expected, got = _loss(reference, dtype), _loss(half, dtype)
    rtol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)


def test_checkpoint_loads_into_the_cast_module_unchanged(tmp_path: Path) -> None:
    # The cast runs before Lightning restores a checkpoint; checkpoints hold only trainable keys (fp32).
    trained = _seesr(tmp_path)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.01)
    state = trained.state_dict()
    module = _seesr(tmp_path)
    module.cast_frozen_prior(torch.bfloat16)
    module.load_state_dict(state)
    for name, value in module.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[name]), name


# ---------------------------------------------------------------------------------------------- 8-bit AdamW
def test_8bit_adamw_is_a_config_switch_and_steps_like_adamw(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    target = "method.optimizer._target_=bitsandbytes.optim.AdamW8bit"
    module8, module32 = _seesr(tmp_path, target), _seesr(tmp_path)
    opt8 = module8.configure_optimizers()["optimizer"]
    opt32 = module32.configure_optimizers()["optimizer"]
    assert isinstance(opt8, bnb.optim.AdamW8bit) and opt8.defaults["lr"] == opt32.defaults["lr"]
    for module, opt in ((module8, opt8), (module32, opt32)):
        opt.param_groups[0]["lr"] = 1e-3  # a visible step
        _step_loss(module).backward()
        opt.step()
    # bitsandbytes keeps 8-bit blockwise-quantised moments for tensors of >= 4096 elements (min_8bit_size)
    big = [p for p in module8.trainable_parameters() if p.numel() >= 4096]
    assert big and all(opt8.state[p]["state1"].dtype == torch.uint8 for p in big)
    # Adam's first step is lr * g / (|g| + eps) per element: quantising the moments to 8 bits (dynamic map,
    # blocks of 256) changes it by far less than the step itself. Compare the updates of the big tensors.
    p8 = dict(module8.named_parameters())
    p32 = dict(module32.named_parameters())
    ref = _seesr(tmp_path)
    for name, p in ref.named_parameters():
        if p8[name].numel() < 4096 or not p8[name].requires_grad:
            continue
        d8, d32 = p8[name].detach() - p, p32[name].detach() - p
        if d32.abs().max() == 0:
            continue
        rel = (d8 - d32).norm() / d32.norm()
        assert rel < 0.1, (name, float(rel))


# ---------------------------------------------------------------------------------------------- channels_last
def test_channels_last_loss_equals_the_contiguous_loss(tmp_path: Path) -> None:
    # Same maths, other memory layout: oneDNN may pick another convolution algorithm / summation order, so
    # the fp32 results agree to float32 rounding accumulated over the network (~1e-6 relative), not bitwise.
    module = _seesr(tmp_path, "method.channels_last=true")
    conv = module.prior.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(_loss(module), _loss(_seesr(tmp_path)), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- compile
@pytest.mark.slow  # ~55 s on the 2-core CPU: dynamo traces the whole UNet forward and backward
def test_compiled_denoiser_loss_equals_the_eager_loss(tmp_path: Path) -> None:
    # `aot_eager` captures the denoiser's forward and backward graphs through dynamo + AOTAutograd (what
    # inductor compiles) and runs them with PyTorch's kernels: the graph capture is what can change results
    # (graph breaks, guards, decompositions), so the loss must agree to float32 rounding (decompositions may
    # reorder sums). Inductor's C++ code generation takes minutes on a 2-core CPU; the GPU benchmark runs it.
    torch._dynamo.reset()
    module = _seesr(tmp_path, "method.compile_denoiser=aot_eager")
    assert module.prior.unet._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in module.state_dict())  # checkpoint keys unchanged
    compiled = _step_loss(module)
    eager = _step_loss(_seesr(tmp_path))
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=1e-5, atol=0)
    compiled.backward()  # the compiled backward runs and reaches the trainable ControlNet
    assert module.controlnet.conv_in.weight.grad is not None
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- SDPA
@pytest.mark.parametrize(
    "experiment", ["seesr_tiny", "xpsr_tiny", "dreamclear_tiny", "stablesr_tiny", "supir_tiny"]
)
def test_every_attention_runs_sdpa(tmp_path: Path, experiment: str) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    module = instantiate(compose_config("train", [f"experiment={experiment}"], tmp_path).method)
    processors = collections.Counter(
        type(m.processor).__name__ for m in module.modules() if isinstance(m, Attention)
    )
    assert processors and set(processors) <= {AttnProcessor2_0.__name__}, processors
    text = [
        m.config._attn_implementation
        for m in module.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]
    assert text and set(text) == {"sdpa"}


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias=None) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def _explicit(module: nn.Module, monkeypatch: pytest.MonkeyPatch, *args) -> torch.Tensor:
    import torch.nn.functional as F

    def explicit(q, k, v, attn_mask=None, dropout_p=0.0, **_):
        return _softmax_attention(q, k, v, attn_mask)

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", explicit)
        return module(*args)


def test_stablesr_spatial_attention_equals_explicit_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    from restore.models.stablesr import SpatialSelfAttention

    torch.manual_seed(0)
    block = SpatialSelfAttention(64, num_heads=4)
    nn.init.normal_(block.proj_out.weight, std=0.1)  # zero-init would hide the attention output
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(block(x), _explicit(block, monkeypatch, x), rtol=1e-5, atol=1e-5)


def test_dreamclear_cross_attention_equals_explicit_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    from restore.models.dreamclear import DegradationCrossAttention

    torch.manual_seed(0)
    block = DegradationCrossAttention(32, 4)
    nn.init.normal_(block.proj.weight, std=0.1)
    lq, ref = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    for got, want in zip(block(lq, ref), _explicit(block, monkeypatch, lq, ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ram_window_attention_equals_explicit_softmax_with_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    from restore.models.ram.ram import build_ram

    torch.manual_seed(0)
    ram = build_ram("tiny", tag_list=[f"t{i}" for i in range(8)]).eval()
    x = ram.preprocess(torch.rand(1, 3, ram.image_size, ram.image_size))
    with torch.no_grad():
        torch.testing.assert_close(
            ram.image_embeds(x), _explicit(ram.image_embeds, monkeypatch, x), rtol=1e-4, atol=1e-5
        )
