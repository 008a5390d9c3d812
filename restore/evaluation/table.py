"""Paper tables from ``results.json`` files, in the layout of SeeSR's Table 2 (Wu et al., CVPR 2024).

Methods are columns; rows are grouped by benchmark, one row per metric with ↑/↓ after its name; in each
row the best value is bold and the second best underlined. Ranking uses the values *as displayed* (after
rounding to the metric's precision): two cells that read the same get the same mark, and the marks follow
dense ranking (best distinct value bold, next distinct value underlined). Missing values show as "–".

The same :class:`Table` model feeds the Markdown and LaTeX renderers here and the HTML table of the
report (:mod:`restore.evaluation.report`), so all three always agree on numbers and marks. The ablation
layout (:mod:`restore.evaluation.ablation`: runs as rows, metrics as columns) is built from the same pieces:
:func:`metric_specs`, :func:`score_cell`, :func:`mark_cells`, :func:`coverage_notes` and the cell renderers.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from restore.evaluation.results import (
    check_same_datasets,
    dedupe_results,
    finite,
    load_results,
    result_source,
    validate_all,
)

__all__ = [
    "BENCHMARK_NAMES",
    "DAGGER",
    "DEFAULT_PRECISION",
    "DISPLAY_NAMES",
    "PRECISION",
    "Cell",
    "Group",
    "Row",
    "Table",
    "build_table",
    "coverage_notes",
    "protocol_notes",
    "load_results",
    "mark_cells",
    "md_cell",
    "md_escape",
    "metric_display_name",
    "metric_order",
    "metric_precision",
    "metric_specs",
    "results_table",
    "score_cell",
    "tex_cell",
    "tex_escape",
    "write_table",
]

#: Decimals per metric key (edit here, or pass ``precision=`` to override per call). Variants such as
#: ``psnr_rgb`` fall back to the part before the first underscore.
PRECISION: dict[str, int] = {
    "psnr": 2,
    "ssim": 4,
    "lpips": 4,
    "dists": 4,
    "fid": 2,
    "niqe": 4,
    "maniqa": 4,
    "musiq": 2,
    "clipiqa": 4,
}
DEFAULT_PRECISION = 4

#: Row labels for metric keys; unknown keys are upper-cased, with a suffix in brackets (``x_rgb`` -> "X (RGB)").
DISPLAY_NAMES: dict[str, str] = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "dists": "DISTS",
    "fid": "FID",
    "niqe": "NIQE",
    "maniqa": "MANIQA",
    "musiq": "MUSIQ",
    "clipiqa": "CLIPIQA",
    "psnr_rgb": "PSNR (RGB)",
    "psnr_y": "PSNR (Y)",
    "ssim_rgb": "SSIM (RGB)",
    "ssim_y": "SSIM (Y)",
}

#: Dataset-cell names for benchmark keys as the papers spell them; unknown names are shown as given.
BENCHMARK_NAMES: dict[str, str] = {
    "realsr": "RealSR",
    "drealsr": "DRealSR",
    "div2k_val": "DIV2K-Val",
    "div2k": "DIV2K-Val",
    "reallr200": "RealLR200",
    "reallq250": "RealLQ250",
}

MISSING = "–"
#: a metric that was computed but has no finite mean (every image scored NaN)
NOT_FINITE = "NaN"
DAGGER = "†"
#: Marks a method column with a note (e.g. a tiny random prior), explained under the table.
DOUBLE_DAGGER = "‡"

Mark = Literal["best", "second"] | None


def metric_display_name(key: str) -> str:
    """``psnr`` -> "PSNR", ``psnr_rgb`` -> "PSNR (RGB)", unknown ``foo_bar`` -> "FOO (BAR)"."""
    if key in DISPLAY_NAMES:
        return DISPLAY_NAMES[key]
    base, _, suffix = key.partition("_")
    base_name = DISPLAY_NAMES.get(base, base.upper())
    return f"{base_name} ({suffix.upper()})" if suffix else base_name


def metric_precision(key: str, overrides: Mapping[str, int] | None = None) -> int:
    """Decimals for ``key``: ``overrides`` first, then :data:`PRECISION` (exact key, then its base)."""
    for table in (overrides or {}, PRECISION):
        if key in table:
            return int(table[key])
        base = key.partition("_")[0]
        if base in table:
            return int(table[base])
    return DEFAULT_PRECISION


@dataclass
class Cell:
    text: str  # formatted value, or MISSING
    value: float | None  # the value as displayed (rounded), used for ranking and by the report
    mark: Mark = None


@dataclass
class Row:
    metric: str
    label: str  # display name without arrow
    lower_better: bool
    cells: list[Cell]

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_better else "↑"


@dataclass
class Group:
    benchmark: str
    label: str  # display name of the benchmark
    counts: dict[str, int]  # method -> number of scored images
    rows: list[Row]
    scales: dict[str, int]
    flagged: bool = False  # has a footnote (different image counts or scales, skipped images)

    @property
    def counts_differ(self) -> bool:
        return len(set(self.counts.values())) > 1

    @property
    def count_text(self) -> str:
        """ "n=100", or "n=99–100" when the methods were scored on different numbers of images."""
        values = sorted(set(self.counts.values()))
        if not values:
            return ""
        return f"n={values[0]}" if len(values) == 1 else f"n={values[0]}–{values[-1]}"


@dataclass
class Table:
    methods: list[str]
    groups: list[Group]
    footnotes: list[str] = field(default_factory=list)
    #: method -> its note (results' ``note``), shown next to the column name and under the table
    method_notes: dict[str, str] = field(default_factory=dict)

    def method_header(self, method: str) -> str:
        """The column name, marked when the method has a note."""
        return method + (DOUBLE_DAGGER if method in self.method_notes else "")


def mark_cells(cells: list[Cell], lower_better: bool) -> None:
    """Best distinct displayed value bold ("best"), the next one underlined ("second"); needs two values."""
    distinct = sorted({c.value for c in cells if c.value is not None}, reverse=not lower_better)
    if len(distinct) == 0 or sum(c.value is not None for c in cells) < 2:
        return  # a single number is not "best" of anything
    for c in cells:
        if c.value == distinct[0]:
            c.mark = "best"
        elif len(distinct) > 1 and c.value == distinct[1]:
            c.mark = "second"


def metric_specs(results: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Metric -> its first spec in ``results`` (order of first appearance); a metric that is lower-better in
    one result and higher-better in another raises ``ValueError`` naming both files."""
    specs: dict[str, Mapping[str, Any]] = {}
    spec_source: dict[str, str] = {}
    for i, r in enumerate(results):
        for name, spec in r["metrics"].items():
            if name not in specs:
                specs[name], spec_source[name] = spec, result_source(r, i)
            elif bool(spec["lower_better"]) != bool(specs[name]["lower_better"]):
                raise ValueError(
                    f"metric {name!r} is lower-better in one result and higher-better in another "
                    f"({spec_source[name]} vs {result_source(r, i)}); they cannot share a row"
                )
    return specs


