"""Run a job from a composed Hydra config: the bodies of ``train.py`` and ``eval.py`` and the config helpers
of ``python -m restore.infer``.

Everything is built with ``hydra.utils.instantiate`` from ``configs/``; this module only wires the parts
together and owns the cross-cutting rules that every method shares:

- seeding (``seed_everything(workers=True)``) before anything random is built;
- callbacks and loggers as dicts of ``_target_`` entries, where a ``null`` entry is skipped (so
  ``callbacks.model_checkpoint=null`` or ``logger.wandb=null`` switch one off from the command line);
- resuming: ``ckpt_path=last`` means ``<run dir>/checkpoints/last.ckpt``, and with ``auto_resume`` a run
  whose directory already holds ``last.ckpt`` (a requeued SLURM job: submitit resubmits it into the same
  directory) continues from it;
- ``wandb.finish()`` in ``finally``, so one crashed job does not poison a multirun sweep.

The method is built as ``instantiate(cfg.method, degradation=<instantiated cfg.degradation>)``: every
training method takes the degradation that synthesises its LR inputs as the ``degradation`` argument.

Evaluation turns the config into an :class:`~restore.evaluation.runner.EvalSpec` and runs the benchmark
runner on every rank of a Lightning Fabric built from the same ``trainer`` group. ``train.py
evaluate.benchmark=<name>`` runs the same runner on the trained module right after fitting, on rank 0, into
``<run dir>/eval/<name>/`` (:mod:`restore.evaluation.post_training`).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from restore.run_directory import guard_run_directory

__all__ = [
    "ConfigError",
    "apply_extras",
    "check_trainer_arguments",
    "evaluate",
    "group_choices",
    "instantiate_callbacks",
    "instantiate_loggers",
    "metric_value",
    "require_key",
    "resolve_ckpt_path",
    "seed_from_config",
    "single_console_log",
    "train",
]

if TYPE_CHECKING:
    from restore.evaluation.runner import EvalSpec

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"


class ConfigError(ValueError):
    """A required config entry is missing or inconsistent; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------- helpers
def require_key(cfg: DictConfig, key: str, hint: str) -> Any:
    """``cfg.<key>``, or a :class:`ConfigError` naming the key when it is absent, null or has ``???`` values."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        raise ConfigError(f"config key `{key}` is required but missing or null: {hint}")
    missing = sorted(OmegaConf.missing_keys(value)) if OmegaConf.is_config(value) else []
    if missing:
        examples = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(
            f"config value(s) {', '.join(f'`{k}`' for k in missing)} must be set (`???`): e.g. {examples}"
        )
    return value


def group_choices(group: str) -> str:
    """Hint listing the options of a config group, e.g. ``choose one with method=<realesrnet|...>``."""
    from restore import CONFIG_DIR

    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    return f"choose one with {group}=<{'|'.join(options)}> (configs/{group}/)"


def _instantiate_entries(
    cfg: DictConfig | None, group: str, kind: type, kwargs: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Instantiate each ``_target_`` entry of a dict config (``kwargs[name]`` added); ``null`` entries are skipped."""
    if cfg is None:
        return {}
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            f"`{group}` must be a dict of `name: {{_target_: ...}}` entries, got {type(cfg).__name__}"
        )
    built = {}
    for name, entry in cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(
                f"`{group}.{name}` has no `_target_`; set one or disable it with `{group}.{name}=null`"
            )
        obj = instantiate(entry, **(kwargs or {}).get(str(name), {}))
        if not isinstance(obj, kind):
            raise ConfigError(f"`{group}.{name}` built a {type(obj).__name__}, not a {kind.__name__}")
        built[str(name)] = obj
    return built


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Callbacks from the ``callbacks`` config group (a dict; ``null`` entries are skipped)."""
    return list(_instantiate_entries(cfg, "callbacks", Callback).values())


def _stable_run_id(output_dir: str | Path) -> str:
    """Same id for the same run directory, so a requeued job continues its wandb run instead of starting one."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path | None = None) -> list[Logger]:
    """Loggers from the ``logger`` config group; a WandbLogger without ``id`` gets one derived from the run dir."""
    kwargs = {}
    if cfg is not None and output_dir is not None:
        for name, entry in cfg.items():
            target = str(entry.get("_target_", "")) if isinstance(entry, DictConfig) else ""
            if target.endswith("WandbLogger") and entry.get("id") is None:
                kwargs[str(name)] = {"id": _stable_run_id(output_dir)}
    return list(_instantiate_entries(cfg, "logger", Logger, kwargs).values())


