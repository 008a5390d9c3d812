"""The Recognize Anything Model (RAM) tagger on its tagging path: image tokens, tag logits, tag strings.

Reference: RAM (Zhang et al., 2023; xinyu1205/recognize-anything) as SeeSR ships it, cswry/SeeSR
``ram/models/ram_lora.py``: Swin-L 384 + tagging head, 4585 tags, per-class thresholds
(``ram/data/ram_tag_list_threshold.txt``), tags joined with ", " (``generate_tag``); image tokens
``image_proj(visual_encoder(x))`` = ``[B, 145, 512]`` (``generate_image_embeds``); input: bicubic resize to
384, clamp to [0, 1], ImageNet mean/std (SeeSR's ``train_seesr.py``).

Only what RAM uses to tag an image is built: ``visual_encoder`` (:mod:`.swin`), ``image_proj``, ``label_embed``,
``wordvec_proj``, ``tagging_head`` (:mod:`.tagging_head`) and ``fc``, with the official key names, so the
released ``ram_swin_large_14m.pth`` loads into it (:func:`load_ram_checkpoint`). The checkpoint's other parts
(``tag_encoder``, ``text_decoder``: Tag2Text captioning) are skipped and counted in the log. The tokenizer of
the official class is only used by those parts, so there is none here.

Files (``restore/weights/manifest.yaml``; ``python -m restore.weights fetch <name>``):
``ram_swin_large_14m.pth`` (weights), ``ram_tag_list.txt`` (4585 names, one per line),
``ram_tag_list_threshold.txt`` (4585 per-class thresholds). Arguments naming them take a path or the bare
manifest name; a missing file raises :class:`MissingModelFileError` with the URL and the fetch command.

Deviation from the official random init (no effect once weights are loaded): ``label_embed`` is drawn from
N(0, std^2) (``RAMConfig.label_embed_init_std``) instead of zeros, so that an untrained (tiny) model gives
class-dependent logits.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restore.models.ram.swin import SwinTransformer, resize_relative_position_tables
from restore.models.ram.tagging_head import TaggingHead
from restore.weights.checkpoint_file import load_checkpoint_file
from restore.weights.manifest import MissingWeightsError, WeightFile
from restore.weights.manifest import get as manifest_entry

__all__ = [
    "RAM",
    "RAM_CHECKPOINT",
    "RAM_VARIANTS",
    "TAG_LIST",
    "TAG_THRESHOLDS",
    "MissingModelFileError",
    "RAMConfig",
    "RAMLoadReport",
    "build_ram",
    "load_ram_checkpoint",
    "read_tag_list",
    "read_thresholds",
    "resolve_model_file",
]

log = logging.getLogger(__name__)

#: Manifest names of the official files (restore/weights/manifest.yaml).
RAM_CHECKPOINT = "ram_swin_large_14m.pth"
TAG_LIST = "ram_tag_list.txt"
TAG_THRESHOLDS = "ram_tag_list_threshold.txt"

#: ImageNet statistics of RAM's input normalisation (as SeeSR's ``train_seesr.py`` / ``test_seesr.py``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Checkpoint entries recomputed by the model (the official loader deletes them too).
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass(frozen=True)
class RAMConfig:
    """Every number of a RAM tagger. Defaults: the official Swin-L 384 (RAM
    ``ram/configs/swin/config_swinL_384.json`` + ``ram/configs/q2l_config.json``, ``encoder_width=512``)."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # active in training mode only (the DAPE student trains in train mode)
    token_dim: int = 512  # image_proj output = label_embed width = tagging-head encoder width
    hidden_size: int = 768  # tagging head
    head_num_heads: int = 4
    head_num_layers: int = 2
    intermediate_size: int = 3072
    head_dropout: float = 0.1  # BERT attention-probability and hidden dropout
    layer_norm_eps: float = 1e-12
    num_classes: int = 4585  # used only when no tag list is given
    threshold: float = 0.68  # class threshold when no per-class file is given (official default argument)
    delete_tag_index: tuple[int, ...] = field(default_factory=tuple)  # official RAM / SeeSR: none
    label_embed_init_std: float = 0.02  # random init only (official: zeros; loaded weights replace it)

    @property
    def vision_width(self) -> int:
        """Channels of the Swin output (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)


#: Named configurations for :func:`build_ram`.
RAM_VARIANTS: dict[str, RAMConfig] = {
    "swin_l_384": RAMConfig(),
    # CPU-test size: 64 px, 5 tokens of 32 channels, 64 generated tags; same structure (shifted windows in the
    # first two stages, a one-window stage, Linear wordvec_proj since hidden != token_dim).
    "tiny": RAMConfig(
        image_size=64,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        token_dim=32,
        hidden_size=48,
        head_num_heads=2,
        intermediate_size=96,
        num_classes=64,
        threshold=0.5,
        label_embed_init_std=1.0,  # class queries far apart: a random model keeps ~1/3 of the tags, not all
    ),
}


class RAM(nn.Module):
    """RAM tagger: ``preprocess`` -> ``image_embeds`` (the RCA tokens) -> ``tag_logits`` -> ``generate_tags``.

    Args:
        config: the numbers (:data:`RAM_VARIANTS`).
        tag_list: class names; their count sets ``label_embed``'s rows.
        thresholds: per-class sigmoid thresholds (a tag is kept when its probability is *greater*); ``None``
            = ``config.threshold`` for every class.
        delete_tag_index: classes never output (official RAM and SeeSR: none; Tag2Text deletes a few).
    """

    def __init__(
        self,
        config: RAMConfig,
        tag_list: Sequence[str],
        thresholds: Sequence[float] | Tensor | None = None,
        delete_tag_index: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.token_dim = config.token_dim
        self.tag_list = list(tag_list)
        num_classes = len(self.tag_list)
        if num_classes == 0:
            raise ValueError("tag_list is empty")
        deleted = config.delete_tag_index if delete_tag_index is None else delete_tag_index
        self.delete_tag_index = tuple(sorted({int(i) for i in deleted}))
        if any(not 0 <= i < num_classes for i in self.delete_tag_index):
            raise ValueError(f"delete_tag_index out of range for {num_classes} classes")

        # Registration order as the official RAM (so state_dict() lists the keys in its order).
        self.visual_encoder = SwinTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            mlp_ratio=config.mlp_ratio,
            drop_path_rate=config.drop_path_rate,
        )
        self.tagging_head = TaggingHead(
            hidden_size=config.hidden_size,
            encoder_width=config.token_dim,
            num_heads=config.head_num_heads,
            num_layers=config.head_num_layers,
            intermediate_size=config.intermediate_size,
            dropout=config.head_dropout,
            layer_norm_eps=config.layer_norm_eps,
        )
        self.label_embed = nn.Parameter(torch.empty(num_classes, config.token_dim))
        nn.init.normal_(self.label_embed, std=config.label_embed_init_std)
        # Official: Linear(512, hidden) unless hidden == 512 (the label-embedding width).
        if config.hidden_size != config.token_dim:
            self.wordvec_proj: nn.Module = nn.Linear(config.token_dim, config.hidden_size)
        else:
            self.wordvec_proj = nn.Identity()
        self.fc = nn.Linear(config.hidden_size, 1)
        self.image_proj = nn.Linear(config.vision_width, config.token_dim)

        values = torch.full((num_classes,), float(config.threshold))
        if thresholds is not None:
            given = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
            if given.numel() != num_classes:
                raise ValueError(f"{given.numel()} thresholds for {num_classes} tags")
            values = given.to(values.device)
        self.register_buffer("class_threshold", values, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.tag_list)

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: ``1 + (image_size / 32)^2`` (145 at 384)."""
        return self.visual_encoder.num_tokens

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1], any size -> bicubic ``image_size`` square, clamp, ImageNet-normalised.

        As SeeSR's training data path (``train_seesr.py``): ``F.interpolate(..., mode='bicubic')`` (no
        antialias), ``clamp(0, 1)``, then mean/std. Float32 whatever the input dtype.
        """
        x = images.float()
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:  # same-size bicubic resampling is the identity
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return (x.clamp(0.0, 1.0) - self.pixel_mean) / self.pixel_std

    def image_embeds(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels -> ``[B, num_tokens, token_dim]`` = ``image_proj(visual_encoder(pixels))``."""
        return self.image_proj(self.visual_encoder(pixels))

    def label_queries(self) -> Tensor:
        """``[K, hidden]`` = ``relu(wordvec_proj(label_embed))``, the tagging head's queries."""
        return F.relu(self.wordvec_proj(self.label_embed))

    def tag_logits(self, image_embeds: Tensor) -> Tensor:
        """``[B, N, token_dim]`` image embeddings -> ``[B, num_classes]`` logits (tagging head + ``fc``)."""
        queries = self.label_queries().unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocessed pixels -> (image embeddings, tag logits)."""
        embeds = self.image_embeds(pixels)
        return embeds, self.tag_logits(embeds)

    def tag_mask(self, logits: Tensor) -> Tensor:
        """``[B, K]`` bool: ``sigmoid(logits) > class_threshold``, deleted classes off."""
        keep = torch.sigmoid(logits.float()) > self.class_threshold.to(logits.device)
        if self.delete_tag_index:
            keep[:, list(self.delete_tag_index)] = False
        return keep

    def tags_from_logits(self, logits: Tensor) -> list[str]:
        """One string per image: the kept class names in class order, joined with ``", "`` (SeeSR's
        ``generate_tag``)."""
        return [
            ", ".join(self.tag_list[i] for i in row.nonzero().flatten().tolist())
            for row in self.tag_mask(logits)
        ]

    def generate_tags(self, image_embeds: Tensor) -> list[str]:
        """Tag strings from image embeddings (official ``generate_tag`` without the Chinese names)."""
        return self.tags_from_logits(self.tag_logits(image_embeds))


# --------------------------------------------------------------------------------------------- files


class MissingModelFileError(MissingWeightsError):
    """A model file is missing: names it, where it was looked for, its URL and how to get it."""

    def __init__(
        self,
        consumer: str,
        requested: Path,
        entry: WeightFile | None = None,
        url: str | None = None,
        hint: str = "",
    ) -> None:
        self.requested = Path(requested)
        self.url = url or (entry.fetch_url() if entry is not None else None)
        self.hint = hint
        super().__init__(consumer, [entry] if entry is not None else [])

    def _message(self) -> str:
        name = self.requested.name
        lines = [f"{self.metric} needs '{name}', which is not at {self.requested}"]
        if self.url:
            lines.append(f"  url:  {self.url}")
        for wf in self.missing:
            lines.append(f"  fetched copies are looked for at: {wf.path}")
            lines.append(
                f"fix: run `python -m restore.weights fetch {name}` on a machine with internet (it is then "
                "found automatically), or download the url above and pass its path."
            )
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def _manifest_entry(name: str) -> WeightFile | None:
    try:
        return manifest_entry(name)
    except KeyError:
        return None


def resolve_model_file(value: str | Path, consumer: str) -> Path:
    """An existing file for ``value``: the path itself, else the fetched manifest copy of its file name.

    ``value`` is a path or a bare manifest name (``"ram_swin_large_14m.pth"``). A path that does not exist
    falls back to the manifest's cached copy of the same file name (logged), so configs may name
    ``${paths.weights_dir}/<file>`` and still find a file installed by ``python -m restore.weights fetch``.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    entry = _manifest_entry(path.name)
    if entry is not None and entry.exists():
        if str(value) != path.name:
            log.info("%s: %s does not exist; using the fetched copy %s", consumer, path, entry.path)
        return entry.path
    raise MissingModelFileError(consumer, path, entry)


