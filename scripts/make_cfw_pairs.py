"""StableSR stage 2's data step: stage-1 latents + upsampled LR + GT for training the CFW decoder.

    python scripts/make_cfw_pairs.py method=stablesr ckpt_path=<stage-1 run>/checkpoints/last.ckpt \\
        pairs=data/stablesr_pairs out=data/cfw_pairs device=cuda
    python train.py experiment=stablesr_cfw data.train.root=data/cfw_pairs

Config: configs/make_cfw_pairs.yaml; what is written: restore.data.cfw_pairs; how: restore.methods.stablesr_cfw.
A killed run resumes when the same command runs again.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from restore import CONFIG_DIR

log = logging.getLogger("make_cfw_pairs")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="make_cfw_pairs")
def main(cfg: DictConfig) -> None:
    from restore.infer import load_method, resolve_device
    from restore.methods.stablesr import StableSR
    from restore.methods.stablesr_cfw import make_cfw_pairs
    from restore.run import ConfigError

    for key in ("pairs", "out"):
        if not cfg.get(key):
            raise ConfigError(f"{key}=... is required (configs/make_cfw_pairs.yaml)")
    if cfg.get("method") is None:
        raise ConfigError("method=... is required: the stage-1 StableSR config (method=stablesr)")
    device = resolve_device(str(cfg.device))
    stage1 = load_method(cfg, device)
    if not isinstance(stage1, StableSR):
        raise ConfigError(f"method must be a StableSR stage-1 model, got {type(stage1).__name__}")
    counts = make_cfw_pairs(
        stage1,
        cfg.pairs,
        cfg.out,
        lq_folder=str(cfg.lq_folder),
        limit=cfg.get("limit"),
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        progress=bool(cfg.progress),
    )
    log.info(
        f"CFW pairs in {cfg.out}: {counts['written']} written, {counts['kept']} kept from an earlier run, "
        f"{counts['skipped_nonfinite']} skipped (non-finite)"
    )


if __name__ == "__main__":
    main()
