"""Lightning DataModule wrapping already-instantiated datasets (Hydra builds them from ``configs/data``)."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from restore.data.paired import collate_variable_size

__all__ = ["RestoreDataModule"]


def _forward_epoch(dataset: Dataset, epoch: int) -> None:
    set_epoch = getattr(dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


class _EpochRandomSampler(RandomSampler):
    """RandomSampler whose ``set_epoch`` (called by Lightning at each epoch start) reaches the dataset."""

    def set_epoch(self, epoch: int) -> None:
        _forward_epoch(self.data_source, epoch)


class _EpochDistributedSampler(DistributedSampler):
    """DistributedSampler that also forwards ``set_epoch`` to the dataset."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        _forward_epoch(self.dataset, epoch)


class RestoreDataModule(L.LightningDataModule):
    """Train / val / test dataloaders around given datasets.

    Epoch-dependent datasets (:class:`restore.data.hr_datasets.MixtureDataset`) get ``set_epoch``
    every epoch: the training sampler forwards Lightning's per-epoch ``sampler.set_epoch`` call to the
    dataset (under DDP the module builds the ``DistributedSampler`` itself so the forwarding survives),
    and ``train_dataloader`` sets the current epoch too (covers dataloader reloads and resumes).

    Validation and test loaders do not shuffle and keep the last partial batch. Every loader collates with
    :func:`restore.data.paired.collate_variable_size` (test images differ in size): same-shape tensors are
    stacked, and strings (``key`` and any prompt field, e.g. ``lowlevel_prompt``) become lists of strings.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last

    def _loader_kwargs(self) -> dict:
        workers = self.num_workers
        return {
            "num_workers": workers,
            # Pinning only helps (and only works without a warning) with a CUDA device.
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers > 0,
            "collate_fn": collate_variable_size,
        }

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _train_sampler(self, dataset: Dataset):
        trainer = self.trainer
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if kwargs:  # distributed: build it here, else Lightning replaces our sampler and drops the forwarding
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            return _EpochDistributedSampler(dataset, shuffle=True, seed=seed, **kwargs)
        return _EpochRandomSampler(dataset)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.train_set is None:
            raise ValueError(
                "RestoreDataModule has no training dataset: set `data.train` in the config "
                "(e.g. an ImageFolderHR) before calling fit"
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("RestoreDataModule has no training dataset: set `data.train` in the config")
        if len(self.train_set) < self.batch_size and self.drop_last:
            raise ValueError(
                f"training set has {len(self.train_set)} items, fewer than batch_size={self.batch_size} "
                "with drop_last=True: every batch would be dropped"
            )
        sampler = self._train_sampler(self.train_set)
        sampler.set_epoch(self._current_epoch())  # also reaches the dataset
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader | list:
        if dataset is None:
            return []
        return DataLoader(
            dataset, batch_size=self.val_batch_size, shuffle=False, drop_last=False, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader | list:
        """Empty list (validation skipped) when no val dataset is configured."""
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("RestoreDataModule has no test dataset: set `data.test` in the config")
        return self._eval_loader(self.test_set)
