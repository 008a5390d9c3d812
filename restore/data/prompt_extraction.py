"""Pre-compute text prompts for a folder of images into one JSONL side-file: MLLM captions and DAPE tags.

Sources: XPSR's high-level LLaVA caption and low-level quality text, pre-computed once per image, newlines
-> spaces (qyp2000/XPSR ``utils_data/{high,low}level_prompt_{train,test}.py``), and SeeSR's DAPE tags, joined
with ``", "`` (cswry/SeeSR ``ram/models/ram_lora.py``, ``generate_tag``).
The official scripts write one ``.txt`` per image and per prompt kind; here every kind is one field of one
record per image in the side-file that :class:`restore.data.prompts.PromptTable` reads::

    {"path": "sub/0001.png", "highlevel": "A red car ...", "lowlevel": "It is blurry ...", "tags": "car, red"}

``path`` is the image's dataset key: its path relative to the input folder (POSIX), or ``skimage/<name>.png``
for the photos bundled with scikit-image (the keys of :class:`restore.data.hr_datasets.EmbeddedPhotos`).

The file is an append log made safe to resume:

- progress is appended (one line per image holding the fields computed in that run) and flushed after every
  batch, so a killed run keeps its finished images;
- at the start and at the end the file is **compacted**: the lines of one path are merged into one record (a
  field of a later line replaces the earlier value; no field is ever dropped), written to a temporary file
  and moved over the original with ``os.replace`` (atomic), so the result always reads with ``PromptTable``.
  A last line cut off mid-write by a kill is dropped with a warning; any other malformed line is an error;
- an image is skipped when its record already holds a non-empty value of every requested field; a second run
  that asks for a new field computes only that field. A non-empty value is never replaced unless its field is
  named in ``overwrite_fields`` (an empty value, as the official scripts leave for failures, is recomputed).

Unreadable images (:class:`restore.data.image_io.ImageReadError`) are skipped with a warning naming the file
and the reason, and listed in the returned :class:`ExtractionReport`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from restore.atomic_write import atomic_path
from restore.data.image_io import ImageReadError, list_images, read_image, to_tensor

__all__ = [
    "CAPTIONER_CONFIG_DIR",
    "DAPE_SOURCES",
    "DEFAULT_SOURCES",
    "ExtractionReport",
    "ImageEntry",
    "PromptSource",
    "build_prompt_sources",
    "compact_side_file",
    "dape_tagger",
    "embedded_entries",
    "extract_prompts",
    "folder_entries",
    "parse_field_specs",
    "read_side_file",
    "write_side_file",
]

log = logging.getLogger(__name__)

#: A prompt source: images (``[3, H, W]`` in [0, 1], sizes may differ) -> one text per image.
PromptSource = Callable[[list[Tensor]], list[str]]


def _captioner_config_dir() -> Path:
    from restore import CONFIG_DIR

    return CONFIG_DIR / "method" / "captioner"


#: Where ``--field NAME=<config>`` finds captioner configs (``llava15_7b``, ``qinstruct``, ``dreamclear_llava``,
#: ``tiny_llava``, ``tiny_llava_next``).
CAPTIONER_CONFIG_DIR = _captioner_config_dir()
#: Source names that mean SeeSR's DAPE tagger (full size: RAM Swin-L + DAPE.pth; tiny: random, CPU).
DAPE_SOURCES = ("dape", "dape_tiny")
#: The source of a field given without one (``--field highlevel``): the field names XPSR's and SeeSR's
#: configs read (``prompt_key: {prompt: highlevel, lowlevel_prompt: lowlevel}``; a ``_gt`` suffix: the same
#: source on the HR images).
DEFAULT_SOURCES = {"highlevel": "llava15_7b", "lowlevel": "qinstruct", "tags": "dape"}


# ---------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageEntry:
    """One image to prompt: its side-file key and how to read it (float32 RGB ``(H, W, 3)`` in [0, 1];
    raises :class:`ImageReadError` for an unreadable file)."""

    key: str
    load: Callable[[], np.ndarray]


def folder_entries(root: str | os.PathLike) -> list[ImageEntry]:
    """Every image under ``root`` (recursive, sorted), keyed by its POSIX path relative to ``root``."""
    root = Path(root)
    return [
        ImageEntry(path.relative_to(root).as_posix(), lambda path=path: read_image(path))
        for path in list_images(root)
    ]


def embedded_entries(names: Sequence[str] | None = None) -> list[ImageEntry]:
    """The photos bundled with scikit-image, keyed ``skimage/<name>.png`` as
    :class:`restore.data.hr_datasets.EmbeddedPhotos` keys them."""
    from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, load_embedded_photo

    def loader(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            try:
                return load_embedded_photo(name)
            except RuntimeError as err:  # skimage could not load its own data: same policy as a bad file
                raise ImageReadError(f"skimage/{name}.png", str(err), "reinstall scikit-image") from err

        return load

    return [
        ImageEntry(f"skimage/{n}.png", loader(n)) for n in (EMBEDDED_PHOTO_NAMES if names is None else names)
    ]


# ---------------------------------------------------------------------------------------------- side-file
def _normalise(path: str) -> str:
    """``'./a\\\\b.png'`` -> ``'a/b.png'``, as :class:`restore.data.prompts.PromptTable` compares keys."""
    return "/".join(p for p in path.replace("\\", "/").split("/") if p not in ("", "."))


def read_side_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Records of a (possibly uncompacted) side-file, merged per normalised path, in first-seen order.

    A later line's fields replace earlier values of the same fields; other fields are kept. Blank lines are
    ignored. A last line without its newline that is not valid JSON (a write cut off by a kill) is dropped
    with a warning; any other invalid line raises ``ValueError`` with the line number (the file is left
    alone). A missing file gives no records.
    """
    path = Path(path)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # no newline after it: the partial last write of a killed run
                log.warning(
                    "%s:%d: dropping an incomplete last line (a killed run?): %r", path, lineno, line[:80]
                )
                continue
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg}): {line.strip()[:80]!r}") from err
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise ValueError(
                f'{path}:{lineno}: expected an object with a string field "path", got {line[:80]!r}'
            )
        key = _normalise(record["path"])
        merged = records.setdefault(key, {"path": key})
        merged.update({k: v for k, v in record.items() if k != "path"})
    return records


