"""What a prior's text encoder hands the denoiser, and where those features can come from besides the encoder.

- :class:`TextCondition`: the encoded prompts of one batch: hidden states, their attention mask (T5 / PixArt
  attend only the valid tokens; CLIP priors attend every position and leave it ``None``), a pooled embedding
  (SDXL's OpenCLIP-bigG projection) and added per-sample conditions (SDXL ``time_ids``, PixArt ``resolution`` /
  ``aspect_ratio``). It is a dataclass of tensors, so the sampler's classifier-free guidance concatenates it
  ``[uncond, cond]`` like any other condition.
- :class:`TextFeatureStore`: precomputed features in side-files, one ``safetensors`` file per prompt (named by
  the prompt's sha256) plus a ``manifest.json`` naming the encoder. PixArt's T5-XXL (4.8B parameters) does not fit
  next to the DiT on one 24 GB GPU, and DreamClear trains from stored T5 features, so a prior can read them
  instead of running its encoder (``scripts/precompute_text_features.py`` writes them).
- :class:`TextCache`: an in-memory LRU of encoded prompts (the encoders are frozen, so an entry stays valid).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from restore.atomic_write import atomic_path

__all__ = [
    "FEATURES_FORMAT",
    "MissingTextFeaturesError",
    "TextCache",
    "TextCondition",
    "TextFeatureStore",
    "null_mask",
]

FEATURES_FORMAT = "restore.text_features/v1"
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TextCondition:
    """Encoded prompts of a batch of ``B``: every tensor has the batch as its first dimension."""

    #: ``[B, L, C]`` token features the denoiser cross-attends to
    hidden_states: Tensor
    #: ``[B, L]`` 1 for tokens to attend, 0 for padding; ``None``: every position is attended (CLIP priors)
    attention_mask: Tensor | None = None
    #: ``[B, C']`` pooled text embedding (SDXL ``text_embeds``), ``None`` where the prior has none
    pooled: Tensor | None = None
    #: other per-sample conditions the denoiser takes with the text (SDXL ``time_ids``, PixArt ``resolution``)
    added: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.hidden_states.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        """The tensors by flat name (``added`` entries as ``added.<name>``), ``None`` fields left out."""
        out = {"hidden_states": self.hidden_states}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.pooled is not None:
            out["pooled"] = self.pooled
        out.update({f"added.{k}": v for k, v in self.added.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> TextCondition:
        """Inverse of :meth:`tensors`."""
        added = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("added.")}
        return cls(
            hidden_states=tensors["hidden_states"],
            attention_mask=tensors.get("attention_mask"),
            pooled=tensors.get("pooled"),
            added=added,
        )

    def map(self, fn: Callable[[Tensor], Tensor]) -> TextCondition:
        """``fn`` applied to every tensor."""
        return TextCondition.from_tensors({k: fn(v) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        """On ``device``; floating-point features (not the mask) in ``dtype`` when given."""

        def move(t: Tensor) -> Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast)

        hidden = move(self.hidden_states)
        pooled = None if self.pooled is None else move(self.pooled)
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        added = {k: move(v) for k, v in self.added.items()}
        return TextCondition(hidden, mask, pooled, added)

    def rows(self, index: int | slice | Tensor) -> TextCondition:
        """The rows ``index`` (keeps the batch dimension for an int)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])

    @classmethod
    def cat(cls, parts: Sequence[TextCondition]) -> TextCondition:
        """Concatenate along the batch; all parts must have the same fields."""
        names = [set(p.tensors()) for p in parts]
        if any(n != names[0] for n in names):
            raise ValueError(f"cannot concatenate text conditions with different fields: {names}")
        return cls.from_tensors({k: torch.cat([p.tensors()[k] for p in parts]) for k in names[0]})

    def where(self, mask: Tensor, other: TextCondition) -> TextCondition:
        """Rows of ``other`` where ``mask`` (``[B]`` bool) is true, else this one's.

        Only the fields ``other`` defines are replaced: a null condition without a mask (PixArt's learned null
        caption) keeps the prompt's attention mask, as PixArt's caption dropout does.
        """
        mask = mask.to(self.hidden_states.device).bool()
        ours, theirs = self.tensors(), other.tensors()
        out = {}
        for name, value in ours.items():
            if name not in theirs:
                out[name] = value
                continue
            replacement = theirs[name].to(device=value.device, dtype=value.dtype).expand_as(value)
            pick = mask.view(-1, *([1] * (value.ndim - 1)))
            out[name] = torch.where(pick, replacement, value)
        return TextCondition.from_tensors(out)