def metric_order(specs: Mapping[str, Any], metrics: Sequence[str] | None) -> list[str]:
    """The requested metrics (deduplicated, in order), or all of ``specs``; unknown names raise ``ValueError``."""
    if metrics is None:
        return list(specs)
    order = list(dict.fromkeys(metrics))
    unknown = [m for m in order if m not in specs]
    if unknown:
        raise ValueError(f"metric(s) {unknown} are in no result; available: {list(specs)}")
    return order


def score_cell(value: Any, decimals: int) -> Cell:
    """A mean as displayed: rounded to ``decimals``, ranked by the rounded value; missing is "–", a metric that
    was computed but has no finite value is "NaN" (explained by a footnote, :func:`coverage_notes`)."""
    raw = finite(value)
    if raw is None:
        return Cell(NOT_FINITE if _is_nan(value) else MISSING, None)
    text = f"{raw:.{decimals}f}"
    return Cell(text, float(text))


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def nonfinite_notes(label: str, runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One footnote per (run, metric) with NaN/inf per-image scores: how many, and what the mean covers."""
    notes = []
    for run, r in runs.items():
        scores = [entry.get("scores") or {} for entry in r["per_image"]]
        for metric in r["metrics"]:
            values = [s[metric] for s in scores if metric in s]
            bad = sum(1 for v in values if v is None or _is_nan(float(v)))
            if not bad:
                continue
            name = metric_display_name(metric)
            covered = (
                "no value (NaN)" if bad == len(values) else f"the mean is over the other {len(values) - bad}"
            )
            notes.append(
                f"{label}, {name}: {run} scored NaN on {bad} of {len(values)} image(s) (per-image scores in its "
                f"results.csv; e.g. an image smaller than the metric needs): {covered}."
            )
    return notes


def coverage_notes(label: str, runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Footnotes for one benchmark's runs (name -> result, in column/row order): different image counts,
    images left unscored, different scales, NaN per-image scores."""
    counts = {m: int(r["num_scored"]) for m, r in runs.items()}
    scales = {m: int(r["scale"]) for m, r in runs.items()}
    notes = []
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{m}: {n}" for m, n in counts.items())
        notes.append(
            f"{label}: the methods were scored on different numbers of images ({detail}); "
            "comparing means over different image sets is misleading."
        )
    else:
        short = [
            f"{m}: {n} of {runs[m]['num_images']}" for m, n in counts.items() if n < runs[m]["num_images"]
        ]
        if short:
            notes.append(f"{label}: not every image was scored ({', '.join(short)}).")
    if len(set(scales.values())) > 1:
        detail = ", ".join(f"{m}: ×{s}" for m, s in scales.items())
        notes.append(f"{label}: the methods ran at different scales ({detail}).")
    return notes + nonfinite_notes(label, runs)


def protocol_notes(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The evaluation protocol under the table: one line when every run used the same one, else which run used
    which (their numbers are not comparable cell for cell)."""
    used: dict[str, list[str]] = {}
    summaries: dict[str, str] = {}
    for r in results:
        protocol = (r.get("settings") or {}).get("protocol") or {}
        name = str(protocol.get("name") or "unrecorded")
        summaries.setdefault(name, str(protocol.get("summary") or ""))
        used.setdefault(name, []).append(f"{r['method']} ({r['benchmark']})")
    if len(used) == 1:
        name = next(iter(used))
        return [] if name == "unrecorded" else [f"protocol {name}: {summaries[name]}".rstrip(": ")]
    listing = "; ".join(f"{name}: {', '.join(runs)}" for name, runs in used.items())
    return [f"the runs were scored under different protocols ({listing}): their numbers are not comparable"]


def _order_methods(results: Sequence[Mapping[str, Any]], last: str | None) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in results))
    if last is not None:
        if last not in methods:
            raise ValueError(f"--last/last={last!r} is not one of the methods {methods}")
        methods.remove(last)
        methods.append(last)
    return methods


def build_table(
    results: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    precision: Mapping[str, int] | None = None,
    last: str | None = None,
    on_duplicate: Literal["error", "newest"] = "error",
) -> Table:
    """The table model behind :func:`results_table` and the report: values, marks and footnotes.

    ``metrics``: rows to show, in this order (default: every metric, in order of first appearance in the
    results' ``metrics``). A requested metric that no result has raises ``ValueError``; within a benchmark,
    rows where no method has a value are left out (e.g. PSNR on an LR-only set).
    """
    if not results:
        raise ValueError("no results to tabulate")
    results = dedupe_results(validate_all(results), on_duplicate)
    check_same_datasets(results)
    methods = _order_methods(results, last)
    specs = metric_specs(results)
    order = metric_order(specs, metrics)

    by_benchmark: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in results:
        by_benchmark.setdefault(r["benchmark"], {})[r["method"]] = r
    groups: list[Group] = []
    for bench, per_method in by_benchmark.items():
        rows = []
        for metric in order:
            p = metric_precision(metric, precision)
            cells = [
                score_cell(per_method[m]["aggregate"].get(metric) if m in per_method else None, p)
                for m in methods
            ]
            if all(c.value is None for c in cells) and not any(
                metric in r["metrics"] for r in per_method.values()
            ):
                continue  # not computed on this benchmark (e.g. PSNR without GT); computed-but-NaN stays
            lower = bool(specs[metric]["lower_better"])
            mark_cells(cells, lower)
            rows.append(Row(metric, metric_display_name(metric), lower, cells))
        counts = {m: int(per_method[m]["num_scored"]) for m in methods if m in per_method}
        scales = {m: int(per_method[m]["scale"]) for m in methods if m in per_method}
        groups.append(Group(bench, BENCHMARK_NAMES.get(bench, bench), counts, rows, scales))

    footnotes = []
    for g in groups:
        per_method = by_benchmark[g.benchmark]
        notes = coverage_notes(g.label, {m: per_method[m] for m in methods if m in per_method})
        g.flagged = bool(notes)
        footnotes += notes
    footnotes += protocol_notes(results)
    method_notes = {}
    for r in results:
        if r.get("note") and r["method"] not in method_notes:
            method_notes[r["method"]] = str(r["note"])
    return Table(methods, groups, footnotes, {m: method_notes[m] for m in methods if m in method_notes})


# --- Markdown ---------------------------------------------------------------------------------------


def md_escape(text: str) -> str:
    # html.escape: GitHub treats <...> in cells as HTML; "|" would split the cell.
    return html.escape(text, quote=False).replace("|", "\\|")


def md_cell(c: Cell) -> str:
    if c.mark == "best":
        return f"**{c.text}**"
    if c.mark == "second":
        return f"<u>{c.text}</u>"  # Markdown has no underline; GitHub renders this inline HTML
    return c.text


def _render_markdown(t: Table) -> str:
    lines = [
        "| " + " | ".join(["Dataset", "Metric", *(md_escape(t.method_header(m)) for m in t.methods)]) + " |",
        "|" + "|".join([":--", ":--"] + [":-:"] * len(t.methods)) + "|",
    ]
    for g in t.groups:
        dataset = md_escape(g.label) + (f" ({g.count_text})" if g.counts_differ else "")
        dataset += DAGGER if g.flagged else ""
        for i, row in enumerate(g.rows):
            first = dataset if i == 0 else ""
            cells = [first, f"{md_escape(row.label)} {row.arrow}", *map(md_cell, row.cells)]
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if t.footnotes:
        # Blank lines between notes: each renders as its own paragraph.
        text += "\n" + "\n\n".join(f"{DAGGER} {md_escape(f)}" for f in t.footnotes) + "\n"
    if t.method_notes:
        text += "\n" + "\n\n".join(
            f"{DOUBLE_DAGGER} {md_escape(m)}: {md_escape(n)}" for m, n in t.method_notes.items()
        )
        text += "\n"
    return text


# --- LaTeX ------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "×": r"$\times$",
}


def tex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def tex_cell(c: Cell) -> str:
    if c.value is None:
        return "--"
    if c.mark == "best":
        return rf"\textbf{{{c.text}}}"
    if c.mark == "second":
        return rf"\underline{{{c.text}}}"
    return c.text


def _render_latex(t: Table) -> str:
    lines = [
        r"% requires \usepackage{booktabs} and \usepackage{multirow}",
        r"\begin{tabular}{ll" + "c" * len(t.methods) + "}",
        r"\toprule",
        " & ".join(
            ["Dataset", "Metric"]
            + [tex_escape(m) + (r"$^\ddagger$" if m in t.method_notes else "") for m in t.methods]
        )
        + r" \\",
        r"\midrule",
    ]
    for gi, g in enumerate(t.groups):
        if gi:
            lines.append(r"\midrule")
        dataset = tex_escape(g.label) + (f" ({tex_escape(g.count_text)})" if g.counts_differ else "")
        if g.flagged:
            dataset += r"$^\dagger$"
        for i, row in enumerate(g.rows):
            first = rf"\multirow{{{len(g.rows)}}}{{*}}{{{dataset}}}" if i == 0 else ""
            arrow = r"$\downarrow$" if row.lower_better else r"$\uparrow$"
            lines.append(
                " & ".join([first, f"{tex_escape(row.label)} {arrow}", *map(tex_cell, row.cells)]) + r" \\"
            )
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in t.footnotes:
        lines.append(r"\par\footnotesize $^\dagger$ " + tex_escape(note))
    for method, note in t.method_notes.items():
        lines.append(r"\par\footnotesize $^\ddagger$ " + tex_escape(f"{method}: {note}"))
    return "\n".join(lines) + "\n"


def results_table(
    results: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    fmt: Literal["markdown", "latex"] = "markdown",
    precision: Mapping[str, int] | None = None,
    last: str | None = None,
    on_duplicate: Literal["error", "newest"] = "error",
) -> str:
    """Render loaded results (see :func:`load_results`) as a Markdown or LaTeX (booktabs) table.

    ``last`` moves that method to the last column (the "ours" convention); otherwise columns follow first
    appearance. ``precision`` overrides :data:`PRECISION` per metric. Two results for the same
    (method, benchmark) raise ``ValueError`` naming both files unless ``on_duplicate="newest"``.
    """
    table = build_table(results, metrics=metrics, precision=precision, last=last, on_duplicate=on_duplicate)
    if fmt == "markdown":
        return _render_markdown(table)
    if fmt == "latex":
        return _render_latex(table)
    raise ValueError(f"fmt must be 'markdown' or 'latex', got {fmt!r}")


def write_table(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` (parents created); an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
