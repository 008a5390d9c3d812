"""Precomputed training inputs: what the frozen encoders make of a prepared pair set, stored once in shards.

A diffusion-SR training step runs frozen networks on every batch before the trainable ones see it: the VAE
encoder on the GT, the text encoder on the prompt (and XPSR's low-level prompt), SeeSR's DAPE on the LR (RAM
tokens) and, without a prompt side-file, on the GT (tags). On a fixed pair set (SeeSR / XPSR train on stored
512² pairs: ``restore.data.paired_training``) their outputs never change, so
``scripts/precompute_training_inputs.py`` computes them once and :class:`PrecomputedInputs` trains from them.

What is stored and what stays in the step (``LatentDiffusionSR.training_step``):

- the GT's VAE posterior *moments* (mean and log-variance), not a latent: the step still draws the posterior
  sample with its own generator (``latent_dist.sample()`` of the official trainers, cswry/SeeSR
  ``train_seesr.py``), so the draws, and the loss, equal the on-the-fly path's;
- the features of the text prompt each sample trains with, and once for the set the prior's null condition
  when it is an encoded prompt (SD's ``""``): prompt dropout stays a per-step draw that picks between them;
- the method's other frozen inputs (SeeSR's RAM tokens of the upsampled LR, XPSR's low-level prompt features);
- the GT and LR images themselves (8-bit ones as ``uint8``, exactly as ``read_image`` reads them): the ControlNet
  reads the LR and XPSR's DFC loss the GT.

Noise, timesteps and the null-prompt draw stay on the fly. Crops are fixed (each pair whole, as the official
pair sets are stored at the training size); the horizontal flip of the recipes is kept by storing the encoders'
outputs of both orientations (``variants``), one drawn per item.

Layout of a precomputed folder::

    manifest.json            format, encoder identity, pair-set identity, shard size, variants; ``complete``
    null_text.safetensors    the null condition's features (SD priors)
    shards/00000.safetensors pairs 0..S-1: ``{j}/gt``, ``{j}/lq``, ``{j}/{variant}/{field}``; metadata: keys, texts

Every file is written atomically (:mod:`restore.atomic_write`), the manifest first: a killed run continues
where it stopped, and a folder written for another encoder or pair set is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from restore.atomic_write import atomic_path, atomic_write_text
from restore.data.paired import collate_variable_size, prompt_field_map
from restore.data.paired_training import PairedTrainingFolder
from restore.data.transforms import rng_from_torch
from restore.models.priors.text import TextCondition

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "PREFIX",
    "VARIANTS",
    "PrecomputedInputs",
    "PrecomputedInputsError",
    "check_precomputed_source",
    "method_encoder",
    "pair_set_identity",
    "precomputed",
    "precomputed_text",
    "text_fields",
    "write_precomputed_inputs",
]

FORMAT = "restore.precomputed_inputs/v1"
MANIFEST_FILE = "manifest.json"
NULL_TEXT_FILE = "null_text.safetensors"
SHARD_FOLDER = "shards"
#: Batch entries carrying precomputed tensors start with this (``precomputed.gt_moments``, ...).
PREFIX = "precomputed."
#: The stored orientations: the pair as stored, and flipped left-right (SeeSR / XPSR train with hflip).
VARIANTS = ("plain", "hflip")
#: Item entries naming where the inputs come from, checked by the method against its own prior.
SOURCE_FIELDS = ("prior", "method")

#: Batch fields whose texts are kept in the shards' metadata (the features are what trains).
TEXT_FIELDS = ("prompt", "lowlevel_prompt")
#: What an encode function returns per batch: tensors ``[B, ...]`` by field, or texts (lists) kept as metadata.
Encoded = Mapping[str, Tensor | Sequence[str]]


class PrecomputedInputsError(ValueError):
    """A precomputed folder that cannot be used as asked (other encoder / pair set, incomplete, damaged)."""


# ---------------------------------------------------------------------------------------------- batch access
def text_fields(name: str, condition: TextCondition) -> dict[str, Tensor]:
    """``condition``'s stored tensors under ``name.`` (``added`` entries left out: they are settings of the prior,
    recomputed by it, never stored)."""
    return {f"{name}.{k}": v for k, v in condition.tensors().items() if not k.startswith("added.")}


def precomputed(batch: Mapping[str, Any], field: str) -> Tensor | None:
    """The batch's precomputed tensor ``field`` (e.g. ``gt_moments``), or ``None`` when it has none."""
    return batch.get(PREFIX + field)


