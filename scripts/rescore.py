"""Several methods' released outputs under one benchmark and one protocol: one table, one report.

    python scripts/rescore.py benchmark=realsr protocol=seesr \\
        +folders.StableSR=results/StableSR/RealSR +folders.SeeSR=results/SeeSR/RealSR

Config: configs/rescore.yaml (eval.py's, plus ``folders``); what it does: restore.evaluation.rescore.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from restore import CONFIG_DIR
from restore.evaluation.fingerprint import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="rescore")
def main(cfg: DictConfig) -> None:
    from restore.evaluation.rescore import rescore

    rescore(cfg)


if __name__ == "__main__":
    main()
