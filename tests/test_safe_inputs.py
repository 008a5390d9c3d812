"""Issue 18 ("Nothing stale, nothing destroyed"): builders never write over their sources, --overwrite leaves no
stale output, unreadable checkpoints get restore's own message, missing inputs name their fix, infer checks its
output before computing, and atomic writers leave no temporary file behind (not even after a kill)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hydra_helpers import compose_config

from restore.atomic_write import atomic_path, atomic_write_text, temp_path
from restore.data.folder_overlap import OverlappingFoldersError, check_folders_disjoint
from restore.data.hr_datasets import export_embedded_photos
from restore.data.image_io import read_image, write_image
from restore.weights.checkpoint_file import CheckpointFileError, check_checkpoint_file, load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepare_testsets():
    """scripts/prepare_testsets.py as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "prepare_testsets_safe", ROOT / "scripts" / "prepare_testsets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of two real photos (astronaut 512x512, coffee 400x600)."""
    folder = tmp_path_factory.mktemp("photos")
    export_embedded_photos(folder, names=["astronaut", "coffee"])
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------ case 2: sources and outputs
def test_reallr200_refuses_a_source_inside_its_output_and_keeps_the_source(
    prepare_testsets, photos, tmp_path, capsys
):
    out = tmp_path / "set"
    assert prepare_testsets.main(["reallr200", "--src", str(photos), "--out", str(out), "--no-progress"]) == 0
    before = _snapshot(out)
    # today's code crops OUT/lq in place: each source is its own output
    argv = ["reallr200", "--src", str(out / "lq"), "--out", str(out), "--max-side", "64", "--overwrite"]
    assert prepare_testsets.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        f"--src '{out / 'lq'}'" in err and f"--out '{out}'" in err and "choose an --out folder outside" in err
    )
    assert _snapshot(out) == before


def test_output_inside_a_source_and_symlinked_sources_are_refused(prepare_testsets, photos, tmp_path, capsys):
    nested = photos / "benchmarks"
    argv = ["reallr200", "--src", str(photos), "--out", str(nested), "--no-progress"]
    assert prepare_testsets.main(argv) == 2
    assert "the output is inside the source" in capsys.readouterr().err and not nested.exists()

    out = tmp_path / "set"
    prepare_testsets.main(["reallr200", "--src", str(photos), "--out", str(out), "--no-progress"])
    link = tmp_path / "link_to_lq"
    link.symlink_to(out / "lq", target_is_directory=True)  # resolves into the output
    argv = ["reallr200", "--src", str(link), "--out", str(out), "--overwrite", "--max-side", "64"]
    assert prepare_testsets.main([*argv, "--no-progress"]) == 2
    assert "the source is inside the output" in capsys.readouterr().err
    assert read_image(out / "lq" / "astronaut.png").shape == (512, 512, 3)  # not cropped

    # realsr: a pair folder inside --out, whichever option named it
    pairs = tmp_path / "paired"
    lr_dir = pairs / "lq"
    write_image(lr_dir / "x.png", np.zeros((8, 8, 3), np.float32))
    write_image(pairs / "gt" / "x.png", np.zeros((32, 32, 3), np.float32))
    argv = [
        "realsr",
        "--lr-dir",
        str(lr_dir),
        "--gt-dir",
        str(pairs / "gt"),
        "--lr-suffix",
        "",
        "--gt-suffix",
        "",
    ]
    assert prepare_testsets.main([*argv, "--lr-size", "4", "--out", str(pairs), "--overwrite"]) == 2
    assert f"--lr-dir '{lr_dir}'" in capsys.readouterr().err
    with pytest.raises(OverlappingFoldersError, match="overlap"):
        prepare_testsets.prepare_paired(
            prepare_testsets.match_dirs(lr_dir, pairs / "gt"),
            pairs,
            lr_size=4,
            overwrite=True,
            progress=False,
        )
    assert read_image(lr_dir / "x.png").shape == (8, 8, 3)


