"""A self-contained HTML report of evaluation results: one ``report.html`` to open, mail or archive.

Contents: the metric table (the same :class:`~restore.evaluation.table.Table` model as the paper table, so
numbers and marks agree), then per benchmark one row per image with the bicubic-upsampled LR, every
method's output and the GT, each labelled with that image's score; under each row a zoomed crop of the
same region in every panel (the window where the methods are furthest from GT), and a control that sorts
the rows by any per-image metric of any method; finally the settings footer (pyiqa version, crop border,
config hashes, skipped images and missing metrics with their reasons).

Everything is inline (CSS, JS, images as base64 data URIs) and a Content-Security-Policy forbids any
other source, so the page shows exactly what it contains, with no network. To keep the file small,
panels are downscaled to ``panel_size`` and stored as JPEG; crops stay at native resolution as PNG and
are enlarged by the browser with nearest-neighbour (``image-rendering: pixelated``).

The page's script sets ``document.body.dataset.ready = "1"`` once initialised; a URL fragment such as
``report.html#sort=psnr:bicubic:desc`` selects the sort on load (headless-browser tests use this).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw

from restore.atomic_write import atomic_path
from restore.data.image_io import ImageReadError, read_image
from restore.evaluation.results import dedupe_results, finite, result_source, validate_all
from restore.evaluation.table import Table, build_table, metric_display_name, metric_precision

__all__ = ["write_report"]

_JPEG_QUALITY = 90
_RECT_COLOR = (255, 32, 32)
_esc = html.escape


def _natural_key(name: str) -> list[Any]:
    # "img2" before "img10", as file browsers sort.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _data_uri(pil: Image.Image, fmt: Literal["JPEG", "PNG"]) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        pil.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps thin edges sharp
    else:
        pil.save(buf, format="PNG", optimize=True)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _json_attr(obj: Any) -> str:
    return _esc(json.dumps(obj, ensure_ascii=False, allow_nan=False), quote=True)


def _panel_dims(h: int, w: int, panel_size: int) -> tuple[int, int]:
    """Display size with the longer side equal to ``panel_size``."""
    s = panel_size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _crop_window(
    srs: Sequence[np.ndarray | None], gt: np.ndarray | None, size: tuple[int, int], crop: int
) -> tuple[int, int, int]:
    """(y, x, c) of the ``c x c`` window (in reference-image pixels) to zoom into.

    With GT: the window of largest mean |SR - GT| averaged over the methods whose output has the GT's size
    (where the methods are furthest from GT, which is where they differ most from each other too).
    Without GT (LR-only sets): the centre.
    """
    h, w = size
    c = max(1, min(crop, h, w))
    usable = [sr for sr in srs if sr is not None and gt is not None and sr.shape == gt.shape]
    if not usable:
        return (h - c) // 2, (w - c) // 2, c
    err = np.mean([np.abs(sr - gt).mean(axis=2) for sr in usable], axis=0, dtype=np.float64)
    integral = np.pad(err.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[c:, c:] - integral[:-c, c:] - integral[c:, :-c] + integral[:-c, :-c]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x), c


@dataclass
class _Panel:
    label: str
    method: str | None  # None for the LR and GT panels
    img: np.ndarray | None
    scores: dict[str, float | None]
    note: str = ""  # why there is no image


def _encode_panel(
    p: _Panel, window: tuple[int, int, int], ref: tuple[int, int], panel_size: int
) -> tuple[str, str]:
    """(panel data URI, crop data URI) with the crop rectangle drawn on the panel."""
    assert p.img is not None
    h, w = p.img.shape[:2]
    # The window is in reference pixels; map it proportionally onto outputs of another size.
    y0, x0, c = window
    sy, sx = h / ref[0], w / ref[1]
    cy0, cx0 = round(y0 * sy), round(x0 * sx)
    cy1, cx1 = max(cy0 + 1, round((y0 + c) * sy)), max(cx0 + 1, round((x0 + c) * sx))
    crop = Image.fromarray(_to_u8(p.img[cy0:cy1, cx0:cx1]))
    if crop.size != (c, c):
        crop = crop.resize((c, c), Image.Resampling.NEAREST)
    ph, pw = _panel_dims(h, w, panel_size)
    interp = cv2.INTER_AREA if ph < h else cv2.INTER_CUBIC
    panel = Image.fromarray(_to_u8(cv2.resize(p.img, (pw, ph), interpolation=interp)))
    f = pw / w
    draw = ImageDraw.Draw(panel)
    draw.rectangle(
        [
            round(cx0 * f),
            round(cy0 * f),
            max(round(cx1 * f) - 1, round(cx0 * f) + 1),
            max(round(cy1 * f) - 1, round(cy0 * f) + 1),
        ],
        outline=_RECT_COLOR,
        width=2,
    )
    return _data_uri(panel, "JPEG"), _data_uri(crop, "PNG")


def _read(path: str | None, notes: list[str]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return read_image(path)
    except ImageReadError as err:
        notes.append(str(err))
        return None


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em} h2{margin-top:2em;border-bottom:1px solid #ccc}
table.metrics{border-collapse:collapse;margin:1em 0;background:#fff}
table.metrics th,table.metrics td{border:1px solid #ccc;padding:.25em .6em;text-align:center}
table.metrics td.dataset,table.metrics td.metric{text-align:left}
.footnote{font-size:.85em;color:#555}
.controls{margin:.8em 0;padding:.5em;background:#eef;display:inline-block;border-radius:4px}
.img-row{background:#fff;border:1px solid #ddd;border-radius:4px;margin:.8em 0;padding:.5em}
.img-row h3{margin:.1em 0 .4em;font-size:1em}
.panels,.crops{display:flex;flex-wrap:nowrap;gap:6px;overflow-x:auto}
figure{margin:0;flex:none;text-align:center}
figcaption{font-size:.8em;line-height:1.3}
.score{font-variant-numeric:tabular-nums;color:#333}
img.crop{image-rendering:pixelated;image-rendering:crisp-edges}
.missing{display:flex;align-items:center;justify-content:center;background:#eee;color:#888;font-size:.8em}
footer{margin-top:3em;font-size:.85em;color:#444}
footer table{border-collapse:collapse} footer td,footer th{border:1px solid #ddd;padding:.2em .5em}
"""

