"""HR training datasets, embedded photos, mixtures, paired test sets and the DataModule."""

from __future__ import annotations

import json
import math
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, SequentialSampler, default_collate

from restore.data.datamodule import RestoreDataModule
from restore.data.hr_datasets import (
    EMBEDDED_PHOTO_NAMES,
    EmbeddedPhotos,
    ImageFolderHR,
    MixtureDataset,
    export_embedded_photos,
    load_embedded_photo,
)
from restore.data.image_io import read_image, write_image
from restore.data.paired import LRImageFolder, PairedImageFolder, collate_variable_size
from restore.data.prompts import PromptNotFoundError
from restore.data.transforms import RandomCropFlip, rng_from_torch

SMALL_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr")
    export_embedded_photos(root / "skimage", SMALL_PHOTOS)
    return root


# --------------------------------------------------------------------------- embedded photos


@pytest.mark.parametrize("name", EMBEDDED_PHOTO_NAMES)
def test_each_embedded_photo_loads_as_rgb(name):
    img = load_embedded_photo(name)
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 256
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.03  # a photo, not a flat image
    # Colour, not grey stored as RGB: channels differ somewhere noticeably.
    assert np.abs(img[..., 0] - img[..., 1]).max() > 0.1 or np.abs(img[..., 1] - img[..., 2]).max() > 0.1
    # Values are exactly k / 255 (8-bit source).
    np.testing.assert_array_equal(np.rint(img * 255) / np.float32(255), img)


def test_embedded_photo_known_sizes_and_unknown_name():
    assert load_embedded_photo("astronaut").shape == (512, 512, 3)
    assert load_embedded_photo("chelsea").shape == (300, 451, 3)
    with pytest.raises(ValueError, match="available"):
        load_embedded_photo("lena")


def test_embedded_photos_dataset():
    ds = EmbeddedPhotos(names=["chelsea", "coffee"], crop_size=128, repeats=3)
    assert len(ds) == 6
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert keys == ["skimage/chelsea.png", "skimage/coffee.png"] * 3
    item = ds[1]
    assert set(item) == {"hq", "key"}
    assert item["hq"].shape == (3, 128, 128) and item["hq"].dtype == torch.float32
    assert item["hq"].min() >= 0.0 and item["hq"].max() <= 1.0
    with pytest.raises(IndexError):
        ds[6]


def test_export_embedded_photos_round_trip(photo_root):
    files = sorted((photo_root / "skimage").glob("*.png"))
    assert [f.stem for f in files] == sorted(SMALL_PHOTOS)
    for f in files:
        np.testing.assert_array_equal(read_image(f), load_embedded_photo(f.stem))
    # Deterministic content: re-exporting over the same files is allowed by default.
    assert export_embedded_photos(photo_root / "skimage", ["chelsea"]) == [
        photo_root / "skimage" / "chelsea.png"
    ]


# --------------------------------------------------------------------------- ImageFolderHR


def test_image_folder_hr_items(photo_root):
    ds = ImageFolderHR(photo_root, crop_size=96)
    assert len(ds) == 4
    assert ds.keys == [f"skimage/{n}.png" for n in sorted(SMALL_PHOTOS)]
    torch.manual_seed(7)
    item = ds[2]
    assert set(item) == {"hq", "key"} and item["key"] == "skimage/coffee.png"
    assert item["hq"].shape == (3, 96, 96) and item["hq"].dtype == torch.float32
    # The item is exactly read_image + RandomCropFlip driven by torch's RNG.
    torch.manual_seed(7)
    expected = RandomCropFlip(96)(read_image(photo_root / "skimage/coffee.png"), rng_from_torch())
    np.testing.assert_array_equal(item["hq"].permute(1, 2, 0).numpy(), expected)


