"""restore.weights: manifest vs pyiqa's own URL tables, destinations, checks, fetch rules, CLI, random init.

Nothing is downloaded: fetching is exercised with file:// URLs on local files (torch.hub's downloader
handles them), and with a downloader that raises to simulate an offline machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import restore.weights.download as download_module
from restore import PROJECT_ROOT
from restore.weights import (
    MissingWeightsError,
    WeightFile,
    WeightsVerificationError,
    check_metric_weights,
    fetch,
    files_for_metric,
    get,
    manifest,
    metric_model_path,
    pyiqa_cache_synced,
)
from restore.weights.__main__ import main as cli
from restore.weights.download import basicsr_niqe_npz, read_provenance
from restore.weights.random_init import materialize_random_weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("RESTORE_WEIGHTS_DIR", str(tmp_path / "weights"))
    import torch.hub

    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"  # no set_dir override in this process
    return tmp_path / "torch" / "hub"


def compose_paths(weights: Path) -> dict:
    """configs/paths/default.yaml's weights_dir resolved with the environment of the test."""
    from omegaconf import OmegaConf

    paths = OmegaConf.load(PROJECT_ROOT / "configs" / "paths" / "default.yaml")
    paths.root_dir = "/nonexistent"
    return {"weights_dir": OmegaConf.create({"paths": paths}).paths.weights_dir}


def _hf(url: str) -> str:
    """pyiqa builds its URLs with huggingface_hub (HF_ENDPOINT-dependent): compare on the public host."""
    from huggingface_hub import constants

    return url.replace(constants.ENDPOINT.rstrip("/"), "https://huggingface.co")


# --------------------------------------------------------------------------------------- manifest


def test_manifest_urls_are_the_ones_pyiqa_and_torchvision_use():
    import timm.models

    from restore.metrics.compat import install_pkg_resources_packaging

    install_pkg_resources_packaging()  # what the metric suite does before pyiqa's CLIP metrics import
    from pyiqa.archs import (
        clip_model,
        clipiqa_arch,
        dists_arch,
        inception,
        lpips_arch,
        maniqa_arch,
        musiq_arch,
        niqe_arch,
    )
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    expected = {
        "LPIPS_v0.1_alex-df73285e.pth": _hf(lpips_arch.default_model_urls["0.1_alex"]),
        "LPIPS_v0.1_vgg-a78928a0.pth": _hf(lpips_arch.default_model_urls["0.1_vgg"]),
        "alexnet-owt-7be5be79.pth": AlexNet_Weights.IMAGENET1K_V1.url,
        "vgg16-397923af.pth": VGG16_Weights.IMAGENET1K_V1.url,
        "DISTS_weights-f5e65c96.pth": _hf(dists_arch.default_model_urls["url"]),
        "pt_inception-2015-12-05-6726825d.pth": _hf(inception.FID_WEIGHTS_URL),
        "niqe_modelparameters.mat": _hf(niqe_arch.default_model_urls["url"]),
        "niqe_matlab_params.mat": _hf(niqe_arch.default_model_urls["niqe_matlab"]),
        "ckpt_koniq10k.pt": _hf(maniqa_arch.default_model_urls["koniq"]),
        "musiq_koniq_ckpt-e95806b9.pth": _hf(musiq_arch.default_model_urls["koniq10k"]),
        "RN50.pt": clip_model._MODELS["RN50"],
        # the variants of the evaluation protocols (configs/protocol/)
        "MANIQA_PIPAL-ae6d356b.pth": _hf(maniqa_arch.default_model_urls["pipal"]),
        "CLIP-IQA%2B_learned_prompts-603f3273.pth": _hf(clipiqa_arch.default_model_urls["clipiqa+"]),
        "CLIPIQA%2B_ViTL14_512-e66488f2.pth": _hf(clipiqa_arch.default_model_urls["clipiqa+_vitL14_512"]),
        "ViT-L-14.pt": clip_model._MODELS["ViT-L/14"],
    }
    by_name = {wf.name: wf for wf in manifest()}
    for name, url in expected.items():
        assert by_name[name].url == url, name
        assert url.rsplit("/", 1)[1] == name
    vit = by_name["timm/vit_base_patch8_224.augreg2_in21k_ft_in1k/model.safetensors"]
    cfg = timm.models.get_pretrained_cfg("vit_base_patch8_224")  # what MANIQA's create_model resolves
    assert vit.hf_repo == cfg.hf_hub_id and vit.hf_filename == "model.safetensors"
    # hash prefixes follow torch.hub's convention name-<sha256 prefix>.ext; CLIP's full sha256 is in its URL
    for wf in manifest():
        if wf.sha256_prefix:
            assert wf.name.rsplit(".", 1)[0].endswith("-" + wf.sha256_prefix)
    for clip in ("RN50.pt", "ViT-L-14.pt"):
        assert by_name[clip].sha256 == by_name[clip].url.split("/")[-2]


