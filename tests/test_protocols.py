"""Evaluation protocols (configs/protocol/): each preset fixes what its sources say, lands in results.json and the
table, changes the run's identity, and refuses a pyiqa outside its range."""

from __future__ import annotations

import json
from pathlib import Path

import pyiqa
import pytest
from hydra_helpers import compose_config, options
from packaging.specifiers import SpecifierSet

from restore.evaluation.protocol import ProtocolError
from restore.evaluation.table import protocol_notes
from restore.run import evaluate
from restore.weights.manifest import files_for_metric

PROTOCOLS = options("protocol")


def test_the_five_presets_exist() -> None:
    assert {"restore", "seesr", "stablesr", "dreamclear", "supir"} <= set(PROTOCOLS)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_each_preset_names_itself_cites_its_sources_and_fits_the_installed_pyiqa(name: str, tmp_path) -> None:
    cfg = compose_config("eval", ["benchmark=realsr", "method=bicubic", f"protocol={name}"], tmp_path)
    protocol = cfg.protocol
    assert protocol.name == name and protocol.summary and protocol.sources and protocol.testsets
    assert pyiqa.__version__ in SpecifierSet(protocol.pyiqa)
    for column in cfg.benchmark.metrics:  # every column the benchmark scores has a catalog entry
        assert column in cfg.metrics


@pytest.mark.parametrize(
    ("name", "crop", "maniqa"),
    [
        ("restore", 0, "maniqa"),
        ("seesr", 4, "maniqa-pipal"),  # cswry/SeeSR#30: MANIQA_PIPAL, crop 4 at x4
        ("stablesr", 0, "maniqa"),
        ("dreamclear", 0, "maniqa"),
        ("supir", 0, "maniqa"),
    ],
)
def test_presets_fix_what_they_cite(name: str, crop: int, maniqa: str, tmp_path) -> None:
    cfg = compose_config("eval", ["benchmark=realsr", "method=bicubic", f"protocol={name}"], tmp_path)
    assert cfg.benchmark.crop_border == crop
    assert cfg.metrics.maniqa.pyiqa == maniqa
    assert cfg.metrics.psnr.options == {
        "test_y_channel": True,
        "color_space": "ycbcr",
    }  # Y of YCbCr in all five
    if maniqa == "maniqa-pipal":
        assert "MANIQA_PIPAL-ae6d356b.pth" in [w.name for w in files_for_metric(maniqa, {})]


def test_seesr_crop_follows_the_scale(tmp_path) -> None:
    cfg = compose_config(
        "eval", ["benchmark=realsr", "method=bicubic", "protocol=seesr", "benchmark.scale=2"], tmp_path
    )
    assert cfg.benchmark.crop_border == 2


@pytest.fixture(scope="module")
def samples_root(tmp_path_factory) -> Path:
    from restore.data.testsets import prepare_samples

    root = tmp_path_factory.mktemp("data")
    prepare_samples(root / "benchmarks/samples", progress=False)
    return root


def _eval(protocol: str, root: Path, tmp_path: Path, *extra: str) -> dict:
    cfg = compose_config(
        "eval",
        [
            "benchmark=samples",
            "method=bicubic",
            f"protocol={protocol}",
            "benchmark.metrics=[psnr,ssim]",
            "num_workers=0",
            "progress=false",
            "report.enabled=true",
            *extra,
        ],
        tmp_path / protocol,
    )
    cfg.paths.data_root = str(root)
    return evaluate(cfg)


def test_results_and_table_carry_the_protocol_and_the_crop_changes_the_numbers(
    samples_root, tmp_path
) -> None:
    plain = _eval("restore", samples_root, tmp_path)
    seesr = _eval("seesr", samples_root, tmp_path)
    assert plain["settings"]["protocol"]["name"] == "restore"
    assert seesr["settings"]["protocol"]["name"] == "seesr" and seesr["settings"]["crop_border"] == 4
    assert seesr["settings"]["config_hash"] != plain["settings"]["config_hash"]  # a separate run
    assert seesr["aggregate"]["psnr"] != pytest.approx(plain["aggregate"]["psnr"], abs=1e-4)
    table = (tmp_path / "seesr/run/table.md").read_text()
    assert "protocol seesr: MANIQA-PIPAL" in table
    assert "protocol seesr" in (tmp_path / "seesr/run/report.html").read_text()
    saved = json.loads((tmp_path / "seesr/run/results.json").read_text())
    assert saved["settings"]["protocol"]["sources"][0].startswith("cswry/SeeSR#30")
    mixed = protocol_notes([plain, seesr])
    assert len(mixed) == 1 and "different protocols" in mixed[0] and "not comparable" in mixed[0]