def precomputed_text(batch: Mapping[str, Any], name: str) -> TextCondition | None:
    """The batch's precomputed text condition ``name`` (``text``, ``null_text``, ``lowlevel_text``), or ``None``."""
    start = f"{PREFIX}{name}."
    tensors = {k[len(start) :]: v for k, v in batch.items() if k.startswith(start)}
    return TextCondition.from_tensors(tensors) if tensors else None


def check_precomputed_source(batch: Mapping[str, Any], prior: str, method: str) -> None:
    """Refuse a batch whose inputs another prior or method computed (same shapes would train silently wrong)."""
    for field, ours in (("prior", prior), ("method", method)):
        theirs = set(batch.get(PREFIX + field) or ())
        if theirs and theirs != {ours}:
            raise PrecomputedInputsError(
                f"the batch's precomputed inputs were made for {field} {sorted(theirs)}, this run uses {ours!r}: "
                "point data.train.root at inputs precomputed for this method "
                "(python scripts/precompute_training_inputs.py experiment=... pairs=... out=...)"
            )


# ---------------------------------------------------------------------------------------------- identity
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_set_identity(pairs: PairedTrainingFolder, prompts: str | os.PathLike | None) -> dict[str, Any]:
    """What defines a pair set's samples: every pair's names and byte sizes (a re-synthesised set differs), the
    recipe / meta files of ``scripts/make_training_pairs.py`` where present, the scale and the prompt side-file's
    content with the fields read."""
    listing = hashlib.sha256()
    for key, gt, lq in zip(pairs.keys, pairs.gt_files, pairs.lq_files, strict=True):
        listing.update(
            f"{key}|{Path(gt).name}|{Path(gt).stat().st_size}|{Path(lq).stat().st_size}\n".encode()
        )
    root = pairs.gt_dir.parent
    recipes = {
        name: _file_digest(root / name) for name in ("recipe.json", "meta.json") if (root / name).is_file()
    }
    return {
        "gt_dir": str(pairs.gt_dir.resolve()),
        "lq_dir": str(pairs.lq_dir.resolve()),
        "num_pairs": len(pairs),
        "pairs": listing.hexdigest(),
        "recipes": recipes,
        "scale": pairs.scale,
        "prompts": None if prompts is None else _file_digest(Path(prompts)),
        "prompt_fields": None if pairs.prompts is None else dict(pairs.prompts.mapping),
    }


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any], path: str = "") -> list[str]:
    out = []
    for key in sorted(set(found) | set(wanted)):
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{path}{key}.")
        elif a != b:
            out.append(f"{path}{key}: stored {a!r}, now {b!r}")
    return out


# ---------------------------------------------------------------------------------------------- shards
def shard_path(root: str | os.PathLike, index: int) -> Path:
    return Path(root) / SHARD_FOLDER / f"{index:05d}.safetensors"


def _image_for_storage(image: Tensor) -> Tensor:
    """``uint8`` when the float image is exactly an 8-bit one (``k / 255``: ``read_image``'s values), else as is."""
    codes = (image * 255).round()
    if bool(((codes / 255) == image).all()):
        return codes.to(torch.uint8)
    return image.float()


def _image_from_storage(stored: Tensor) -> Tensor:
    return stored.float() / 255 if stored.dtype == torch.uint8 else stored.float()


def _read_shard_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        names = set(fh.keys())
    return {"keys": json.loads(metadata.get("keys", "null")), "names": names}