def test_destinations_follow_torch_home(torch_home):
    assert get("LPIPS_v0.1_alex-df73285e.pth").path == torch_home / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth"
    assert get("alexnet-owt-7be5be79.pth").path == torch_home / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert get("RN50.pt").path == torch_home / "clip" / "RN50.pt"  # pyiqa's clip loader: get_dir()/clip
    # released method weights: $RESTORE_WEIGHTS_DIR, the folder the configs read as paths.weights_dir
    weights = torch_home.parents[1] / "weights"
    assert get("RealESRGAN_x4plus.pth").path == weights / "RealESRGAN_x4plus.pth"
    assert compose_paths(weights)["weights_dir"] == str(weights)
    import pyiqa.utils.download_util as du

    before = du.DEFAULT_CACHE_DIR
    with pyiqa_cache_synced() as target:
        assert du.DEFAULT_CACHE_DIR == str(torch_home / "pyiqa") == str(target)
    assert before == du.DEFAULT_CACHE_DIR


def test_files_for_metric_follows_options():
    names = lambda metric, options=None: [wf.name for wf in files_for_metric(metric, options)]  # noqa: E731
    assert names("lpips") == ["LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"]
    assert names("lpips", {"net": "vgg"}) == ["LPIPS_v0.1_vgg-a78928a0.pth", "vgg16-397923af.pth"]
    assert names("lpips-vgg") == ["LPIPS_v0.1_vgg-a78928a0.pth", "vgg16-397923af.pth"]
    assert names("dists") == ["vgg16-397923af.pth", "DISTS_weights-f5e65c96.pth"]
    assert names("fid") == ["pt_inception-2015-12-05-6726825d.pth"]
    assert names("niqe") == ["niqe_modelparameters.mat"]
    assert names("niqe", {"pretrained_model_path": "/x.mat"}) == []
    assert names("niqe_matlab") == ["niqe_matlab_params.mat"]
    assert names("maniqa") == [
        "ckpt_koniq10k.pt",
        "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k/model.safetensors",
    ]
    assert names("musiq") == ["musiq_koniq_ckpt-e95806b9.pth"]
    assert names("clipiqa") == ["RN50.pt"]
    assert names("psnr") == [] and names("ssim") == []


def test_missing_weights_error_names_file_url_path_and_fix(torch_home, caplog):
    with pytest.raises(MissingWeightsError) as info:
        check_metric_weights("lpips")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for wf in (get("LPIPS_v0.1_alex-df73285e.pth"), get("alexnet-owt-7be5be79.pth")):
        assert wf.name in message and wf.fetch_url() in message and str(wf.path) in message
    assert "python -m restore.weights fetch LPIPS_v0.1_alex-df73285e.pth alexnet-owt-7be5be79.pth" in message
    assert f"then copy {torch_home} here" in message
    assert [wf.name for wf in info.value.missing] == [
        "LPIPS_v0.1_alex-df73285e.pth",
        "alexnet-owt-7be5be79.pth",
    ]

    with pytest.raises(MissingWeightsError, match="--from-basicsr"):
        check_metric_weights("niqe")
    check_metric_weights("psnr")  # weight-free: nothing to check
    check_metric_weights("niqe", {"pretrained_model_path": "/elsewhere.mat"})  # user file replaces ours
    with caplog.at_level(logging.DEBUG, logger="restore.weights.manifest"):
        check_metric_weights("topiq_nr")  # not in the manifest: left to pyiqa
    assert "not in the weights manifest" in caplog.text


