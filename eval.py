"""Restore a benchmark with a method: ``python eval.py model=realesrnet ckpt_path=<run>/checkpoints/last.ckpt``
(config: configs/eval.yaml). The restored PNGs go to ``images_dir``; scoring them comes with the metric stack.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from restore.run import evaluate  # imported here so that `--help` and config errors answer fast

    evaluate(cfg)


if __name__ == "__main__":
    main()
