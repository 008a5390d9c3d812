"""Shared test setup: offline, no wandb, deterministic CPU threads, real photos as fixtures."""

from __future__ import annotations

import os

# huggingface_hub and wandb read these at import time: set them before anything imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs two xdist workers on the 2-core CI machine: one thread each (the tiny models gain nothing from
# a second intra-op thread, and two threads per worker would oversubscribe the cores); alone, up to 2.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for a module of tiny models: their tensors are a few KB, so with more threads the
    wake-ups cost more than the maths (up to 100x on a loaded 2-core machine). Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _photo_batch(size: int) -> torch.Tensor:
    """Four real photos from scikit-image, area-resized to size x size, (4, 3, size, size) in [0, 1]."""
    import cv2
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    resized = [
        cv2.resize(np.ascontiguousarray(p), (size, size), interpolation=cv2.INTER_AREA) for p in photos
    ]
    return torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 255.0 for r in resized])


@pytest.fixture(scope="session")
def photos_256() -> torch.Tensor:
    return _photo_batch(256)


@pytest.fixture(scope="session")
def photos_128() -> torch.Tensor:
    return _photo_batch(128)