# Sorting and score labels. Scores live in data attributes (JSON) written by Python; the script only
# reorders existing elements, so the page is fully readable with scripts disabled.
_JS = r"""
(function () {
  const meta = JSON.parse(document.getElementById('report-meta').textContent);
  function fmt(metric, v) {
    if (v === null || v === undefined) return '–';
    const p = (meta.precision[metric] !== undefined) ? meta.precision[metric] : 4;
    return Number(v).toFixed(p);
  }
  function showMetric(section, metric) {
    section.querySelectorAll('figure.panel[data-scores]').forEach(function (fig) {
      const scores = JSON.parse(fig.dataset.scores);
      const span = fig.querySelector('.score');
      if (!span) return;
      span.textContent = metric ? (meta.names[metric] || metric) + ': ' + fmt(metric, scores[metric]) : '';
    });
  }
  function sortSection(section) {
    const key = section.querySelector('select.sort-key').value;
    const desc = section.querySelector('select.sort-dir').value === 'desc';
    const list = section.querySelector('.rows');
    const rows = Array.from(list.children);
    let metric = null, method = null;
    if (key !== 'name') {
      const i = key.indexOf(':');
      metric = key.slice(0, i); method = key.slice(i + 1);
    }
    function val(row) {
      if (metric === null) return null;
      const s = JSON.parse(row.dataset.scores);
      const v = s[metric] ? s[metric][method] : null;
      return (v === null || v === undefined) ? null : v;
    }
    rows.sort(function (a, b) {
      const ia = +a.dataset.index, ib = +b.dataset.index;
      if (metric === null) return desc ? ib - ia : ia - ib;
      const va = val(a), vb = val(b);
      if (va === null && vb === null) return ia - ib;
      if (va === null) return 1;   // rows without a score go last in both directions
      if (vb === null) return -1;
      if (va !== vb) return desc ? vb - va : va - vb;
      return ia - ib;
    });
    rows.forEach(function (r) { list.appendChild(r); });
    section.dataset.sorted = key + ':' + (desc ? 'desc' : 'asc');
    showMetric(section, metric || section.dataset.defaultMetric || null);
  }
  function fromHash() {
    const m = /(?:^#|&)sort=([^&]*)/.exec(location.hash);
    if (!m) return;
    const spec = decodeURIComponent(m[1]);
    const j = spec.lastIndexOf(':');
    let key = spec, dir = 'asc';
    if (j > 0 && (spec.slice(j + 1) === 'asc' || spec.slice(j + 1) === 'desc')) {
      key = spec.slice(0, j); dir = spec.slice(j + 1);
    }
    document.querySelectorAll('section.benchmark').forEach(function (section) {
      const sel = section.querySelector('select.sort-key');
      if (!sel || !Array.from(sel.options).some(function (o) { return o.value === key; })) return;
      sel.value = key;
      section.querySelector('select.sort-dir').value = dir;
    });
  }
  fromHash();
  document.querySelectorAll('section.benchmark').forEach(function (section) {
    if (!section.querySelector('select.sort-key')) return;
    section.querySelectorAll('select.sort-key, select.sort-dir').forEach(function (sel) {
      sel.addEventListener('change', function () {
        sortSection(section);
        const spec = section.querySelector('select.sort-key').value + ':' + section.querySelector('select.sort-dir').value;
        history.replaceState(null, '', '#sort=' + encodeURIComponent(spec));
      });
    });
    sortSection(section);
  });
  document.body.dataset.ready = '1';
})();
"""