def null_mask(null: Tensor | Sequence[bool] | None, n: int) -> list[bool]:
    """A per-row null flag list from a bool tensor, a sequence or ``None`` (no null rows)."""
    if null is None:
        return [False] * n
    flags = null.tolist() if isinstance(null, Tensor) else list(null)
    if len(flags) != n:
        raise ValueError(f"null mask has {len(flags)} entries for {n} prompts")
    return [bool(f) for f in flags]


class MissingTextFeaturesError(KeyError):
    """A prompt has no precomputed features and the prior has no text encoder to compute them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class TextFeatureStore:
    """Precomputed text features of one encoder, one file per prompt (see the module doc).

    ``encoder``: the id written to (and checked against) the manifest, e.g. the prior's source and its
    encoder settings, so that features of another encoder are refused instead of silently used.
    """

    def __init__(self, directory: str | os.PathLike, encoder: str | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.encoder = encoder
        manifest = self.directory / _MANIFEST
        if manifest.is_file():
            info = json.loads(manifest.read_text(encoding="utf-8"))
            if info.get("format") != FEATURES_FORMAT:
                raise ValueError(f"{manifest}: format {info.get('format')!r}, expected {FEATURES_FORMAT!r}")
            if encoder is not None and info.get("encoder") != encoder:
                raise ValueError(
                    f"text features in {self.directory} were computed by {info.get('encoder')!r}, this prior "
                    f"encodes with {encoder!r}: point text_features at that encoder's features or recompute "
                    "them with scripts/precompute_text_features.py"
                )

    @staticmethod
    def key(prompt: str) -> str:
        """The file stem of ``prompt``: sha256 of its UTF-8 bytes."""
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()

    def path(self, prompt: str) -> Path:
        key = self.key(prompt)
        return self.directory / key[:2] / f"{key}.safetensors"

    def __contains__(self, prompt: str) -> bool:
        return self.path(prompt).is_file()

    def read(self, prompt: str) -> TextCondition | None:
        """The stored features of ``prompt`` (batch of one), or ``None``."""
        from safetensors.torch import load_file

        path = self.path(prompt)
        if not path.is_file():
            return None
        return TextCondition.from_tensors(load_file(str(path)))

    def write(self, prompt: str, condition: TextCondition) -> Path:
        """Store ``condition`` (batch of one) for ``prompt``; atomic (a killed writer leaves no partial file)."""
        from safetensors.torch import save_file

        if len(condition) != 1:
            raise ValueError(f"write one prompt at a time, got a batch of {len(condition)}")
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / _MANIFEST
        if not manifest.is_file():
            manifest.write_text(
                json.dumps({"format": FEATURES_FORMAT, "encoder": self.encoder}, indent=2), encoding="utf-8"
            )
        path = self.path(prompt)
        path.parent.mkdir(exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in condition.tensors().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"prompt": prompt[:2000]})
        return path


class TextCache:
    """LRU of encoded prompts (batch-of-one :class:`TextCondition` rows); ``size`` 0 disables it."""

    def __init__(self, size: int = 0) -> None:
        if size < 0:
            raise ValueError(f"text cache size must be >= 0, got {size}")
        self.size = size
        self._rows: OrderedDict[str, TextCondition] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    def get(self, prompt: str) -> TextCondition:
        self._rows.move_to_end(prompt)
        return self._rows[prompt]

    def put(self, prompt: str, row: TextCondition) -> None:
        self._rows[prompt] = row

    def trim(self) -> None:
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)


def unique(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, in first-seen order."""
    return list(dict.fromkeys(items))
