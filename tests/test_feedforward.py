"""FeedForwardSR's own rules: scale checks, padding, validation PSNR, prediction writing."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from restore.callbacks.image_writer import PNGWriter
from restore.data.degradation import RealESRGANDegradation
from restore.data.hr_datasets import EmbeddedPhotos
from restore.data.image_io import read_image, write_image
from restore.data.paired import PairedImageFolder, collate_variable_size
from restore.methods.feedforward import FeedForwardSR
from restore.models.rrdbnet import RRDBNet

TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


class _Nearest(nn.Module):
    """Nearest-neighbour x4 upsampling with one (unused) parameter: a predictable 'network'."""

    scale = 4

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def paired_dir(tmp_path_factory) -> Path:
    """Two GT/LR pairs of different sizes (LR = 4x4 box average of GT), like a small benchmark."""
    root = tmp_path_factory.mktemp("paired")
    photos = EmbeddedPhotos(names=["astronaut", "coffee"], crop_size=64, hflip=False)
    torch.manual_seed(0)
    for i, size in enumerate((64, 48)):
        gt = photos[i]["hq"][:, :size, :size]
        write_image(root / "gt" / f"{i}.png", gt)
        write_image(root / "lq" / f"{i}.png", F.avg_pool2d(gt[None], 4)[0])
    return root


def test_scale_mismatch_between_net_and_degradation_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"degradation\.scale=4 but model\.net\.scale=2"):
        FeedForwardSR(RRDBNet(scale=2, **TINY), degradation=RealESRGANDegradation.from_preset("realesrgan"))


def test_hr_batches_without_degradation_fail_clearly() -> None:
    model = FeedForwardSR(RRDBNet(**TINY), optimizer=lambda p: torch.optim.Adam(p))
    loader = DataLoader(EmbeddedPhotos(names=["astronaut"], crop_size=128, repeats=2), batch_size=2)
    with pytest.raises(RuntimeError, match="no degradation.*degradation=realesrgan"):
        _trainer(max_steps=1).fit(model, train_dataloaders=loader)


def test_training_without_optimizer_config_fails_clearly() -> None:
    model = FeedForwardSR(RRDBNet(**TINY))
    with pytest.raises(ValueError, match="method.optimizer"):
        model.configure_optimizers()


@pytest.mark.parametrize(("scale", "size"), [(4, (13, 11)), (2, (13, 11)), (1, (14, 9))])
def test_restore_handles_any_input_size(scale: int, size: tuple[int, int]) -> None:
    """Scales 2 and 1 pixel-unshuffle, so odd sizes are padded and the output cropped back."""
    model = FeedForwardSR(RRDBNet(scale=scale, **TINY)).eval()
    with torch.no_grad():
        out = model.restore(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * scale, size[1] * scale)


def test_validation_psnr_on_paired_data(paired_dir: Path) -> None:
    """val/psnr is the mean RGB PSNR of the 8-bit-rounded output against GT, over images of any size."""
    dataset = PairedImageFolder(paired_dir / "lq", paired_dir / "gt", scale=4)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_variable_size)  # sizes differ: lists
    (result,) = _trainer().validate(FeedForwardSR(_Nearest()), loader, verbose=False)
    expected = []
    for item in dataset:
        sr = torch.round(F.interpolate(item["lq"][None], scale_factor=4, mode="nearest") * 255) / 255
        expected.append(10 * torch.log10(1 / (sr[0] - item["gt"]).pow(2).mean()))
    assert result["val/psnr"] == pytest.approx(float(torch.stack(expected).mean()), abs=1e-3)
    assert 15 < result["val/psnr"] < 40  # a sane value for nearest-neighbour x4 on photos


def test_validation_on_hr_data_uses_the_same_degradations_every_time() -> None:
    model = FeedForwardSR(_Nearest(), degradation=RealESRGANDegradation.from_preset("realesrgan"))
    hr = EmbeddedPhotos(names=["astronaut", "coffee"], crop_size=128, hflip=False)
    batches = [hr[0], hr[1]]  # fixed crops: only the degradation could vary between runs
    loader = DataLoader(batches, batch_size=1)
    (first,) = _trainer().validate(model, loader, verbose=False)
    torch.manual_seed(123)  # the global RNG must not matter
    (second,) = _trainer().validate(model, loader, verbose=False)
    assert first["val/psnr"] == second["val/psnr"]


def test_predict_writes_each_image_once(paired_dir: Path, tmp_path: Path) -> None:
    dataset = PairedImageFolder(paired_dir / "lq", paired_dir / "gt")
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_variable_size)
    writer = PNGWriter(tmp_path / "out")
    _trainer(callbacks=[writer]).predict(FeedForwardSR(_Nearest()), loader, return_predictions=False)
    assert sorted(p.name for p in writer.written) == ["0.png", "1.png"]
    for item in dataset:
        written = read_image(tmp_path / "out" / item["key"])
        assert written.shape[:2] == tuple(item["gt"].shape[1:])
    with pytest.raises(FileExistsError):  # results of an earlier run are never replaced silently
        _trainer(callbacks=[PNGWriter(tmp_path / "out")]).predict(FeedForwardSR(_Nearest()), loader)


def test_writer_rejects_keys_outside_its_folder(tmp_path: Path) -> None:
    writer = PNGWriter(tmp_path)
    assert writer.path_for("sub/a.jpg") == tmp_path / "sub" / "a.png"
    with pytest.raises(ValueError, match="relative path"):
        writer.path_for("../escape.png")
