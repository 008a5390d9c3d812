"""Compose configs/ in-process as train.py/eval.py would, with the run directory and data root in a tmp dir."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from restore import CONFIG_DIR
from restore.evaluation.fingerprint import register_resolvers

register_resolvers()  # as eval.py does: configs/eval.yaml names its run directory with ${eval_run_name:}


def options(group: str) -> list[str]:
    """The options of a config group, from the files (so new configs are tested without listing them)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(
    config_name: str, overrides: list[str], tmp_path: Path, hydra_cfg: bool = False
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides``; paths point into ``tmp_path``
    (``run/`` is the run directory, ``data/`` the data root). ``hydra_cfg`` keeps the ``hydra`` node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[f"hydra.run.dir={tmp_path / 'run'}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as inside a real run
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_root = str(tmp_path / "data")
        if not hydra_cfg:
            del cfg["hydra"]
    return cfg
