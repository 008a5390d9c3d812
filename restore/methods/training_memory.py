"""Memory and speed switches of diffusion-prior training: the frozen prior in half precision, channels-last
convolutions and a compiled denoiser.

The frozen prior holds most of the weights (SeeSR: 1.29B frozen vs 0.75B trainable parameters) but needs no
gradients and no fp32 master copy: under mixed precision its matrix products already run in bf16/fp16, so
storing it in that dtype changes only the few ops autocast keeps in fp32 (norms, embeddings) and halves its
memory. The trainable modules keep fp32 master weights (Micikevicius et al., "Mixed Precision Training", ICLR
2018, Sec. 3.1). Channels-last and ``torch.compile`` change the memory layout and the kernels, not the maths.
How to use them: ``docs/training_memory.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "FROZEN_DTYPES",
    "cast_parameters",
    "check_mixed_precision",
    "compile_in_place",
    "parse_frozen_dtype",
    "to_channels_last",
]

#: accepted ``frozen_dtype`` names
FROZEN_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_frozen_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype named by a ``frozen_dtype`` setting (``bf16`` / ``fp16`` / ``None`` = keep fp32)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key in ("null", "none", "fp32", "float32"):
        return None
    if key not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be one of bf16, fp16 or null (keep fp32), got {name!r}")
    return FROZEN_DTYPES[key]


def cast_parameters(
    module: nn.Module, dtype: torch.dtype, select: Callable[[str], bool] = lambda name: True
) -> int:
    """Cast the floating-point parameters of ``module`` whose name ``select`` accepts to ``dtype`` in place
    (the ``Parameter`` objects stay, so references held elsewhere stay valid); returns how many were cast.
    Buffers keep their dtype (schedules, position ids)."""
    count = 0
    for name, param in module.named_parameters():
        if param.is_floating_point() and param.dtype != dtype and select(name):
            param.data = param.data.to(dtype)
            count += 1
    return count


def check_mixed_precision(precision: str | int | None, dtype: torch.dtype) -> None:
    """Refuse a half-precision frozen prior outside autocast: fp32 activations would meet bf16/fp16 weights."""
    text = str(precision)
    if not text.endswith("-mixed"):
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        raise ValueError(
            f"frozen_dtype={name} runs the frozen prior inside autocast, but trainer.precision={text!r} does not "
            f"autocast. Fix: trainer.precision={'bf16' if name == 'bf16' else '16'}-mixed, or "
            "method.frozen_dtype=null"
        )


def to_channels_last(modules: Iterable[nn.Module]) -> None:
    """Store the 4-d (convolution) weights of ``modules`` channels-last: cuDNN's tensor-core convolutions work
    in NHWC, so a contiguous NCHW weight costs a layout transform per call (PyTorch tutorial "Channels Last
    Memory Format")."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_in_place(module: nn.Module, backend: bool | str = True) -> nn.Module:
    """``torch.compile`` the forward of ``module`` in place (``nn.Module.compile``): unlike ``torch.compile(m)``
    the parameter names stay (no ``_orig_mod.`` prefix), so checkpoints and key filters are unchanged.
    ``backend``: ``True`` = inductor (generated kernels), or a ``torch._dynamo`` backend name (e.g.
    ``aot_eager``: the captured forward/backward graphs run eagerly, no code generation)."""
    module.compile(backend="inductor" if backend is True else str(backend))
    return module
