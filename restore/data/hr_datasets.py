"""High-quality (HR) training image datasets: random crops of clean images, degraded later on the fly.

Items are ``{"hq": FloatTensor (3, crop, crop) in [0, 1], "key": str}`` plus one string per prompt field
when a prompt side-file is configured (``"prompt"`` by default; several with a ``prompt_key`` mapping,
see :class:`restore.data.paired.PromptFields`). ``key`` is the image path relative to the dataset root: a
stable ID for logging, prompts and resuming.

Named datasets (LSDIR, DF2K_OST, FFHQ-10k...) are Hydra configs that instantiate
:class:`ImageFolderHR`; several of them are combined with :class:`MixtureDataset` (weighted) or
``torch.utils.data.ConcatDataset`` (plain union).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from restore.data.image_io import list_images, read_image, to_tensor, write_image
from restore.data.paired import load_prompt_fields
from restore.data.transforms import RandomCropFlip

__all__ = [
    "EMBEDDED_PHOTO_NAMES",
    "EmbeddedPhotos",
    "FixedPrompt",
    "ImageFolderHR",
    "MixtureDataset",
    "export_embedded_photos",
    "load_embedded_photo",
]


def _dataset_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # absolute path in a file list, outside the root
        return path.as_posix()


class ImageFolderHR(Dataset):
    """HR images from a folder (recursive) or from a file list, randomly cropped and flipped.

    Args:
        root: dataset folder; keys are paths relative to it.
        file_list: optional text/JSON list of relative paths (see :func:`restore.data.image_io.list_images`),
            e.g. LSDIR's ``train.json``.
        file_list_key: field of the JSON objects holding the path (default: ``"path_gt"``, else ``"path"``).
        crop_size, hflip, rotate, small_image: see :class:`restore.data.transforms.RandomCropFlip`.
        limit: keep only the first ``limit`` files in listing order (sorted for folders, file order for
            lists), e.g. the first 10k FFHQ faces. More than available is an error: a silently smaller
            training set would not reproduce the protocol.
        prompts: optional JSONL prompt side-file (see :mod:`restore.data.prompts`); checked up front.
        prompt_key: field of the side-file put in ``item["prompt"]`` (``"prompt"``, ``"tags"``...), or a
            mapping ``{item_field: side_file_field}`` for several prompts per image, e.g. XPSR's
            ``{prompt: highlevel, lowlevel_prompt: lowlevel}`` (a content caption and a quality text per
            image, as qyp2000/XPSR ``dataloader/localdataset.py`` reads them).
        prompt_missing: ``"error"`` or ``"empty"`` for images without an entry.
        repeats: items per image and epoch (item i is image ``i % len(files)``), as :class:`EmbeddedPhotos`,
            so an experiment that lengthens its epochs runs on any folder (``data=folder``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        file_list: str | os.PathLike | None = None,
        crop_size: int = 512,
        hflip: bool = True,
        rotate: bool = False,
        small_image: str = "pad",
        limit: int | None = None,
        prompts: str | os.PathLike | None = None,
        prompt_key: str | Mapping[str, str] = "prompt",
        file_list_key: str | None = None,
        prompt_missing: str = "error",
        repeats: int = 1,
    ):
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        self.repeats = repeats
        self.root = Path(root)
        files = list_images(self.root, file_list, file_list_key)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"limit must be a positive int or None, got {limit!r}")
            if limit > len(files):
                raise ValueError(
                    f"limit={limit} but only {len(files)} images found under '{self.root}'"
                    f"{f' (file list {file_list})' if file_list else ''}; the download is incomplete "
                    "(see data/README.md) or lower the limit"
                )
            files = files[:limit]
        self.files = files
        self.keys = [_dataset_key(f, self.root) for f in files]
        self.transform = RandomCropFlip(crop_size, hflip=hflip, rotate=rotate, small_image=small_image)
        self.prompts = load_prompt_fields(prompts, prompt_key, prompt_missing, self.keys)

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root='{self.root}', n={len(self)}, transform={self.transform})"

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self.files)
        key = self.keys[index]
        crop = self.transform(read_image(self.files[index]), key=key)
        item = {"hq": to_tensor(crop), "key": key}
        if self.prompts is not None:
            item.update(self.prompts(key))
        return item