def read_tag_list(path: str | Path) -> list[str]:
    """Class names, one per line (official ``load_tag_list``: ``splitlines`` of the UTF-8 text)."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def read_thresholds(path: str | Path) -> list[float]:
    """Per-class thresholds, one float per line (``ram_tag_list_threshold.txt``)."""
    return [float(line) for line in Path(path).read_text(encoding="utf-8").split()]


# --------------------------------------------------------------------------------------------- weights


@dataclass
class RAMLoadReport:
    """What :func:`load_ram_checkpoint` did."""

    loaded: int
    ignored: dict[str, int]  # checkpoint entries not on the tagging path, counted by top-level module
    derived: int  # relative_position_index / attn_mask entries dropped (recomputed by the model)
    resized: list[str]  # relative-position tables resized to the model's window


def _read_state(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    if isinstance(checkpoint, Mapping):
        data: Any = checkpoint
    else:
        path = resolve_model_file(checkpoint, "RAM")
        data = load_checkpoint_file(
            path,
            written_by="RAM (ram_swin_large_14m.pth) or SeeSR (DAPE.pth)",
            fix="download the release again, or pass its state dict",
            mmap=True,
        )
    for wrapper in ("model", "params", "state_dict"):  # official: checkpoint['model']
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
            break
    return {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, Tensor)}


def load_ram_checkpoint(model: RAM, checkpoint: str | Path | Mapping[str, Any]) -> RAMLoadReport:
    """Load official RAM weights (``ram_swin_large_14m.pth`` or a state dict) into ``model``'s tagging path.

    As the official ``load_checkpoint_swinlarge``: ``vision_multi.*`` is renamed ``tagging_head.*``, the
    derived ``relative_position_index`` / ``attn_mask`` entries are dropped, relative-position tables are
    resized when the window differs. Unlike it (``strict=False``), every tagging-path tensor must be present
    with the right shape; the rest (``tag_encoder``, ``text_decoder``, ...) is ignored and counted in the log.
    LoRA parameters (if :func:`restore.models.dape.add_dape_lora` ran first) are left as they are.
    """
    state = _read_state(checkpoint)
    state = {
        k.replace("vision_multi", "tagging_head", 1) if k.startswith("vision_multi") else k: v
        for k, v in state.items()
    }
    ours = model.state_dict()
    # peft wraps LoRA'd Linears as `<name>.base_layer`; the checkpoint names the plain Linear.
    wanted = {k.replace(".base_layer.", "."): k for k in ours if "lora_" not in k}
    mapped: dict[str, Tensor] = {}
    ignored: Counter[str] = Counter()
    derived = 0
    for key, value in state.items():
        if key in wanted:
            mapped[wanted[key]] = value
        elif key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS:
            derived += 1
        else:
            ignored[key.split(".", 1)[0]] += 1
    missing = sorted(k for k in wanted if wanted[k] not in mapped)
    if missing:
        raise KeyError(
            f"the RAM checkpoint lacks {len(missing)} tagging-path tensors, e.g. {missing[:5]}: is it a RAM "
            "(ram_swin_large_14m.pth) checkpoint? A DAPE.pth holds only LoRA deltas (cswry/SeeSR#79): load "
            "it with restore.models.dape.load_dape"
        )
    resized = resize_relative_position_tables(mapped, ours)
    wrong = [(k, tuple(v.shape), tuple(ours[k].shape)) for k, v in mapped.items() if v.shape != ours[k].shape]
    if wrong:
        hint = ""
        if any(k == "label_embed" for k, _, _ in wrong):
            hint = " (label_embed rows = number of classes: the tag list must match the checkpoint's 4585)"
        raise ValueError(f"shape mismatch between the RAM checkpoint and the model{hint}: {wrong[:5]}")
    model.load_state_dict(mapped, strict=False)
    report = RAMLoadReport(len(mapped), dict(sorted(ignored.items())), derived, resized)
    summary = ", ".join(f"{name}: {n}" for name, n in report.ignored.items()) or "none"
    log.info(
        "RAM: loaded %d tensors; ignored %d checkpoint entries off the tagging path (%s); dropped %d derived "
        "buffers; resized %d relative-position tables",
        report.loaded,
        sum(report.ignored.values()),
        summary,
        report.derived,
        len(report.resized),
    )
    return report


# --------------------------------------------------------------------------------------------- builder


def build_ram(
    variant: str = "swin_l_384",
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    tag_list: str | Path | Sequence[str] | None = None,
    thresholds: str | Path | Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> RAM:
    """A RAM tagger in eval mode.

    Args:
        variant: a key of :data:`RAM_VARIANTS` (``"swin_l_384"`` official, ``"tiny"`` for CPU tests).
        checkpoint: official RAM weights (path, manifest name or state dict); ``None`` = random init.
        tag_list: file (path or manifest name, e.g. ``"ram_tag_list.txt"``) or list of class names; ``None``:
            ``tag0``, ``tag1``, ... (``config.num_classes`` of them; a warning for the full-size variant).
        thresholds: per-class threshold file or values; ``None``: ``config.threshold`` for all classes.
        device: where the model lives; ``"meta"`` builds the structure only (shapes, keys, counts).
        seed: seed of the random init (the global RNG is left untouched), so a tiny model is reproducible.
        overrides: :class:`RAMConfig` fields to change (e.g. ``token_dim=32``, ``drop_path_rate=0``).
    """
    if variant not in RAM_VARIANTS:
        raise ValueError(f"unknown RAM variant {variant!r}; choose one of {sorted(RAM_VARIANTS)}")
    config = replace(RAM_VARIANTS[variant], **overrides)
    if isinstance(checkpoint, str | Path):  # missing files fail before a (possibly large) build
        checkpoint = resolve_model_file(checkpoint, "RAM")
    if tag_list is None:
        names = [f"tag{i}" for i in range(config.num_classes)]
        if variant != "tiny":
            log.warning(
                "RAM %s built without a tag list: tags are named tag0..tag%d", variant, len(names) - 1
            )
    elif isinstance(tag_list, str | Path):
        names = read_tag_list(resolve_model_file(tag_list, "RAM tag list"))
    else:
        names = list(tag_list)
    if isinstance(thresholds, str | Path):
        thresholds = read_thresholds(resolve_model_file(thresholds, "RAM tag thresholds"))

    if str(device) == "meta":
        if checkpoint is not None:
            raise ValueError("a checkpoint cannot be loaded into a model on the meta device")
        with torch.device("meta"):
            model = RAM(config, names, thresholds)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = RAM(config, names, thresholds)
        if checkpoint is not None:
            load_ram_checkpoint(model, checkpoint)
        model.to(device)
    return model.eval()
