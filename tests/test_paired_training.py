"""PairedTrainingFolder: offline-degraded GT/LR training pairs with aligned random crops (cswry/SeeSR utils_data/make_paired_data.py,
qyp2000/XPSR utils_data/make_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from restore.data.datamodule import RestoreDataModule
from restore.data.hr_datasets import load_embedded_photo
from restore.data.image_io import read_image, write_image
from restore.data.paired_training import PairedTrainingFolder, downscale_like_lq
from restore.data.prompts import PromptNotFoundError
from restore.data.transforms import rng_from_torch
from tests.hydra_helpers import compose_config

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]  # 512x512, 300x451, 400x600, 427x640
SCALE = 4
HALF_LSB = 0.5 / 255 + 1e-6  # 8-bit rounding of the stored LR


def _box_down(img: np.ndarray, s: int = SCALE) -> np.ndarray:
    """Exact x``s`` box (block-mean) downscale of an (H, W, 3) image whose sides are multiples of ``s``."""
    h, w = img.shape[:2]
    return img.reshape(h // s, s, w // s, s, 3).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _write_pairs(root: Path, names=PHOTOS) -> tuple[Path, Path]:
    """``root/gt/<name>.png``: the photo cut to multiples of 4; ``root/lq/<name>.png``: its exact x4 box
    downscale."""
    for name in names:
        photo = load_embedded_photo(name)
        h, w = (photo.shape[0] // SCALE) * SCALE, (photo.shape[1] // SCALE) * SCALE
        gt = photo[:h, :w]
        write_image(root / "gt" / f"{name}.png", gt)
        write_image(root / "lq" / f"{name}.png", _box_down(gt))
    return root / "gt", root / "lq"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def side_file(tmp_path_factory) -> Path:
    """XPSR-style prompts: LR caption / LR quality text, and the HR's quality text (``lowlevel_gt``)."""
    path = tmp_path_factory.mktemp("prompts") / "xpsr.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "path": f"{n}.png",
                    "highlevel": f"a photo of {n}",
                    "lowlevel": f"{n} is blurry and noisy",
                    "lowlevel_gt": f"{n} is sharp and clean",
                    "highlevel_gt": f"a sharp photo of {n}",
                }
            )
            + "\n"
            for n in PHOTOS
        )
    )
    return path


