"""``train.py evaluate.benchmark=<name>``: score the module just trained, in its run directory.

After ``trainer.fit`` the module still in memory is restored with on a benchmark by the runner of ``eval.py``
(:func:`~restore.evaluation.runner.evaluate_benchmark`), so the numbers are those of ``python eval.py
benchmark=<name> method=<method> ckpt_path=<run>/checkpoints/last.ckpt`` (ModelCheckpoint writes last.ckpt
with these very weights at the end of fit), without building the module again and loading the checkpoint.
Outputs go to ``<run dir>/eval/<benchmark>/`` (results.json/csv, table.md, report.html, images, scores):
one folder per run, so every job of a sweep has its own, and ``scripts/make_table.py --ablation`` gathers them.

Rules:

- **Rank 0 alone**, in one process on its training device: after a DDP fit the process group is still up,
  so the runner is told to ignore it (:func:`~restore.evaluation.parallel.single_process`); the other ranks
  return at once and no collective can wait for them. Sharding the images over the ranks would save time
  only on large benchmarks, at the price of every rank agreeing on every step; a full evaluation belongs to
  ``eval.py trainer=ddp``.
- **Sharded training** (FSDP, DeepSpeed): rank 0 holds a shard of the weights only, so it builds the module
  from ``cfg.method`` and loads ``checkpoints/last.ckpt`` (written in full) instead.
- **Precision**: ``evaluate.precision`` (default ``32-true``, eval.py's default), not the training one.
- **Label**: ``evaluate.label``, else the task name plus the overrides that vary across the multirun
  (``xpsr_tiny fusion=serial``, :mod:`restore.evaluation.sweep`); the results carry those overrides and the
  job number.
- **Identity**: the run key hashes the benchmark, the method config, the metric settings and a digest of the
  weights. The same weights again (a requeued job killed while evaluating) continue the evaluation; other
  weights (the run resumed and trained further) or settings replace it: it scored a state of this run that
  its checkpoint no longer holds, and two results in one run folder would make a sweep's table ambiguous.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from restore.evaluation.benchmark import Benchmark
from restore.evaluation.fingerprint import ckpt_signature, evaluation_key, module_digest
from restore.evaluation.parallel import local_fabric, single_process
from restore.evaluation.runner import RUN_KEY_FILE, EvalSpec, evaluate_benchmark
from restore.evaluation.sweep import run_label, sweep_job_num, sweep_overrides

__all__ = ["EvaluateConfigError", "evaluate_after_training", "training_eval_spec"]

log = logging.getLogger(__name__)

EVAL_SUBDIR = "eval"


class EvaluateConfigError(ValueError):
    """``evaluate`` is not a usable config; the message names the key and the fix."""


def _group_option(cfg: DictConfig, group: str, choice: Any, key: str) -> dict[str, Any]:
    """A config group option by name (``samples`` -> configs/benchmark/samples.yaml) or given inline as a
    mapping, resolved against the training config (``${paths.data_root}`` is the run's)."""
    from restore import CONFIG_DIR

    if OmegaConf.is_dict(choice) or isinstance(choice, dict):
        node = choice
    else:
        path = CONFIG_DIR / group / f"{choice}.yaml"
        if not path.is_file():
            options = "|".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
            raise EvaluateConfigError(
                f"{key}={choice}: no configs/{group}/{choice}.yaml; choose one of <{options}> or give the "
                f"{group} inline as a mapping"
            )
        node = OmegaConf.load(path)
        if "defaults" in node:  # composed by Hydra only; loading it plainly would drop its parents
            raise EvaluateConfigError(f"configs/{group}/{choice}.yaml has a defaults list: not loadable here")
    scratch = copy.deepcopy(cfg)
    with open_dict(scratch):
        scratch[group] = node
    return OmegaConf.to_container(scratch[group], resolve=True)


def _sharded(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy))


