"""Score a method (or a folder of restored images) on a benchmark: ``python eval.py benchmark=samples
method=bicubic``; ``python eval.py benchmark=realsr outputs=DIR``. Config: configs/eval.yaml.
Writes results.json/csv, table.md and report.html into the run directory.
"""

import hydra
from omegaconf import DictConfig

from restore.cluster import prepare_job_environment
from restore.evaluation.fingerprint import register_resolvers

register_resolvers()  # ${eval_run_name:} names the run directory; needed before Hydra composes the config


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    prepare_job_environment(cfg)  # SLURM compute nodes: offline, caches under paths.weights_dir
    from restore.run import evaluate  # imported here so that `--help` and config errors answer fast

    evaluate(cfg)


if __name__ == "__main__":
    main()
