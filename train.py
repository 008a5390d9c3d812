"""Train a method: ``python train.py experiment=realesrnet_tiny`` (config: configs/train.yaml).

Thin on purpose: everything happens in :func:`restore.run.train`. Returns the sweep objective
(``optimized_metric``) so Hydra sweepers such as Optuna can use it.
"""

import hydra
from omegaconf import DictConfig

from restore.cluster import prepare_job_environment


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    prepare_job_environment(cfg)  # SLURM compute nodes: offline, caches under paths.weights_dir
    # Imported here so that `--help`, `--cfg` and config errors answer without loading torch.
    from restore.run import metric_value, train

    return metric_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