# --------------------------------------------------------------------------------------- fetch


def _toy_entry(
    tmp_path: Path, content: bytes, *, prefix: str | None = None, sha256: str | None = None, tag: str = ""
) -> WeightFile:
    source = tmp_path / "served" / "toy.bin"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(content)
    name = f"toy{tag}-{prefix or 'nohash'}.pth"
    return WeightFile(
        name=name, url=source.as_uri(), destination="pyiqa", sha256=sha256, sha256_prefix=prefix, used_by={}
    )


def test_fetch_verifies_sha256_and_installs_atomically(torch_home, tmp_path):
    content = b"weights" * 1000
    digest = hashlib.sha256(content).hexdigest()
    good = _toy_entry(tmp_path, content, prefix=digest[:8])
    result = fetch(good, progress=False)
    assert result.status == "downloaded" and result.path == torch_home / "pyiqa" / good.name
    assert result.path.read_bytes() == content
    full = _toy_entry(tmp_path, content, sha256=digest)
    assert fetch(full, progress=False).status == "downloaded"

    for bad in (
        _toy_entry(tmp_path, content, prefix="deadbeef"),
        _toy_entry(tmp_path, content, sha256="0" * 64, tag="-bad"),
    ):
        with pytest.raises(WeightsVerificationError, match="does not match"):
            fetch(bad, progress=False)
        assert not bad.path.exists()
    assert sorted(p.name for p in (torch_home / "pyiqa").iterdir()) == sorted(
        [good.name, full.name, "weights.lock.json"]
    )  # no temp


def test_fetch_never_overwrites_a_valid_file(torch_home, tmp_path):
    content = b"abc" * 100
    entry = _toy_entry(tmp_path, content, prefix=hashlib.sha256(content).hexdigest()[:8])
    fetch(entry, progress=False)
    os.utime(entry.path, (1, 1))
    (tmp_path / "served" / "toy.bin").write_bytes(b"changed upstream")
    result = fetch(entry, progress=False, force=True)  # force only replaces files that fail verification
    assert (
        result.status == "present" and entry.path.read_bytes() == content and entry.path.stat().st_mtime == 1
    )

    entry.path.write_bytes(b"corrupt")
    (tmp_path / "served" / "toy.bin").write_bytes(content)
    assert fetch(entry, progress=False).status == "invalid" and entry.path.read_bytes() == b"corrupt"
    assert (
        fetch(entry, progress=False, force=True).status == "downloaded" and entry.path.read_bytes() == content
    )

    unhashed = _toy_entry(tmp_path, b"new")
    unhashed.path.write_bytes(b"old")
    assert (
        fetch(unhashed, progress=False, force=True).status == "present"
        and unhashed.path.read_bytes() == b"old"
    )


