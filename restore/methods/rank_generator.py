"""A per-rank random generator for a LightningModule's training draws, saved in checkpoints.

Every training method draws randomness outside the dataloader (degradations on the device, diffusion noise,
timesteps, prompt dropout). Each rank gets its own stream, seeded from (seed, rank), so ranks never
repeat each other's draws; the states of all ranks are gathered into the checkpoint, so a resumed run
continues the same streams. When the world size or device type changed since the checkpoint, the streams
are reseeded from (seed, rank, step) with a warning: the run goes on, with other draws.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["RankGenerator", "mixed_seed"]


def mixed_seed(*entropy: int) -> int:
    """A well-mixed 63-bit seed from several integers (numpy SeedSequence), e.g. (seed, rank, step)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


class RankGenerator:
    """Lazily created ``torch.Generator`` of this rank; ``state_dict``/``load_state_dict`` for checkpoints."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending: dict[str, Any] | None = None

    def get(self, module: L.LightningModule, device: torch.device) -> torch.Generator:
        """The generator, created on first use on ``device`` (restored from a loaded checkpoint if any)."""
        if self._generator is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(mixed_seed(self.seed, module.global_rank))
            saved, self._pending = self._pending, None
            if saved is not None:
                self._restore(gen, saved, module)
            self._generator = gen
        return self._generator

    def _restore(self, gen: torch.Generator, saved: dict[str, Any], module: L.LightningModule) -> None:
        states, world = saved["states"], module.trainer.world_size
        if saved["device_type"] == gen.device.type and len(states) == world:
            gen.set_state(states[module.global_rank])
            return
        step = module.trainer.global_step
        gen.manual_seed(mixed_seed(self.seed, module.global_rank, step))
        rank_zero_warn(
            f"the checkpoint's generators were saved for {len(states)} rank(s) on '{saved['device_type']}', "
            f"this run has {world} on '{gen.device.type}': reseeded from (seed, rank, step={step}); the "
            "random draws will differ from an uninterrupted run"
        )

    def state_dict(self, module: L.LightningModule) -> dict[str, Any] | None:
        """All ranks' states (every rank must call this: it gathers), or what was loaded if nothing was drawn."""
        if self._generator is None:
            return self._pending
        state = self._generator.get_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            local = state.to(module.device)  # NCCL gathers CUDA tensors only
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            states = [s.cpu() for s in gathered]
        else:
            states = [state]
        return {"seed": self.seed, "device_type": self._generator.device.type, "states": states}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """Keep ``saved`` until the next :meth:`get` (the device and the rank are known only then)."""
        self._pending = saved
        self._generator = None
