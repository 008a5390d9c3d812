"""Offline training pairs (scripts/make_training_pairs.py): each stored crop equals the Real-ESRGAN pipeline run on
it alone, small images are reflect-padded, and a killed run resumes to the same bytes."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from restore.data.degradation import RealESRGANDegradation
from restore.data.hr_datasets import load_embedded_photo
from restore.data.image_io import read_image, to_tensor, write_image
from restore.data.offline_pairs import make_training_pairs
from restore.data.testsets import PrepareError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_training_pairs as cli  # noqa: E402


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    """Two real photos (128² and 112x104) and one smaller than the 96 crop (72x80, padded)."""
    root = tmp_path_factory.mktemp("hr")
    for name, (h, w) in {"astronaut": (128, 128), "coffee": (112, 104), "chelsea": (72, 80)}.items():
        photo = load_embedded_photo(name)
        write_image(root / "photos" / f"{name}.png", cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA))
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
    }


def test_every_crop_is_the_pipeline_run_on_it_alone(hr_dir, tmp_path) -> None:
    out = tmp_path / "pairs"
    summary = make_training_pairs([hr_dir], out, crop=96, epochs=2, seed=3, batch_size=4, progress=False)
    assert (summary.written, summary.skipped) == (6, 0)
    names = [f"{i:07d}.png" for i in range(1, 7)]
    for sub, side in (("gt", 96), ("lr", 24), ("sr_bicubic", 96)):
        assert sorted(p.name for p in (out / sub).iterdir()) == names
        assert read_image(out / sub / names[0]).shape == (side, side, 3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["crop"] == 96 and meta["gt"] == "sharpened" and len(meta["crops"]) == 6
    full = RealESRGANDegradation.from_preset("realesrgan")  # USM inside, as one call per crop
    padded = 0
    for record in meta["crops"]:
        image = read_image(record["source"])
        pad = record["padded"]
        if pad["bottom"] or pad["right"]:
            padded += 1
            image = cv2.copyMakeBorder(image, 0, pad["bottom"], 0, pad["right"], cv2.BORDER_REFLECT_101)
        box = record["box"]
        crop = image[box["top"] : box["top"] + 96, box["left"] : box["left"] + 96]
        generator = torch.Generator().manual_seed(record["torch_seed"])
        with torch.no_grad():
            result = full(to_tensor(np.ascontiguousarray(crop))[None], generator=generator)
        up = F.interpolate(result.lq, size=(96, 96), mode="bicubic", align_corners=False)
        for sub, expected in (("lr", result.lq), ("gt", result.gt), ("sr_bicubic", up)):
            stored = to_tensor(read_image(out / sub / record["name"]))
            quantised = (expected[0].clamp(0, 1) * 255).round() / 255
            torch.testing.assert_close(stored, quantised, rtol=0, atol=1e-6, msg=f"{sub}/{record['name']}")
    assert padded == 2  # chelsea (72x80) in both epochs


def test_a_killed_run_resumes_to_the_same_bytes_and_other_options_are_refused(hr_dir, tmp_path) -> None:
    reference = tmp_path / "reference"
    make_training_pairs([hr_dir], reference, crop=96, epochs=2, progress=False)
    out = tmp_path / "resumed"
    make_training_pairs([hr_dir], out, crop=96, epochs=2, batch_size=1, progress=False)
    (out / "meta.json").unlink()  # killed before the end: crop 5 half written, crop 6 not started
    (out / "gt" / "0000005.png").unlink()
    for sub in ("lr", "sr_bicubic", "gt"):
        (out / sub / "0000006.png").unlink(missing_ok=True)
    summary = make_training_pairs([hr_dir], out, crop=96, epochs=2, batch_size=3, progress=False)
    assert (summary.written, summary.skipped) == (2, 4)
    assert _digest(out) == _digest(reference)  # batch size and interruption change nothing
    assert make_training_pairs([hr_dir], out, crop=96, epochs=2, progress=False).written == 0  # finished
    with pytest.raises(PrepareError, match="other options \\(seed differ"):
        make_training_pairs([hr_dir], out, crop=96, epochs=2, seed=1, progress=False)
    write_image(tmp_path / "fresh" / "gt" / "stray.png", np.zeros((8, 8, 3)))
    with pytest.raises(PrepareError, match="would not write"):
        make_training_pairs([hr_dir], tmp_path / "fresh", crop=96, progress=False)
    with pytest.raises(PrepareError, match="not divisible"):
        make_training_pairs([hr_dir], tmp_path / "odd", crop=98, progress=False)
    with pytest.raises(PrepareError, match="at least 74 px"):
        make_training_pairs([hr_dir], tmp_path / "small", crop=64, progress=False)


def test_cli_clean_gt_and_summary(hr_dir, tmp_path, capsys) -> None:
    args = [
        "--src",
        str(hr_dir),
        "--out",
        str(tmp_path / "p"),
        "--crop",
        "76",
        "--gt",
        "clean",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert "training_pairs: wrote 3 crop(s), kept from an earlier run 0" in capsys.readouterr().out
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    record = meta["crops"][0]  # astronaut, no padding: the stored GT is the crop itself
    box = record["box"]
    crop = read_image(record["source"])[box["top"] : box["top"] + 76, box["left"] : box["left"] + 76]
    np.testing.assert_array_equal(read_image(tmp_path / "p" / "gt" / record["name"]), crop)
    assert cli.main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 2
    assert "is not a folder" in capsys.readouterr().err