def _drop_lr_monitor_without_logger(callbacks: list[Callback], loggers: list[Logger]) -> list[Callback]:
    """LearningRateMonitor raises at train start without a logger; with ``logger=none`` just leave it out."""
    if loggers:
        return callbacks
    kept = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if len(kept) != len(callbacks):
        log.info("no logger configured: LearningRateMonitor left out")
    return kept


def _checkpoint_dir(callbacks: list[Callback], output_dir: str | Path) -> Path:
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    return Path(output_dir) / "checkpoints"


def resolve_ckpt_path(requested: str | None, ckpt_dir: str | Path, auto_resume: bool = True) -> str | None:
    """The checkpoint to resume from.

    - ``auto_resume`` and ``<ckpt_dir>/last.ckpt`` exists: that file. This is how a requeued SLURM job
      continues; it wins over an explicit ``ckpt_path`` too, since restarting a requeued job from its
      initial checkpoint would throw its progress away (set ``auto_resume=false`` to force ``ckpt_path``).
    - ``"last"``: ``<ckpt_dir>/last.ckpt``, which must exist.
    - a path: that file, which must exist.
    """
    last = Path(ckpt_dir) / LAST_CKPT
    if auto_resume and last.is_file():
        if requested not in (None, "last") and Path(requested).resolve() != last.resolve():
            log.warning(f"auto-resume: '{last}' exists, resuming from it instead of ckpt_path={requested}")
        else:
            log.info(f"resuming from '{last}'")
        return str(last)
    if requested is None:
        return None
    if requested == "last":
        if last.is_file():
            return str(last)
        raise FileNotFoundError(
            f"ckpt_path=last but '{last}' does not exist. `last` is the run directory's checkpoints/{LAST_CKPT}: "
            "rerun with hydra.run.dir=<the earlier run's directory>, or pass ckpt_path=/path/to/file.ckpt"
        )
    if not Path(requested).is_file():
        raise FileNotFoundError(f"ckpt_path={requested} does not exist")
    return str(requested)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (from a YAML/CLI config) fits a Trainer argument's annotation; unknown types pass."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def check_trainer_arguments(trainer_cfg: DictConfig | None) -> None:
    """Type-check the ``trainer`` group against ``lightning.pytorch.Trainer``'s signature before building it, so
    ``trainer.max_steps=abc`` is a :class:`ConfigError` naming the key, not a ``TypeError`` deep in Lightning."""
    if trainer_cfg is None or not str(trainer_cfg.get("_target_", "")).endswith("Trainer"):
        return
    import typing

    hints = typing.get_type_hints(L.Trainer.__init__)
    for key, value in trainer_cfg.items_ex(resolve=False):
        key = str(key)
        if key.startswith("_") or key not in hints or OmegaConf.is_config(value):
            continue
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: checked where it is defined
        if not _accepts(hints[key], value):
            raise ConfigError(
                f"trainer.{key}={value!r} ({type(value).__name__}) is not a valid value: Lightning's Trainer takes "
                f"{key}: {getattr(hints[key], '__name__', str(hints[key]).replace('typing.', ''))}"
                + f". Fix the value of trainer.{key}"
            )


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        log.info("composed config:\n%s", OmegaConf.to_yaml(cfg))