def test_image_folder_hr_limit_and_file_list(photo_root, tmp_path):
    ds = ImageFolderHR(photo_root, crop_size=64, limit=2)
    assert ds.keys == ["skimage/astronaut.png", "skimage/chelsea.png"]
    with pytest.raises(ValueError, match="only 4 images"):
        ImageFolderHR(photo_root, crop_size=64, limit=5)
    with pytest.raises(ValueError, match="limit"):
        ImageFolderHR(photo_root, crop_size=64, limit=0)
    lst = tmp_path / "train.json"  # LSDIR-style JSON list of objects
    lst.write_text(json.dumps([{"path": "skimage/rocket.png"}, {"path": "skimage/chelsea.png"}]))
    ds = ImageFolderHR(photo_root, file_list=lst, crop_size=64)
    assert ds.keys == ["skimage/rocket.png", "skimage/chelsea.png"]
    assert ds[0]["hq"].shape == (3, 64, 64)


def test_image_folder_hr_prompts(photo_root, tmp_path):
    side = tmp_path / "prompts.jsonl"
    side.write_text(
        "".join(
            json.dumps({"path": f"skimage/{n}.png", "prompt": f"photo of {n}"}) + "\n" for n in SMALL_PHOTOS
        )
    )
    ds = ImageFolderHR(photo_root, crop_size=64, prompts=side)
    assert [ds[i]["prompt"] for i in range(len(ds))] == [f"photo of {n}" for n in sorted(SMALL_PHOTOS)]
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"path": "skimage/coffee.png", "prompt": "coffee"}) + "\n")
    with pytest.raises(PromptNotFoundError, match="skimage/astronaut.png"):  # checked at construction
        ImageFolderHR(photo_root, crop_size=64, prompts=partial)
    ds = ImageFolderHR(photo_root, crop_size=64, prompts=partial, prompt_missing="empty")
    assert [ds[i]["prompt"] for i in range(4)] == ["", "", "coffee", ""]


def _xpsr_side_file(path, keys):
    """Two prompts per image (XPSR): a caption and a quality description."""
    path.write_text(
        "".join(
            json.dumps({"path": k, "highlevel": f"caption {k}", "lowlevel": f"quality {k}"}) + "\n"
            for k in keys
        )
    )
    return path


XPSR_FIELDS = {"prompt": "highlevel", "lowlevel_prompt": "lowlevel"}


def test_prompt_mapping_image_folder_hr(photo_root, tmp_path):
    keys = [f"skimage/{n}.png" for n in sorted(SMALL_PHOTOS)]
    side = _xpsr_side_file(tmp_path / "x.jsonl", keys)
    for mapping in (XPSR_FIELDS, OmegaConf.create(XPSR_FIELDS)):  # Hydra passes a DictConfig
        ds = ImageFolderHR(photo_root, crop_size=32, prompts=side, prompt_key=mapping)
        item = ds[1]
        assert set(item) == {"hq", "key", "prompt", "lowlevel_prompt"}
        assert (
            item["prompt"] == "caption skimage/chelsea.png"
            and item["lowlevel_prompt"] == "quality skimage/chelsea.png"
        )
    # The str form is the one-prompt form: the field goes to item["prompt"].
    assert ImageFolderHR(photo_root, crop_size=32, prompts=side, prompt_key="lowlevel")[0]["prompt"] == (
        "quality skimage/astronaut.png"
    )
    # One field missing for one image: an error at construction naming the image and the field.
    lines = side.read_text().splitlines()
    lines[2] = json.dumps({"path": keys[2], "highlevel": "only a caption"})
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptNotFoundError, match="1 image\\(s\\) have no 'lowlevel'.*skimage/coffee.png"):
        ImageFolderHR(photo_root, crop_size=32, prompts=partial, prompt_key=XPSR_FIELDS)
    ds = ImageFolderHR(
        photo_root, crop_size=32, prompts=partial, prompt_key=XPSR_FIELDS, prompt_missing="empty"
    )
    assert [(ds[i]["prompt"], ds[i]["lowlevel_prompt"]) for i in (1, 2)] == [
        ("caption skimage/chelsea.png", "quality skimage/chelsea.png"),
        ("only a caption", ""),
    ]
    # Malformed mappings fail even without a side-file (config typo caught when the dataset is built).
    with pytest.raises(ValueError, match="holds an image"):
        ImageFolderHR(photo_root, crop_size=32, prompt_key={"hq": "highlevel"})
    with pytest.raises(ValueError, match="non-empty mapping"):
        ImageFolderHR(photo_root, crop_size=32, prompt_key={})
    with pytest.raises(ValueError, match="non-empty name"):
        ImageFolderHR(photo_root, crop_size=32, prompt_key={"prompt": 3})


