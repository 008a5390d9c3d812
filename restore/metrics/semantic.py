"""Semantic fidelity: does the restored image show the same things as the ground truth?

Diffusion restorers can invent content (a face in foliage, text that was never there, a cat turned into a dog)
while scoring well on no-reference quality and tolerably on PSNR. ``tag_f1`` measures what PSNR/LPIPS do not
name directly: the agreement between the RAM tags (Recognize Anything, Zhang et al. 2023; the tagger SeeSR's DAPE is
built on) of the restored image and of its ground truth. Per image,

    tag_f1 = 2 |T(sr) ∩ T(gt)| / (|T(sr)| + |T(gt)|)      (1 when both tag sets are empty)

with ``T(x)`` the set of tags RAM keeps (``sigmoid(logit) > per-class threshold``, the official thresholds). It is
the F1 of the restored image's tags taken as predictions of the ground truth's; the set value is the mean over
images. Higher is better; 1 means the same tags. It is a full-reference metric of restore (no pyiqa equivalent),
listed in ``configs/metrics/default.yaml``; docs/metrics.md discusses what it does and does not see.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TagAgreement", "tag_f1"]


def tag_f1(sr_tags: Tensor, gt_tags: Tensor) -> Tensor:
    """Per-row F1 of two ``[B, K]`` boolean tag masks: ``2 |A ∩ B| / (|A| + |B|)``, 1 where both are empty."""
    sr, gt = sr_tags.bool(), gt_tags.bool()
    both = (sr & gt).sum(dim=1).double()
    total = (sr.sum(dim=1) + gt.sum(dim=1)).double()
    return torch.where(total > 0, 2 * both / total.clamp(min=1), torch.ones_like(total))


class TagAgreement(nn.Module):
    """``tag_f1`` of restored vs ground-truth images (``[B, 3, H, W]`` in [0, 1]) with a RAM tagger.

    Args:
        tagger: a :class:`~restore.models.ram.RAM` (or anything with ``preprocess``, ``image_embeds``,
            ``tag_logits`` and ``tag_mask``); when ``None``, one is built with :func:`restore.models.ram.build_ram`
            from the remaining keyword arguments (``variant``, ``checkpoint``, ``tag_list``, ``thresholds``), which
            names the missing file and how to fetch it when the weights are absent.
    """

    #: what pyiqa metrics expose and the suite reads
    lower_better = False

    def __init__(self, tagger: nn.Module | None = None, **ram: Any) -> None:
        super().__init__()
        if tagger is None:
            from restore.models.ram import build_ram

            tagger = build_ram(**ram)
        self.tagger = tagger.eval().requires_grad_(False)

    @torch.no_grad()
    def tags(self, images: Tensor) -> Tensor:
        """``[B, K]`` boolean tag masks of images in [0, 1]."""
        tagger = self.tagger
        return tagger.tag_mask(tagger.tag_logits(tagger.image_embeds(tagger.preprocess(images))))

    @torch.no_grad()
    def forward(self, sr: Tensor, gt: Tensor) -> Tensor:
        return tag_f1(self.tags(sr), self.tags(gt))