def _table_html(t: Table) -> str:
    out = ['<table class="metrics">', "<thead><tr><th>Dataset</th><th>Metric</th>"]
    out += [f"<th>{_esc(m)}{'<sup>‡</sup>' if m in t.method_notes else ''}</th>" for m in t.methods]
    out.append("</tr></thead><tbody>")
    for g in t.groups:
        dataset = _esc(g.label) + (f" ({_esc(g.count_text)})" if g.counts_differ else "")
        dataset += "<sup>†</sup>" if g.flagged else ""
        for i, row in enumerate(g.rows):
            out.append('<tr class="metric-row">')
            if i == 0:
                out.append(f'<td class="dataset" rowspan="{len(g.rows)}">{dataset}</td>')
            out.append(f'<td class="metric">{_esc(row.label)} {row.arrow}</td>')
            for c in row.cells:
                text = _esc(c.text)
                if c.mark == "best":
                    out.append(f'<td class="best"><b>{text}</b></td>')
                elif c.mark == "second":
                    out.append(f'<td class="second"><u>{text}</u></td>')
                else:
                    out.append(f"<td>{text}</td>")
            out.append("</tr>")
    out.append("</tbody></table>")
    out += [f'<p class="footnote">† {_esc(n)}</p>' for n in t.footnotes]
    out += [f'<p class="footnote method-note">‡ {_esc(m)}: {_esc(n)}</p>' for m, n in t.method_notes.items()]
    return "\n".join(out)


def _figure(
    label: str,
    uri: str | None,
    dims: tuple[int, int],
    note: str,
    scores: dict | None,
    score_text: str,
    cls: str = "panel",
) -> str:
    h, w = dims
    attrs = f' data-scores="{_json_attr(scores)}"' if scores is not None else ""
    if uri is None:
        body = f'<div class="missing" style="width:{w}px;height:{h}px">{_esc(note or "not available")}</div>'
    else:
        body = f'<img src="{uri}" width="{w}" height="{h}" alt="{_esc(label)}">'
    score = f'<br><span class="score">{_esc(score_text)}</span>' if scores is not None else ""
    return f'<figure class="{cls}"{attrs}>{body}<figcaption>{_esc(label)}{score}</figcaption></figure>'


