"""MetricSuite: catalog resolution, weights handling, reference-free mode, batching, outputs, describe().

Learned metrics run with random weights written by restore.weights.random_init into a scratch TORCH_HOME
(real pyiqa loaders); NIQE uses the pristine model derived from basicsr's npz. Values of the weight-free
metrics are checked against independent references in test_metric_calibration.py; here the checks are
about the suite's own behaviour.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from restore.metrics import MetricSpec, MetricSuite, fid_from_features, load_catalog, resolve_spec
from restore.weights import MissingWeightsError, fetch, get
from restore.weights.random_init import materialize_random_weights


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root))
    materialize_random_weights(["lpips", "fid", "musiq"], seed=0)
    fetch(get("niqe_modelparameters.mat"), from_basicsr=True)
    yield root
    mp.undo()


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    return tmp_path / "empty" / "hub"


@pytest.fixture(scope="module")
def batch(photos_256) -> tuple[torch.Tensor, torch.Tensor]:
    """(restored, gt): 4 real photos and a degraded copy (blur + noise, requantised to 8 bits)."""
    gt = photos_256
    blurred = torch.nn.functional.avg_pool2d(gt, 3, stride=1, padding=1, count_include_pad=False)
    noise = 0.02 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))
    return ((blurred + noise).clamp(0, 1) * 255).round() / 255, gt


# --------------------------------------------------------------------------------------- catalog


def test_catalog_has_the_paper_settings():
    catalog = load_catalog()
    assert catalog["psnr"] == {
        "pyiqa": "psnr",
        "options": {"test_y_channel": True, "color_space": "ycbcr"},
        "crop_border": True,
    }
    assert catalog["ssim"]["options"] == {"test_y_channel": True, "color_space": "ycbcr"}
    assert catalog["psnr_rgb"]["options"] == {"test_y_channel": False}
    assert catalog["lpips"] == {"pyiqa": "lpips", "options": {"net": "alex", "version": "0.1"}}
    assert catalog["niqe"] == {"pyiqa": "niqe", "crop_border": True}
    assert {catalog[n]["pyiqa"] for n in ("fid", "dists", "maniqa", "musiq", "clipiqa")} == {
        "fid", "dists", "maniqa", "musiq", "clipiqa",
    }  # fmt: skip
    for name in catalog:
        spec = resolve_spec(name, catalog)  # every entry is valid and names a pyiqa metric
        assert spec.name == name and set(catalog[name]) <= {
            "pyiqa",
            "options",
            "crop_border",
            "implementation",
        }


def test_catalog_options_reach_pyiqa():
    suite = MetricSuite(["psnr", "ssim", "psnr_rgb", "ssim_rgb"])
    psnr, ssim = suite._metrics["psnr"].net, suite._metrics["ssim"]  # ssim: implementation restore
    assert psnr.test_y_channel and psnr.kwargs == {"color_space": "ycbcr"}
    assert ssim.test_y_channel and ssim.color_space == "ycbcr"
    assert not suite._metrics["psnr_rgb"].net.test_y_channel
    assert not suite._metrics["ssim_rgb"].test_y_channel  # pyiqa's ssimc default, kept
    pyiqa_ssim = MetricSuite([{"name": "ssim", "implementation": "pyiqa"}])._metrics["ssim"].net
    assert pyiqa_ssim.test_y_channel and pyiqa_ssim.color_space == "ycbcr" and not pyiqa_ssim.downsample


def test_entry_forms_and_errors():
    catalog = load_catalog()
    assert resolve_spec("psnry", catalog) == MetricSpec("psnry", "psnry")  # raw pyiqa name: its defaults
    assert resolve_spec("psnr", {}) == MetricSpec("psnr", "psnr")  # empty catalog: pyiqa's RGB psnr
    merged = resolve_spec({"name": "psnr", "options": {"test_y_channel": False}}, catalog)
    assert merged == MetricSpec("psnr", "psnr", {"test_y_channel": False}, crop_border=True)
    with pytest.raises(ValueError, match=r"not in the catalog \(psnr, ssim.*pyiqa.list_models\(\)"):
        MetricSuite(["psnr", "no_such_metric"])
    with pytest.raises(ValueError, match="crop_border: true on the spec"):
        MetricSuite([{"name": "p", "pyiqa": "psnr", "options": {"crop_border": 4}}])
    with pytest.raises(ValueError, match="listed twice"):
        MetricSuite(["psnr", "psnr"])
    with pytest.raises(ValueError, match="unknown keys"):
        MetricSuite([{"name": "p", "pyiqa": "psnr", "crop": 4}])
    with pytest.raises(ValueError, match="only 'fid'"):
        MetricSuite(["sfid"])
    with pytest.raises(ValueError, match="on_missing_weights"):
        MetricSuite(["psnr"], on_missing_weights="ignore")


# --------------------------------------------------------------------------------------- weights


def test_missing_weights_error_and_warn(empty_torch_home, caplog):
    with pytest.raises(MissingWeightsError) as info:
        MetricSuite(["psnr", "lpips"])
    wf = get("LPIPS_v0.1_alex-df73285e.pth")
    assert wf.name in str(info.value) and wf.fetch_url() in str(info.value)
    assert str(empty_torch_home / "pyiqa" / wf.name) in str(info.value)

    with caplog.at_level(logging.WARNING, logger="restore.metrics.suite"):
        suite = MetricSuite(["psnr", "lpips", "niqe"], on_missing_weights="warn")
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == [
        "metric lpips skipped",
        "metric niqe skipped",
    ]
    assert "`python -m restore.weights fetch --metric lpips`" in caplog.records[0].getMessage()
    assert suite.names == ["psnr"] and set(suite.missing) == {"lpips", "niqe"}
    assert "alexnet-owt-7be5be79.pth" in suite.missing["lpips"] and "--from-basicsr" in suite.missing["niqe"]


def test_clipiqa_missing_weights_reported_before_import(empty_torch_home):
    with pytest.raises(MissingWeightsError, match="RN50.pt"):
        MetricSuite(["clipiqa"])


def test_pkg_resources_shim_makes_openai_clip_importable():
    from restore.metrics.compat import install_pkg_resources_packaging

    installed = install_pkg_resources_packaging()  # True here: setuptools >= 81 has no pkg_resources
    try:
        import clip  # openai-clip does `from pkg_resources import packaging` at import

        assert callable(clip.tokenize)
        if installed:
            assert sys.modules["pkg_resources"].__doc__.startswith("restore.metrics.compat stub")
        assert install_pkg_resources_packaging() is False  # never replaces an importable one
    finally:
        if installed:
            del sys.modules["pkg_resources"]


# --------------------------------------------------------------------------------------- modes


@pytest.mark.usefixtures("torch_home")
def test_without_reference_fr_and_fid_are_left_out(batch, caplog):
    sr, _ = batch
    with caplog.at_level(logging.INFO, logger="restore.metrics.suite"):
        suite = MetricSuite(["psnr", "lpips", "fid", "niqe", "musiq"], has_reference=False)
    assert suite.names == ["niqe", "musiq"] and suite.kind == {"niqe": "nr", "musiq": "nr"}
    dropped = [r.getMessage() for r in caplog.records if "needs ground truth" in r.getMessage()]
    assert len(dropped) == 3 and all(n in " ".join(dropped) for n in ("psnr", "lpips", "fid"))
    scores = suite.score(sr[:2], None)
    assert set(scores) == {"niqe", "musiq"} and suite.set_features(sr, None) == {}
    with pytest.raises(ValueError, match="need gt"):
        MetricSuite(["psnr"]).score(sr, None)


@pytest.mark.usefixtures("torch_home")
def test_kinds_and_lower_better_come_from_pyiqa():
    import pyiqa
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    suite = MetricSuite(["psnr", "ssim", "lpips", "niqe", "musiq", "fid"])
    assert suite.kind == {
        "psnr": "fr",
        "ssim": "fr",
        "lpips": "fr",
        "niqe": "nr",
        "musiq": "nr",
        "fid": "set",
    }
    assert suite.per_image == ["psnr", "ssim", "lpips", "niqe", "musiq"] and suite.set_level == ["fid"]
    assert suite.lower_better == {
        "psnr": False, "ssim": False, "lpips": True, "niqe": True, "musiq": False, "fid": True,
    }  # fmt: skip
    for name in ("psnr", "ssim"):
        assert suite.lower_better[name] == pyiqa.create_metric(name, device="cpu").lower_better
    for name in suite.names:
        assert suite.lower_better[name] == DEFAULT_CONFIGS[suite.specs[name].pyiqa].get("lower_better", False)


# --------------------------------------------------------------------------------------- scoring


@pytest.mark.usefixtures("torch_home")
def test_scores_are_batch_invariant_deterministic_float64(batch):
    sr, gt = (t[..., :200, :] for t in batch)  # 2x2 NIQE blocks after the crop
    suite = MetricSuite(["psnr", "ssim", "psnr_rgb", "lpips", "niqe"], crop_border=4)
    scores = suite.score(sr, gt)
    for name, values in scores.items():
        assert values.dtype == torch.float64 and values.device.type == "cpu" and values.shape == (4,), name
        assert torch.isfinite(values).all(), name
    for i in range(len(sr)):
        alone = suite.score(sr[i : i + 1], gt[i : i + 1])
        for name in scores:
            torch.testing.assert_close(alone[name][0], scores[name][i], rtol=1e-6, atol=1e-6, msg=name)
    again = suite.score(sr, gt)
    assert all(torch.equal(again[n], scores[n]) for n in scores)
    assert (scores["psnr"] < 40).all() and (scores["lpips"] > 0).all()  # the pairs really differ
    # MUSIQ (multi-scale patches, padded sequences) on its own: its cost hardly depends on the image size
    musiq = MetricSuite(["musiq"])
    small = sr[:2, :, :64, :96]
    both = musiq.score(small, None)["musiq"]
    for i in range(2):
        torch.testing.assert_close(
            musiq.score(small[i : i + 1], None)["musiq"][0], both[i], rtol=1e-6, atol=1e-6
        )


@pytest.mark.usefixtures("torch_home")
def test_input_checks_and_small_images(batch, caplog):
    sr, gt = batch
    suite = MetricSuite(["psnr", "niqe"], crop_border=4)
    with pytest.raises(ValueError, match="same shape"):
        suite.score(sr, gt[..., :128])
    with pytest.raises(ValueError, match=r"float \(N, 3, H, W\)"):
        suite.score(sr[:, 0], gt[:, 0])
    with caplog.at_level(logging.WARNING, logger="restore.metrics.suite"):
        small = suite.score(sr[..., :80, :80], gt[..., :80, :80])  # NIQE needs a 96x96 block
    assert torch.isnan(small["niqe"]).all() and torch.isfinite(small["psnr"]).all()
    niqe_crop = suite._crop_for(suite.specs["niqe"])
    assert f"smaller than the {96 + 2 * niqe_crop} px it needs" in caplog.text
    # an image that the crop border eats whole is NaN too, never an error that aborts the benchmark
    tiny = suite.score(sr[..., :8, :8], gt[..., :8, :8])
    assert torch.isnan(tiny["psnr"]).all() and torch.isnan(tiny["niqe"]).all()


def test_ssim_gives_nan_for_an_image_under_its_11px_window_instead_of_raising(batch):
    sr, gt = batch
    suite = MetricSuite(["psnr", "ssim"], crop_border=0)
    scores = suite.score(sr[..., :10, :10], gt[..., :10, :10])  # pyiqa's conv raises on these
    assert torch.isnan(scores["ssim"]).all() and torch.isfinite(scores["psnr"]).all()
    assert torch.isfinite(suite.score(sr[..., :11, :11], gt[..., :11, :11])["ssim"]).all()


@pytest.mark.usefixtures("torch_home")
def test_set_features_and_finalize(batch):
    sr, gt = batch
    suite = MetricSuite(["psnr", "fid"])
    feats = suite.set_features(sr[:2, :, :64, :64], gt[:2, :, :64, :64])
    assert set(feats) == {"fid"} and set(feats["fid"]) == {"sr", "gt"}
    assert feats["fid"]["sr"].shape == (2, 2048) and feats["fid"]["sr"].dtype == torch.float64
    assert not torch.equal(feats["fid"]["sr"], feats["fid"]["gt"])
    # finalize works on the whole set's features, given whole or in gathered chunks (small D keeps it fast)
    rng = np.random.default_rng(0)
    a, b = torch.from_numpy(rng.normal(0, 1, (30, 6))), torch.from_numpy(rng.normal(0.3, 1.2, (25, 6)))
    expected = fid_from_features(a, b)
    assert suite.finalize({"fid": {"sr": a, "gt": b}}) == {"fid": pytest.approx(expected, rel=1e-12)}
    chunks = {"fid": {"sr": [a[:10], a[10:]], "gt": [b[:7], b[7:20], b[20:]]}}
    assert suite.finalize(chunks)["fid"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(KeyError, match="fid"):
        suite.finalize({})


@pytest.mark.usefixtures("torch_home")
def test_describe_is_json_and_records_what_was_used():
    from restore.weights.manifest import sha256_file

    suite = MetricSuite(["psnr", "ssim_rgb", "lpips", "niqe", "fid"], crop_border=4)
    desc = json.loads(json.dumps(suite.describe()))
    assert list(desc) == suite.names
    assert desc["psnr"]["options"] == {"test_y_channel": True, "color_space": "ycbcr", "crop_border": 4}
    assert desc["lpips"]["options"] == {"net": "alex", "version": "0.1", "crop_border": 0}
    assert desc["ssim_rgb"]["pyiqa"] == "ssimc" and desc["fid"]["kind"] == "set"
    assert desc["lpips"]["random_weights"] is True and "random_weights" not in desc["psnr"]
    assert desc["lpips"]["weights"] == ["LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"]
    niqe = desc["niqe"]
    assert (
        niqe["params_file"] == "niqe_modelparameters.mat" and "niqe_pris_params.npz" in niqe["params_source"]
    )
    assert niqe["params_sha256"] == sha256_file(get("niqe_modelparameters.mat").path)
    assert all(d["pyiqa_version"] == "0.1.16" for d in desc.values())
