"""The environment of a run inside a SLURM job, set when the job starts, from the composed config.

Compute nodes of most clusters have no internet. Inside a SLURM job (``SLURM_JOB_ID`` set: a job of
``python train.py -m hydra/launcher=slurm ...``, or ``srun``/``sbatch`` of train.py or eval.py) this sets:

- ``HF_HUB_OFFLINE=1`` and ``WANDB_MODE=offline``: no network calls that would hang or fail;
- ``TORCH_HOME=<paths.weights_dir>/torch`` and ``HF_HOME=<paths.weights_dir>/huggingface``: the caches that
  ``python -m restore.weights fetch`` and ``scripts/prefetch_weights.py`` fill on a login node when run with the
  same two variables (README, "Running on a SLURM cluster").

A variable already set wins (sbatch passes the submitting shell's environment on), so ``HF_HUB_OFFLINE=0``
exported before the sweep keeps the hub online. This happens in the job's Python process rather than in the
launcher's ``setup`` lines because ``paths.weights_dir`` resolves through ``${hydra:runtime.cwd}``, which does
not exist yet when Hydra instantiates the launcher in the submitting process. It must run before anything
imports huggingface_hub, which reads ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, at import.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: Modules that read the variables below once, when imported.
_READ_AT_IMPORT = ("huggingface_hub", "wandb")


def job_environment(weights_dir: str | Path) -> dict[str, str]:
    """The variables a SLURM job runs with: offline hub and wandb, caches under ``weights_dir``."""
    weights = Path(weights_dir)
    return {
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TORCH_HOME": str(weights / "torch"),
        "HF_HOME": str(weights / "huggingface"),
    }


def prepare_job_environment(
    cfg: DictConfig, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Inside a SLURM job, set :func:`job_environment` for ``cfg.paths.weights_dir`` where not already set.

    Returns the variables it set (empty outside SLURM or when all were set). Call it first in the Hydra task
    function, before importing restore's models.
    """
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return {}
    added = {k: v for k, v in job_environment(cfg.paths.weights_dir).items() if k not in env}
    env.update(added)
    early = [m for m in _READ_AT_IMPORT if m in sys.modules]
    if added and early:
        log.warning(
            f"{', '.join(early)} imported before the SLURM job environment was set: {sorted(added)} may not apply"
        )
    if added:
        log.info("SLURM job %s: %s", env["SLURM_JOB_ID"], " ".join(f"{k}={v}" for k, v in added.items()))
    return added