def _motorcycle_left() -> np.ndarray:
    from skimage import data

    return data.stereo_motorcycle()[0]


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


# RGB photographs bundled inside the scikit-image wheel (verified to load with no network access).
# Excluded: colorwheel/logo (synthetic graphics), grayscale images (camera, coins, moon, ...).
_EMBEDDED_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage_loader("astronaut"),
    "chelsea": _skimage_loader("chelsea"),
    "coffee": _skimage_loader("coffee"),
    "hubble_deep_field": _skimage_loader("hubble_deep_field"),
    "immunohistochemistry": _skimage_loader("immunohistochemistry"),
    "motorcycle_left": _motorcycle_left,
    "retina": _skimage_loader("retina"),
    "rocket": _skimage_loader("rocket"),
}
#: Names accepted by :class:`EmbeddedPhotos` and :func:`load_embedded_photo`.
EMBEDDED_PHOTO_NAMES: tuple[str, ...] = tuple(sorted(_EMBEDDED_LOADERS))


def load_embedded_photo(name: str) -> np.ndarray:
    """One embedded photo as float32 RGB (H, W, 3) in [0, 1] (uint8 / 255, same as reading its PNG export)."""
    if name not in _EMBEDDED_LOADERS:
        raise ValueError(f"unknown embedded photo {name!r}; available: {', '.join(EMBEDDED_PHOTO_NAMES)}")
    try:
        img = _EMBEDDED_LOADERS[name]()
    except Exception as err:  # skimage may try a network fetch for data missing from its wheel
        raise RuntimeError(
            f"scikit-image could not load its bundled photo {name!r} ({err}); "
            "reinstall scikit-image or drop the name from `names`"
        ) from err
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise RuntimeError(f"embedded photo {name!r} is not 8-bit RGB (dtype {img.dtype}, shape {img.shape})")
    return img.astype(np.float32) / np.float32(255.0)


