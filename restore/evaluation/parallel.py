"""Processes for evaluation: a Lightning Fabric built from the ``trainer`` config, and exact gathers.

Evaluation uses the same ``trainer=`` group as training (``trainer=ddp trainer.devices=8``, ``trainer=cpu``,
``trainer=ddp_sim`` for two CPU processes), so one flag means the same on both sides. Only the fields
that matter for inference are read; Fabric launches the processes (spawn or re-run of the script, the
latter also under SLURM/torchrun) and sets each rank's device.

:func:`single_process` makes one process act as a world of one although a process group is up: ``train.py
evaluate=...`` evaluates on global rank 0 alone after a DDP fit, while the other ranks never join a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.strategies import SingleDeviceStrategy

__all__ = [
    "barrier",
    "fabric_from_trainer_config",
    "gather_objects",
    "local_fabric",
    "single_process",
    "world",
]

log = logging.getLogger(__name__)

#: Sharded-training strategies have nothing to shard at inference: each rank holds the whole model.
_INFERENCE_STRATEGY = {"fsdp": "ddp", "deepspeed": "ddp"}


def fabric_from_trainer_config(trainer: Mapping[str, Any] | None) -> Fabric:
    """``Fabric(accelerator, devices, num_nodes, strategy, precision)`` taken from a trainer config node."""
    trainer = dict(trainer or {})
    strategy = trainer.get("strategy") or "auto"
    if not isinstance(strategy, str):  # an instantiated/structured strategy: keep the launcher simple
        strategy = "ddp"
    if strategy.split("_")[0] in _INFERENCE_STRATEGY:
        log.info(f"trainer.strategy={strategy}: evaluation runs plain DDP (one full model per rank)")
        strategy = _INFERENCE_STRATEGY[strategy.split("_")[0]]
    return Fabric(
        accelerator=trainer.get("accelerator", "auto"),
        devices=trainer.get("devices", 1),
        num_nodes=int(trainer.get("num_nodes", 1)),
        strategy=strategy,
        precision=trainer.get("precision", "32-true"),
    )


def local_fabric(device: torch.device, precision: str | int = "32-true") -> Fabric:
    """A Fabric for one process on ``device``, blind to the cluster it runs in.

    Its own cluster environment keeps Fabric from reading SLURM/torchrun variables, which describe the
    training job's world (and would be refused as not matching one device). Not launched: the evaluation
    runner only uses its ``device`` and ``autocast()``.
    """
    accelerator = "cuda" if device.type == "cuda" else device.type
    return Fabric(
        accelerator=accelerator,
        strategy=SingleDeviceStrategy(device=device),
        precision=precision,
        plugins=[LightningEnvironment()],
    )


_single_process = False


@contextmanager
def single_process() -> Iterator[None]:
    """Inside: :func:`world` is (0, 1) and :func:`barrier` / :func:`gather_objects` touch no process group."""
    global _single_process
    previous, _single_process = _single_process, True
    try:
        yield
    finally:
        _single_process = previous


def _distributed() -> bool:
    return not _single_process and dist.is_available() and dist.is_initialized()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group). Exact: objects are pickled."""
    if not _distributed() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one (or inside :func:`single_process`)."""
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()