def _log_hyperparameters(cfg: DictConfig, model: L.LightningModule, trainer: L.Trainer) -> None:
    """Send the whole resolved config (plus parameter counts) to every logger."""
    if not trainer.loggers:
        return
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def _finish_wandb() -> None:
    if "wandb" in sys.modules:  # never import wandb just to close it
        import wandb

        if wandb.run is not None:
            wandb.finish()


def metric_value(metrics: Mapping[str, float], name: str | None) -> float | None:
    """The objective a Hydra sweeper (e.g. Optuna) optimises; ``None`` when no ``optimized_metric`` is set."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]


def single_console_log() -> None:
    """The ``lightning`` package always adds its own console handler and still propagates to the root logger;
    under Hydra the root logger already prints (and writes the run's log file), so every message came twice."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


def seed_from_config(cfg: DictConfig) -> None:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)


# ---------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.method`` on ``cfg.data``, then evaluate it when ``evaluate.benchmark`` is set.

    Returns the final logged metrics plus ``eval/<benchmark>/<metric>`` means (for sweepers and tests).
    """
    lock = None
    try:
        single_console_log()
        apply_extras(cfg)
        seed_from_config(cfg)
        for key, hint in (
            ("data", group_choices("data")),
            ("method", group_choices("method")),
            ("trainer", group_choices("trainer")),
            ("paths.output_dir", "run through train.py, or set paths.output_dir"),
        ):
            require_key(cfg, key, hint)
        output_dir = cfg.paths.output_dir
        check_trainer_arguments(cfg.trainer)
        lock = guard_run_directory(cfg, output_dir)

        log.info(f"instantiating datamodule <{cfg.data.get('_target_')}>")
        datamodule = instantiate(cfg.data)
        degradation = None
        if cfg.get("degradation") is not None:
            require_key(cfg, "degradation", group_choices("degradation"))
            log.info(f"instantiating degradation <{cfg.degradation.get('_target_')}>")
            degradation = instantiate(cfg.degradation)
        log.info(f"instantiating method <{cfg.method.get('_target_')}>")
        model = instantiate(cfg.method, degradation=degradation)

        callbacks = instantiate_callbacks(cfg.get("callbacks"))
        loggers = instantiate_loggers(cfg.get("logger"), output_dir)
        callbacks = _drop_lr_monitor_without_logger(callbacks, loggers)
        log.info(f"instantiating trainer <{cfg.trainer.get('_target_')}>")
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        _log_hyperparameters(cfg, model, trainer)

        ckpt_path = resolve_ckpt_path(
            cfg.get("ckpt_path"), _checkpoint_dir(callbacks, output_dir), bool(cfg.get("auto_resume", True))
        )
        if (
            ckpt_path
        ):  # Lightning would relay torch's "retry with weights_only=False" advice for a garbage file
            from restore.weights.checkpoint_file import check_checkpoint_file

            check_checkpoint_file(
                ckpt_path,
                written_by="train.py (a Lightning checkpoint)",
                fix="pass ckpt_path=<run dir>/checkpoints/last.ckpt or ckpt_path=last",
            )
        results = None
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            from restore.evaluation.post_training import evaluate_after_training

            last = _checkpoint_dir(callbacks, output_dir) / LAST_CKPT
            results = evaluate_after_training(cfg, trainer, model, last)
        else:
            log.info("train=false: skipping fit, validating only (evaluate= runs after a fit only)")
            trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if results is not None:
            bench = results["benchmark"]
            metrics.update({f"eval/{bench}/{k}": float(v) for k, v in results["aggregate"].items()})
        log.info(f"final metrics: {metrics}")
        return metrics
    finally:
        if lock is not None:
            lock.release()
        _finish_wandb()


# ---------------------------------------------------------------------------------------------- eval
def _eval_spec(cfg: DictConfig) -> EvalSpec:
    from restore.evaluation.benchmark import Benchmark
    from restore.evaluation.fingerprint import method_label, run_key
    from restore.evaluation.runner import EvalSpec
    from restore.evaluation.sweep import sweep_job_num, sweep_overrides

    benchmark_cfg = require_key(cfg, "benchmark", group_choices("benchmark"))
    method, outputs = cfg.get("method"), cfg.get("outputs")
    if (method is None) == (outputs is None):
        raise ConfigError(
            "say what to evaluate: a method ("
            + group_choices("method").replace("choose one with ", "")
            + ", with "
            "ckpt_path=... when it has trained weights) or outputs=<folder of restored images> — exactly one"
        )
    if method is not None:
        require_key(cfg, "method", group_choices("method"))
    benchmark = Benchmark.from_config(OmegaConf.to_container(benchmark_cfg, resolve=True))
    return EvalSpec(
        benchmark=benchmark,
        label=method_label(cfg),
        run_dir=Path(require_key(cfg, "paths.output_dir", "run through eval.py, or set paths.output_dir")),
        run_key=run_key(cfg),
        method=None if method is None else OmegaConf.to_container(method, resolve=True),
        ckpt_path=cfg.get("ckpt_path"),
        outputs=None if outputs is None else Path(str(outputs)).expanduser(),
        metric_catalog=OmegaConf.to_container(cfg.metrics, resolve=True) if cfg.get("metrics") else None,
        on_missing_weights=str(cfg.get("on_missing_weights", "warn")),
        batch_size=int(cfg.get("batch_size", 8)),
        num_workers=int(cfg.get("num_workers", 2)),
        progress=bool(cfg.get("progress", True)),
        report=OmegaConf.to_container(cfg.get("report") or {}, resolve=True),
        overrides=sweep_overrides(),
        job_num=sweep_job_num(),
        protocol=_checked_protocol(cfg, benchmark),
        precision=str(OmegaConf.select(cfg, "trainer.precision", default="32-true")),
    )


def _checked_protocol(cfg: DictConfig, benchmark: Any) -> dict[str, Any] | None:
    """The ``protocol`` node as a plain dict, after :func:`restore.evaluation.protocol.check_protocol`."""
    from restore.evaluation.protocol import check_protocol

    node = cfg.get("protocol")
    protocol = None if node is None else OmegaConf.to_container(node, resolve=True)
    check_protocol(protocol, benchmark)
    return protocol


def _evaluate_on_rank(fabric: Any, spec: EvalSpec) -> dict[str, Any] | None:
    from restore.evaluation.runner import evaluate_benchmark

    return evaluate_benchmark(spec, fabric)


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Restore ``cfg.benchmark`` with ``cfg.method`` (or take ``cfg.outputs``), score it and write the results.

    Returns the results document (``results.json``) on rank 0.
    """
    from restore.evaluation.parallel import fabric_from_trainer_config

    single_console_log()
    apply_extras(cfg)
    seed_from_config(cfg)
    spec = _eval_spec(cfg)
    fabric = fabric_from_trainer_config(
        OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") else None
    )
    results = fabric.launch(_evaluate_on_rank, spec)
    if results is not None:
        table = (spec.run_dir / "table.md").read_text(encoding="utf-8")
        log.info(f"{results['method']} on {results['benchmark']} ({results['num_scored']} images):\n{table}")
        if results["missing_metrics"]:
            names = " ".join(sorted(results["missing_metrics"]))
            # the fetch command takes pyiqa names: a protocol's column "maniqa" may be pyiqa's maniqa-pipal
            catalog = cfg.get("metrics") or {}
            variants = sorted(
                {str((catalog.get(n) or {}).get("pyiqa") or n) for n in results["missing_metrics"]}
            )
            log.warning(
                f"not scored (weights missing): {names}. Fetch them on a machine with internet: "
                f"python -m restore.weights fetch --metric {' '.join(variants)}"
            )
    return results
