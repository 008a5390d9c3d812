"""The HTML report: structure (html.parser), self-containment, crop placement, and a headless-Chromium run
that checks the page's script initialises and applies a sort given in the URL fragment."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from results_fixtures import make_lr_only_run, make_paired_runs

from restore.data.image_io import read_image
from restore.evaluation.report import _crop_window, write_report
from restore.evaluation.results import load_results
from restore.evaluation.table import build_table

PANEL = 96  # small panels keep the test fast; the layout does not depend on the size


class _Collector(HTMLParser):
    """Flat record of the elements the tests look at, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.text_in: dict[str, list[str]] = {}
        self.all_text: list[str] = []
        self.cells: list[tuple[str, str]] = []  # (class, text) of metric-table <td>s
        self._cell: list | None = None
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "body":
            self.body = a
        if tag in ("img", "meta", "br", "link", "input"):
            return
        self.stack.append(tag)
        if tag == "td":
            self._cell = [a.get("class", ""), ""]

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell[0], self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        self.all_text.append(data)
        if self.stack:
            self.text_in.setdefault(self.stack[-1], []).append(data)
        if self._cell is not None:
            self._cell[1] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photos_128):
    root = tmp_path_factory.mktemp("runs")
    photos = photos_128[:3].permute(0, 2, 3, 1).numpy().astype(np.float32)
    info = make_paired_runs(root, photos)
    make_lr_only_run(root, photos[:2])
    results = load_results([root / "bicubic", root / "blurred", root / "bicubic_lronly"])
    report = write_report(root / "report.html", results, panel_size=PANEL, title="Test <report>")
    return {"root": root, "results": results, "report": report, **info}


def test_report_table_matches_results_table(runs):
    doc = _parse(runs["report"].read_text(encoding="utf-8"))
    table = build_table(runs["results"])
    assert len(doc.find("tr", "metric-row")) == sum(len(g.rows) for g in table.groups) == 4
    # Every value cell, in order, with the same text and the same mark as the paper table.
    expected = [(c.mark or "", c.text) for g in table.groups for r in g.rows for c in r.cells]
    got = [(cls, text) for cls, text in doc.cells if cls not in ("dataset", "metric")][: len(expected)]
    assert got == expected
    assert ("best", "50.00") in got and ("second", "80.00") in got  # FID: lower is better
    assert "PSNR ↑" in doc.text_in["td"] and "FID ↓" in doc.text_in["td"]


