"""restore's semantic-fidelity metric ``tag_f1``: the F1 of the restored image's tags against the GT's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from restore.data.hr_datasets import load_embedded_photo
from restore.metrics.semantic import TagAgreement, tag_f1
from restore.metrics.suite import MetricSuite


def test_tag_f1_by_hand() -> None:
    sr = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # 2*1/(2+2), both empty -> 1, disjoint -> 0, equal -> 1
    assert tag_f1(sr, gt).tolist() == [0.5, 1.0, 0.0, 1.0]


class ColourLayoutTagger(nn.Module):
    """A tagger that sees content in a way one can reason about: tag (cell, channel) fires when that channel's mean
    in that cell of a 4x4 grid exceeds 0.5. Same interface as restore.models.ram.RAM."""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images.float(), size=(32, 32), mode="area")

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(pixels, 4).flatten(1)

    def tag_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        return (embeds - 0.5) * 20

    def tag_mask(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) > 0.5


def _photos(*names: str) -> torch.Tensor:
    images = [torch.from_numpy(load_embedded_photo(n)).permute(2, 0, 1).float()[None] for n in names]
    return torch.cat([F.interpolate(x, size=(96, 96), mode="area") for x in images])


def test_swapped_content_scores_low_identical_and_slightly_noisy_score_high() -> None:
    metric = TagAgreement(ColourLayoutTagger())
    gt = _photos("astronaut", "coffee", "chelsea", "rocket")
    swapped = gt.roll(1, dims=0)  # every image restored as another image's content
    noisy = (gt + 0.01 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert metric(gt, gt).tolist() == [1.0] * 4
    assert metric(noisy, gt).min() > 0.9
    assert metric(swapped, gt).mean() < 0.7 and (metric(swapped, gt) < metric(noisy, gt)).all()
    assert metric.lower_better is False


def test_the_suite_scores_it_with_a_tiny_ram_and_names_missing_weights() -> None:
    catalog = {"tag_f1": {"pyiqa": "tag_f1", "options": {"variant": "tiny"}}, "psnr": {"pyiqa": "psnr"}}
    suite = MetricSuite(["tag_f1"], catalog=catalog)
    gt = _photos("astronaut", "coffee")
    scores = suite.score(gt, gt)["tag_f1"]
    assert scores.dtype == torch.float64 and scores.tolist() == [1.0, 1.0]
    assert suite.kind["tag_f1"] == "fr" and suite.lower_better["tag_f1"] is False
    described = suite.describe()["tag_f1"]
    assert described["implementation"] == "restore.metrics.semantic.TagAgreement"
    # the full-size default without RAM's weights: skipped with the file, its url and the fetch command
    warned = MetricSuite(["tag_f1"], on_missing_weights="warn")
    assert "tag_f1" in warned.missing
    assert "ram_swin_large_14m.pth" in warned.missing["tag_f1"]
    assert "python -m restore.weights fetch ram_swin_large_14m.pth" in warned.missing["tag_f1"]
    assert not MetricSuite(["tag_f1"], catalog=catalog, has_reference=False).names  # needs ground truth