class EmbeddedPhotos(Dataset):
    """Training set made of the colour photos bundled with scikit-image: runs with no download at all.

    For smoke tests, demos and CI, not for real training (8 images). Keys are ``"skimage/<name>.png"``:
    the keys an :class:`ImageFolderHR` gives the same photos after ``export_embedded_photos(root / "skimage")``,
    so prompt side-files work for both. ``repeats`` lengthens an epoch (item i is photo ``i % len(names)``),
    giving several random crops per photo and epoch. ``prompts`` / ``prompt_key`` / ``prompt_missing`` as
    :class:`ImageFolderHR` (side-file entries ``{"path": "skimage/<name>.png", ...}``).
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        crop_size: int = 256,
        hflip: bool = True,
        small_image: str = "pad",
        repeats: int = 1,
        prompts: str | os.PathLike | None = None,
        prompt_key: str | Mapping[str, str] = "prompt",
        prompt_missing: str = "error",
    ):
        self.names = list(EMBEDDED_PHOTO_NAMES if names is None else names)
        if not self.names:
            raise ValueError("names is empty; leave it None for all embedded photos")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        self.repeats = repeats
        self.images = [load_embedded_photo(n) for n in self.names]
        self.keys = [f"skimage/{n}.png" for n in self.names]
        self.transform = RandomCropFlip(crop_size, hflip=hflip, rotate=False, small_image=small_image)
        self.prompts = load_prompt_fields(prompts, prompt_key, prompt_missing, self.keys)

    def __len__(self) -> int:
        return len(self.names) * self.repeats

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        i = index % len(self.names)
        key = self.keys[i]
        item = {"hq": to_tensor(self.transform(self.images[i], key=key)), "key": key}
        if self.prompts is not None:
            item.update(self.prompts(key))
        return item


def export_embedded_photos(
    out_dir: str | os.PathLike, names: Sequence[str] | None = None, overwrite: bool = True
) -> list[Path]:
    """Write the embedded photos as ``<out_dir>/<name>.png`` (8-bit, lossless) and return the paths.

    Used to build real folder datasets without downloads. ``overwrite`` defaults to True because the
    content is deterministic, so re-running a demo is harmless.
    """
    out_dir = Path(out_dir)
    return [
        write_image(out_dir / f"{name}.png", load_embedded_photo(name), overwrite=overwrite)
        for name in (EMBEDDED_PHOTO_NAMES if names is None else names)
    ]


class MixtureDataset(Dataset):
    """Weighted mixture of datasets with a deterministic, seeded, per-epoch assignment.

    Item ``i`` comes from dataset ``j`` with probability ``w_j / sum(w)`` and from a uniformly drawn
    index within it. The whole assignment for an epoch is a pure function of ``(seed, epoch)``, so it
    is identical on every rank and worker (DistributedSampler can shard it), reproducible, and
    restored on resume by calling ``set_epoch`` with the resumed epoch.

    ``set_epoch`` writes the epoch into a shared-memory tensor, so DataLoader workers (persistent
    ones included) see it; each process recomputes the assignment lazily when the epoch changes.
    :class:`restore.data.datamodule.RestoreDataModule` calls it every epoch through its sampler.

    Args:
        datasets: the sources; each must be non-empty.
        weights: one positive weight per dataset; default proportional to dataset lengths (same
            expectation as ``ConcatDataset`` sampled with replacement).
        length: items per epoch; default the sum of the dataset lengths.
        seed: non-negative seed of the assignment; ``None`` means 0 (not a random seed, which would
            give each DDP rank a different assignment).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float] | None = None,
        length: int | None = None,
        seed: int | None = 0,
    ):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        self.lengths = np.array([len(d) for d in self.datasets], dtype=np.int64)
        empty = [i for i, n in enumerate(self.lengths) if n == 0]
        if empty:
            raise ValueError(f"MixtureDataset: dataset(s) at position {empty} are empty")
        if weights is None:
            w = self.lengths.astype(np.float64)
        else:
            w = np.asarray(list(weights), dtype=np.float64)
            if w.shape != (len(self.datasets),):
                raise ValueError(
                    f"MixtureDataset: got {w.size} weight(s) for {len(self.datasets)} dataset(s); "
                    "give exactly one weight per dataset"
                )
            if not np.all(np.isfinite(w)) or np.any(w <= 0):
                raise ValueError(f"MixtureDataset: weights must be finite and > 0, got {w.tolist()}")
        self.probabilities = w / w.sum()
        if length is None:
            length = int(self.lengths.sum())
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"MixtureDataset: length must be a positive int or None, got {length!r}")
        self.length = length
        seed = 0 if seed is None else seed  # never "random": every rank must draw the same assignment
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"MixtureDataset: seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the assignment of ``epoch`` (deterministic); visible to already-running workers."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._shared_epoch.fill_(int(epoch))

    def assignment(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_index, item_index)`` arrays of length ``len(self)`` for ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1], self._cached[2]
        rng = np.random.default_rng([self.seed, epoch])
        which = rng.choice(len(self.datasets), size=self.length, p=self.probabilities)
        sizes = self.lengths[which]
        index = np.minimum((rng.random(self.length) * sizes).astype(np.int64), sizes - 1)
        self._cached = (epoch, which, index)
        return which, index

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for MixtureDataset of length {self.length}")
        which, item = self.assignment()
        return self.datasets[int(which[index])][int(item[index])]


class FixedPrompt(Dataset):
    """Every item of ``dataset`` with ``field`` set to one ``prompt``.

    SUPIR (Yu et al., CVPR 2024, Sec. 3.3) adds 100k images generated by SDXL *from* its negative prompt,
    captioned with that prompt, so that classifier-free guidance against the negative prompt has learned what
    the prompt means instead of producing artefacts: ``FixedPrompt(ImageFolderHR(<those images>),
    <negative prompt>)`` inside a :class:`MixtureDataset` (``configs/data/supir.yaml``).
    """

    def __init__(self, dataset: Dataset, prompt: str, field: str = "prompt") -> None:
        self.dataset = dataset
        self.prompt = str(prompt)
        self.field = field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], self.field: self.prompt}