def _expected_item(ds: PairedTrainingFolder, index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The item's crops recomputed from the files: same per-item generator, same draw, one window x scale."""
    torch.manual_seed(seed)
    rng = rng_from_torch()
    lq, gt = read_image(ds.lq_files[index]), read_image(ds.gt_files[index])
    window = ds.transform.draw(lq.shape[0], lq.shape[1], rng)
    return window.apply(lq), window.apply(gt, scale=ds.scale)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def test_items_are_aligned_crops(pairs):
    gt_dir, lq_dir = pairs
    ds = PairedTrainingFolder(gt_dir, lq_dir, scale=4, crop_size=64)
    assert len(ds) == 4 and ds.keys == [f"{n}.png" for n in sorted(PHOTOS)]
    for seed in range(12):
        index = seed % 4
        torch.manual_seed(seed)
        item = ds[index]
        assert set(item) == {"gt", "lq", "key"} and item["key"] == f"{sorted(PHOTOS)[index]}.png"
        assert item["gt"].shape == (3, 64, 64) and item["lq"].shape == (3, 16, 16)
        assert item["gt"].dtype == torch.float32 and item["lq"].dtype == torch.float32
        gt, lq = _hwc(item["gt"]), _hwc(item["lq"])
        # Implementation-free check: the LR was made as the box-mean of 4x4 GT blocks, so the GT crop
        # box-downscaled gives the LR crop up to 8-bit rounding only when both cover the same region.
        assert np.abs(_box_down(gt) - lq).max() <= HALF_LSB
        # ... and one LR pixel off is far from it (the check is sensitive to misalignment).
        assert np.abs(_box_down(gt)[:, 1:] - lq[:, :-1]).max() > 10 * HALF_LSB
        exp_lq, exp_gt = _expected_item(ds, index, seed)
        np.testing.assert_array_equal(lq, exp_lq)
        np.testing.assert_array_equal(gt, exp_gt)


def test_flips_and_rotations_are_identical_on_both(pairs):
    gt_dir, lq_dir = pairs
    ds = PairedTrainingFolder(gt_dir, lq_dir, crop_size=64, hflip=True, rotate=True)
    plain = PairedTrainingFolder(gt_dir, lq_dir, crop_size=64, hflip=False, rotate=False)
    seen = set()
    for seed in range(24):
        torch.manual_seed(seed)
        item = ds[0]
        torch.manual_seed(seed)
        ref = plain[0]  # same window (drawn first), no flip/rotation
        torch.manual_seed(seed)
        window = ds.transform.draw(128, 128, rng_from_torch())
        seen.add((window.hflip, window.rot90))
        assert np.abs(_box_down(_hwc(item["gt"])) - _hwc(item["lq"])).max() <= HALF_LSB
        for field in ("gt", "lq"):
            expected = np.flip(_hwc(ref[field]), axis=1) if window.hflip else _hwc(ref[field])
            np.testing.assert_array_equal(_hwc(item[field]), np.rot90(expected, window.rot90))
    assert {f for f, _ in seen} == {False, True} and {k for _, k in seen} == {0, 1, 2, 3}


def test_full_size_crop_and_suffixes(tmp_path):
    root = tmp_path / "p"
    for i in range(2):  # DIV2K-style names: 0001.png <-> 0001x4.png
        gt = load_embedded_photo("astronaut")[i * 64 : i * 64 + 128, :128]
        write_image(root / "gt" / f"{i:04d}.png", gt)
        write_image(root / "lq" / f"{i:04d}x4.png", _box_down(gt))
    ds = PairedTrainingFolder(root / "gt", root / "lq", crop_size=128, lr_suffix="x4", hflip=False)
    assert ds.keys == ["0000x4.png", "0001x4.png"]
    item = ds[1]  # crop == image: the whole pair
    np.testing.assert_array_equal(_hwc(item["gt"]), read_image(root / "gt" / "0001.png"))
    np.testing.assert_array_equal(_hwc(item["lq"]), read_image(root / "lq" / "0001x4.png"))
    write_image(root / "lq" / "0002x4.png", _box_down(gt))  # the matcher of PairedImageFolder
    with pytest.raises(ValueError, match="1 LR name\\(s\\) without GT.*'0002'"):
        PairedTrainingFolder(root / "gt", root / "lq", crop_size=128, lr_suffix="x4")


def test_size_mismatch_names_the_pair(tmp_path):
    root = tmp_path / "p"
    gt = load_embedded_photo("astronaut")[:128, :128]
    write_image(root / "gt" / "a.png", gt)
    write_image(root / "lq" / "a.png", _box_down(gt)[:, :31])  # 32x31, not 128 / 4
    ds = PairedTrainingFolder(root / "gt", root / "lq", crop_size=64)
    with pytest.raises(
        ValueError, match=r"pair 'a.png': GT '.*gt/a.png' is 128x128 but LR is 32x31 \(expected x4\)"
    ):
        ds[0]
    with pytest.raises(ValueError, match="expected x2"):  # a wrong `scale` is caught the same way
        PairedTrainingFolder(root / "gt", root / "lq", scale=2, crop_size=64)[0]


def test_small_pair_names_the_file_and_the_fix(pairs):
    gt_dir, lq_dir = pairs
    ds = PairedTrainingFolder(gt_dir, lq_dir, crop_size=320)  # chelsea's GT is 300x448
    ds[0]  # astronaut 512x512: fine
    with pytest.raises(ValueError) as info:
        ds[1]
    msg = str(info.value)
    assert "chelsea.png" in msg and "300x448" in msg and "crop_size=320" in msg and "--crop" in msg


def test_invalid_arguments(pairs):
    gt_dir, lq_dir = pairs
    with pytest.raises(ValueError, match="not a multiple of scale"):
        PairedTrainingFolder(gt_dir, lq_dir, crop_size=66)
    with pytest.raises(ValueError, match="scale"):
        PairedTrainingFolder(gt_dir, lq_dir, scale=0)
    with pytest.raises(ValueError, match="original_image_prob"):
        PairedTrainingFolder(gt_dir, lq_dir, original_image_prob=1.5)
    with pytest.raises(IndexError):
        PairedTrainingFolder(gt_dir, lq_dir, crop_size=64)[4]


def test_prompt_fields(pairs, side_file):
    gt_dir, lq_dir = pairs
    mapping = {"prompt": "highlevel", "lowlevel_prompt": "lowlevel"}
    ds = PairedTrainingFolder(gt_dir, lq_dir, crop_size=64, prompts=side_file, prompt_key=mapping)
    item = ds[2]
    assert item["key"] == "coffee.png" and item["prompt"] == "a photo of coffee"
    assert item["lowlevel_prompt"] == "coffee is blurry and noisy"
    one = PairedTrainingFolder(gt_dir, lq_dir, crop_size=64, prompts=side_file, prompt_key="lowlevel")[2]
    assert set(one) == {"gt", "lq", "key", "prompt"} and one["prompt"] == "coffee is blurry and noisy"


def test_original_image_prob_one_feeds_the_hr(pairs, side_file):
    gt_dir, lq_dir = pairs
    mapping = {"prompt": "highlevel", "lowlevel_prompt": "lowlevel"}
    kwargs = dict(crop_size=64, prompts=side_file, prompt_key=mapping)
    lr_ds = PairedTrainingFolder(gt_dir, lq_dir, **kwargs)
    # Official XPSR switches only the low-level text to the HR's (lowlevel_prompt_q_GT in train.py).
    ds = PairedTrainingFolder(
        gt_dir,
        lq_dir,
        original_image_prob=1.0,
        original_prompt_key={"lowlevel_prompt": "lowlevel_gt"},
        **kwargs,
    )
    for seed in range(4):
        torch.manual_seed(seed)
        item = ds[seed]
        torch.manual_seed(seed)
        lr_item = lr_ds[seed]
        torch.testing.assert_close(
            item["gt"], lr_item["gt"], rtol=0, atol=0
        )  # the coin is drawn after the crop
        expected = F.interpolate(
            item["gt"][None], size=(16, 16), mode="bicubic", antialias=True, align_corners=False
        )
        torch.testing.assert_close(item["lq"], expected[0].clamp(0, 1), rtol=0, atol=0)
        assert item["lq"].shape == lr_item["lq"].shape and not torch.equal(item["lq"], lr_item["lq"])
        name = item["key"][:-4]
        assert item["prompt"] == f"a photo of {name}"  # the high-level text stays the LR caption
        assert item["lowlevel_prompt"] == f"{name} is sharp and clean"
        assert lr_item["lowlevel_prompt"] == f"{name} is blurry and noisy"
    # Default (None): every field F with an F_gt counterpart in the side-file reads F_gt.
    auto = PairedTrainingFolder(gt_dir, lq_dir, original_image_prob=1.0, **kwargs)
    assert auto.original_prompts.mapping == {"prompt": "highlevel_gt", "lowlevel_prompt": "lowlevel_gt"}
    item = auto[0]
    assert (
        item["prompt"] == "a sharp photo of astronaut"
        and item["lowlevel_prompt"] == "astronaut is sharp and clean"
    )
    # scale 1 (512² LR-upsampled folders, the official layout): lq is exactly the HR crop.
    same = PairedTrainingFolder(gt_dir, gt_dir, scale=1, crop_size=64, original_image_prob=1.0)
    item = same[3]
    torch.testing.assert_close(item["lq"], item["gt"], rtol=0, atol=0)
    assert torch.equal(downscale_like_lq(item["gt"], 1), item["gt"])


def test_original_image_prob_frequency_and_prompt_checks(tmp_path, pairs, side_file):
    root = tmp_path / "tiny"
    gt = load_embedded_photo("coffee")[:32, :32]
    write_image(root / "gt" / "coffee.png", gt)
    write_image(root / "lq" / "coffee.png", _box_down(gt))
    ds = PairedTrainingFolder(root / "gt", root / "lq", crop_size=16, hflip=False, original_image_prob=0.25)
    torch.manual_seed(0)
    lr_crops = 0
    for _ in range(400):
        item = ds[0]
        lr_crops += bool(torch.equal(item["lq"] * 255, torch.round(item["lq"] * 255)))  # 8-bit: stored LR
    assert 300 - 40 <= lr_crops <= 300 + 40  # Binomial(400, 0.75): mean 300, sd 8.7
    gt_dir, lq_dir = pairs
    mapping = {"prompt": "highlevel", "lowlevel_prompt": "lowlevel"}
    with pytest.raises(ValueError, match="does not fill"):
        PairedTrainingFolder(
            gt_dir,
            lq_dir,
            prompts=side_file,
            prompt_key=mapping,
            original_image_prob=0.1,
            original_prompt_key={"caption": "highlevel_gt"},
        )
    partial = tmp_path / "partial.jsonl"
    lines = side_file.read_text().splitlines()
    record = json.loads(lines[1])
    del record["lowlevel_gt"]
    partial.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    with pytest.raises(PromptNotFoundError, match="1 image\\(s\\) have no 'lowlevel_gt'.*'chelsea.png'"):
        PairedTrainingFolder(gt_dir, lq_dir, prompts=partial, prompt_key=mapping, original_image_prob=0.1)
    # Without the HR prompts a p=0 dataset does not need them; without any _gt field nothing changes.
    PairedTrainingFolder(gt_dir, lq_dir, prompts=partial, prompt_key=mapping)
    plain = PairedTrainingFolder(
        gt_dir, lq_dir, prompts=side_file, prompt_key="lowlevel_gt", original_image_prob=0.1
    )
    assert plain.original_prompts.mapping == {"prompt": "lowlevel_gt"}


def _batches(ds, seed: int, n: int = 2) -> list[dict]:
    L.seed_everything(seed, workers=True, verbose=False)
    dm = RestoreDataModule(train=ds, batch_size=2, num_workers=2, persistent_workers=False)
    loader = dm.train_dataloader()
    return [b for b, _ in zip(loader, range(n))]


def test_dataloader_workers_are_seeded_and_collate_strings(pairs, side_file):
    gt_dir, lq_dir = pairs
    ds = PairedTrainingFolder(
        gt_dir,
        lq_dir,
        crop_size=64,
        prompts=side_file,
        prompt_key=OmegaConf.create(
            {"prompt": "highlevel", "lowlevel_prompt": "lowlevel"}
        ),  # as Hydra passes it
        original_image_prob=0.5,
        original_prompt_key=OmegaConf.create({"lowlevel_prompt": "lowlevel_gt"}),
    )
    a, b, c = _batches(ds, 7, n=4), _batches(ds, 7, n=4), _batches(ds, 8, n=4)
    seen = set()
    for batch in a:
        assert batch["gt"].shape == (2, 3, 64, 64) and batch["lq"].shape == (2, 3, 16, 16)
        for field in ("key", "prompt", "lowlevel_prompt"):
            assert isinstance(batch[field], list) and len(batch[field]) == 2
            assert all(isinstance(s, str) for s in batch[field])
        for i, key in enumerate(batch["key"]):
            name = key[:-4]
            assert batch["prompt"][i] == f"a photo of {name}"
            # An item is either the stored LR (8-bit values) with the LR text, or the HR with the HR text.
            stored = torch.equal(batch["lq"][i] * 255, torch.round(batch["lq"][i] * 255))
            quality = "is blurry and noisy" if stored else "is sharp and clean"
            assert batch["lowlevel_prompt"][i] == f"{name} {quality}"
            seen.add(stored)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["lowlevel_prompt"] == y["lowlevel_prompt"]
        assert torch.equal(x["gt"], y["gt"]) and torch.equal(x["lq"], y["lq"])
    assert seen == {False, True}  # both kinds of item within 8 draws at p = 0.5 (seed 7)
    assert any(not torch.equal(x["gt"], y["gt"]) for x, y in zip(a, c))


def test_paired_train_config(tmp_path):
    _write_pairs(tmp_path / "data" / "train_pairs", names=["astronaut", "coffee"])
    side = tmp_path / "p.jsonl"
    side.write_text(
        "".join(
            json.dumps({"path": f"{n}.png", "highlevel": n, "lowlevel": "ok"}) + "\n"
            for n in ("astronaut", "coffee")
        )
    )
    cfg = compose_config(
        "train",
        [
            "data=paired_train",
            "method=realesrnet_tiny",
            f"data.train.prompts={side}",
            "data.train.prompt_key={prompt:highlevel,lowlevel_prompt:lowlevel}",
            "data.train.crop_size=128",
        ],
        tmp_path,
    )
    dm = instantiate(cfg.data)
    ds = dm.train_set
    assert isinstance(ds, PairedTrainingFolder) and ds.keys == ["astronaut.png", "coffee.png"]
    assert ds.scale == 4 and ds.original_image_prob == 0.0 and dm.batch_size == 2
    item = ds[1]
    assert item["gt"].shape == (3, 128, 128) and item["lq"].shape == (3, 32, 32)
    assert item["prompt"] == "coffee" and item["lowlevel_prompt"] == "ok"