def test_first_fetch_pins_sha256_and_later_fetches_and_loads_refuse_a_change(
    torch_home, tmp_path, capsys, monkeypatch
):
    """Issue 18 case 8: a file without a published hash is pinned at its first fetch, then verified."""
    from restore.weights.checkpoint_file import load_checkpoint_file
    from restore.weights.lock import LOCK_FILE

    first = tmp_path / "first.pth"
    torch.save({"w": torch.ones(2)}, first)
    content = first.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    entry = _toy_entry(tmp_path, content)  # manifest entry with neither sha256 nor prefix
    result = fetch(entry, progress=False)
    assert result.status == "downloaded" and "pinned" in result.message
    lock = json.loads((entry.path.parent / LOCK_FILE).read_text())
    assert lock["files"][entry.name]["sha256"] == digest
    assert lock["files"][entry.name]["url"] == entry.url
    assert entry.verify() is True
    assert load_checkpoint_file(entry.path, written_by="a test")["w"].tolist() == [1.0, 1.0]

    # upstream changes the file: a fresh fetch refuses it and installs nothing
    served = tmp_path / "served" / "toy.bin"
    torch.save({"w": torch.zeros(2)}, served)
    changed = hashlib.sha256(served.read_bytes()).hexdigest()
    entry.path.unlink()
    with pytest.raises(WeightsVerificationError) as info:
        fetch(entry, progress=False)
    message = str(info.value)
    assert digest in message and changed in message and entry.name in message and "--repin" in message
    assert not entry.path.exists()
    assert sorted(p.name for p in entry.path.parent.iterdir()) == [LOCK_FILE]  # no temp left

    # the installed file changes on disk: fetch reports it invalid, loading refuses it
    entry.path.write_bytes(served.read_bytes())
    invalid = fetch(entry, progress=False)
    assert invalid.status == "invalid" and digest in invalid.message and changed in invalid.message
    with pytest.raises(WeightsVerificationError, match="--repin") as info:
        load_checkpoint_file(entry.path, written_by="a test")
    assert str(entry.path) in str(info.value) and digest in str(info.value) and changed in str(info.value)

    # --repin: the user accepts the new file; it is pinned and loads again
    monkeypatch.setattr("restore.weights.__main__.get", {entry.name: entry}.__getitem__)
    assert cli(["fetch", entry.name, "--repin"]) == 0
    assert "pinned" in capsys.readouterr().out
    assert json.loads((entry.path.parent / LOCK_FILE).read_text())["files"][entry.name]["sha256"] == changed
    assert load_checkpoint_file(entry.path, written_by="a test")["w"].tolist() == [0.0, 0.0]


def _npz_arrays() -> dict[str, np.ndarray]:
    with np.load(basicsr_niqe_npz()) as npz:
        return {k: npz[k] for k in npz.files}


def test_niqe_params_derived_from_basicsr(torch_home, monkeypatch):
    for module in [m for m in sys.modules if m == "basicsr" or m.startswith("basicsr.")]:
        monkeypatch.delitem(sys.modules, module)
    npz_path = basicsr_niqe_npz()
    assert "basicsr" not in sys.modules  # found without importing basicsr (which needs a torchvision shim)
    assert npz_path is not None and npz_path.name == "niqe_pris_params.npz"
    result = fetch(get("niqe_modelparameters.mat"), from_basicsr=True)
    assert result.status == "derived" and result.path == torch_home / "pyiqa" / "niqe_modelparameters.mat"
    mat = scipy.io.loadmat(result.path)
    npz = _npz_arrays()
    np.testing.assert_array_equal(mat["mu_prisparam"], npz["mu_pris_param"])
    np.testing.assert_array_equal(mat["cov_prisparam"], npz["cov_pris_param"])
    assert mat["mu_prisparam"].shape == (1, 36) and mat["cov_prisparam"].shape == (36, 36)
    digest = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    assert read_provenance(result.path).endswith(f"basicsr/metrics/niqe_pris_params.npz sha256={digest}")
    assert "basicsr" in result.source
    # kept, not rebuilt, on a second call
    assert fetch(get("niqe_modelparameters.mat"), from_basicsr=True).status == "present"
    assert metric_model_path("niqe") == {"pretrained_model_path": str(result.path)}


