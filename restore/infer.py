"""Restore your own images with a trained method: ``python -m restore.infer method=<name> input=DIR output=DIR
ckpt_path=<train.py run>/checkpoints/last.ckpt`` (config: configs/infer.yaml).

The method is one of the configs ``train.py`` and ``eval.py`` use (configs/method/), built with
``hydra.utils.instantiate`` and loaded with :func:`restore.methods.checkpoints.load_method_weights`; every image
goes through ``module.restore(lq[None])`` under ``inference_mode`` (and autocast for bf16/fp16), as eval.py's
runner calls it (``[1, 3, h, w]`` in ``[0, 1]`` -> ``[1, 3, s*h, s*w]``).

Rules:

- ``<input>/a/b.jpg`` is written to ``<output>/a/b.png``; two inputs with one output name (``b.jpg`` and
  ``b.png``), ``output == input`` or an output that would replace its own input are refused before any work;
  when ``output`` lies inside ``input``, the files under it are not inputs;
- an output that exists is kept and counted as skipped (``overwrite=true`` replaces it);
- an unreadable input (corrupt, truncated, unsupported) is skipped with its reason and listed at the end;
- ``<output>/infer_config.yaml`` records the resolved config, written before the first image. When the folder
  already holds one from a different configuration (ignoring run-only keys such as ``paths`` or
  ``overwrite``), the old file is kept as ``infer_config.<its mtime>.yaml``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from restore import CONFIG_DIR

__all__ = [
    "CONFIG_FILE",
    "PRECISIONS",
    "InferSummary",
    "autocast_for",
    "infer",
    "main",
    "plan_outputs",
    "record_config",
    "load_method",
    "resolve_device",
    "check_output_writable",
]

log = logging.getLogger("restore.infer")  # not "__main__" under `python -m`

#: The resolved config of the run, written into the output folder.
CONFIG_FILE = "infer_config.yaml"
#: ``precision`` -> autocast dtype (``None``: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys that do not change what is written, left out when deciding whether two configs are the same.
_RUN_ONLY_KEYS = ("paths", "extras", "hydra", "task_name", "overwrite", "progress")


@dataclass
class InferSummary:
    """What a run did; paths of outputs (``restored``, ``existing``) and inputs (``unreadable``)."""

    restored: list[Path] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    config_file: Path | None = None

    def line(self) -> str:
        return (
            f"restored {len(self.restored)}, skipped {len(self.existing)} existing, "
            f"{len(self.unreadable)} unreadable"
        )


# ---------------------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (``fp32``: none)."""
    from restore.run import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"precision=fp16 needs a cuda device (device is {device}); use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def plan_outputs(input_path: Path, output_dir: Path) -> list[tuple[Path, Path]]:
    """``(input file, output file)`` pairs; refuses ``output == input``, self-replacement and name clashes."""
    from restore.data.image_io import list_images
    from restore.run import ConfigError

    if not input_path.exists():
        raise FileNotFoundError(f"input={input_path} does not exist")
    if input_path.is_file():
        pairs = [(input_path, output_dir / f"{input_path.stem}.png")]
    else:
        if input_path.resolve() == output_dir.resolve():
            raise ConfigError(
                f"output is the input folder ({input_path}): restored images would mix with (or replace) the "
                "inputs; choose another output=DIR"
            )
        files = list_images(input_path)
        out_res = output_dir.resolve()
        # Output inside input: earlier results there are not inputs.
        files = [f for f in files if not f.resolve().is_relative_to(out_res)]
        pairs = [(f, output_dir / f.relative_to(input_path).with_suffix(".png")) for f in files]
    same = [str(src) for src, dst in pairs if dst.resolve() == src.resolve()]
    if same:
        raise ConfigError(f"output would replace its input: {', '.join(same[:5])}; choose another output=DIR")
    counts = Counter(dst for _, dst in pairs)
    clashes = sorted(str(src) for src, dst in pairs if counts[dst] > 1)
    if clashes:
        raise ConfigError(
            f"inputs that differ only in their suffix would share an output file: {', '.join(clashes[:10])}; "
            "rename them or restore them separately"
        )
    return pairs


def _defining(container: Any) -> Any:
    if isinstance(container, dict):
        return {k: v for k, v in container.items() if k not in _RUN_ONLY_KEYS}
    return container