def test_prompt_mapping_embedded_photos(tmp_path):
    names = ["chelsea", "coffee"]
    side = _xpsr_side_file(tmp_path / "x.jsonl", [f"skimage/{n}.png" for n in names])
    ds = EmbeddedPhotos(names=names, crop_size=32, repeats=2, prompts=side, prompt_key=XPSR_FIELDS)
    assert [ds[i]["lowlevel_prompt"] for i in range(4)] == [f"quality skimage/{n}.png" for n in names] * 2
    assert ds[1]["prompt"] == "caption skimage/coffee.png"
    assert EmbeddedPhotos(names=names, crop_size=32, prompts=side, prompt_key="highlevel")[0]["prompt"] == (
        "caption skimage/chelsea.png"
    )
    with pytest.raises(PromptNotFoundError, match="skimage/rocket.png"):
        EmbeddedPhotos(names=["rocket", "coffee"], crop_size=32, prompts=side)
    ds = EmbeddedPhotos(
        names=["rocket", "coffee"], crop_size=32, prompts=side, prompt_key=XPSR_FIELDS, prompt_missing="empty"
    )
    assert (ds[0]["prompt"], ds[0]["lowlevel_prompt"], ds[1]["prompt"]) == (
        "",
        "",
        "caption skimage/coffee.png",
    )
    assert set(EmbeddedPhotos(names=names, crop_size=32)[0]) == {"hq", "key"}


def test_image_folder_hr_small_image_policy(photo_root):
    with pytest.raises(ValueError, match="skimage/chelsea.png"):
        ImageFolderHR(photo_root, crop_size=400, small_image="error")[1]  # chelsea is 300x451
    with pytest.warns(UserWarning, match="skimage/chelsea.png"):
        item = ImageFolderHR(photo_root, crop_size=400)[1]
    assert item["hq"].shape == (3, 400, 400)


# --------------------------------------------------------------------------- MixtureDataset


class _Tagged(Dataset):
    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.tag, i