def _section_html(
    bench: str,
    label: str,
    results: list[Mapping[str, Any]],
    *,
    max_images: int | None,
    panel_size: int,
    zoom: int,
    crop_size: int,
    precision: Mapping[str, int] | None,
    only: Sequence[str] | None,
    notes: list[str],
) -> str:
    methods = [r["method"] for r in results]
    marked = {r["method"]: r["method"] + ("‡" if r.get("note") else "") for r in results}  # see the table
    entries = [{e["name"]: e for e in r["per_image"]} for r in results]
    skipped = [{s["name"]: s["reason"] for s in r["skipped"]} for r in results]
    names = sorted({n for e in entries for n in e}, key=_natural_key)
    total = len(names)
    if max_images is not None:
        names = names[:max_images]
    # Per-image metrics in configured order (set-level metrics such as FID have no per-image score).
    metrics = list(
        dict.fromkeys(m for r in results for m, spec in r["metrics"].items() if spec["kind"] != "set")
    )
    if only is not None:
        metrics = [m for m in only if m in metrics]
    scale = results[0]["scale"]
    default_metric = metrics[0] if metrics else ""

    def score_text(scores: Mapping[str, Any]) -> str:
        if not default_metric:
            return ""
        v = scores.get(default_metric)
        shown = "–" if v is None else f"{v:.{metric_precision(default_metric, precision)}f}"
        return f"{metric_display_name(default_metric)}: {shown}"

    out = [
        f'<section class="benchmark" data-benchmark="{_esc(bench)}" data-default-metric="{_esc(default_metric)}">'
    ]
    shown = f"{len(names)} of {total}" if len(names) < total else f"{total}"
    out.append(f"<h2>{_esc(label)} <small>(×{scale}, {shown} images)</small></h2>")
    if metrics:
        opts = ['<option value="name">name</option>']
        for m in metrics:
            for meth in methods:
                opts.append(
                    f'<option value="{_esc(m)}:{_esc(meth)}">{_esc(metric_display_name(m))} of {_esc(meth)}</option>'
                )
        out.append(
            '<div class="controls"><label>Sort rows by <select class="sort-key">'
            + "".join(opts)
            + '</select></label> <select class="sort-dir"><option value="asc">ascending</option>'
            '<option value="desc">descending</option></select></div>'
        )
    out.append('<div class="rows">')
    for index, name in enumerate(names):
        ref_entry = next(e[name] for e in entries if name in e)
        gt = _read(ref_entry.get("gt"), notes)
        lr = _read(ref_entry.get("lr"), notes)
        srs = [_read(e[name]["sr"], notes) if name in e else None for e in entries]
        first_sr = next((s for s in srs if s is not None), None)
        if gt is not None:
            ref = gt.shape[:2]
        elif first_sr is not None:
            ref = first_sr.shape[:2]
        elif lr is not None:
            ref = (lr.shape[0] * scale, lr.shape[1] * scale)
        else:
            ref = (panel_size, panel_size)
        panels = []
        lr_label = f"LR (bicubic ×{scale})"
        lr_up = None
        if lr is not None:
            lr_up = np.clip(cv2.resize(lr, (ref[1], ref[0]), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
        panels.append(_Panel(lr_label, None, lr_up, {}, "LR not readable"))
        for meth, e, skip, sr in zip(methods, entries, skipped, srs):
            if name in e:
                scores = {m: finite(e[name].get("scores", {}).get(m)) for m in metrics}
                panels.append(_Panel(marked[meth], meth, sr, scores, "output not readable"))
            else:
                reason = skip.get(name)
                panels.append(
                    _Panel(marked[meth], meth, None, {}, f"skipped: {reason}" if reason else "no result")
                )
        if ref_entry.get("gt") is not None:
            panels.append(_Panel("GT", None, gt, {}, "GT not readable"))
        window = _crop_window(srs, gt, ref, crop_size)

        row_scores = {m: {p.method: p.scores.get(m) for p in panels if p.method is not None} for m in metrics}
        out.append(
            f'<div class="img-row" data-name="{_esc(name)}" data-index="{index}" data-scores="{_json_attr(row_scores)}">'
        )
        out.append(f"<h3>{_esc(name)}</h3>")
        figs, crops = [], []
        c = window[2]
        crop_dims = (c * zoom, c * zoom)
        for p in panels:
            dims = (
                _panel_dims(p.img.shape[0], p.img.shape[1], panel_size)
                if p.img is not None
                else _panel_dims(*ref, panel_size)
            )
            scores = p.scores if p.method is not None else None
            if p.img is None:
                figs.append(_figure(p.label, None, dims, p.note, scores, score_text(p.scores)))
                crops.append(_figure(p.label, None, crop_dims, p.note, None, "", cls="crop-fig"))
                continue
            panel_uri, crop_uri = _encode_panel(p, window, ref, panel_size)
            figs.append(_figure(p.label, panel_uri, dims, "", scores, score_text(p.scores)))
            crops.append(
                f'<figure class="crop-fig"><img class="crop" src="{crop_uri}" width="{crop_dims[1]}" '
                f'height="{crop_dims[0]}" alt="{_esc(p.label)} crop"><figcaption>{_esc(p.label)}</figcaption></figure>'
            )
        out.append('<div class="panels">' + "".join(figs) + "</div>")
        y, x, _ = window
        out.append(
            f'<div class="crops" title="crop at x={x}, y={y}, {c}x{c} px, ×{zoom}">'
            + "".join(crops)
            + "</div>"
        )
        out.append("</div>")
    out.append("</div></section>")
    return "\n".join(out)


def _settings_html(results: Sequence[Mapping[str, Any]], notes: list[str]) -> str:
    out = ["<footer>", "<h2>Settings</h2>", '<table class="settings"><thead><tr>']
    cols = [
        "Benchmark",
        "Method",
        "×",
        "images (scored)",
        "pyiqa",
        "crop border",
        "config hash",
        "post",
        "created",
        "file",
    ]
    out += [f"<th>{_esc(c)}</th>" for c in cols] + ["</tr></thead><tbody>"]
    for i, r in enumerate(results):
        s = r.get("settings", {})
        vals = [
            r["benchmark"],
            r["method"],
            str(r["scale"]),
            f"{r['num_images']} ({r['num_scored']})",
            str(s.get("pyiqa_version", "–")),
            str(s.get("crop_border", "–")),
            str(s.get("config_hash", "–")),
            json.dumps(s.get("post", []), ensure_ascii=False),
            str(r.get("created") or "–"),
            result_source(r, i),
        ]
        out.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in vals) + "</tr>")
    out.append("</tbody></table>")
    skipped = [(r, s) for r in results for s in r["skipped"]]
    out.append(f"<h3>Skipped images ({len(skipped)})</h3>")
    if skipped:
        out.append('<ul class="skipped">')
        out += [
            f"<li>{_esc(r['method'])} / {_esc(r['benchmark'])}: <b>{_esc(s['name'])}</b> "
            f"({_esc(str(s.get('path', '')))}) — {_esc(s['reason'])}</li>"
            for r, s in skipped
        ]
        out.append("</ul>")
    missing = [(r, m, why) for r in results for m, why in r["missing_metrics"].items()]
    out.append(f"<h3>Missing metrics ({len(missing)})</h3>")
    if missing:
        out.append('<ul class="missing-metrics">')
        out += [
            f"<li>{_esc(r['method'])} / {_esc(r['benchmark'])}: <b>{_esc(m)}</b> — {_esc(why)}</li>"
            for r, m, why in missing
        ]
        out.append("</ul>")
    if notes:
        out.append(f'<h3>Images the report could not read ({len(notes)})</h3><ul class="notes">')
        out += [f"<li>{_esc(n)}</li>" for n in dict.fromkeys(notes)]
        out.append("</ul>")
    out.append(
        f"<p>Generated {_esc(datetime.now().isoformat(timespec='seconds'))} by restore.evaluation.report.</p>"
    )
    out.append("</footer>")
    return "\n".join(out)


