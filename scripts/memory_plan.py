"""Print the training memory of a config before submitting it: weights, gradients and optimizer state per part.

    python scripts/memory_plan.py experiment=seesr
    python scripts/memory_plan.py experiment=seesr trainer.precision=bf16-mixed method.frozen_dtype=bf16 \
        method.optimizer._target_=bitsandbytes.optim.AdamW8bit

Builds the method on the meta device (full-size structures, no weights, no memory; configs/memory_plan.yaml
names the stand-ins of weight-loading parts) and prints :func:`restore.methods.memory_plan.format_plan`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plan_text(cfg: DictConfig) -> str:
    """The plan of a composed ``configs/memory_plan.yaml`` (HydraConfig set, for the config choices)."""
    from hydra.core.hydra_config import HydraConfig

    from restore.methods.memory_plan import (
        apply_frozen_dtype,
        build_on_meta,
        format_plan,
        meta_method_config,
        plan_parts,
    )

    choices = dict(HydraConfig.get().runtime.choices)
    method_cfg = meta_method_config(cfg.method, choices, cfg.plan.meta_parts, cfg.plan.drop)
    module, on_meta = build_on_meta(method_cfg)
    precision = str(cfg.trainer.precision)
    apply_frozen_dtype(module, cfg.method.get("frozen_dtype"), precision)
    optimizer = cfg.method.get("optimizer")
    target = None if optimizer is None else str(optimizer["_target_"])
    parts = plan_parts(module, precision, target)
    title = (
        f"memory plan: experiment={choices.get('experiment')} method={choices.get('method')} "
        f"precision={precision} frozen_dtype={cfg.method.get('frozen_dtype')} optimizer={target} "
        f"batch/GPU={cfg.data.get('batch_size')} "
        f"({'meta-device build: structure only' if on_meta else 'built on the CPU (small model)'})"
    )
    return format_plan(title, parts, list(cfg.plan.budgets_gb), float(cfg.plan.overhead_gb))


@hydra.main(version_base="1.3", config_path="../configs", config_name="memory_plan")
def main(cfg: DictConfig) -> None:
    print(plan_text(cfg))


if __name__ == "__main__":
    main()
