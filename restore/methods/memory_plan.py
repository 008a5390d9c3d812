"""The training memory of a method config, counted from a meta-device build: weights, gradients and optimizer
state per part, for the configured precision, ``frozen_dtype`` and optimizer (``scripts/memory_plan.py``).

What is exact: parameter counts and dtypes (the full-size structures of ``restore/models``), gradient bytes
(one per trainable parameter, in its dtype), optimizer state (AdamW: two moments in the parameter dtype;
bitsandbytes' 8-bit AdamW: two uint8 moments + one fp32 absmax per block of 256 and two 256-entry maps for
tensors of >= 4096 elements, fp32 moments below: ``bitsandbytes/optim/optimizer.py``, ``Optimizer8bit``).
What is not counted: activations (they depend on the batch, resolution and checkpointing: measured by
``benchmarks/gpu/run.py``), the CUDA context and allocator slack (a configured margin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from restore.methods.training_memory import check_mixed_precision, parse_frozen_dtype

__all__ = ["PartMemory", "format_plan", "meta_method_config", "optimizer_state_bytes", "plan_parts"]

GB = 1e9
#: bitsandbytes' defaults: tensors below min_8bit_size keep fp32 moments; blockwise quantisation per 256
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP = 256


@dataclass
class PartMemory:
    """Bytes of one part of a module (a prior component, a trainable module, a frozen tagger)."""

    name: str
    trainable: bool
    params: int
    dtype: str
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


def meta_method_config(
    method: DictConfig, choices: Mapping[str, str | None], meta_parts: Mapping[str, Any], drop: Sequence[str]
) -> DictConfig:
    """``method`` with every weight-loading part replaced by its meta-device structure (``meta_parts``: node ->
    {choice or ``inline``: replacement}) and the inference-only parts in ``drop`` removed."""
    cfg = OmegaConf.create(OmegaConf.to_container(method, resolve=True))
    with open_dict(cfg):
        for node in drop:
            if node in cfg:
                cfg[node] = None
        for node, table in meta_parts.items():
            if cfg.get(node) is None:
                continue
            choice = next((c for g, c in choices.items() if g.split("/")[-1].split("@")[-1] == node), None)
            choice = choice or _choice_by_package(choices, node)
            key = choice if choice in table else "inline" if "inline" in table else None
            if key is None:
                continue
            replacement = table[key]
            if replacement is None:
                cfg[node] = None
            elif "_target_" in replacement:
                cfg[node] = replacement
            else:
                cfg[node] = OmegaConf.merge(cfg[node], replacement)
    return cfg


def _choice_by_package(choices: Mapping[str, str | None], node: str) -> str | None:
    # Hydra names a group chosen into another package "method/tagger@dape" -> look for "@<node>"
    for group, choice in choices.items():
        if group.endswith(f"@{node}") or group.endswith(f"@method.{node}"):
            return choice
    return None


def build_on_meta(method: DictConfig) -> tuple[nn.Module, bool]:
    """Instantiate a method config with its parameters on the meta device (structure only, no memory) and
    whether that worked. accelerate's ``init_empty_weights`` puts only parameters there (noise schedules and
    other plain tensors stay computable); parts that copy real data at construction (the tiny test models)
    cannot be built so and are built on the CPU instead (``False``; they are small)."""
    from accelerate import init_empty_weights
    from hydra.errors import InstantiationException

    try:
        with init_empty_weights():
            return instantiate(method), True
    except (InstantiationException, NotImplementedError, RuntimeError):
        return instantiate(method), False


def optimizer_state_bytes(target: str, params: Iterable[nn.Parameter]) -> int:
    """Bytes of the optimizer state of ``params`` for an optimizer class path (Adam/AdamW, 8-bit or not)."""
    name = target.rsplit(".", 1)[-1]
    total = 0
    for p in params:
        n = p.numel()
        if name in ("AdamW8bit", "Adam8bit", "PagedAdamW8bit"):
            if n >= BNB_MIN_8BIT_SIZE:
                total += 2 * n + 2 * math.ceil(n / BNB_BLOCK) * 4 + 2 * BNB_QMAP * 4
            else:
                total += 2 * n * 4
        elif name in ("AdamW", "Adam", "FusedAdam"):
            total += 2 * n * p.element_size()
        else:
            raise ValueError(
                f"no state model for optimizer {target!r}: the plan knows torch.optim.Adam/AdamW and "
                "bitsandbytes.optim.AdamW8bit / Adam8bit. Fix: method.optimizer._target_ to one of them"
            )
    return total


def _part_of(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in ("prior", "trainable") and rest:
        return f"{head}.{rest.split('.', 1)[0]}"
    return head


def plan_parts(module: nn.Module, precision: str, optimizer_target: str | None) -> list[PartMemory]:
    """Per part and role (frozen / trainable): parameters and the bytes of their weights, gradients and
    optimizer state in training with ``precision`` (Lightning's names: ``32-true``, ``bf16-mixed``,
    ``bf16-true``, ...). ``*-true`` half precision stores everything, trainables included, in half."""
    if hasattr(module, "trainable_parameters"):
        trainable_ids = {id(p) for p in module.trainable_parameters()}
    else:
        trainable_ids = {id(p) for p in module.parameters() if p.requires_grad}
    half_true = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(precision))
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        groups.setdefault((_part_of(name), id(p) in trainable_ids), []).append(p)
    parts = []
    for (name, trainable), params in groups.items():
        size = (lambda p: torch.finfo(half_true).bits // 8) if half_true else (lambda p: p.element_size())
        weight = sum(p.numel() * size(p) for p in params)
        dtypes = sorted({str(half_true or p.dtype).removeprefix("torch.") for p in params})
        optimizer = 0
        if trainable and optimizer_target:
            optimizer = optimizer_state_bytes(optimizer_target, params)
            if half_true and not optimizer_target.endswith("8bit"):
                optimizer //= 2  # fp32 estimate above -> the half parameter dtype
        parts.append(
            PartMemory(
                name=name,
                trainable=trainable,
                params=sum(p.numel() for p in params),
                dtype="/".join(dtypes),
                weight_bytes=weight,
                grad_bytes=weight if trainable else 0,
                optimizer_bytes=optimizer,
            )
        )
    return sorted(parts, key=lambda part: (part.trainable, part.name))


def apply_frozen_dtype(module: nn.Module, frozen_dtype: Any, precision: str) -> None:
    """What ``setup("fit")`` does to a method with ``frozen_dtype`` (the plan counts the cast weights)."""
    dtype = parse_frozen_dtype(frozen_dtype)
    if dtype is None or not hasattr(module, "cast_frozen_prior"):
        return
    check_mixed_precision(precision, dtype)
    module.cast_frozen_prior(dtype)


def format_plan(
    title: str,
    parts: Sequence[PartMemory],
    budgets_gb: Sequence[float],
    overhead_gb: float,
) -> str:
    """The plan as a text table, totals and the verdict per GPU memory size."""

    def gb(n: float) -> str:
        return f"{n / GB:8.2f}"

    lines = [
        title,
        f"{'part':<34} {'role':<9} {'params':>14} {'dtype':<14} {'weights GB':>10} {'grads GB':>9} "
        f"{'optim GB':>9} {'total GB':>9}",
    ]
    for p in parts:
        role = "trainable" if p.trainable else "frozen"
        lines.append(
            f"{p.name:<34} {role:<9} {p.params:>14,} {p.dtype:<14} {gb(p.weight_bytes):>10} "
            f"{gb(p.grad_bytes):>9} {gb(p.optimizer_bytes):>9} {gb(p.total_bytes):>9}"
        )
    static = sum(p.total_bytes for p in parts)
    trainable = sum(p.params for p in parts if p.trainable)
    frozen = sum(p.params for p in parts if not p.trainable)
    lines += [
        f"{'total':<34} {'':<9} {trainable + frozen:>14,} {'':<14} "
        f"{gb(sum(p.weight_bytes for p in parts)):>10} {gb(sum(p.grad_bytes for p in parts)):>9} "
        f"{gb(sum(p.optimizer_bytes for p in parts)):>9} {gb(static):>9}",
        f"trainable {trainable:,} / frozen {frozen:,} parameters",
        f"static memory = weights + grads + optimizer state = {static / GB:.2f} GB; + {overhead_gb:.1f} GB margin "
        f"(CUDA context, allocator) = {static / GB + overhead_gb:.2f} GB",
        "activations are NOT counted here (they grow with batch x resolution; checkpointing cuts them): what "
        "remains below is the room for them. benchmarks/gpu/run.py measures the real peak.",
    ]
    for budget in budgets_gb:
        room = budget - static / GB - overhead_gb
        verdict = (
            f"{room:6.2f} GB left for activations" if room > 0 else "does NOT fit even without activations"
        )
        lines.append(f"  {budget:>4g} GB GPU: {verdict}")
    return "\n".join(lines)
