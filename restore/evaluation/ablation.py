"""Ablation tables: the runs of a sweep as rows, metrics as columns, one table per benchmark.

``python train.py -m experiment=xpsr_tiny method.fusion=sfa,serial evaluate.benchmark=samples`` writes one
``<job>/eval/<benchmark>/results.json`` per run, each carrying the overrides that vary across the sweep
(:mod:`restore.evaluation.sweep`). Here a row is labelled with those overrides (``fusion=serial``), rows
follow the sweep order (job number), and each column marks its best value bold and the second underlined
with the rules of the paper tables (:mod:`restore.evaluation.table`: values ranked as displayed, dense
ranking), whose cells, marks and renderers this module reuses.

    | RealSR | PSNR ↑ | SSIM ↑ | LPIPS ↓ |
    |:--|:-:|:-:|:-:|
    | fusion=sfa | **25.10** | <u>0.7100</u> | **0.2000** |
    | fusion=serial | <u>24.87</u> | **0.7330** | <u>0.2254</u> |
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from restore.evaluation.results import check_same_datasets, dedupe_results, validate_all
from restore.evaluation.sweep import variant_label
from restore.evaluation.table import (
    BENCHMARK_NAMES,
    DAGGER,
    Cell,
    coverage_notes,
    mark_cells,
    md_cell,
    md_escape,
    metric_display_name,
    metric_order,
    metric_precision,
    metric_specs,
    score_cell,
    tex_cell,
    tex_escape,
)

__all__ = ["AblationTable", "Column", "ablation_table", "build_ablation", "sweep_order"]

# <sweep dir>/<job number>/eval/<benchmark>/results.json, as train.py evaluate= lays a multirun out
_JOB_DIR = re.compile(r"^\d+$")


@dataclass
class Column:
    metric: str
    label: str  # display name without arrow
    lower_better: bool

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_better else "↑"


@dataclass
class AblationTable:
    """One benchmark: ``rows[i]`` is (variant label, one cell per column)."""

    benchmark: str
    label: str  # display name of the benchmark
    columns: list[Column]
    rows: list[tuple[str, list[Cell]]]
    footnotes: list[str] = field(default_factory=list)


def _job_from_path(result: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """(sweep dir, job number) read from ``<sweep>/<num>/eval/<bench>/results.json``, else (None, None)."""
    source = result.get("_source")
    if not source:
        return None, None
    parts = Path(source).parts
    if len(parts) >= 5 and parts[-3] == "eval" and _JOB_DIR.match(parts[-4]):
        return str(Path(*parts[:-4])), int(parts[-4])
    return None, None


def sweep_order(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``results`` in sweep order: sweeps in order of first appearance, within one by job number (the
    recorded ``job_num``, else the job folder's name); results without a number keep their place after them."""
    keyed = []
    sweeps: dict[str | None, int] = {}
    for i, r in enumerate(results):
        sweep, num = _job_from_path(r)
        if r.get("job_num") is not None:
            num = int(r["job_num"])
        rank = sweeps.setdefault(sweep, len(sweeps))
        keyed.append(((rank, num if num is not None else math.inf, i), r))
    return [r for _, r in sorted(keyed, key=lambda t: t[0])]