def _within_binomial(count: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_mixture_frequencies_match_weights():
    n = 20000
    mix = MixtureDataset([_Tagged(0, 5), _Tagged(1, 3), _Tagged(2, 4)], weights=[1, 3, 6], length=n, seed=0)
    items = [mix[i] for i in range(n)]
    tags = Counter(tag for tag, _ in items)
    for tag, p in zip(range(3), [0.1, 0.3, 0.6]):
        assert _within_binomial(tags[tag], n, p), (tag, tags[tag])
    # Index uniform within each dataset.
    idx = Counter(i for tag, i in items if tag == 0)
    assert set(idx) == set(range(5))
    for count in idx.values():
        assert _within_binomial(count, tags[0], 1 / 5)


def test_mixture_defaults_and_determinism():
    a = MixtureDataset([_Tagged(0, 10), _Tagged(1, 30)])
    assert len(a) == 40
    np.testing.assert_allclose(a.probabilities, [0.25, 0.75])  # proportional to lengths
    b = MixtureDataset([_Tagged(0, 10), _Tagged(1, 30)])
    assert [a[i] for i in range(40)] == [b[i] for i in range(40)]
    c = MixtureDataset([_Tagged(0, 10), _Tagged(1, 30)], seed=1)
    assert [a[i] for i in range(40)] != [c[i] for i in range(40)]
    assert a[-1] == a[39]
    unseeded = MixtureDataset([_Tagged(0, 10), _Tagged(1, 30)], seed=None)  # `seed: ${seed}` left null
    assert [unseeded[i] for i in range(40)] == [a[i] for i in range(40)]
    with pytest.raises(IndexError):
        a[40]


def test_mixture_set_epoch_changes_assignment_reproducibly():
    mix = MixtureDataset([_Tagged(0, 50), _Tagged(1, 50)], length=200, seed=3)
    epoch0 = [mix[i] for i in range(200)]
    mix.set_epoch(1)
    assert mix.epoch == 1
    epoch1 = [mix[i] for i in range(200)]
    assert epoch0 != epoch1
    mix.set_epoch(0)
    assert [mix[i] for i in range(200)] == epoch0
    other = MixtureDataset([_Tagged(0, 50), _Tagged(1, 50)], length=200, seed=3)
    other.set_epoch(1)  # e.g. a resumed run
    assert [other[i] for i in range(200)] == epoch1


def test_mixture_epoch_reaches_persistent_workers():
    mix = MixtureDataset([_Tagged(0, 7), _Tagged(1, 9)], length=24, seed=0)
    loader = DataLoader(
        mix, batch_size=None, sampler=SequentialSampler(mix), num_workers=1, persistent_workers=True
    )

    def expected(epoch):
        which, index = mix.assignment(epoch)
        return [(int(w), int(i)) for w, i in zip(which, index)]

    def as_tuples(batch):
        return [(int(t), int(i)) for t, i in batch]

    assert as_tuples(loader) == expected(0)
    mix.set_epoch(1)  # after the worker process exists
    assert as_tuples(loader) == expected(1) != expected(0)


def test_mixture_validation():
    with pytest.raises(ValueError, match="one weight per dataset"):
        MixtureDataset([_Tagged(0, 2), _Tagged(1, 2)], weights=[1.0])
    with pytest.raises(ValueError, match="> 0"):
        MixtureDataset([_Tagged(0, 2), _Tagged(1, 2)], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="> 0"):
        MixtureDataset([_Tagged(0, 2), _Tagged(1, 2)], weights=[1.0, -2.0])
    with pytest.raises(ValueError, match="empty"):
        MixtureDataset([_Tagged(0, 2), _Tagged(1, 0)])
    with pytest.raises(ValueError, match="at least one"):
        MixtureDataset([])
    with pytest.raises(ValueError, match="seed"):
        MixtureDataset([_Tagged(0, 2)], seed=-1)
    with pytest.raises(ValueError, match="length"):
        MixtureDataset([_Tagged(0, 2)], length=0)


# --------------------------------------------------------------------------- paired / LR-only test sets


def _img(h, w, value):
    return np.full((h, w, 3), value, np.float32)


@pytest.fixture
def paired_dirs(tmp_path):
    lr, gt = tmp_path / "lr", tmp_path / "gt"
    for i, (h, w) in enumerate([(8, 8), (6, 10), (5, 7)]):
        write_image(lr / f"{i:04d}x4.png", _img(h, w, i / 10))
        write_image(gt / f"{i:04d}.png", _img(4 * h, 4 * w, i / 10 + 0.05))
    return lr, gt


def test_paired_matching_with_suffix(paired_dirs):
    lr, gt = paired_dirs
    ds = PairedImageFolder(lr, gt, lr_suffix="x4", scale=4)
    assert len(ds) == 3 and ds.keys == ["0000x4.png", "0001x4.png", "0002x4.png"]
    item = ds[1]
    assert set(item) == {"lq", "gt", "key"}
    assert item["lq"].shape == (3, 6, 10) and item["gt"].shape == (3, 24, 40)
    assert item["lq"][0, 0, 0].item() == pytest.approx(round(0.1 * 255) / 255)
    assert item["gt"][0, 0, 0].item() == pytest.approx(round(0.15 * 255) / 255)


def test_paired_mismatch_lists_names_both_ways(paired_dirs):
    lr, gt = paired_dirs
    with pytest.raises(ValueError) as info:
        PairedImageFolder(lr, gt)  # without lr_suffix nothing matches
    msg = str(info.value)
    assert "3 LR name(s) without GT" in msg and "'0000x4'" in msg
    assert "3 GT name(s) without LR" in msg and "'0002'" in msg
    write_image(lr / "extra_lr_only.png", _img(2, 2, 0))
    write_image(gt / "0099.png", _img(8, 8, 0))
    with pytest.raises(ValueError) as info:
        PairedImageFolder(lr, gt, lr_suffix="x4")
    msg = str(info.value)
    assert "1 LR name(s) without GT" in msg and "'extra_lr_only'" in msg
    assert "1 GT name(s) without LR" in msg and "'0099'" in msg


def test_paired_matches_across_extensions_and_checks_scale(tmp_path):
    lr, gt = tmp_path / "lr", tmp_path / "gt"
    write_image(lr / "Canon_001_LR4.png", _img(4, 4, 0.2))
    gt.mkdir()
    from PIL import Image

    Image.fromarray(np.full((16, 12, 3), 50, np.uint8)).save(gt / "Canon_001_HR.jpg")
    ds = PairedImageFolder(lr, gt, lr_suffix="_LR4", gt_suffix="_HR")
    assert ds.keys == ["Canon_001_LR4.png"] and ds[0]["gt"].shape == (3, 16, 12)
    with pytest.raises(ValueError, match="expected x4"):
        PairedImageFolder(lr, gt, lr_suffix="_LR4", gt_suffix="_HR", scale=4)[0]


def test_paired_duplicate_names(tmp_path):
    lr, gt = tmp_path / "lr", tmp_path / "gt"
    write_image(lr / "1.png", _img(2, 2, 0))
    (lr / "1.jpg").write_bytes((lr / "1.png").read_bytes())
    write_image(gt / "1.png", _img(2, 2, 0))
    with pytest.raises(ValueError, match="two files for the name '1'"):
        PairedImageFolder(lr, gt)


def test_paired_and_lr_only_prompts(paired_dirs, tmp_path):
    lr, gt = paired_dirs
    side = tmp_path / "p.jsonl"
    side.write_text(
        "".join(json.dumps({"path": f"{i:04d}x4.png", "tags": [f"t{i}", "x"]}) + "\n" for i in range(3))
    )
    ds = PairedImageFolder(lr, gt, lr_suffix="x4", prompts=side, prompt_key="tags")
    assert ds[2]["prompt"] == "t2, x"
    lq_only = LRImageFolder(lr, prompts=side, prompt_key="tags")
    item = lq_only[0]
    assert set(item) == {"lq", "key", "prompt"} and item["key"] == "0000x4.png" and item["prompt"] == "t0, x"
    assert item["lq"].shape == (3, 8, 8)
    assert set(LRImageFolder(lr)[1]) == {"lq", "key"}


def test_prompt_mapping_paired_and_lr_only(paired_dirs, tmp_path):
    lr, gt = paired_dirs
    side = _xpsr_side_file(tmp_path / "x.jsonl", [f"{i:04d}x4.png" for i in (0, 2)])
    with pytest.raises(PromptNotFoundError, match="0001x4.png"):
        PairedImageFolder(lr, gt, lr_suffix="x4", prompts=side, prompt_key=XPSR_FIELDS)
    ds = PairedImageFolder(
        lr, gt, lr_suffix="x4", prompts=side, prompt_key=XPSR_FIELDS, prompt_missing="empty"
    )
    assert [(ds[i]["prompt"], ds[i]["lowlevel_prompt"]) for i in range(3)] == [
        ("caption 0000x4.png", "quality 0000x4.png"),
        ("", ""),
        ("caption 0002x4.png", "quality 0002x4.png"),
    ]
    item = LRImageFolder(lr, prompts=side, prompt_key=OmegaConf.create(XPSR_FIELDS), prompt_missing="empty")[
        2
    ]
    assert (
        set(item) == {"lq", "key", "prompt", "lowlevel_prompt"}
        and item["lowlevel_prompt"] == "quality 0002x4.png"
    )


@pytest.mark.parametrize("collate", [collate_variable_size, default_collate])
def test_collate_strings_become_lists_for_any_field(collate):
    batch = [
        {
            "gt": torch.zeros(3, 4, 4),
            "key": "a.png",
            "prompt": "cap a",
            "lowlevel_prompt": "low a",
            "x_text": "",
        },
        {
            "gt": torch.ones(3, 4, 4),
            "key": "b.png",
            "prompt": "cap b",
            "lowlevel_prompt": "low b",
            "x_text": "z",
        },
    ]
    out = collate(batch)
    assert out["gt"].shape == (2, 3, 4, 4)
    assert out["prompt"] == ["cap a", "cap b"] and out["lowlevel_prompt"] == ["low a", "low b"]
    assert out["x_text"] == ["", "z"] and out["key"] == ["a.png", "b.png"]


def test_collate_variable_size():
    same = [{"lq": torch.zeros(3, 4, 4), "key": "a"}, {"lq": torch.ones(3, 4, 4), "key": "b"}]
    out = collate_variable_size(same)
    assert out["lq"].shape == (2, 3, 4, 4) and out["key"] == ["a", "b"]
    assert out["lq"][1].sum().item() == 48
    mixed = [{"lq": torch.zeros(3, 4, 4), "key": "a"}, {"lq": torch.zeros(3, 5, 6), "key": "b"}]
    out = collate_variable_size(mixed)
    assert isinstance(out["lq"], list) and [t.shape for t in out["lq"]] == [(3, 4, 4), (3, 5, 6)]
    with pytest.raises(ValueError, match="different fields"):
        collate_variable_size(
            [{"lq": torch.zeros(1), "key": "a"}, {"lq": torch.zeros(1), "key": "b", "prompt": ""}]
        )


# --------------------------------------------------------------------------- DataModule


def test_datamodule_train_batch(photo_root):
    dm = RestoreDataModule(train=ImageFolderHR(photo_root, crop_size=64), batch_size=3, num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers is False and loader.drop_last is True
    batch = next(iter(loader))
    assert batch["hq"].shape == (3, 3, 64, 64) and batch["hq"].dtype == torch.float32
    assert len(batch["key"]) == 3 and set(batch["key"]) <= {f"skimage/{n}.png" for n in SMALL_PHOTOS}
    assert len(loader) == 1  # 4 items, batch 3, drop_last


def test_datamodule_eval_loaders(paired_dirs):
    lr, gt = paired_dirs
    dm = RestoreDataModule(test=PairedImageFolder(lr, gt, lr_suffix="x4"), val_batch_size=2, num_workers=0)
    assert dm.val_dataloader() == []
    batches = list(dm.test_dataloader())
    assert [b["key"] for b in batches] == [["0000x4.png", "0001x4.png"], ["0002x4.png"]]  # ordered, no drop
    assert [t.shape for t in batches[0]["lq"]] == [(3, 8, 8), (3, 6, 10)]


def test_datamodule_errors():
    dm = RestoreDataModule(num_workers=0)
    with pytest.raises(ValueError, match="no training dataset"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="no training dataset"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="no test dataset"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="batch_size"):
        RestoreDataModule(batch_size=0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        RestoreDataModule(train=_Tagged(0, 2), batch_size=4, num_workers=0).train_dataloader()


class _TaggedDict(_Tagged):
    def __getitem__(self, i):
        tag, i = super().__getitem__(i)
        return {"hq": torch.full((3, 2, 2), float(tag)), "key": f"{tag}/{i}"}


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["key"])
        return (self.w * batch["hq"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_redraws_mixture_every_epoch():
    mix = MixtureDataset([_TaggedDict(0, 5), _TaggedDict(1, 6)], length=8, seed=0)
    dm = RestoreDataModule(train=mix, batch_size=4, num_workers=1, persistent_workers=True)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen) == [0, 1, 2]
    for epoch, keys in model.seen.items():
        which, index = mix.assignment(epoch)
        assert sorted(keys) == sorted(f"{w}/{i}" for w, i in zip(which, index)), epoch
    assert len({tuple(sorted(k)) for k in model.seen.values()}) == 3  # a new draw each epoch


def test_datamodule_distributed_sampler_forwards_epoch():
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    mix = MixtureDataset([_TaggedDict(0, 5), _TaggedDict(1, 6)], length=9, seed=0)
    dm = RestoreDataModule(train=mix, batch_size=2, num_workers=0)
    # What a DDP trainer exposes; the module must build the DistributedSampler itself.
    dm.trainer = SimpleNamespace(current_epoch=2, distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.num_replicas == 2 and sampler.rank == 1
    assert len(sampler) == 5 and mix.epoch == 2 and sampler.epoch == 2
    sampler.set_epoch(4)  # what Lightning calls at the start of each epoch
    assert mix.epoch == 4 and sampler.epoch == 4