def test_niqe_falls_back_to_basicsr_when_download_fails(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    result = fetch(get("niqe_modelparameters.mat"))
    assert result.status == "derived" and "download failed" in result.message and result.path.is_file()
    with pytest.raises(urllib.error.URLError):
        fetch(get("DISTS_weights-f5e65c96.pth"))  # no offline source: the error surfaces
    assert download_module.basicsr_niqe_npz() is not None


# --------------------------------------------------------------------------------------- CLI


def test_cli_list_and_path(torch_home, capsys):
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    for wf in manifest():
        assert wf.name in out
    assert "missing" in out and "present" not in out
    fetch(get("niqe_modelparameters.mat"), from_basicsr=True)
    cli(["list"])
    line = next(
        row for row in capsys.readouterr().out.splitlines() if row.startswith("niqe_modelparameters.mat")
    )
    assert "present" in line and str(torch_home / "pyiqa" / "niqe_modelparameters.mat") in line
    assert cli(["path", "DISTS_weights-f5e65c96.pth"]) == 0
    assert capsys.readouterr().out.strip() == str(torch_home / "pyiqa" / "DISTS_weights-f5e65c96.pth")
    assert cli(["path", "nonexistent.pth"]) == 2
    assert cli(["fetch", "--metric", "niqe", "--from-basicsr"]) == 0
    assert "present" in capsys.readouterr().out


def test_cli_runs_as_module(torch_home):
    env = {**os.environ, "TORCH_HOME": str(torch_home.parent)}
    out = subprocess.run(
        [sys.executable, "-m", "restore.weights", "path", "RN50.pt"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        check=True,
    ).stdout
    assert out.strip() == str(torch_home / "clip" / "RN50.pt")


# --------------------------------------------------------------------------------------- random init


def test_random_lpips_weights_load_through_pyiqa(torch_home):
    import pyiqa

    paths = materialize_random_weights(["lpips"], seed=3)
    assert sorted(p.name for p in paths) == ["LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"]
    assert all(get(p.name).is_random() for p in paths)
    assert json.loads((paths[0].parent / (paths[0].name + ".random-init.json")).read_text())["seed"] == 3
    with pyiqa_cache_synced():
        metric = pyiqa.create_metric("lpips", device="cpu")
    lins = torch.load(get("LPIPS_v0.1_alex-df73285e.pth").path)
    # pyiqa loads LPIPS with strict=False: check the tensors really arrived (a key typo would be ignored)
    for k in range(5):
        torch.testing.assert_close(metric.net.lins[k].model[1].weight, lins[f"lin{k}.model.1.weight"])
    alex = torch.load(get("alexnet-owt-7be5be79.pth").path)
    torch.testing.assert_close(metric.net.net.slice1[0].weight, alex["features.0.weight"])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert metric(x, x).abs().max() < 1e-6 and (metric(x, x.flip(-1)) > 0).all()


def test_random_init_refuses_to_clobber_and_default_cache(torch_home, tmp_path, monkeypatch):
    real = torch_home / "pyiqa" / "pt_inception-2015-12-05-6726825d.pth"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"real weights")
    with pytest.raises(FileExistsError, match="pt_inception"):
        materialize_random_weights(["lpips", "fid"])
    assert real.read_bytes() == b"real weights"
    assert not get("LPIPS_v0.1_alex-df73285e.pth").path.exists()  # nothing written at all
    with pytest.raises(ValueError, match="niqe_modelparameters.mat --from-basicsr"):
        materialize_random_weights(["niqe"])
    with pytest.raises(ValueError, match="cannot write random weights for 'clipiqa'"):
        materialize_random_weights(["clipiqa"])
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the "default" cache, inside tmp
    with pytest.raises(PermissionError, match="default cache"):
        materialize_random_weights(["lpips"])
    assert not (tmp_path / "xdg").exists()


def test_random_fid_and_musiq_load_strictly(torch_home):
    import pyiqa

    materialize_random_weights(["fid", "musiq"], seed=1)
    with pyiqa_cache_synced():
        fid = pyiqa.create_metric("fid", device="cpu")  # load_state_dict(strict=True) inside pyiqa
        musiq = pyiqa.create_metric("musiq", device="cpu")
    state = torch.load(get("pt_inception-2015-12-05-6726825d.pth").path)
    torch.testing.assert_close(fid.net.model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    scores = musiq(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_random_dists_weights_load_through_pyiqa(torch_home):
    import pyiqa

    materialize_random_weights(["dists"])  # includes the 553 MB VGG16
    with pyiqa_cache_synced():
        metric = pyiqa.create_metric("dists", device="cpu")
    state = torch.load(get("DISTS_weights-f5e65c96.pth").path)
    torch.testing.assert_close(metric.net.alpha, state["alpha"])
    torch.testing.assert_close(metric.net.beta, state["beta"])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert metric(x, x).abs().max() < 1e-5 and metric(x, x.flip(-1)).item() > 0