def _verify_shard(path: Path, keys: Sequence[str], variants: Sequence[str]) -> None:
    """A finished shard holds the planned pairs with every entry; raise naming the fix otherwise."""
    try:
        found = _read_shard_metadata(path)
    except Exception as err:  # a file that safetensors cannot parse
        raise PrecomputedInputsError(f"{path} is damaged ({err}): delete it and run again") from err
    if found["keys"] != list(keys):
        raise PrecomputedInputsError(
            f"{path} holds other pairs than planned ({found['keys'][:3]}... vs {list(keys)[:3]}...): the pair set "
            "changed since it was written; write to a new out= folder"
        )
    for j in range(len(keys)):
        needed = [f"{j}/gt", f"{j}/lq"] + [f"{j}/{v}/gt_moments" for v in variants]
        missing = [n for n in needed if n not in found["names"]]
        if missing:
            raise PrecomputedInputsError(f"{path} lacks {missing}: delete it and run again")


def _flip(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {**batch, "gt": batch["gt"].flip(-1), "lq": batch["lq"].flip(-1)}


def method_encoder(module: Any) -> Callable[[dict[str, Any]], Encoded]:
    """The ``encode`` of :func:`write_precomputed_inputs` for a method (a ``LatentDiffusionSR``): its batch
    preparation (``on_after_batch_transfer``: the upsampled LR, SeeSR's tags and RAM tokens, XPSR's text choice),
    then its ``precompute_inputs``, plus the texts it encoded (kept in the shards' metadata for inspection)."""

    def encode(batch: dict[str, Any]) -> Encoded:
        prepared = module.on_after_batch_transfer(batch, 0)
        texts = {f: prepared[f] for f in TEXT_FIELDS if isinstance(prepared.get(f), list)}
        return {**module.precompute_inputs(prepared), **texts}

    return encode


def write_precomputed_inputs(
    pairs: PairedTrainingFolder,
    encode: Callable[[dict[str, Any]], Encoded],
    out: str | os.PathLike,
    identity: Mapping[str, Any],
    null_text: Mapping[str, Tensor] | None = None,
    samples_per_shard: int = 256,
    batch_size: int = 8,
    hflip: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, int]:
    """Encode every pair of ``pairs`` with ``encode`` into shards under ``out``; returns ``{written, kept}`` shards.

    ``pairs`` must read each pair whole and unflipped (``crop_size`` = the pair size, ``hflip=False``);
    ``encode(batch)`` gets a collated batch on ``device`` (``gt``, ``lq``, ``key``, prompt fields) and returns its
    fields (``gt_moments``, ``text.hidden_states``, ...). ``identity``: the encoder's identity (method, prior,
    weight digests, settings) written to the manifest with the pair set's; a folder holding another identity is
    refused. ``null_text``: the null condition's tensors (stored once). ``hflip`` also stores the flipped
    orientation.
    """
    out = Path(out)
    if isinstance(samples_per_shard, bool) or samples_per_shard <= 0 or batch_size <= 0:
        raise ValueError(
            f"samples_per_shard and batch_size must be positive, got {samples_per_shard}, {batch_size}"
        )
    variants = list(VARIANTS if hflip else VARIANTS[:1])
    prompts = None if pairs.prompts is None else pairs.prompts.table.path
    manifest = {
        "format": FORMAT,
        "encoder": dict(identity),
        "pair_set": pair_set_identity(pairs, prompts),
        "samples_per_shard": int(samples_per_shard),
        "variants": variants,
        "num_samples": len(pairs),
        "gt_size": list(pairs[0]["gt"].shape[-2:]) if len(pairs) else None,
        "num_shards": -(-len(pairs) // samples_per_shard),
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # what reading it back gives
    _claim_folder(out, manifest)
    if null_text:
        from safetensors.torch import save_file

        with atomic_path(out / NULL_TEXT_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in null_text.items()}, str(tmp))
    counts = {"written": 0, "kept": 0}
    bar = tqdm(total=len(pairs), desc="precompute", unit="pair", disable=not progress)
    for shard in range(manifest["num_shards"]):
        indices = range(shard * samples_per_shard, min(len(pairs), (shard + 1) * samples_per_shard))
        keys = [pairs.keys[i] for i in indices]
        path = shard_path(out, shard)
        if path.is_file():
            _verify_shard(path, keys, variants)
            counts["kept"] += 1
        else:
            _write_shard(path, pairs, indices, encode, variants, batch_size, device)
            counts["written"] += 1
        bar.update(len(indices))
    bar.close()
    atomic_write_text(out / MANIFEST_FILE, json.dumps({**manifest, "complete": True}, indent=2))
    return counts


def _claim_folder(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest of a new folder, or check that an existing one was written for the same inputs."""
    path = out / MANIFEST_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored.pop("complete", None)
        diffs = _differences(stored, manifest)
        if diffs:
            raise PrecomputedInputsError(
                f"{out} holds inputs precomputed for another encoder or pair set ({'; '.join(diffs[:4])}): "
                f"write them to a new out= folder (or delete {out} to recompute)"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise PrecomputedInputsError(
            f"{out} is not empty and has no {MANIFEST_FILE}: not a precomputed-inputs folder; choose another out="
        )
    atomic_write_text(path, json.dumps(manifest, indent=2))


def _write_shard(
    path: Path,
    pairs: PairedTrainingFolder,
    indices: range,
    encode: Callable[[dict[str, Any]], Encoded],
    variants: Sequence[str],
    batch_size: int,
    device: torch.device | str,
) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    texts: list[dict[str, dict[str, str]]] = []
    size = None
    for start in range(indices.start, indices.stop, batch_size):
        items = [pairs[i] for i in range(start, min(indices.stop, start + batch_size))]
        for item in items:
            size = size or tuple(item["gt"].shape)
            if tuple(item["gt"].shape) != size:
                raise PrecomputedInputsError(
                    f"pair '{item['key']}' has GT {tuple(item['gt'].shape)}, others {size}: a precomputed set "
                    "stores whole pairs of one size (scripts/make_training_pairs.py --crop)"
                )
        batch = collate_variable_size(items)
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        row = start - indices.start
        per_item: list[dict[str, dict[str, str]]] = [{} for _ in items]
        for j, item in enumerate(items):
            tensors[f"{row + j}/gt"] = _image_for_storage(item["gt"])
            tensors[f"{row + j}/lq"] = _image_for_storage(item["lq"])
        for variant in variants:
            encoded = encode(batch if variant == "plain" else _flip(batch))
            for field, value in encoded.items():
                for j in range(len(items)):
                    if isinstance(value, Tensor):
                        tensors[f"{row + j}/{variant}/{field}"] = value[j].detach().cpu().contiguous()
                    else:
                        per_item[j].setdefault(variant, {})[field] = str(value[j])
        texts += per_item
    keys = [pairs.keys[i] for i in indices]
    metadata = {"keys": json.dumps(keys), "texts": json.dumps(texts)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ---------------------------------------------------------------------------------------------- dataset
class PrecomputedInputs(Dataset):
    """Training items from a folder written by ``scripts/precompute_training_inputs.py`` (see the module doc).

    Items: ``{"gt", "lq", "key"}`` as :class:`~restore.data.paired_training.PairedTrainingFolder` gives them, plus
    ``precomputed.<field>`` tensors (``gt_moments``, ``text.*``, ``null_text.*``, the method's own) and
    ``precomputed.prior`` / ``precomputed.method`` naming what computed them; the methods' training step then
    runs no VAE encoder, text encoder or tagger (``LatentDiffusionSR.training_step``).

    Args:
        root: the precomputed folder (its manifest must say ``complete``).
        hflip: draw the stored flipped orientation with p=0.5 (the recipes' hflip); needs a set written with it.
        crop_size: ``None``, or the GT side the experiment trains on: checked against the stored pairs (their crops
            are fixed when precomputed).
        prompts, prompt_key: ``None``, or the experiment's side-file settings: the side-file's content and fields
            are checked against the ones the features were computed from (the texts themselves are not read).

    The orientation is drawn from a numpy generator seeded from torch's global RNG
    (:func:`restore.data.transforms.rng_from_torch`), as every training dataset here.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        hflip: bool = True,
        crop_size: int | None = None,
        prompts: str | os.PathLike | None = None,
        prompt_key: str | Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            raise PrecomputedInputsError(
                f"{self.root} has no {MANIFEST_FILE}: write it with `python scripts/precompute_training_inputs.py "
                "experiment=... pairs=<pair set> out=<folder>` (docs/training_memory.md)"
            )
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise PrecomputedInputsError(
                f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}"
            )
        if not self.manifest.get("complete"):
            raise PrecomputedInputsError(
                f"{self.root} is incomplete (a precompute run stopped before its end): run the same "
                "scripts/precompute_training_inputs.py command again to finish it"
            )
        self.variants = list(self.manifest["variants"])
        if hflip and "hflip" not in self.variants:
            raise PrecomputedInputsError(
                f"{self.root} was written without the flipped orientation: set data.train.hflip=false, or "
                "precompute again with hflip=true"
            )
        self.hflip = bool(hflip)
        self._check_experiment(crop_size, prompts, prompt_key)
        self.samples_per_shard = int(self.manifest["samples_per_shard"])
        self.num_samples = int(self.manifest["num_samples"])
        self.null_text: dict[str, Tensor] = {}
        if (self.root / NULL_TEXT_FILE).is_file():
            from safetensors.torch import load_file

            self.null_text = {k: v[0] for k, v in load_file(str(self.root / NULL_TEXT_FILE)).items()}
        encoder = self.manifest["encoder"]
        self.sources = {"prior": str(encoder.get("prior")), "method": str(encoder.get("method"))}
        self._keys: dict[int, list[str]] = {}

    def _check_experiment(
        self,
        crop_size: int | None,
        prompts: str | os.PathLike | None,
        prompt_key: str | Mapping[str, str] | None,
    ) -> None:
        """The experiment's data settings must describe the stored inputs (the crops and texts are fixed)."""
        stored = self.manifest.get("gt_size")
        if crop_size is not None and stored is not None and list(stored) != [int(crop_size)] * 2:
            raise PrecomputedInputsError(
                f"data.train.crop_size={crop_size}, but {self.root} stores {stored[0]}x{stored[1]} pairs (crops are "
                "fixed when precomputed): set data.train.crop_size=null, or precompute pairs of that size"
            )
        pair_set = self.manifest["pair_set"]
        if prompts is not None:
            path = Path(prompts).expanduser()
            digest = _file_digest(path) if path.is_file() else None
            if digest != pair_set.get("prompts"):
                raise PrecomputedInputsError(
                    f"data.train.prompts={path} is not the side-file {self.root} was precomputed from (its content "
                    "differs): precompute again with it, or set data.train.prompts=null"
                )
        if prompts is not None and prompt_key is not None:
            fields = prompt_field_map(prompt_key)
            if fields != pair_set.get("prompt_fields"):
                raise PrecomputedInputsError(
                    f"data.train.prompt_key={fields}, but {self.root} was precomputed with "
                    f"{pair_set.get('prompt_fields')}: precompute again, or set data.train.prompts=null"
                )

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root='{self.root}', n={len(self)}, hflip={self.hflip})"

    def _shard(self, index: int) -> tuple[Path, int]:
        shard, row = divmod(index, self.samples_per_shard)
        return shard_path(self.root, shard), row

    def __getitem__(self, index: int) -> dict[str, Any]:
        from safetensors import safe_open

        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        path, row = self._shard(index)
        if not path.is_file():
            raise PrecomputedInputsError(
                f"{path} is missing: run scripts/precompute_training_inputs.py again"
            )
        flip = self.hflip and rng_from_torch().random() < 0.5
        variant = "hflip" if flip else "plain"
        item: dict[str, Any] = {}
        with safe_open(str(path), framework="pt") as fh:
            keys = self._keys.get(index // self.samples_per_shard)
            if keys is None:
                keys = self._keys[index // self.samples_per_shard] = json.loads(fh.metadata()["keys"])
            for name in ("gt", "lq"):
                image = _image_from_storage(fh.get_tensor(f"{row}/{name}"))
                item[name] = image.flip(-1) if flip else image
            item["key"] = keys[row]
            start = f"{row}/{variant}/"
            for name in fh.keys():  # noqa: SIM118 (safe_open is no dict)
                if name.startswith(start):
                    item[PREFIX + name[len(start) :]] = fh.get_tensor(name)
        item.update({PREFIX + k: v for k, v in self.null_text.items()})  # stored as null_text.<name>
        item.update({PREFIX + k: v for k, v in self.sources.items()})
        return item