def test_report_rows_panels_labels_and_self_contained(runs):
    text = runs["report"].read_text(encoding="utf-8")
    doc = _parse(text)
    rows = doc.find("div", "img-row")
    assert [r["data-name"] for r in rows] == ["img1", "img2", "img3", "lr1", "lr2"]
    # Paired: LR, bicubic, blurred, GT panels + as many crops per row; LR-only: LR and bicubic.
    imgs = doc.find("img")
    assert len(imgs) == 3 * 4 * 2 + 2 * 2 * 2
    assert len(doc.find("img", "crop")) == 3 * 4 + 2 * 2
    assert all(i["src"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for i in imgs)
    # Nothing loads from elsewhere: no links/external scripts, and a CSP that forbids other sources.
    assert not doc.find("link") and all("src" not in a for t, a in doc.tags if t == "script")
    assert any("default-src 'none'" in a.get("content", "") for a in doc.find("meta"))
    assert "http://" not in text and "https://" not in text

    captions = doc.text_in["figcaption"]
    assert captions.count("LR (bicubic ×4)") == 2 * 5  # panel + crop in each of the 5 rows
    assert captions.count("GT") == 2 * 3
    for name, s in runs["scores"]["blurred"].items():
        assert f"PSNR: {s['psnr']:.2f}" in doc.text_in["span"], name
    assert doc.text_in["title"] == ["Test <report>"]  # escaped in the file, decoded by the parser
    assert "<title>Test &lt;report&gt;</title>" in text

    # The sort control offers every per-image metric of every method (no FID: it is set-level).
    options = [a["value"] for a in doc.find("option")]
    assert {"name", "psnr:bicubic", "psnr:blurred", "sharpness:bicubic", "sharpness:blurred"} <= set(options)
    assert not any(o.startswith("fid:") for o in options)
    assert len(doc.find("select", "sort-key")) == 2 and len(doc.find("select", "sort-dir")) == 2
    # Scores for sorting sit on the rows as JSON (None for missing, never NaN).
    first = json.loads(rows[0]["data-scores"])
    assert first["psnr"] == pytest.approx(
        {
            "bicubic": runs["scores"]["bicubic"]["img1"]["psnr"],
            "blurred": runs["scores"]["blurred"]["img1"]["psnr"],
        }
    )


def test_report_footer_lists_settings_skipped_and_missing(runs):
    doc = _parse(runs["report"].read_text(encoding="utf-8"))
    footer_text = "".join(doc.all_text)
    assert "0.1.16" in footer_text and "h-bicubic" in footer_text and "h-blurred" in footer_text
    assert "broken<1>" in footer_text and "not an image file (<truncated> & co)" in footer_text
    assert "maniqa" in footer_text and "weights file ckpt_koniq10k.pt missing" in footer_text


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_crop_is_the_same_worst_window_in_every_panel(runs):
    """The crop of each panel is the native 64x64 window where the methods' mean |SR - GT| is largest."""
    doc = _parse(runs["report"].read_text(encoding="utf-8"))
    crops = doc.find("img", "crop")[:4]  # img1: LR, bicubic, blurred, GT
    gt = read_image(runs["root"] / "gt" / "img1.png")
    srs = [read_image(runs["root"] / m / "images" / "photos" / "img1.png") for m in ("bicubic", "blurred")]
    err = np.mean([np.abs(s - gt).mean(axis=2) for s in srs], axis=0)
    windows = np.lib.stride_tricks.sliding_window_view(err, (64, 64)).sum(axis=(2, 3))
    y, x = np.unravel_index(np.argmax(windows), windows.shape)
    for img, crop in zip([srs[0], srs[1], gt], crops[1:]):
        assert crop["width"] == crop["height"] == str(64 * 4)
        expected = np.rint(img[y : y + 64, x : x + 64] * 255).astype(np.uint8)
        np.testing.assert_array_equal(_decode(crop["src"]), expected)


def test_crop_window_finds_the_error_and_centres_without_gt():
    gt = np.zeros((100, 120, 3), np.float32)
    sr = gt.copy()
    sr[50:70, 10:30] = 1.0  # the only error
    y, x, c = _crop_window([sr], gt, (100, 120), 20)
    assert (y, x, c) == (50, 10, 20)
    assert _crop_window([sr], None, (100, 120), 64) == (18, 28, 64)
    assert _crop_window([sr], None, (30, 120), 64) == (0, 45, 30)  # window never exceeds the image


def test_report_refuses_overwrite_and_limits_images(runs, tmp_path):
    with pytest.raises(FileExistsError):
        write_report(runs["report"], runs["results"])
    out = write_report(tmp_path / "r.html", runs["results"], max_images=1, panel_size=64, zoom=2)
    doc = _parse(out.read_text(encoding="utf-8"))
    assert [r["data-name"] for r in doc.find("div", "img-row")] == ["img1", "lr1"]
    assert {c["width"] for c in doc.find("img", "crop")} == {"128"}  # 64 px window x2
    write_report(out, runs["results"][:1], overwrite=True, panel_size=64)
    assert len(_parse(out.read_text(encoding="utf-8")).find("div", "img-row")) == 3


def test_missing_output_file_becomes_a_placeholder(runs, tmp_path):
    results = [dict(r) for r in runs["results"][:2]]
    results[1] = {**results[1], "per_image": [dict(e) for e in results[1]["per_image"]]}
    results[1]["per_image"][0]["sr"] = str(tmp_path / "gone.png")
    out = write_report(tmp_path / "r.html", results, panel_size=64)
    doc = _parse(out.read_text(encoding="utf-8"))
    assert len(doc.find("div", "missing")) == 2  # panel and crop of blurred/img1
    assert "output not readable" in doc.text_in["div"]
    assert any("gone.png" in t for t in doc.text_in["li"])  # listed in the footer with the reason


# ------------------------------------------------------------------------------------ headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(exe: str, url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_report_in_headless_chromium(runs, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH")
    t0 = time.time()
    url = runs["report"].resolve().as_uri()

    dom = _run_chromium(exe, url + "#sort=psnr:bicubic:desc", tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    doc = _parse(dom.stdout)
    assert doc.body.get("data-ready") == "1", "the page's script did not run to the end"
    assert len(doc.find("tr", "metric-row")) == 4
    assert len(doc.find("img")) == 32
    by_psnr = sorted(runs["names"], key=lambda n: -runs["scores"]["bicubic"][n]["psnr"])
    assert by_psnr != runs["names"], "fixture must make the sorted order differ from the name order"
    rows = [r["data-name"] for r in doc.find("div", "img-row")]
    assert rows[:3] == by_psnr
    assert rows[3:] == ["lr1", "lr2"]  # no PSNR in the LR-only section: it keeps the name order
    sections = doc.find("section", "benchmark")
    assert [s.get("data-sorted") for s in sections] == ["psnr:bicubic:desc", "name:asc"]

    # Ascending by another method's no-reference score; the labels switch to that metric.
    dom = _run_chromium(exe, url + "#sort=sharpness:blurred:asc", tmp_path, "--dump-dom")
    doc = _parse(dom.stdout)
    by_sharp = sorted(runs["names"], key=lambda n: runs["scores"]["blurred"][n]["sharpness"])
    assert [r["data-name"] for r in doc.find("div", "img-row")][:3] == by_sharp
    assert any(t.startswith("SHARPNESS: ") for t in doc.text_in["span"])

    shot = tmp_path / "shot.png"
    done = _run_chromium(
        exe, url, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars"
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20  # photos and text, not a blank page
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 100  # the crop rectangles are drawn on the panels
    assert time.time() - t0 < 60
