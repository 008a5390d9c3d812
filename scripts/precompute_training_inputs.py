"""Precompute a method's frozen training inputs of a prepared pair set into shards (GT VAE moments, text features).

    python scripts/precompute_training_inputs.py experiment=seesr pairs=data/train_pairs \\
        out=data/train_pairs/seesr_inputs device=cuda
    python train.py experiment=seesr data=precomputed data.train.root=data/train_pairs/seesr_inputs

Config: configs/precompute_training_inputs.yaml (the method composes as in train.py); what is stored and how the
training step uses it: restore.data.precomputed_inputs; what each method precomputes:
``LatentDiffusionSR.precompute_inputs`` (SeeSR adds RAM tokens, XPSR the low-level prompt's features).
A killed run resumes when the same command runs again; a folder of another encoder or pair set is refused.
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
from omegaconf import DictConfig, OmegaConf

from restore import CONFIG_DIR

log = logging.getLogger("precompute_training_inputs")


def pair_folders(pairs: Path, lq_folder: str | None) -> tuple[Path, Path]:
    """(gt folder, LR folder) of a pair set; the LR one is ``lq_folder``, or ``lq/`` / ``lr/``, whichever exists."""
    from restore.run import ConfigError

    gt = pairs / "gt"
    candidates = [lq_folder] if lq_folder else ["lq", "lr"]
    found = [pairs / name for name in candidates if (pairs / name).is_dir()]
    if not gt.is_dir() or not found:
        raise ConfigError(
            f"pairs={pairs} must hold gt/ and {' or '.join(f'{c}/' for c in candidates)}: write it with "
            "scripts/make_training_pairs.py or scripts/prepare_testsets.py (data/README.md, 'Training pairs')"
        )
    return gt, found[0]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="precompute_training_inputs")
def main(cfg: DictConfig) -> None:
    import torch
    from hydra.utils import instantiate

    from restore.data.image_io import image_size, list_images
    from restore.data.paired_training import PairedTrainingFolder
    from restore.data.precomputed_inputs import method_encoder, write_precomputed_inputs
    from restore.infer import resolve_device
    from restore.methods.latent_diffusion import LatentDiffusionSR
    from restore.run import ConfigError

    for key in ("pairs", "out"):
        if not cfg.get(key):
            raise ConfigError(f"{key}=... is required (configs/precompute_training_inputs.yaml)")
    gt_dir, lq_dir = pair_folders(Path(cfg.pairs).expanduser(), cfg.get("lq_folder"))
    first = next(iter(list_images(gt_dir)), None)
    size = image_size(first) if first is not None else None
    if size is None:
        raise ConfigError(f"{gt_dir} holds no readable image")
    pairs = PairedTrainingFolder(
        gt_dir,
        lq_dir,
        scale=int(cfg.scale),
        crop_size=int(size[0]),  # whole pairs; a larger pair would be cropped at random: refused when read
        hflip=False,
        rotate=False,
        prompts=cfg.get("prompts"),
        prompt_key=OmegaConf.to_container(cfg.prompt_key)
        if OmegaConf.is_config(cfg.prompt_key)
        else cfg.prompt_key,
        prompt_missing=str(cfg.prompt_missing),
    )
    device = resolve_device(str(cfg.device))
    log.info(f"instantiating method <{cfg.method.get('_target_')}>")
    module = instantiate(cfg.method)
    if not isinstance(module, LatentDiffusionSR):
        raise ConfigError(
            f"method {type(module).__name__} is not a latent diffusion method: it has no precomputable inputs"
        )
    module.to(device).eval()

    with torch.no_grad():
        identity = module.precomputed_identity()
        counts = write_precomputed_inputs(
            pairs,
            method_encoder(module),
            cfg.out,
            identity,
            null_text=module.precompute_null_text(),
            samples_per_shard=int(cfg.samples_per_shard),
            batch_size=int(cfg.batch_size),
            hflip=bool(cfg.hflip),
            device=device,
            progress=bool(cfg.progress),
        )
    log.info(
        f"precomputed inputs of {len(pairs)} pairs in {cfg.out}: {counts['written']} shard(s) written, "
        f"{counts['kept']} kept from an earlier run; train with data=precomputed data.train.root={cfg.out}"
    )


if __name__ == "__main__":
    main()