def write_report(
    path: str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    *,
    max_images: int | None = None,
    panel_size: int = 256,
    zoom: int = 4,
    title: str | None = None,
    overwrite: bool = False,
    metrics: Sequence[str] | None = None,
    last: str | None = None,
    precision: Mapping[str, int] | None = None,
    crop_size: int = 64,
    on_duplicate: Literal["error", "newest"] = "error",
) -> Path:
    """Write the self-contained HTML report of ``results`` (loaded with ``load_results``) to ``path``.

    ``max_images`` limits the image rows per benchmark (first by name); ``panel_size`` is the longer side
    of each panel in pixels; the zoomed crops are ``crop_size`` px windows enlarged ``zoom``×.
    ``metrics``/``last``/``precision``/``on_duplicate`` are as in :func:`~restore.evaluation.table.results_table`.
    An existing file is kept unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    if panel_size < 16 or zoom < 1 or crop_size < 4:
        raise ValueError(
            f"need panel_size >= 16, zoom >= 1, crop_size >= 4; got {panel_size}, {zoom}, {crop_size}"
        )
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
    table = build_table(results, metrics=metrics, precision=precision, last=last, on_duplicate=on_duplicate)
    results = dedupe_results(validate_all(results), on_duplicate)
    order = {m: i for i, m in enumerate(table.methods)}
    benchmarks: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        benchmarks.setdefault(r["benchmark"], []).append(r)
    labels = {g.benchmark: g.label for g in table.groups}
    if title is None:
        title = "Evaluation report: " + ", ".join(labels.values())

    all_metrics = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    meta = {
        "names": {m: metric_display_name(m) for m in all_metrics},
        "precision": {m: metric_precision(m, precision) for m in all_metrics},
    }
    notes: list[str] = []
    sections = [
        _section_html(
            bench,
            labels[bench],
            sorted(rs, key=lambda r: order[r["method"]]),
            max_images=max_images,
            panel_size=panel_size,
            zoom=zoom,
            crop_size=crop_size,
            precision=precision,
            only=metrics,
            notes=notes,
        )
        for bench, rs in benchmarks.items()
    ]
    # "<" escaped so the JSON cannot close its <script> element.
    meta_json = json.dumps(meta, ensure_ascii=False).replace("<", "\\u003c")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    doc = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head><body>",
            f"<h1>{_esc(title)}</h1>",
            _table_html(table),
            *sections,
            _settings_html(results, notes),
            f'<script type="application/json" id="report-meta">{meta_json}</script>',
            f"<script>{_JS}</script>",
            "</body></html>",
        ]
    )
    with atomic_path(path) as tmp:  # never a half-written report under the final name
        tmp.write_text(doc, encoding="utf-8")
        if path.exists() and not overwrite:  # created meanwhile by someone else
            raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    return path
