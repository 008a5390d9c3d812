"""Fingerprints of an evaluation: what makes two runs' images and scores interchangeable.

- :func:`run_key` hashes the composed config parts that define the result (benchmark, method, weights
  file signatures, seed, precision, scored folder, metric selection and settings) — not batch sizes or workers.
  The inputs' contents are checked per image inside the run (:mod:`restore.evaluation.input_identity`), and the
  device kind each image was restored on is recorded with it.
  ``eval.py`` names its run directory ``<label>-<run key>`` (resolver ``${eval_run_name:}``), so running
  the same command again continues the same run, and any change that alters results gets a new directory:
  nothing is recomputed needlessly and nothing of an earlier run is overwritten. A benchmark's prompt side-file
  enters by its content (:func:`file_digest`): restored images made with other prompts are not reused.
- :func:`module_digest` stands in for the weights file when ``train.py evaluate=...`` scores the module still
  in memory after training.
- The score fingerprint adds what only the built metrics know (pyiqa version, each metric's resolved
  options); every stored score line carries it (see :mod:`restore.evaluation.score_store`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ckpt_signature",
    "evaluation_key",
    "method_files",
    "file_digest",
    "method_label",
    "module_digest",
    "register_resolvers",
    "run_key",
    "stable_hash",
]


def stable_hash(obj: Any, length: int = 10) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), first ``length`` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def ckpt_signature(path: str | os.PathLike | None) -> Any:
    """Path, size and mtime of a weights file or folder: a retrained checkpoint at the same path differs."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return str(p)  # reported as missing later, with the fix
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve()), [[f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a prompt side-file: edited in place, its path and size may not change)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_digest(module: Any) -> str:
    """sha256 over a module's ``state_dict`` tensors (names, dtypes, shapes, bytes), in name order."""
    import torch

    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if not torch.is_tensor(value):
            continue
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _selected_metrics(benchmark: Mapping[str, Any], catalog: Mapping[str, Any] | None) -> dict[str, Any]:
    catalog = catalog or {}
    selected = {}
    for entry in benchmark.get("metrics") or []:
        if isinstance(entry, str):
            selected[entry] = catalog.get(entry) if entry in catalog else entry
        else:
            selected[str(entry.get("name"))] = entry
    return selected


#: Precisions that run the networks in float32: the default, left out of run keys (so keys made before precision
#: was part of them stay valid).
FLOAT32_PRECISIONS = ("32-true", "32", 32, None)


def evaluation_key(
    benchmark: Mapping[str, Any],
    method: Any,
    weights: Any,
    outputs: str | os.PathLike | None = None,
    metric_catalog: Mapping[str, Any] | None = None,
    precision: str | int | None = None,
    seed: int | None = None,
) -> str:
    """Hash of what defines an evaluation's images and scores, from plain containers.

    ``weights``: what identifies the trained weights (:func:`ckpt_signature` of a file, or
    :func:`module_digest` of an in-memory module). ``precision``: the restoring precision (Lightning's names);
    a bf16 / fp16 run restores other images than an fp32 one, so it gets its own key. ``seed``: the global seed
    (a diffusion method's noise follows it). Scoring a folder (``outputs``) runs no network of the method: its
    precision and seed are not part of the key. Weight files named inside the method config (``method.weights``, a
    prior's local folder) enter by their signature, like ``ckpt_path``: retrained in place, they change the key.
    """
    bench = dict(benchmark)
    prompts = bench.pop("prompts", None)
    if prompts:  # only then: keys of runs without prompts stay what they were before prompts existed
        path = Path(str(prompts)).expanduser()
        bench["prompts"] = [str(path), file_digest(path) if path.is_file() else None]
    parts = {
        "benchmark": bench,
        "method": method,
        "weights": weights,
        "outputs": str(Path(outputs).expanduser().resolve()) if outputs else None,
        "metrics": _selected_metrics(benchmark, metric_catalog),
    }
    if precision not in FLOAT32_PRECISIONS and not outputs:
        parts["precision"] = str(precision)
    if seed is not None and method is not None and not outputs:
        parts["seed"] = int(seed)
    files = method_files(method)
    if files:  # only then: keys of methods without files stay what they were
        parts["method_files"] = files
    return stable_hash(parts, 8)


def method_files(method: Any) -> dict[str, Any]:
    """``config key -> signature`` of every string in the method config that names an existing local file or
    folder (weights, a prior's snapshot folder): the weights behind a method, beyond ``ckpt_path``."""
    found: dict[str, Any] = {}

    def visit(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{key}[{i}]")
        elif isinstance(node, str) and ("/" in node or "." in node) and "${" not in node:
            path = Path(node).expanduser()
            if path.is_absolute() and path.exists():
                found[key] = ckpt_signature(path)

    visit(method if isinstance(method, Mapping) else {}, "")
    return found


def run_key(cfg: DictConfig) -> str:
    """Hash of the config parts that define an evaluation's images and scores (``eval.py``'s config)."""
    return evaluation_key(
        _plain(cfg.benchmark),
        _plain(cfg.get("method")),
        ckpt_signature(cfg.get("ckpt_path")),
        cfg.get("outputs"),
        _plain(cfg.get("metrics")),
        OmegaConf.select(cfg, "trainer.precision", default=None),
        cfg.get("seed"),
    )


def method_choice(cfg: DictConfig) -> str | None:
    """The ``method=<name>`` option of the composed config (``hydra.runtime.choices``), if any."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.method", default=None)
    if choice is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("method")
    return None if choice is None else str(choice)


def method_label(cfg: DictConfig) -> str:
    """Column name of the evaluated system: ``label``, else the stem of the weights file of a method defined by
    one (``method=spandrel method.weights=.../RealESRGAN_x4plus.pth``), else the method's config name
    (``method=seesr_tiny``), else the scored folder's name."""
    if cfg.get("label"):
        return str(cfg.label)
    method = cfg.get("method")
    if method is not None:
        weights = OmegaConf.select(method, "weights", default=None, throw_on_missing=False)
        if isinstance(weights, str) and weights:
            return Path(weights).stem
        choice = method_choice(cfg)
        return choice or str(method.get("_target_", "method")).rsplit(".", 1)[-1]
    if cfg.get("outputs"):
        return Path(str(cfg.outputs)).expanduser().resolve().name
    return "unnamed"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "run"


def _eval_run_name(*, _root_: DictConfig) -> str:
    return f"{_safe(method_label(_root_))}-{run_key(_root_)}"


def register_resolvers() -> None:
    """``${eval_run_name:}`` for configs/eval.yaml's run directory (idempotent)."""
    if not OmegaConf.has_resolver("eval_run_name"):
        OmegaConf.register_new_resolver("eval_run_name", _eval_run_name)