def _row_labels(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The overrides whose values differ between ``runs`` (``fusion=serial``); the method label where a run
    has none of them, or where two runs would read the same."""
    keys = list(dict.fromkeys(k for r in runs for k in r.get("overrides") or {}))
    varying = [k for k in keys if len({(r.get("overrides") or {}).get(k) for r in runs}) > 1]
    labels = [variant_label(r.get("overrides") or {}, varying) or r["method"] for r in runs]
    if len(set(labels)) < len(labels):
        return [r["method"] for r in runs]  # method labels are unique (dedupe_results)
    return labels


def build_ablation(
    results: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    precision: Mapping[str, int] | None = None,
    on_duplicate: Literal["error", "newest"] = "error",
) -> list[AblationTable]:
    """One :class:`AblationTable` per benchmark (order of first appearance), rows in sweep order.

    ``metrics``: columns to show, in this order (default: every metric, in order of first appearance);
    columns without any value on a benchmark are left out. Two results with the same (method, benchmark)
    raise ``ValueError`` unless ``on_duplicate="newest"`` (a job that was run again).
    """
    if not results:
        raise ValueError("no results to tabulate")
    results = sweep_order(dedupe_results(validate_all(results), on_duplicate))
    check_same_datasets(results)
    specs = metric_specs(results)
    order = metric_order(specs, metrics)
    by_benchmark: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        by_benchmark.setdefault(r["benchmark"], []).append(r)
    tables = []
    for bench, runs in by_benchmark.items():
        labels = _row_labels(runs)
        columns: list[Column] = []
        grid: list[list[Cell]] = [[] for _ in runs]
        for metric in order:
            p = metric_precision(metric, precision)
            cells = [score_cell(r["aggregate"].get(metric), p) for r in runs]
            if all(c.value is None for c in cells) and not any(metric in r["metrics"] for r in runs):
                continue  # not computed on this benchmark (e.g. PSNR without GT); computed-but-NaN stays
            lower = bool(specs[metric]["lower_better"])
            mark_cells(cells, lower)
            columns.append(Column(metric, metric_display_name(metric), lower))
            for row, cell in zip(grid, cells, strict=True):
                row.append(cell)
        label = BENCHMARK_NAMES.get(bench, bench)
        notes = coverage_notes(label, dict(zip(labels, runs, strict=True)))
        tables.append(AblationTable(bench, label, columns, list(zip(labels, grid, strict=True)), notes))
    return tables


def _render_markdown(tables: Sequence[AblationTable]) -> str:
    blocks = []
    for t in tables:
        head = md_escape(t.label) + (DAGGER if t.footnotes else "")
        lines = [
            "| " + " | ".join([head, *(f"{md_escape(c.label)} {c.arrow}" for c in t.columns)]) + " |",
            "|" + "|".join([":--"] + [":-:"] * len(t.columns)) + "|",
        ]
        lines += [
            "| " + " | ".join([md_escape(label), *map(md_cell, cells)]) + " |" for label, cells in t.rows
        ]
        text = "\n".join(lines) + "\n"
        if t.footnotes:
            text += "\n" + "\n\n".join(f"{DAGGER} {md_escape(f)}" for f in t.footnotes) + "\n"
        blocks.append(text)
    return "\n".join(blocks)


def _render_latex(tables: Sequence[AblationTable]) -> str:
    blocks = []
    for t in tables:
        head = tex_escape(t.label) + (r"$^\dagger$" if t.footnotes else "")
        arrows = [r"$\downarrow$" if c.lower_better else r"$\uparrow$" for c in t.columns]
        lines = [
            r"% requires \usepackage{booktabs}",
            r"\begin{tabular}{l" + "c" * len(t.columns) + "}",
            r"\toprule",
            " & ".join([head, *(f"{tex_escape(c.label)} {a}" for c, a in zip(t.columns, arrows))]) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join([tex_escape(label), *map(tex_cell, cells)]) + r" \\" for label, cells in t.rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [r"\par\footnotesize $^\dagger$ " + tex_escape(note) for note in t.footnotes]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def ablation_table(
    results: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    fmt: Literal["markdown", "latex"] = "markdown",
    precision: Mapping[str, int] | None = None,
    on_duplicate: Literal["error", "newest"] = "error",
) -> str:
    """Render loaded results (:func:`~restore.evaluation.results.load_results`) as ablation tables, one per
    benchmark, separated by a blank line (Markdown) or as consecutive ``tabular`` blocks (LaTeX)."""
    tables = build_ablation(results, metrics=metrics, precision=precision, on_duplicate=on_duplicate)
    if fmt == "markdown":
        return _render_markdown(tables)
    if fmt == "latex":
        return _render_latex(tables)
    raise ValueError(f"fmt must be 'markdown' or 'latex', got {fmt!r}")