def test_overwrite_removes_the_output_of_a_source_that_became_unreadable(prepare_testsets, tmp_path):
    src, out = tmp_path / "src", tmp_path / "set"
    export_embedded_photos(src, names=["astronaut", "coffee"])
    assert prepare_testsets.main(["reallr200", "--src", str(src), "--out", str(out), "--no-progress"]) == 0
    assert (out / "lq" / "coffee.png").is_file()
    (src / "coffee.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # the source became unreadable
    argv = ["reallr200", "--src", str(src), "--out", str(out), "--overwrite", "--no-progress"]
    assert prepare_testsets.main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert [s["file"] for s in meta["skipped"]] == ["coffee.png"]
    listed = sorted(r["name"] for r in meta["images"])
    assert (
        sorted(p.name for p in (out / "lq").iterdir()) == listed == ["astronaut.png"]
    )  # folder == meta.json


def test_training_and_cfw_pair_builders_refuse_overlap(tmp_path):
    from restore.data.offline_pairs import make_training_pairs
    from restore.methods.stablesr_cfw import make_cfw_pairs

    folder = tmp_path / "hr"
    export_embedded_photos(folder, names=["coffee"])
    with pytest.raises(OverlappingFoldersError, match="the output is inside the source"):
        make_training_pairs([folder], folder, crop=128, progress=False)
    with pytest.raises(OverlappingFoldersError, match="the source is inside the output"):
        make_training_pairs([folder / "lr"], folder, crop=128, progress=False)  # OUT/lr is written
    assert not (folder / "recipe.json").exists()
    check_folders_disjoint([folder / "hr_embedded"], [folder / "gt", folder / "lr"])  # `--src embedded`: fine

    pairs = tmp_path / "pairs"
    write_image(pairs / "gt" / "a.png", np.zeros((8, 8, 3), np.float32))
    write_image(pairs / "inputs" / "a.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(OverlappingFoldersError, match="pairs '.*inputs' and out"):
        make_cfw_pairs(None, pairs, pairs, lq_folder="inputs", progress=False)  # would overwrite the LR
    assert read_image(pairs / "inputs" / "a.png").shape == (2, 2, 3)


# -------------------------------------------------------------------------- case 9b: garbage checkpoints
def _loaders(tmp_path: Path) -> dict[str, Callable[[Path], object]]:
    """Every reader of a checkpoint file in restore, called on ``path``."""
    from restore.methods import dreamclear, stablesr, supir
    from restore.methods.checkpoints import load_method_weights, read_diffusers_weights
    from restore.methods.stablesr_cfw import trained_cfw_autoencoder
    from restore.models.basicsr_weights import load_basicsr_state_dict
    from restore.models.cfw import load_cfw_checkpoint
    from restore.models.dape import read_dape_state
    from restore.models.priors.pixart import read_null_caption
    from restore.models.ram.ram import _read_state
    from restore.models.reference import SpandrelRestorer

    def diffusers(path: Path) -> object:
        folder = tmp_path / "release" / "unet"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "diffusion_pytorch_model.bin").write_bytes(path.read_bytes())
        return read_diffusers_weights(folder, "seesr")

    return {
        "train.py ckpt_path": lambda p: load_method_weights(torch.nn.Linear(1, 1), p, "x"),
        "diffusers .bin": diffusers,
        "DreamClear": lambda p: dreamclear.load_official_dreamclear(None, p),
        "StableSR": lambda p: stablesr.load_official_stablesr(None, p),
        "SUPIR encoder": lambda p: supir.load_encoder_checkpoint(None, p),
        "SUPIR": lambda p: supir.load_official_supir(None, p),
        "CFW run": lambda p: trained_cfw_autoencoder(p, None),
        "CFW release": load_cfw_checkpoint,
        "BasicSR": load_basicsr_state_dict,
        "DAPE": read_dape_state,
        "RAM": _read_state,
        "PixArt": read_null_caption,
        "spandrel": SpandrelRestorer.from_file,
    }


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"text": tmp_path / "garbage.pth", "truncated": tmp_path / "truncated.pth"}
    files["text"].write_bytes(b"this is not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.ones(64)}}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


def test_every_checkpoint_reader_gives_restores_message_never_torchs_advice(tmp_path, monkeypatch):
    from restore.methods import stablesr

    monkeypatch.setattr(stablesr, "_check_variant", lambda module, name: None)  # needs a built StableSR
    for kind, path in _bad_files(tmp_path).items():
        for name, load in _loaders(tmp_path).items():
            with pytest.raises(CheckpointFileError) as info:
                load(path)
            message = str(info.value)
            shown = (
                tmp_path / "release/unet/diffusion_pytorch_model.bin" if name == "diffusers .bin" else path
            )
            assert f"'{shown}' is not a checkpoint written by" in message, (kind, name, message)
            assert "weights_only" not in message and info.value.__cause__ is None, (kind, name)
            assert info.value.__suppress_context__, (kind, name)  # torch's text is not chained either


def test_a_pickle_with_objects_is_refused_by_weights_only_readers(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "extra": Path("x")}, path)  # a pickled Python object besides tensors
    with pytest.raises(CheckpointFileError, match="holds Python objects besides tensors") as info:
        load_checkpoint_file(path, written_by="train.py", fix="give last.ckpt")
    assert str(info.value).endswith("; give last.ckpt") and "weights_only" not in str(info.value)
    assert load_checkpoint_file(path, written_by="a trusted release", weights_only=False)["extra"] == Path(
        "x"
    )