def write_side_file(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line to a temporary file beside ``path``, then ``os.replace`` it (atomic:
    readers see the old or the new file, never half of one)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def compact_side_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Merge the lines of each path into one record (:func:`read_side_file`) and rewrite the file atomically;
    returns the records. A missing file is created empty."""
    records = read_side_file(path)
    write_side_file(path, records.values())
    return records


# ---------------------------------------------------------------------------------------------- sources
def dape_tagger(dape: torch.nn.Module) -> PromptSource:
    """SeeSR's tag prompt from a (frozen) DAPE / RAM: ``generate_tags(image_embeds(preprocess(x)))``, one
    ``"a, b, c"`` string per image (as SeeSR's ``test_seesr.py`` and
    :meth:`restore.methods.seesr.SeeSR.tags`).

    Images of different sizes are preprocessed one by one (the DAPE resizes each to its square input) and then
    tagged as one batch, on the DAPE's device, in float32.
    """

    @torch.no_grad()
    def tags(images: list[Tensor]) -> list[str]:
        if not images:
            return []
        device = next(dape.parameters()).device
        pixels = torch.cat([dape.preprocess(img[None].to(device).float()) for img in images])
        return list(dape.generate_tags(dape.image_embeds(pixels)))

    return tags


def parse_field_specs(specs: Iterable[str]) -> dict[str, str]:
    """``["highlevel=llava15_7b", "tags=dape"]`` -> ``{"highlevel": "llava15_7b", "tags": "dape"}`` (ordered).

    A bare name of :data:`DEFAULT_SOURCES` (``highlevel``, ``lowlevel``, ``tags``, also with a ``_gt`` suffix)
    takes its default source. Field names must be non-empty, not ``path`` and given once."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not sep:
            source = DEFAULT_SOURCES.get(name.removesuffix("_gt"), "")
            if not source:
                raise ValueError(
                    f"expected FIELD=SOURCE (e.g. highlevel=llava15_7b) or one of the fields with a default "
                    f"source ({', '.join(f'{k}[_gt]' for k in DEFAULT_SOURCES)}), got {spec!r}"
                )
        if not name or not source:
            raise ValueError(f"expected FIELD=SOURCE (e.g. highlevel=llava15_7b), got {spec!r}")
        if name == "path":
            raise ValueError('"path" is the image key, not a prompt field')
        if name in out:
            raise ValueError(f"field {name!r} is given twice")
        out[name] = source
    if not out:
        raise ValueError("no prompt field requested (e.g. --field highlevel=llava15_7b)")
    return out


def _captioner_config(source: str) -> Any:
    from omegaconf import OmegaConf

    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        path = CAPTIONER_CONFIG_DIR / f"{source}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in CAPTIONER_CONFIG_DIR.glob("*.yaml"))
        raise ValueError(
            f"unknown prompt source {source!r}: expected one of {', '.join(choices + list(DAPE_SOURCES))} "
            "or a captioner .yaml file"
        )
    return OmegaConf.load(path)


def _instantiate(cfg: Any, **overrides: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a missing-model error itself rather than Hydra's wrapper (its
    message is the one that names the fix)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from restore.models.captioners import CaptionerNotFoundError
    from restore.weights.manifest import MissingWeightsError

    try:
        return instantiate(cfg, **overrides)
    except InstantiationException as err:
        if isinstance(err.__cause__, (CaptionerNotFoundError, MissingWeightsError)):
            raise err.__cause__ from None
        raise


def _prompt_and_decoding(cfg: Mapping[str, Any], defaults: bool = False) -> dict[str, Any]:
    """A captioner config's prompt template and decoding settings (``MLLMCaptioner`` keyword arguments).

    Keys the config leaves out (or null) are omitted, so ``with_instruction`` keeps the captioner's own; with
    ``defaults`` they take ``MLLMCaptioner``'s defaults (the same as ``from_pretrained``'s) instead, so a config
    sharing another config's checkpoint gets what it would have got loading the checkpoint itself.
    """
    import inspect

    from restore.models.captioners import MLLMCaptioner

    out: dict[str, Any] = {}
    signature = inspect.signature(MLLMCaptioner.__init__).parameters
    for key in ("prompt_template", "temperature", "top_p", "seed"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
        elif defaults:
            out[key] = signature[key].default
    return out


def build_prompt_sources(
    fields: Mapping[str, str],
    tiny: bool = False,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | str | None = None,
    model_paths: Mapping[str, str] | None = None,
    ram_checkpoint: str | os.PathLike | None = None,
    dape_checkpoint: str | os.PathLike | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, PromptSource]:
    """Field name -> prompt source, from source names (see :func:`parse_field_specs`).

    A source is a captioner config of ``configs/method/captioner/`` (``llava15_7b``, ``qinstruct``,
    ``dreamclear_llava``, ``tiny_llava``, ``tiny_llava_next``) or a path to such a ``.yaml`` (instantiated with
    Hydra, built at once even when the config is ``_partial_`` for a method to build on first use;
    ``device``, ``torch_dtype``, ``max_new_tokens`` and ``model_paths[field]`` override its entries), ``dape``
    (RAM Swin-L ``ram_checkpoint``, default the weights manifest's, + ``dape_checkpoint``; missing files raise
    :class:`restore.weights.MissingWeightsError`) or ``dape_tiny``. ``tiny`` swaps every captioner for
    :func:`restore.models.captioners.tiny_llava` asked the config's instruction with its prompt template and
    decoding (temperature, top-p, seed), and ``dape`` for ``dape_tiny``: the whole pipeline on a CPU with no
    download. Captioners of one checkpoint share its weights; each keeps its config's instruction, prompt
    template, budget and decoding.
    """
    from restore.models.captioners import MLLMCaptioner, tiny_llava
    from restore.models.dape import load_dape

    model_paths = dict(model_paths or {})
    unknown = sorted(set(model_paths) - set(fields))
    if unknown:
        raise ValueError(f"model paths given for fields that are not requested: {unknown}")
    loaded: dict[tuple[Any, ...], MLLMCaptioner] = {}
    sources: dict[str, PromptSource] = {}
    for name, source in fields.items():
        if source in DAPE_SOURCES:
            if tiny or source == "dape_tiny":
                dape = load_dape("tiny", seed=0, token_dim=32, device=device)
            else:
                dape = load_dape(
                    "swin_l_384",
                    ram_checkpoint=ram_checkpoint,
                    dape_checkpoint=dape_checkpoint,
                    device=device,
                )
            sources[name] = dape_tagger(dape)
            continue
        cfg = _captioner_config(source)
        if tiny:
            captioner = tiny_llava(str(cfg.instruction), seed=0).with_instruction(
                str(cfg.instruction), **_prompt_and_decoding(cfg)
            )
            if max_new_tokens is not None:
                captioner.max_new_tokens = max_new_tokens
            sources[name] = captioner.to(device).caption
            continue
        overrides: dict[str, Any] = {}
        if max_new_tokens is not None:
            overrides["max_new_tokens"] = max_new_tokens
        target = str(cfg.get("_target_", ""))
        if target.endswith("MLLMCaptioner.from_pretrained"):
            if name in model_paths:
                overrides["model_id_or_path"] = model_paths[name]
            overrides["device"] = str(device)
            if torch_dtype is not None:
                overrides["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
            merged = {**cfg, **overrides}
            share_key = (
                merged["model_id_or_path"],
                str(merged.get("torch_dtype")),
                merged.get("local_files_only"),
            )
            if share_key in loaded:  # same checkpoint: reuse its weights with this field's instruction
                base = loaded[share_key]
                captioner = MLLMCaptioner(
                    base.model,
                    base.processor,
                    str(merged["instruction"]),
                    max_new_tokens=merged.get("max_new_tokens"),
                    source=base.source,
                    **_prompt_and_decoding(merged, defaults=True),
                )
            else:
                # A method's config may be _partial_ (built on first use); here the captioner is needed now.
                captioner = _instantiate(cfg, _partial_=False, **overrides)
                loaded[share_key] = captioner
        else:
            if name in model_paths:
                raise ValueError(f"field {name!r}: {source!r} ({target}) does not load a checkpoint by path")
            captioner = _instantiate(cfg, **overrides)
            captioner = captioner.to(device) if isinstance(captioner, torch.nn.Module) else captioner
        sources[name] = captioner.caption if isinstance(captioner, MLLMCaptioner) else captioner
    return sources


# ---------------------------------------------------------------------------------------------- extraction
@dataclass
class ExtractionReport:
    """What :func:`extract_prompts` did."""

    out: Path
    images: int  #: images given
    complete_before: int  #: images that already had every requested field
    computed: dict[str, int] = field(default_factory=dict)  #: field -> values written in this run
    unreadable: list[tuple[str, str]] = field(default_factory=list)  #: (key, reason) of skipped images

    def summary(self) -> str:
        done = ", ".join(f"{k}: {v}" for k, v in self.computed.items()) or "nothing"
        return (
            f"{self.out}: {self.images} images, {self.complete_before} already complete; computed {done}; "
            f"{len(self.unreadable)} unreadable"
        )


def _has_value(record: Mapping[str, Any] | None, name: str) -> bool:
    value = None if record is None else record.get(name)
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, list) and bool(value))


def extract_prompts(
    entries: Sequence[ImageEntry],
    out: str | os.PathLike,
    sources: Mapping[str, PromptSource],
    batch_size: int = 8,
    overwrite_fields: Collection[str] = (),
    progress: bool = True,
) -> ExtractionReport:
    """Compute the missing prompt fields of ``entries`` into the JSONL side-file ``out`` (see the module doc).

    ``sources`` maps field name -> prompt source (:func:`build_prompt_sources`). Images are read and prompted
    ``batch_size`` at a time (sizes may differ within a batch); each source sees only the images that still
    need its field. ``overwrite_fields`` recomputes those fields for every image even when they hold text.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not sources:
        raise ValueError("no prompt source given")
    if "path" in sources:
        raise ValueError('"path" is the image key, not a prompt field')
    extra = sorted(set(overwrite_fields) - set(sources))
    if extra:
        raise ValueError(f"overwrite_fields {extra} are not among the requested fields {sorted(sources)}")
    keys = [e.key for e in entries]
    duplicated = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if duplicated:
        raise ValueError(f"several images share the keys {duplicated[:5]}")

    out = Path(out)
    records = compact_side_file(out)  # a killed run's duplicate lines are merged before anything else
    todo: list[tuple[ImageEntry, list[str]]] = []
    for entry in entries:
        record = records.get(_normalise(entry.key))
        needed = [n for n in sources if n in overwrite_fields or not _has_value(record, n)]
        if needed:
            todo.append((entry, needed))
    report = ExtractionReport(out=out, images=len(entries), complete_before=len(entries) - len(todo))
    report.computed = dict.fromkeys(sources, 0)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"prompts -> {out.name}", unit="img", disable=not progress)
    try:
        with out.open("a", encoding="utf-8") as log_file:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                new = _prompt_batch(batch, sources, report)
                for key, values in new:
                    log_file.write(json.dumps({"path": _normalise(key), **values}, ensure_ascii=False) + "\n")
                log_file.flush()
                os.fsync(log_file.fileno())  # a kill after this line loses nothing of this batch
                bar.update(len(batch))
    finally:
        bar.close()
    compact_side_file(out)
    if report.unreadable:
        log.warning(
            "%d unreadable image(s) skipped: %s",
            len(report.unreadable),
            "; ".join(f"{k} ({r})" for k, r in report.unreadable),
        )
    return report


def _prompt_batch(
    batch: Sequence[tuple[ImageEntry, list[str]]],
    sources: Mapping[str, PromptSource],
    report: ExtractionReport,
) -> list[tuple[str, dict[str, str]]]:
    """Read the batch's images (skipping unreadable ones) and run each source on the images that need it."""
    keys: list[str] = []
    images: list[Tensor] = []
    needs: list[list[str]] = []
    for entry, needed in batch:
        try:
            images.append(to_tensor(entry.load()))
        except ImageReadError as err:
            log.warning("skipping unreadable image %s: %s", entry.key, err.reason)
            report.unreadable.append((entry.key, err.reason))
            continue
        keys.append(entry.key)
        needs.append(needed)
    values: list[dict[str, str]] = [{} for _ in keys]
    for name, source in sources.items():
        idx = [i for i, needed in enumerate(needs) if name in needed]
        if not idx:
            continue
        texts = source([images[i] for i in idx])
        if len(texts) != len(idx):
            raise RuntimeError(
                f"prompt source of field {name!r} returned {len(texts)} texts for {len(idx)} images"
            )
        for i, text in zip(idx, texts, strict=True):
            values[i][name] = text
        report.computed[name] += len(idx)
    return [(k, v) for k, v in zip(keys, values, strict=True) if v]
