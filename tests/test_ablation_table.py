"""Ablation tables (make_table.py --ablation): runs as rows labelled by their swept overrides, in sweep order,
metrics as columns with the paper tables' best/second marks; the results fields that carry the sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from results_fixtures import results_doc, write_results

from restore.evaluation.ablation import ablation_table, sweep_order
from restore.evaluation.results import ResultsFormatError, load_results, validate_results
from restore.evaluation.sweep import run_label, short_names, variant_label

REPO = Path(__file__).resolve().parents[1]

# XPSR Tab. 3 shaped: four fusion variants, psnr 25.104 and 25.1049 both read 25.10 (a tie for best), one FID
# missing.
VARIANTS = {
    "sfa": {"psnr": 25.104, "ssim": 0.7312, "lpips": 0.2101, "fid": 101.3},
    "serial": {"psnr": 24.87, "ssim": 0.7330, "lpips": 0.2254, "fid": 99.8},
    "high_only": {"psnr": 25.1049, "ssim": 0.7001, "lpips": 0.2600, "fid": None},
    "low_only": {"psnr": 24.5, "ssim": 0.7100, "lpips": 0.1998, "fid": 120.55},
}
EXPECTED_MD = """\
| RealSR | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ |
|:--|:-:|:-:|:-:|:-:|
| fusion=sfa | **25.10** | <u>0.7312</u> | <u>0.2101</u> | <u>101.30</u> |
| fusion=serial | <u>24.87</u> | **0.7330** | 0.2254 | **99.80** |
| fusion=high_only | **25.10** | 0.7001 | 0.2600 | – |
| fusion=low_only | 24.50 | 0.7100 | **0.1998** | 120.55 |
"""
EXPECTED_TEX = r"""% requires \usepackage{booktabs}
\begin{tabular}{lcccc}
\toprule
RealSR & PSNR $\uparrow$ & SSIM $\uparrow$ & LPIPS $\downarrow$ & FID $\downarrow$ \\
\midrule
fusion=sfa & \textbf{25.10} & \underline{0.7312} & \underline{0.2101} & \underline{101.30} \\
fusion=serial & \underline{24.87} & \textbf{0.7330} & 0.2254 & \textbf{99.80} \\
fusion=high\_only & \textbf{25.10} & 0.7001 & 0.2600 & -- \\
fusion=low\_only & 24.50 & 0.7100 & \textbf{0.1998} & 120.55 \\
\bottomrule
\end{tabular}
"""


def _variant_doc(job: int, fusion: str, benchmark: str = "realsr", more: dict | None = None, **kw) -> dict:
    overrides = {"method.fusion": fusion, **(more or {})}
    return results_doc(
        run_label("xpsr_tiny", overrides), benchmark, VARIANTS[fusion], overrides=overrides, job_num=job, **kw
    )


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    """<sweep>/<job>/eval/realsr/results.json for the four variants, as train.py -m ... evaluate= lays them out."""
    for job, fusion in enumerate(VARIANTS):
        write_results(tmp_path / "sweep" / str(job) / "eval/realsr", _variant_doc(job, fusion))
    return tmp_path / "sweep"


def _make_table(*argv: str) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return make_table.main(list(argv))


def test_ablation_markdown_and_latex(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _make_table("--ablation", str(sweep_dir)) == 0
    assert capsys.readouterr().out == EXPECTED_MD
    assert _make_table("--layout", "ablation", "--format", "latex", str(sweep_dir)) == 0
    assert capsys.readouterr().out == EXPECTED_TEX
    assert _make_table("--ablation", "--metrics", "lpips,psnr", str(sweep_dir)) == 0
    assert capsys.readouterr().out.splitlines()[:3] == [
        "| RealSR | LPIPS ↓ | PSNR ↑ |",
        "|:--|:-:|:-:|",
        "| fusion=sfa | <u>0.2101</u> | **25.10** |",
    ]


def test_rows_follow_the_sweep_not_the_file_names(tmp_path: Path) -> None:
    # job folders 2 and 10 without a recorded job_num: "10" sorts before "2" as text, not as a number
    for job, fusion in ((10, "serial"), (2, "sfa")):
        doc = _variant_doc(job, fusion)
        del doc["job_num"]
        write_results(tmp_path / "sweep" / str(job) / "eval/realsr", doc)
    results = load_results([tmp_path / "sweep"])
    assert [r["_source"].split("/")[-4] for r in results] == ["10", "2"]
    assert [r["method"] for r in sweep_order(results)] == ["xpsr_tiny fusion=sfa", "xpsr_tiny fusion=serial"]
    # a recorded job number wins over the load order (in-memory results have no file to read it from)
    docs = [_variant_doc(job, fusion) for job, fusion in enumerate(VARIANTS)]
    assert ablation_table(docs[::-1]) == EXPECTED_MD


def test_one_table_per_benchmark_with_coverage_notes(sweep_dir: Path) -> None:
    docs = [_variant_doc(0, "sfa", "drealsr"), _variant_doc(1, "serial", "drealsr", n=10, scored=9)]
    text = ablation_table([*load_results([sweep_dir]), *docs], metrics=["psnr"])
    realsr, drealsr = text.split("\n\n", 1)
    assert realsr.splitlines()[0] == "| RealSR | PSNR ↑ |"
    assert drealsr.splitlines()[:4] == [
        "| DRealSR† | PSNR ↑ |",
        "|:--|:-:|",
        "| fusion=sfa | **25.10** |",
        "| fusion=serial | <u>24.87</u> |",
    ]
    note = (
        "† DRealSR: the methods were scored on different numbers of images (fusion=sfa: 10, fusion=serial: 9)"
    )
    assert note in drealsr


def _rows(docs: list[dict]) -> list[str]:
    return [line.split(" | ")[0][2:] for line in ablation_table(docs, metrics=["psnr"]).splitlines()[2:]]


def test_row_labels_name_what_varies() -> None:
    # two sweeps in one table: model.dfc differs between them, model.seed is the same everywhere
    docs = [
        _variant_doc(0, "sfa", more={"method.dfc": "both", "seed": "1"}),
        _variant_doc(0, "sfa", more={"method.dfc": "none", "seed": "1"}),
        _variant_doc(1, "serial", more={"method.dfc": "none", "seed": "1"}),
    ]
    assert _rows(docs) == ["fusion=sfa dfc=both", "fusion=sfa dfc=none", "fusion=serial dfc=none"]
    # a plain eval.py result (no overrides) next to the sweep's runs keeps its method name
    docs = [
        results_doc("bicubic", "realsr", {"psnr": 23.0}),
        _variant_doc(0, "sfa"),
        _variant_doc(1, "serial"),
    ]
    assert _rows(docs) == ["fusion=sfa", "fusion=serial", "bicubic"]
    # labels that would read the same fall back to the (unique) method labels
    docs = [
        _variant_doc(0, "sfa"),
        results_doc("sfa again", "realsr", {"psnr": 1.0}, overrides={"method.fusion": "sfa"}),
    ]
    assert _rows(docs) == ["xpsr_tiny fusion=sfa", "sfa again"]


def test_the_same_run_twice_needs_keep_newest(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    again = _variant_doc(0, "sfa", created="2026-11-24T12:00:00")
    again["aggregate"]["psnr"] = 26.0
    write_results(tmp_path / "rerun/0/eval/realsr", again)
    assert _make_table("--ablation", str(sweep_dir), str(tmp_path / "rerun")) == 1
    assert "two results for method 'xpsr_tiny fusion=sfa'" in capsys.readouterr().err
    assert _make_table("--ablation", "--keep-newest", str(sweep_dir), str(tmp_path / "rerun")) == 0
    assert "| fusion=sfa | **26.00** |" in capsys.readouterr().out
    assert _make_table("--ablation", "--last", "x", str(sweep_dir)) == 1


def test_results_schema_sweep_fields() -> None:
    old = results_doc("m", "b", {"psnr": 1.0})  # written before the fields existed: still valid
    checked = validate_results(old)
    assert checked["overrides"] == {} and checked["job_num"] is None
    with pytest.raises(ResultsFormatError, match="'overrides' must be an object of override key -> value"):
        validate_results({**old, "overrides": {"method.lr": 0.1}})
    with pytest.raises(ResultsFormatError, match="'job_num' must be a non-negative integer or null"):
        validate_results({**old, "job_num": -1})


def test_override_names() -> None:
    assert short_names(["method.fusion", "method/prior", "a.lr", "b.lr"]) == {
        "method.fusion": "fusion",
        "method/prior": "prior",
        "a.lr": "a.lr",
        "b.lr": "b.lr",
    }
    overrides = {"method.fusion": "serial", "method.optimizer.lr": "1e-3"}
    assert variant_label(overrides) == "fusion=serial lr=1e-3"
    assert variant_label(overrides, ["method.optimizer.lr"]) == "lr=1e-3"
    assert run_label("xpsr_tiny", overrides) == "xpsr_tiny fusion=serial lr=1e-3"
    assert run_label("xpsr_tiny", {}) == "xpsr_tiny"