def test_check_checkpoint_file_without_loading(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}}, good)
    check_checkpoint_file(good, written_by="train.py")
    for path in _bad_files(tmp_path).values():
        with pytest.raises(CheckpointFileError, match="not a complete torch.save file"):
            check_checkpoint_file(path, written_by="train.py")


# ------------------------------------------------------------------------------- case 9a, 9c: configs
def test_xpsr_tiny_without_prompts_names_the_command_that_writes_them(tmp_path):
    cfg = compose_config("train", ["experiment=xpsr_tiny"], tmp_path)
    expected = tmp_path / "data" / "xpsr_tiny" / "prompts.jsonl"
    with pytest.raises(Exception) as info:  # noqa: B017 (hydra wraps the FileNotFoundError)
        instantiate(cfg.data)
    message = str(info.value)
    assert "FileNotFoundError" in message
    assert (
        f"python scripts/extract_prompts.py --input-embedded --tiny --field highlevel --field lowlevel "
        f"--out {expected}" in message
    )


def test_realesrnet_tiny_runs_on_a_folder(tmp_path, photos):
    cfg = compose_config(
        "train", ["experiment=realesrnet_tiny", "data=folder", f"data.train.root={photos}"], tmp_path
    )
    datamodule = instantiate(cfg.data)
    assert len(datamodule.train_set) == 2 * 4  # two photos, repeats: 4 of the experiment
    keys = [datamodule.train_set[i]["key"] for i in range(8)]
    assert keys == ["astronaut.png", "coffee.png"] * 4
    assert datamodule.train_set[7]["hq"].shape == (3, 128, 128)
    with pytest.raises(IndexError):
        datamodule.train_set[8]


# ------------------------------------------------------------------------------- case 9d: infer output
def test_infer_checks_its_output_before_loading_anything(tmp_path, photos, monkeypatch):
    import restore.infer
    from restore.run import ConfigError

    def never(*args, **kwargs):
        raise AssertionError("the method was built before the output was checked")

    monkeypatch.setattr(restore.infer, "load_method", never)
    inputs = tmp_path / "in"
    write_image(inputs / "sub" / "a.png", np.zeros((8, 8, 3), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the output folder must go")
    cfg = compose_config(
        "infer",
        ["method=realesrnet_tiny", f"input={inputs}", f"output={out}", "requires_weights=false"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=f"output folder '{out / 'sub'}' is not writable"):
        restore.infer.infer(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_infer_refuses_a_read_only_output(tmp_path, monkeypatch):
    import restore.infer
    from restore.run import ConfigError

    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            restore.infer.check_output_writable(out, [out / "a.png"])
    finally:
        out.chmod(0o755)


# ---------------------------------------------------------------------------- case 9e: temporary files
def test_an_interrupted_write_leaves_neither_temp_nor_a_changed_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_temp_files_of_killed_writers_are_removed_by_the_next_writer(tmp_path):
    folder = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from restore.atomic_write import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half a file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(folder / "a.png")], cwd=ROOT, check=False)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in folder.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.png.") and left[0].endswith(".tmp")  # what a kill leaves

    alive = temp_path(folder / "b.png")  # this process's own name: a live writer's, never removed
    alive.write_bytes(b"in progress")
    other_host = folder / ".c.png.otherhost-1.tmp"  # a writer on another machine of a shared file system
    other_host.write_bytes(b"in progress")
    download = folder / (left[0] + "." + "0" * 32 + ".partial")  # torch.hub's temp inside a killed fetch's
    download.write_bytes(b"half a download")
    write_image(folder / "x.png", np.zeros((4, 4, 3), np.float32))
    assert sorted(p.name for p in folder.iterdir()) == sorted([alive.name, other_host.name, "x.png"])

    atomic_write_text(folder / "y.txt", "text")
    assert (folder / "y.txt").read_text() == "text"
