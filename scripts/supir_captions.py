"""SUPIR's captions of a folder of LR images into a prompt side-file, ahead of evaluation or inference.

    python scripts/supir_captions.py method=supir method.pretrained=<SUPIR-v0Q.ckpt> input=<LR dir> \\
        out=<prompts.jsonl> device=cuda

Each LR is restored by the degradation-robust encoder (stage 1, short side 512) and described by the method's
captioner (configs/method/captioner/supir_llava.yaml); the text goes to field ``caption``, which SUPIR reads
before running a captioner itself. Config: configs/supir_captions.yaml; the file format and resuming:
restore.data.prompt_extraction.
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

log = logging.getLogger("supir_captions")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="supir_captions")
def main(cfg: DictConfig) -> None:
    from restore.data.prompt_extraction import extract_prompts, folder_entries
    from restore.infer import load_method, resolve_device
    from restore.methods.supir import CAPTION_RECORD, SUPIR
    from restore.run import ConfigError

    for key in ("input", "out"):
        if not cfg.get(key):
            raise ConfigError(f"{key}=... is required (configs/supir_captions.yaml)")
    module = load_method(cfg, resolve_device(str(cfg.device)))
    if not isinstance(module, SUPIR):
        raise ConfigError(f"method must be a SUPIR config, got {type(module).__name__}")
    if module._captions.captioner is None:
        raise ConfigError("the method has no captioner (method.captioner=null): choose one, e.g. supir_llava")
    report = extract_prompts(
        folder_entries(cfg.input),
        cfg.out,
        {CAPTION_RECORD: module.caption_source()},
        batch_size=int(cfg.batch_size),
        progress=bool(cfg.progress),
    )
    log.info(report.summary())


if __name__ == "__main__":
    main()