def test_a_pyiqa_outside_the_protocols_range_is_refused(samples_root, tmp_path) -> None:
    with pytest.raises(ProtocolError, match=r"protocol=seesr needs pyiqa <0.1 .*installed: 0\.1\.16"):
        _eval("seesr", samples_root, tmp_path, "protocol.pyiqa='<0.1'")


def test_a_test_set_prepared_otherwise_is_refused_naming_the_preparation(samples_root, tmp_path) -> None:
    # the samples' GT are 256 px: under a protocol whose tables used 1024 px GT for this set name, refused
    extra = ["+protocol.testsets.samples.gt_size=1024", "+protocol.testsets.samples.prepare='build it'"]
    with pytest.raises(ProtocolError, match=r"scores samples on 1024x1024 GT.* are another size .*build it"):
        _eval("dreamclear", samples_root, tmp_path, *extra)
    assert (
        _eval("dreamclear", samples_root, tmp_path, "+protocol.testsets.samples.gt_size=256")["num_scored"]
        == 8
    )


@pytest.mark.parametrize("name", PROTOCOLS)
def test_every_testset_entry_says_its_gt_size_and_how_to_build_it(name: str, tmp_path) -> None:
    cfg = compose_config("eval", ["benchmark=realsr", "method=bicubic", f"protocol={name}"], tmp_path)
    for entry in cfg.protocol.testsets.values():
        assert set(entry) == {"gt_size", "prepare", "note"} and entry.prepare and entry.note
        assert entry.gt_size is None or entry.gt_size in (512, 1024)


# ------------------------------------------------------------------------------------------ rescore
def _released(root: Path, tmp_path: Path) -> Path:
    """A folder of 'released outputs': bicubic x4 of the samples' LR files, named like them."""
    import torch.nn.functional as F

    from restore.data.image_io import read_image, to_tensor, write_image

    folder = tmp_path / "released"
    for lr in sorted((root / "benchmarks/samples/lq").glob("*.png")):
        x = to_tensor(read_image(lr))[None]
        write_image(folder / lr.name, F.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 1)[0])
    return folder


def _rescore_cfg(root: Path, tmp_path: Path, folders: dict[str, Path]):
    overrides = ["benchmark=samples", "protocol=seesr", "benchmark.metrics=[psnr,ssim]", "num_workers=0"]
    overrides += [f"+folders.{label}={folder}" for label, folder in folders.items()]
    cfg = compose_config("rescore", [*overrides, "progress=false"], tmp_path / "rescore")
    cfg.paths.data_root = str(root)
    return cfg


def test_rescore_puts_released_folders_in_one_table_under_one_protocol(samples_root, tmp_path) -> None:
    import shutil

    from restore.evaluation.rescore import rescore

    first = _released(samples_root, tmp_path)
    second = shutil.copytree(first, tmp_path / "second")
    results = rescore(_rescore_cfg(samples_root, tmp_path, {"MethodA": first, "MethodB": second}))
    assert [r["method"] for r in results] == ["MethodA", "MethodB"]
    assert all(r["settings"]["protocol"]["name"] == "seesr" and r["num_scored"] == 8 for r in results)
    run = tmp_path / "rescore/run"
    table = (run / "table.md").read_text()
    assert "| MethodA | MethodB |" in table and "protocol seesr" in table
    assert (run / "report.html").is_file() and (run / "MethodA/results.json").is_file()


def test_rescore_refuses_mismatched_folders_before_scoring_any(samples_root, tmp_path) -> None:
    import shutil

    from restore.evaluation.benchmark import BenchmarkError
    from restore.evaluation.rescore import rescore

    good = _released(samples_root, tmp_path)
    missing = shutil.copytree(good, tmp_path / "missing")
    next(iter(sorted(missing.glob("*.png")))).unlink()
    small = shutil.copytree(good, tmp_path / "small")
    from PIL import Image

    victim = sorted(small.glob("*.png"))[1]
    image = Image.open(victim)
    image.resize((image.width // 2, image.height // 2)).save(victim)
    cfg = _rescore_cfg(samples_root, tmp_path, {"Good": good, "Missing": missing, "Small": small})
    with pytest.raises(BenchmarkError, match=r"2 of 3 folder\(s\) do not match .*nothing was scored") as err:
        rescore(cfg)
    assert "- Missing (" in str(err.value) and "no restored file" in str(err.value)
    assert "- Small (" in str(err.value) and "differ in size from their GT" in str(err.value)
    assert not (tmp_path / "rescore/run/Good").exists()