def training_eval_spec(
    cfg: DictConfig, module: L.LightningModule | None, ckpt_path: str | None = None
) -> EvalSpec:
    """The :class:`EvalSpec` of ``cfg.evaluate`` for the run in ``cfg.paths.output_dir``.

    ``module``: the trained module in memory (its weights are digested into the run key); ``None`` with
    ``ckpt_path``: the runner builds the module from ``cfg.method`` and loads that checkpoint.
    """
    ev = cfg.evaluate
    benchmark = _group_option(cfg, "benchmark", ev.benchmark, "evaluate.benchmark")
    if ev.get("metrics") is not None:
        benchmark["metrics"] = OmegaConf.to_container(ev.metrics, resolve=True)
    if ev.get("prompts") is not None:
        benchmark["prompts"] = str(ev.prompts)
    catalog = _group_option(cfg, "metrics", ev.get("metric_catalog") or "default", "evaluate.metric_catalog")
    overrides = sweep_overrides()
    name = str(cfg.get("task_name") or "train")
    method = OmegaConf.to_container(cfg.method, resolve=True)
    weights = ckpt_signature(ckpt_path) if module is None else {"module": module_digest(module)}
    return EvalSpec(
        benchmark=Benchmark.from_config(benchmark),
        label=str(ev.get("label") or run_label(name, overrides)),
        run_dir=Path(cfg.paths.output_dir) / EVAL_SUBDIR / str(benchmark["name"]),
        run_key=evaluation_key(
            benchmark, method, weights, None, catalog, ev.get("precision"), cfg.get("seed")
        ),
        method=method,
        ckpt_path=ckpt_path,
        metric_catalog=catalog,
        on_missing_weights=str(ev.get("on_missing_weights", "warn")),
        batch_size=int(ev.get("batch_size", 8)),
        num_workers=int(ev.get("num_workers", 2)),
        progress=bool(ev.get("progress", True)),
        report=OmegaConf.to_container(ev.get("report") or {}, resolve=True),
        overrides=overrides,
        job_num=sweep_job_num(),
        precision=str(ev.get("precision", "32-true")),
    )


def evaluate_after_training(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, last_ckpt: Path
) -> dict[str, Any] | None:
    """Score ``module`` on ``cfg.evaluate.benchmark`` (rank 0); the results document, or ``None`` when
    ``evaluate`` is off or on other ranks. ``last_ckpt``: where ModelCheckpoint wrote the final weights."""
    ev = cfg.get("evaluate")
    if not ev or not ev.get("benchmark"):
        return None
    if not trainer.is_global_zero:
        return None  # rank 0 evaluates alone: see the module docstring
    ckpt = None
    if _sharded(trainer):
        if not last_ckpt.is_file():
            raise EvaluateConfigError(
                f"evaluate= after {type(trainer.strategy).__name__} training reads the full weights from "
                f"'{last_ckpt}', which was not written: keep callbacks.model_checkpoint (save_last: true)"
            )
        ckpt, module = str(last_ckpt), None
    # as eval.py seeds before it restores (for methods that draw from the global generator)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    spec = training_eval_spec(cfg, module, ckpt)
    marker = spec.run_dir / RUN_KEY_FILE
    if marker.is_file() and marker.read_text().strip() != spec.run_key:
        log.warning(
            f"'{spec.run_dir}' holds an evaluation of other weights or settings of this run: replacing it"
        )
        shutil.rmtree(spec.run_dir)
    fabric = local_fabric(trainer.strategy.root_device, ev.get("precision") or "32-true")
    log.info(f"evaluating `{spec.label}` on {spec.benchmark.name} into {spec.run_dir}")
    with single_process():
        results = evaluate_benchmark(spec, fabric, module=module)
    if results is not None:
        table = (spec.run_dir / "table.md").read_text(encoding="utf-8")
        log.info(f"{results['method']} on {results['benchmark']} ({results['num_scored']} images):\n{table}")
    return results
