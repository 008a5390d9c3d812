"""Paper tables: marks, arrows, ties, missing values, LaTeX, results-format checks and the make_table CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from results_fixtures import results_doc, write_results

from restore.evaluation.results import ResultsFormatError, load_results, validate_results
from restore.evaluation.table import build_table, metric_display_name, results_table, write_table

REPO = Path(__file__).resolve().parents[1]


def _three_methods() -> list[dict]:
    return [
        results_doc("bicubic", "realsr", {"psnr": 24.0, "lpips": 0.3, "fid": 120.0}, n=100),
        results_doc("stablesr", "realsr", {"psnr": 25.5, "lpips": 0.2, "fid": 101.234}, n=100),
        results_doc("ours", "realsr", {"psnr": 23.1, "lpips": 0.25, "fid": 95.0}, n=100),
    ]


def test_markdown_layout_marks_and_arrows():
    lines = results_table(_three_methods()).splitlines()
    assert lines == [
        "| Dataset | Metric | bicubic | stablesr | ours |",
        "|:--|:--|:-:|:-:|:-:|",
        "| RealSR | PSNR ↑ | <u>24.00</u> | **25.50** | 23.10 |",
        "|  | LPIPS ↓ | 0.3000 | **0.2000** | <u>0.2500</u> |",
        "|  | FID ↓ | 120.00 | <u>101.23</u> | **95.00** |",
    ]


def test_last_moves_method_to_the_last_column():
    lines = results_table(_three_methods(), last="bicubic").splitlines()
    assert lines[0] == "| Dataset | Metric | stablesr | ours | bicubic |"
    assert lines[2] == "| RealSR | PSNR ↑ | **25.50** | 23.10 | <u>24.00</u> |"
    with pytest.raises(ValueError, match="'nope' is not one of the methods"):
        results_table(_three_methods(), last="nope")


def test_ties_at_displayed_precision_share_the_mark():
    # 24.004 and 23.996 both read 24.00: both bold; the next distinct value is underlined.
    results = [
        results_doc("a", "realsr", {"psnr": 24.004}),
        results_doc("b", "realsr", {"psnr": 23.996}),
        results_doc("c", "realsr", {"psnr": 23.5}),
        results_doc("d", "realsr", {"psnr": 23.5}),
        results_doc("e", "realsr", {"psnr": 20.0}),
    ]
    row = results_table(results).splitlines()[2]
    assert row == "| RealSR | PSNR ↑ | **24.00** | **24.00** | <u>23.50</u> | <u>23.50</u> | 20.00 |"
    everyone_tied = [results_doc(m, "realsr", {"psnr": 24.0}) for m in "xyz"]
    assert (
        results_table(everyone_tied).splitlines()[2]
        == "| RealSR | PSNR ↑ | **24.00** | **24.00** | **24.00** |"
    )


def test_missing_values_show_a_dash_nan_values_show_nan_and_neither_is_ranked():
    results = [
        results_doc("a", "realsr", {"psnr": 24.0, "niqe": 5.0}),
        results_doc("b", "realsr", {"psnr": float("nan"), "niqe": 4.0}),  # NaN: a failed metric
        results_doc("c", "realsr", {"psnr": None}),
        results_doc("d", "realsr", {"psnr": 22.0, "niqe": 6.12345}),
    ]
    lines = results_table(results).splitlines()
    # NaN: computed, no finite value (footnoted from its per-image scores); "–": not computed at all
    assert lines[2] == "| RealSR | PSNR ↑ | **24.00** | NaN | – | <u>22.00</u> |"
    assert lines[3] == "|  | NIQE ↓ | <u>5.0000</u> | **4.0000** | – | 6.1235 |"
    # A lone value is not "best" of anything.
    single = [results_doc("a", "realsr", {"psnr": 24.0}), results_doc("b", "realsr", {"niqe": 4.0})]
    assert results_table(single).splitlines()[2:] == [
        "| RealSR | PSNR ↑ | 24.00 | – |",
        "|  | NIQE ↓ | – | 4.0000 |",
    ]


def test_rows_grouped_by_benchmark_metric_selection_and_empty_rows_dropped():
    results = [
        results_doc("a", "realsr", {"psnr": 24.0, "musiq": 50.0}),
        results_doc("a", "reallr200", {"musiq": 60.0}),
        results_doc("b", "realsr", {"psnr": 25.0, "musiq": 55.0}),
        results_doc("b", "reallr200", {"musiq": 65.0}),
    ]
    lines = results_table(results, metrics=["musiq", "psnr"]).splitlines()
    assert lines[2:] == [
        "| RealSR | MUSIQ ↑ | <u>50.00</u> | **55.00** |",
        "|  | PSNR ↑ | <u>24.00</u> | **25.00** |",
        "| RealLR200 | MUSIQ ↑ | <u>60.00</u> | **65.00** |",  # no PSNR row for the LR-only set
    ]
    with pytest.raises(ValueError, match=r"\['ssim'\] are in no result"):
        results_table(results, metrics=["psnr", "ssim"])


def test_precision_override_and_display_names():
    results = [results_doc("a", "realsr", {"psnr": 24.12345}), results_doc("b", "realsr", {"psnr": 24.0})]
    assert "| RealSR | PSNR ↑ | **24.123** | <u>24.000</u> |" in results_table(results, precision={"psnr": 3})
    assert metric_display_name("psnr_rgb") == "PSNR (RGB)"
    assert metric_display_name("clipiqa") == "CLIPIQA"
    assert metric_display_name("topiq_nr") == "TOPIQ (NR)"
    assert metric_display_name("brisque") == "BRISQUE"


def test_different_image_counts_are_shown_and_footnoted():
    results = [
        results_doc("a", "realsr", {"psnr": 24.0}, n=100),
        results_doc("b", "realsr", {"psnr": 25.0}, n=100, scored=98),
    ]
    text = results_table(results)
    assert text.splitlines()[2] == "| RealSR (n=98–100)† | PSNR ↑ | <u>24.00</u> | **25.00** |"
    assert "† RealSR: the methods were scored on different numbers of images (a: 100, b: 98)" in text
    assert "misleading" in text
    table = build_table(results)
    assert table.groups[0].counts == {"a": 100, "b": 98}
    # Same count everywhere: no count in the cell, no footnote.
    same = results_table(
        [results_doc("a", "realsr", {"psnr": 1.0}), results_doc("b", "realsr", {"psnr": 2.0})]
    )
    assert "†" not in same and "n=" not in same


def test_latex_booktabs_bold_underline_multirow_and_escaping():
    results = _three_methods()
    results[2]["method"] = "ours_v2 & co"
    tex = results_table(results, fmt="latex")
    lines = tex.splitlines()
    assert r"\toprule" in lines and r"\midrule" in lines and r"\bottomrule" in lines
    assert lines[1] == r"\begin{tabular}{llccc}"
    assert lines[3] == r"Dataset & Metric & bicubic & stablesr & ours\_v2 \& co \\"
    assert lines[5] == (
        r"\multirow{3}{*}{RealSR} & PSNR $\uparrow$ & \underline{24.00} & \textbf{25.50} & 23.10 \\"
    )
    assert lines[6] == r" & LPIPS $\downarrow$ & 0.3000 & \textbf{0.2000} & \underline{0.2500} \\"


def test_latex_missing_value_is_an_en_dash():
    results = [results_doc("a", "realsr", {"psnr": 24.0}), results_doc("b", "realsr", {"psnr": None})]
    assert r"& 24.00 & -- \\" in results_table(results, fmt="latex")


def test_markdown_escapes_pipes_and_html_in_method_names():
    results = [results_doc("a|b", "realsr", {"psnr": 24.0}), results_doc("<ours>", "realsr", {"psnr": 25.0})]
    assert results_table(results).splitlines()[0] == "| Dataset | Metric | a\\|b | &lt;ours&gt; |"


def test_duplicate_method_benchmark_names_both_files(tmp_path):
    old = write_results(
        tmp_path / "run1", results_doc("ours", "realsr", {"psnr": 24.0}, created="2026-01-01T00:00:00")
    )
    new = write_results(
        tmp_path / "run2", results_doc("ours", "realsr", {"psnr": 25.0}, created="2026-02-01T00:00:00")
    )
    other = write_results(tmp_path / "run3", results_doc("bicubic", "realsr", {"psnr": 20.0}))
    results = load_results([tmp_path])
    with pytest.raises(ValueError) as err:
        results_table(results)
    assert str(old) in str(err.value) and str(new) in str(err.value)
    assert str(other) not in str(err.value)
    kept = results_table(results, on_duplicate="newest").splitlines()
    assert kept[0] == "| Dataset | Metric | ours | bicubic |"
    assert kept[2] == "| RealSR | PSNR ↑ | **25.00** | <u>20.00</u> |"


def test_conflicting_direction_for_one_metric_is_an_error():
    a = results_doc("a", "realsr", {"psnr": 24.0})
    b = results_doc("b", "realsr", {"psnr": 25.0})
    b["metrics"] = {"psnr": {"lower_better": True, "kind": "fr"}}
    with pytest.raises(ValueError, match="lower-better in one result and higher-better"):
        results_table([a, b])


# ----------------------------------------------------------------------------------------- format checks


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="restore.results/v0"), "'format' must be 'restore.results/v1'"),
        (lambda d: d.pop("benchmark"), "required field 'benchmark' is missing"),
        (lambda d: d.update(method=""), "'method' must be a non-empty string"),
        (lambda d: d.update(scale=0), "'scale' must be a positive integer"),
        (
            lambda d: d["metrics"]["psnr"].pop("lower_better"),
            r"metrics\['psnr'\].lower_better must be true or false",
        ),
        (lambda d: d["metrics"]["psnr"].update(kind="other"), r"metrics\['psnr'\].kind must be one of"),
        (lambda d: d["aggregate"].update(ssim=0.5), r"aggregate\['ssim'\] has no entry in 'metrics'"),
        (lambda d: d["aggregate"].update(psnr="24"), r"aggregate\['psnr'\] must be a number or null"),
        (lambda d: d["per_image"].append(dict(d["per_image"][0])), "image name 'x' appears twice"),
        (
            lambda d: d["per_image"][0].update(gt=3),
            r"per_image\[0\] \('x'\).gt must be a path string or null",
        ),
        (lambda d: d["per_image"][0]["scores"].update(fid=1.0), "set-level metrics have no per-image score"),
        (lambda d: d.update(num_scored=11), "'num_scored' \\(11\\) exceeds 'num_images' \\(10\\)"),
        (lambda d: d.update(skipped=[{"name": "y"}]), r"skipped\[0\] \('y'\) needs a string 'reason'"),
        (lambda d: d.update(created="yesterday"), "'created' must be an ISO 8601"),
    ],
)
def test_malformed_results_name_the_file_and_problem(tmp_path, mutate, message):
    doc = results_doc(
        "a",
        "realsr",
        {"psnr": 24.0, "fid": 10.0},
        per_image=[{"name": "x", "sr": "x.png", "lr": "lx.png", "gt": None, "scores": {"psnr": 24.0}}],
    )
    mutate(doc)
    path = write_results(tmp_path / "run", doc)
    with pytest.raises(ResultsFormatError, match=message) as err:
        load_results([path])
    assert str(err.value).startswith(str(path))


def test_load_results_errors_for_bad_json_missing_paths_and_empty_dirs(tmp_path):
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"format": "restore.results/v1",')
    with pytest.raises(ResultsFormatError, match=f"{bad}: not valid JSON"):
        load_results([tmp_path / "bad"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no results.json found under"):
        load_results([tmp_path / "empty"])
    with pytest.raises(ResultsFormatError, match="expected a JSON object"):
        validate_results([1, 2])


def test_load_results_searches_dirs_fills_defaults_and_resolves_relative_paths(tmp_path):
    doc = results_doc(
        "a",
        "realsr",
        {"psnr": 24.0},
        per_image=[
            {"name": "x", "sr": "images/x.png", "lr": "/abs/lx.png", "gt": None, "scores": {"psnr": 24.0}}
        ],
    )
    for key in ("num_images", "num_scored", "skipped", "missing_metrics", "settings", "created"):
        doc.pop(key)
    path = write_results(tmp_path / "deep" / "er" / "run", doc)
    write_results(tmp_path / "other", results_doc("b", "realsr", {"psnr": 20.0}))
    results = load_results([tmp_path, path])  # the file named twice counts once
    assert [r["method"] for r in results] == ["a", "b"]
    a = results[0]
    assert a["_source"] == str(path)
    assert (a["num_images"], a["num_scored"], a["skipped"], a["created"]) == (1, 1, [], None)
    assert a["per_image"][0]["sr"] == str(path.resolve().parent / "images" / "x.png")
    assert a["per_image"][0]["lr"] == "/abs/lx.png"


def test_write_table_refuses_to_overwrite(tmp_path):
    out = write_table(tmp_path / "sub" / "t.md", "one\n")
    with pytest.raises(FileExistsError):
        write_table(out, "two\n")
    assert out.read_text() == "one\n"
    write_table(out, "two\n", overwrite=True)
    assert out.read_text() == "two\n"


# -------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "scripts/make_table.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_make_table_cli_prints_writes_and_refuses_overwrite(tmp_path):
    for doc in _three_methods():
        write_results(tmp_path / "runs" / doc["method"], doc)
    expected = results_table(load_results([tmp_path / "runs"]), metrics=["psnr", "fid"], last="bicubic")
    out = tmp_path / "table.md"

    done = _cli(str(tmp_path / "runs"), "--metrics", "psnr,fid", "--last", "bicubic", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
    assert out.read_text(encoding="utf-8") == expected
    assert done.stdout.splitlines()[0] == "| Dataset | Metric | ours | stablesr | bicubic |"

    again = _cli(str(tmp_path / "runs"), "--format", "latex", "--out", str(out))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert out.read_text(encoding="utf-8") == expected  # untouched

    forced = _cli(str(tmp_path / "runs"), "--format", "latex", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert r"\textbf{25.50}" in out.read_text(encoding="utf-8")


def test_make_table_cli_reports_malformed_file(tmp_path):
    path = write_results(tmp_path / "run", {**results_doc("a", "realsr", {"psnr": 1.0}), "scale": "x4"})
    done = _cli(str(tmp_path))
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"error: {path}: 'scale' must be a positive integer" in done.stderr
    assert json.loads(path.read_text())["scale"] == "x4"


def test_a_method_note_marks_its_column_in_markdown_latex_and_the_report(tmp_path):
    note = "tiny random prior: its images are noise by design"
    results = [
        results_doc("bicubic", "realsr", {"psnr": 24.0}),
        results_doc("seesr_tiny", "realsr", {"psnr": 16.9}, note=note),
    ]
    lines = results_table(results).splitlines()
    assert lines[0] == "| Dataset | Metric | bicubic | seesr_tiny‡ |"
    assert lines[-1] == f"‡ seesr_tiny: {note}"
    latex = results_table(results, fmt="latex")
    assert r"seesr\_tiny$^\ddagger$" in latex and r"$^\ddagger$ seesr\_tiny: " + note in latex
    from restore.evaluation.report import write_report

    html = write_report(tmp_path / "report.html", results).read_text()
    assert "seesr_tiny<sup>‡</sup>" in html and f"‡ seesr_tiny: {note}" in html
    assert "‡" not in results_table(results[:1])  # no note, no mark
    with pytest.raises(ResultsFormatError, match="'note' must be a non-empty string"):
        validate_results({**results[0], "note": 3})