def record_config(output_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` (a resolved container) to ``<output_dir>/infer_config.yaml``.

    A file there from the same configuration is left as it is; one from a different configuration is kept as
    ``infer_config.<its mtime>.yaml`` (the folder then holds images of both).
    """
    path = output_dir / CONFIG_FILE
    if path.is_file():
        try:
            old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as err:  # noqa: BLE001 - an unparsable record is kept aside like a different one
            log.warning(f"cannot parse {path} ({err}); keeping it aside")
            old = None
        if old is not None and _defining(old) == _defining(config):
            return path
        stamp = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        backup = output_dir / f"infer_config.{stamp}.yaml"
        n = 1
        while backup.exists():
            backup = output_dir / f"infer_config.{stamp}-{n}.yaml"
            n += 1
        path.rename(backup)
        log.warning(
            f"{output_dir} holds images restored with another configuration, recorded in {backup.name}; "
            f"this run's configuration goes to {CONFIG_FILE}"
        )
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)), encoding="utf-8")
    return path


def _method_name(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice:
            return str(choice)
    return str(cfg.method.get("_target_", "?")).rsplit(".", 1)[-1]


def load_method(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """``cfg.method`` instantiated with its weights (``ckpt_path`` or the released ones it names), on ``device``,
    in eval mode; a method without weights is refused unless ``requires_weights=false``."""
    from hydra.utils import instantiate

    from restore.evaluation.runner import requires_weights
    from restore.methods.checkpoints import MethodWeightsError, load_method_weights
    from restore.run import ConfigError

    name = _method_name(cfg)
    log.info(f"instantiating method <{cfg.method.get('_target_')}>")
    module = instantiate(cfg.method)
    if not callable(getattr(module, "restore", None)):
        raise ConfigError(f"method `{name}` ({type(module).__name__}) has no restore(lq) method")
    if not requires_weights(module) and not cfg.get("ckpt_path"):
        log.info(f"`{name}` has no trained weights (it declares requires_weights = False)")
    elif cfg.get("requires_weights", True) or cfg.get("ckpt_path"):
        try:
            load_method_weights(module, cfg.get("ckpt_path"), name)
        except MethodWeightsError as err:
            if cfg.get("ckpt_path"):
                raise
            raise MethodWeightsError(
                f"method `{name}` has no trained weights: pass ckpt_path=<train.py run>/checkpoints/last.ckpt, or "
                "released weights in the method config where it has such an entry (e.g. method.pretrained=FILE); "
                "requires_weights=false runs the random initialisation (smoke tests only)"
            ) from err
    else:
        log.warning(
            f"requires_weights=false: `{name}` runs without trained weights; its outputs mean nothing"
        )
    return module.to(device).eval()


def _restore_one(
    module: torch.nn.Module, lq: torch.Tensor, device: torch.device, autocast: Any
) -> torch.Tensor:
    with torch.inference_mode(), autocast:
        sr = module.restore(lq[None].to(device))
    if sr.ndim != 4 or sr.shape[:2] != (1, 3):
        raise RuntimeError(f"restore() returned shape {tuple(sr.shape)}; expected (1, 3, H, W)")
    if not torch.isfinite(sr).all():
        raise RuntimeError("restore() returned NaN/inf pixels")
    return sr[0].float().clamp(0, 1).cpu()


# ---------------------------------------------------------------------------------------------- run
def infer(cfg: DictConfig) -> InferSummary:
    """Restore ``cfg.input`` into ``cfg.output`` with ``cfg.method``; see the module doc for the rules."""
    from hydra.utils import to_absolute_path
    from tqdm.auto import tqdm

    from restore.data.image_io import ImageReadError, read_image, to_tensor, write_image
    from restore.run import apply_extras, group_choices, require_key, seed_from_config, single_console_log

    single_console_log()
    apply_extras(cfg)
    require_key(cfg, "method", group_choices("method"))
    input_path = Path(
        to_absolute_path(str(require_key(cfg, "input", "the image or folder to restore: input=DIR")))
    )
    output_dir = Path(
        to_absolute_path(str(require_key(cfg, "output", "the folder for the results: output=DIR")))
    )
    overwrite = bool(cfg.get("overwrite", False))
    device = resolve_device(str(cfg.get("device", "auto")))
    autocast = autocast_for(device, str(cfg.get("precision", "fp32")))

    pairs = plan_outputs(input_path, output_dir)
    check_output_writable(output_dir, [dst for _, dst in pairs])
    summary = InferSummary()
    todo = []
    for src, dst in pairs:
        if dst.exists() and not overwrite:
            summary.existing.append(dst)
        else:
            todo.append((src, dst))
    if summary.existing:
        log.info(
            f"{len(summary.existing)} output(s) already in {output_dir}: kept (overwrite=true replaces them)"
        )

    record = OmegaConf.to_container(cfg, resolve=True)
    record.update(input=str(input_path), output=str(output_dir))  # absolute: same run, same record
    if todo:
        seed_from_config(cfg)
        module = load_method(cfg, device)
        bar = tqdm(todo, desc="restore", unit="img", disable=not cfg.get("progress", True))
        for src, dst in bar:
            try:
                lq = to_tensor(read_image(src))
            except ImageReadError as err:
                summary.unreadable.append((src, f"{err.reason}. Fix: {err.fix}"))
                log.warning(f"skipped '{src}': {err.reason}")
                continue
            sr = _restore_one(module, lq, device, autocast)
            if summary.config_file is None:
                summary.config_file = record_config(output_dir, record)
            try:
                write_image(dst, sr, overwrite=overwrite)
            except FileExistsError:  # written meanwhile by another run: never replaced silently
                summary.existing.append(dst)
                continue
            summary.restored.append(dst)
    _report(summary, output_dir)
    return summary


def check_output_writable(output_dir: Path, outputs: list[Path]) -> None:
    """Create ``output_dir`` and the folders of ``outputs`` and prove each writable with a probe file, so that a
    read-only or blocked output fails before the model is loaded or any image computed."""
    import tempfile

    from restore.run import ConfigError

    for folder in sorted({output_dir, *(dst.parent for dst in outputs)}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(
                f"output folder '{folder}' is not writable ({err.strerror or err}); fix its permissions or remove "
                f"what blocks it, or choose another output=DIR"
            ) from None


def _report(summary: InferSummary, output_dir: Path) -> None:
    if summary.unreadable:
        listing = "\n".join(f"  {src}: {reason}" for src, reason in summary.unreadable)
        log.warning(f"{len(summary.unreadable)} unreadable input(s) skipped:\n{listing}")
    log.info(f"{summary.line()} -> {output_dir}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="infer")
def main(cfg: DictConfig) -> None:
    infer(cfg)


if __name__ == "__main__":
    main()
