"""Several methods' released outputs scored under one benchmark and one protocol, into one table and report.

Published restorations (the folders authors share) are scored with whatever each paper used; putting them side
by side needs the same rules for all. :func:`rescore` first checks every folder against the benchmark (every LR
name present, every image the size of its GT, or LR x scale where there is no GT) and refuses the whole job
naming each folder's problem, then scores each folder as ``eval.py outputs=<folder>`` does (one resumable run
per folder under the output directory), then writes ``table.md`` and ``report.html`` with one column per folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from restore.evaluation.benchmark import Benchmark, BenchmarkError
from restore.evaluation.runner import check_sizes, match_outputs

__all__ = ["check_folders", "rescore"]

log = logging.getLogger(__name__)


def _lr_size_check(benchmark: Benchmark, items: Any, found: Mapping[str, Path]) -> None:
    from restore.data.image_io import image_size

    wrong = []
    for it in items:
        lr, sr = image_size(it.lr), image_size(found[it.name])
        if lr is not None and sr is not None and sr != (lr[0] * benchmark.scale, lr[1] * benchmark.scale):
            wrong.append(f"{it.name} (restored {sr[0]}x{sr[1]}, LR {lr[0]}x{lr[1]} x{benchmark.scale})")
    if wrong:
        raise BenchmarkError(f"{len(wrong)} image(s) are not LR x {benchmark.scale}: {'; '.join(wrong[:10])}")


def check_folders(benchmark: Benchmark, folders: Mapping[str, Path]) -> None:
    """Refuse, before any scoring, folders whose names or sizes do not match the benchmark (all problems named)."""
    items, _ = benchmark.collect()
    problems = []
    for label, folder in folders.items():
        try:
            found = match_outputs(items, Path(folder))
            if benchmark.has_reference:
                check_sizes([(it.name, found[it.name], it.gt) for it in items], benchmark.post)
            elif not any("resize" in step for step in benchmark.post):
                _lr_size_check(benchmark, items, found)
        except BenchmarkError as err:
            problems.append(f"- {label} ({folder}): {err}")
    if problems:
        raise BenchmarkError(
            f"{len(problems)} of {len(folders)} folder(s) do not match benchmark {benchmark.name} "
            f"({benchmark.lr_dir}); nothing was scored:\n" + "\n".join(problems)
        )


def rescore(cfg: DictConfig) -> list[dict[str, Any]]:
    """Score ``cfg.folders`` (label -> folder) under ``cfg.benchmark`` / ``cfg.protocol``; write the joint table
    and report into ``cfg.paths.output_dir``. Returns the per-folder results documents."""
    from restore.evaluation.report import write_report
    from restore.evaluation.table import results_table
    from restore.run import ConfigError, evaluate

    folders = {str(k): Path(str(v)).expanduser() for k, v in (cfg.get("folders") or {}).items()}
    if not folders:
        raise ConfigError(
            "folders={<label>: <folder of restored images>, ...} is required (configs/rescore.yaml)"
        )
    benchmark = Benchmark.from_config(OmegaConf.to_container(cfg.benchmark, resolve=True))
    check_folders(benchmark, folders)
    out = Path(str(cfg.paths.output_dir))
    results = []
    for label, folder in folders.items():
        run = cfg.copy()
        with open_dict(run):
            run.method = None
            run.outputs = str(folder)
            run.label = label
            run.paths.output_dir = str(out / label)
            run.report.compare = []
            run.report.enabled = False
        log.info(f"scoring {label}: {folder}")
        results.append(evaluate(run))
    (out / "table.md").write_text(results_table(results) + "\n", encoding="utf-8")
    if cfg.get("report", {}).get("enabled", True):
        write_report(out / "report.html", results, max_images=cfg.report.get("max_images"), overwrite=True)
    log.info(
        f"{len(results)} folders under protocol {cfg.protocol.name}: {out / 'table.md'}\n{results_table(results)}"
    )
    return results
