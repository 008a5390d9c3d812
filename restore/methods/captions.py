"""Per-image captions at inference: the prompt side-file's record, else an MLLM captioner, else a default text.

DreamClear (its reference restoration) and SUPIR (its stage-1 restoration) caption an image only when the benchmark's
prompt side-file has no record for it, so a side-file covering part of a test set costs the MLLM only the rest. The
captioner is a module or a factory (a Hydra ``_partial_``) built on first use: a 13B model is loaded only when a
caption is needed, and it is never a submodule of the method (it stays out of checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CaptionFallback"]


class CaptionFallback:
    """Records first, then ``captioner`` on the images without one, then ``default``.

    Args:
        captioner: an object with ``caption(images) -> list[str]`` (an :class:`~restore.models.captioners.MLLMCaptioner`),
            a zero-argument factory of one, or ``None``.
        default: the caption when there is neither a record nor a captioner.
        field: the side-file field holding the caption.
        device: where the captioner runs (``None``: the device the caller passes). A bitsandbytes-quantised
            captioner (``quantized``) is never moved.
    """

    def __init__(self, captioner: Any, default: str = "", field: str = "caption", device: str | None = None):
        self._captioner = captioner
        self.default = default
        self.field = field
        self.device = device

    @property
    def captioner(self) -> Any:
        """The captioner, built from its factory on first access (``None`` when there is none)."""
        if self._captioner is not None and not isinstance(self._captioner, nn.Module):
            self._captioner = self._captioner()
        return self._captioner

    def __call__(
        self,
        count: int,
        prompts: Sequence[Mapping[str, str]] | None,
        views: Callable[[list[int]], Tensor | list[Tensor]],
        device: torch.device | str,
    ) -> list[str]:
        """The captions of ``count`` images: ``views(indices)`` gives the captioner's input for the images without
        a record (called once, only when needed)."""
        if prompts is not None and len(prompts) != count:
            raise ValueError(f"got {len(prompts)} prompt records for {count} images")
        records = [None] * count if prompts is None else [r.get(self.field) for r in prompts]
        missing = [i for i, text in enumerate(records) if text is None]
        if not missing:
            return list(records)
        captioner = self.captioner
        if captioner is None:
            fills = [self.default] * len(missing)
        else:
            target = self.device or device
            if not getattr(captioner, "quantized", False):  # bitsandbytes weights cannot be moved
                captioner.to(target)
            images = views(missing)
            images = images.to(target) if isinstance(images, Tensor) else [v.to(target) for v in images]
            fills = list(captioner.caption(images))
        for i, text in zip(missing, fills, strict=True):
            records[i] = text
        return list(records)
