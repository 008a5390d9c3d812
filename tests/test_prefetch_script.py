"""scripts/prefetch_weights.py: fetches what the paper suite needs; offline, NIQE's model is derived from
basicsr and anything else fails with the file named (the download is replaced by a network error here)."""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def prefetch(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    spec = importlib.util.spec_from_file_location(
        "prefetch_weights", ROOT / "scripts" / "prefetch_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_list_is_the_paper_suite(prefetch) -> None:
    assert prefetch.PAPER_SUITE == ["lpips", "dists", "fid", "niqe", "maniqa", "musiq", "clipiqa"]


def test_offline_niqe_is_derived_and_others_fail_by_name(prefetch, tmp_path: Path, capsys) -> None:
    assert prefetch.main(["--metric", "niqe"]) == 0
    assert (tmp_path / "torch/hub/pyiqa/niqe_modelparameters.mat").is_file()
    assert "derived" in capsys.readouterr().out
    assert prefetch.main(["--metric", "lpips"]) != 0
    out = capsys.readouterr()
    assert "LPIPS_v0.1_alex-df73285e.pth" in out.out + out.err
    assert not (tmp_path / "torch/hub/pyiqa/LPIPS_v0.1_alex-df73285e.pth").exists()
