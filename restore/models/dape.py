"""DAPE (degradation-aware prompt extractor): RAM with SeeSR's LoRA, and the DAPE weight files.

Reference: SeeSR (Wu et al., CVPR 2024); official cswry/SeeSR ``ram/models/ram_lora.py``,
``ram/models/swin_transformer_lora.py``, ``ram/models/bert_lora.py`` with microsoft/LoRA's ``loralib`` (LoRA:
Hu et al., ICLR 2022). The official code swaps modules for loralib ones (``r=8``, ``lora_alpha=1`` so the
update is scaled by 1/8, ``lora_B`` zero-initialised, ``lora_A`` Kaiming-uniform):

- every Swin window-attention ``qkv`` becomes ``MergedLinear(dim, 3 dim, enable_lora=[True, False, True])``:
  LoRA on the query and value thirds only. Here :class:`QVLoRALinear`, the same maths and the same tensors
  (``attn.qkv.lora_A [2r, dim]``, ``attn.qkv.lora_B [2 dim, r]``; rows ``:r`` / ``:dim`` are the query's,
  ``r:`` / ``dim:`` the value's): 24 blocks, 48 tensors, 577,536 parameters at full size;
- every BERT attention ``query`` and ``key`` becomes ``lora.Linear``; on the tagging path that is the two
  tagging-head cross-attentions: peft LoRA (``LoraConfig(r=8, lora_alpha=1)`` is loralib's Linear exactly),
  8 tensors, 45,056 parameters. peft names them ``query.lora_A.default.weight`` and wraps the base Linear as
  ``query.base_layer``; :func:`dape_keys_to_official` / :func:`dape_keys_from_official` convert to and from
  the official flat names (``query.lora_A``). plain peft cannot put LoRA on two thirds of a fused Linear,
  hence the own module for ``qkv``.

Files: the released ``DAPE.pth`` is a flat dict of only ``lora_`` tensors (the tag encoder / text decoder ones
included, off the tagging path: ignored and counted here); our stage-1 trainer
(:class:`restore.methods.dape.DAPETraining`) writes Lightning checkpoints holding only the student's LoRA
tensors. :func:`load_dape` reads either, :func:`save_dape` writes the official layout. Load order as the
official: RAM base weights, then the LoRA file, then merge (loralib merges on ``.eval()``; here explicitly,
same numbers: ``W_q += B_q A_q / 8``, ``W_v += B_v A_v / 8``, ``W_query/key += B A / 8``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restore.models.ram.ram import (
    RAM,
    RAM_CHECKPOINT,
    TAG_LIST,
    TAG_THRESHOLDS,
    MissingModelFileError,
    build_ram,
)
from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = [
    "DAPE_FILE",
    "DAPE_URLS",
    "QVLoRALinear",
    "add_dape_lora",
    "dape_keys_from_official",
    "dape_keys_to_official",
    "dape_lora_state_dict",
    "dape_state_dict",
    "has_dape_lora",
    "load_dape",
    "load_dape_lora",
    "merge_dape_lora",
    "read_dape_state",
    "save_dape",
    "tiny_dape",
]

log = logging.getLogger(__name__)

#: Official LoRA settings (SeeSR's LoRA modules: loralib ``r=8``, ``lora_alpha`` left at its default 1).
LORA_RANK = 8
LORA_ALPHA = 1.0
#: The released file and where it is published (cswry/SeeSR README: Google Drive / OneDrive folders; no
#: direct download link, so it is not in the weights manifest).
DAPE_FILE = "DAPE.pth"
DAPE_URLS = (
    "https://drive.google.com/drive/folders/12HXrRGEXUAnmHRaf0bIn-S8XSK4Ku0JO",
    "https://connectpolyu-my.sharepoint.com/:f:/g/personal/22042244r_connect_polyu_hk/"
    "EiUmSfWRmQFNiTGJWs7rOx0BpZn2xhoKN6tXFmTSGJ4Jfw",
)
#: Tagging-head Linears that get LoRA, relative to ``RAM.tagging_head`` (peft ``target_modules`` regex).
_HEAD_TARGETS = r"encoder\.layer\.\d+\.crossattention\.self\.(query|key)"
#: Modules of the official RAM that carry LoRA in DAPE.pth but are not built here (not on the tagging path).
_OFF_PATH_ROOTS = ("tag_encoder", "text_decoder")
_ROOTS = ("visual_encoder", "tagging_head", *_OFF_PATH_ROOTS)
_PEFT_SUFFIX = {".lora_A.default.weight": ".lora_A", ".lora_B.default.weight": ".lora_B"}


class QVLoRALinear(nn.Linear):
    """A fused ``qkv`` Linear with LoRA on the query and value thirds (loralib ``MergedLinear``,
    ``enable_lora=[True, False, True]``, no dropout, ``fan_in_fan_out=False``).

    ``y = W x + b + s * [B_q A_q x, 0, B_v A_v x]`` with ``s = alpha / rank``, ``A = [A_q; A_v]`` (``[2r, in]``)
    and ``B = [B_q; B_v]`` (``[2 out/3, r]``). ``weight`` / ``bias`` keep the plain Linear's names.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = LORA_RANK,
        alpha: float = LORA_ALPHA,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if out_features % 3:
            raise ValueError(f"a fused qkv Linear has 3 x dim outputs, got {out_features}")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.dim = out_features // 3
        self.lora_A = nn.Parameter(torch.empty(2 * rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(2 * self.dim, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib's reset_parameters
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> QVLoRALinear:
        """Wrap an existing Linear: its ``weight`` / ``bias`` parameters are reused, not copied."""
        weight = linear.weight
        with torch.device("meta"):  # no throw-away allocation of the base weight
            module = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None)
        module.weight, module.bias = weight, linear.bias
        module.lora_A = nn.Parameter(
            torch.empty(2 * rank, linear.in_features, device=weight.device, dtype=weight.dtype)
        )
        module.lora_B = nn.Parameter(
            torch.zeros(2 * module.dim, rank, device=weight.device, dtype=weight.dtype)
        )
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        module.train(linear.training)
        return module

    def delta_weight(self) -> Tensor:
        """``s * [B_q A_q; 0; B_v A_v]``, shaped like ``weight``."""
        r, d = self.rank, self.dim
        dq = self.lora_B[:d] @ self.lora_A[:r]
        dv = self.lora_B[d:] @ self.lora_A[r:]
        return torch.cat([dq, torch.zeros_like(dq), dv]) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        r, d = self.rank, self.dim
        h = F.linear(x, self.lora_A)  # [..., 2r]
        dq = F.linear(h[..., :r], self.lora_B[:d])
        dv = F.linear(h[..., r:], self.lora_B[d:])
        return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1) * self.scaling

    def merge(self) -> None:
        """Add the LoRA update into ``weight`` (then ``forward`` skips the LoRA branch)."""
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W + delta`` (the official key layout without LoRA)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        weight = self.weight if self.merged else self.weight + self.delta_weight().to(self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora=q,v, rank={self.rank}, alpha={self.alpha}"


# ------------------------------------------------------------------------------------------ adding LoRA


def has_dape_lora(ram: RAM) -> bool:
    """Whether ``ram`` carries (unmerged) DAPE LoRA parameters."""
    return any("lora_" in name for name, _ in ram.named_parameters())


def add_dape_lora(ram: RAM, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> RAM:
    """Put SeeSR's LoRA on ``ram`` in place and make only the LoRA parameters trainable.

    Swin ``qkv`` -> :class:`QVLoRALinear`; tagging-head cross-attention ``query`` / ``key`` -> peft LoRA
    (``r=rank``, ``lora_alpha=alpha``, no dropout, no bias). Official: ``rank=8``, ``alpha=1``. Call it after
    loading the RAM base weights (:func:`restore.models.ram.build_ram`); returns ``ram``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_dape_lora(ram):
        raise ValueError("this RAM already has DAPE LoRA")
    for stage in ram.visual_encoder.layers:
        for block in stage.blocks:
            block.attn.qkv = QVLoRALinear.from_linear(block.attn.qkv, rank, alpha)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=_HEAD_TARGETS)
    inject_adapter_in_model(config, ram.tagging_head)
    for name, param in ram.named_parameters():  # loralib.mark_only_lora_as_trainable
        param.requires_grad_("lora_" in name)
    return ram


def merge_dape_lora(ram: RAM) -> RAM:
    """Fold every LoRA update into its base weight and drop the LoRA modules (official keys again)."""
    from peft.tuners.lora import LoraLayer

    replacements: list[tuple[str, nn.Module]] = []
    for name, module in ram.named_modules():
        if isinstance(module, QVLoRALinear):
            replacements.append((name, module.merged_linear()))
        elif isinstance(module, LoraLayer):
            module.merge()
            replacements.append((name, module.get_base_layer()))
    for name, module in replacements:
        parent, _, child = name.rpartition(".")
        setattr(ram.get_submodule(parent), child, module)
    return ram


# ------------------------------------------------------------------------------------------ key layouts


def dape_keys_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our LoRA names -> the official flat ``DAPE.pth`` names (``query.lora_A.default.weight`` ->
    ``query.lora_A``); ``qkv`` names are the same in both."""
    out = {}
    for key, value in state.items():
        for ours, official in _PEFT_SUFFIX.items():
            if key.endswith(ours):
                key = key[: -len(ours)] + official
        out[key] = value
    return out


def dape_keys_from_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The official flat ``DAPE.pth`` names -> ours: BERT ``query``/``key`` LoRA gets peft's names."""
    out = {}
    for key, value in state.items():
        if not key.startswith("visual_encoder.") and key.endswith((".lora_A", ".lora_B")):
            key += ".default.weight"
        out[key] = value
    return out


def dape_lora_state_dict(ram: RAM) -> dict[str, Tensor]:
    """The LoRA tensors of ``ram`` under our names."""
    return {k: v for k, v in ram.state_dict().items() if "lora_" in k}


def dape_state_dict(ram: RAM) -> dict[str, Tensor]:
    """The LoRA tensors of ``ram`` in the official ``DAPE.pth`` layout (flat, ``lora_`` keys only, CPU)."""
    state = dape_lora_state_dict(ram)
    if not state:
        raise ValueError("this RAM has no LoRA parameters (never added, or merged): nothing to save")
    return {k: v.detach().cpu().clone() for k, v in dape_keys_to_official(state).items()}


def save_dape(ram: RAM, path: str | Path) -> Path:
    """Write ``ram``'s LoRA as an official-layout ``DAPE.pth`` (loadable by the official ``ram(...,
    pretrained_condition=path)`` and by :func:`load_dape`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dape_state_dict(ram), path)
    return path


# ------------------------------------------------------------------------------------------ loading


def _strip_to_root(key: str) -> str:
    """``student.visual_encoder.x`` / ``module.tagging_head.x`` -> the key from its RAM root module on."""
    for root in _ROOTS:
        if key.startswith(root + "."):
            return key
        at = key.find("." + root + ".")
        if at >= 0:
            return key[at + 1 :]
    return key


def read_dape_state(source: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """LoRA tensors from an official ``DAPE.pth``, a stage-1 Lightning checkpoint or a state dict, keyed from
    the RAM root module (``visual_encoder.`` / ``tagging_head.`` / ...), in whichever layout they were saved."""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise _missing_dape(path)
        data = load_checkpoint_file(
            path,
            written_by="SeeSR (DAPE.pth) or a stage-1 train.py run",
            fix="download DAPE.pth again or give the run's checkpoints/last.ckpt",
        )
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):  # Lightning checkpoint
        data = data["state_dict"]
    return {_strip_to_root(k): v for k, v in data.items() if isinstance(v, Tensor)}


def _missing_dape(path: Path) -> MissingModelFileError:
    return MissingModelFileError(
        "DAPE",
        path,
        url=" or ".join(DAPE_URLS),
        hint=(
            f"{DAPE_FILE} (SeeSR's released LoRA) is published in Google Drive / OneDrive folders only, so "
            "restore.weights cannot fetch it: download it by hand and pass its path as dape_checkpoint, or "
            "train one with `python train.py experiment=dape` and pass that run's checkpoint."
        ),
    )


def _rank_of(state: Mapping[str, Tensor]) -> int:
    for key, value in state.items():
        if key.startswith("tagging_head.") and ".lora_A" in key:
            return int(value.shape[0])
        if key.startswith("visual_encoder.") and key.endswith(".lora_A"):
            return int(value.shape[0]) // 2
    raise ValueError("no LoRA tensors found: is this a DAPE file?")


def load_dape_lora(ram: RAM, source: str | Path | Mapping[str, Any], strict: bool = True) -> dict[str, int]:
    """Load DAPE LoRA tensors (official or our layout; see :func:`read_dape_state`) into ``ram``.

    Every LoRA tensor of ``ram`` must be provided (``strict``); LoRA tensors of the official tag encoder /
    text decoder are ignored and counted; anything else is an error. Returns the counts (``loaded`` and one
    entry per ignored root module).
    """
    state = read_dape_state(source)
    ours = dape_lora_state_dict(ram)
    if not ours:
        raise ValueError("this RAM has no LoRA parameters: call add_dape_lora first (before merging)")
    by_official = {
        k_off: k for k, k_off in zip(ours, dape_keys_to_official(dict.fromkeys(ours)), strict=True)
    }
    loaded: dict[str, Tensor] = {}
    ignored: Counter[str] = Counter()
    unexpected = []
    for key, value in dape_keys_to_official(state).items():
        if key in by_official:
            loaded[by_official[key]] = value
        elif "lora_" in key and key.split(".", 1)[0] in _OFF_PATH_ROOTS:
            ignored[key.split(".", 1)[0]] += 1
        else:
            unexpected.append(key)
    missing = sorted(set(ours) - set(loaded))
    if strict and (missing or unexpected):
        raise KeyError(
            f"the DAPE weights do not match this RAM's LoRA: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). A LoRA-only file (DAPE.pth or a "
            "checkpoint of restore.methods.dape) for the same RAM variant and rank is expected."
        )
    wrong = [(k, tuple(v.shape), tuple(ours[k].shape)) for k, v in loaded.items() if v.shape != ours[k].shape]
    if wrong:
        raise ValueError(f"DAPE LoRA shapes differ from this RAM's (variant / rank?): {wrong[:3]}")
    ram.load_state_dict(loaded, strict=False)
    counts = {"loaded": len(loaded), **dict(sorted(ignored.items()))}
    log.info(
        "DAPE: loaded %d LoRA tensors; ignored off-path LoRA tensors: %s",
        len(loaded),
        dict(ignored) or "none",
    )
    return counts


def load_dape(
    variant: str = "swin_l_384",
    ram_checkpoint: str | Path | None = None,
    dape_checkpoint: str | Path | Mapping[str, Any] | None = None,
    tag_list: str | Path | None = None,
    thresholds: str | Path | None = None,
    merge: bool = True,
    device: str | torch.device = "cpu",
    alpha: float = LORA_ALPHA,
    seed: int = 0,
    **overrides: Any,
) -> RAM:
    """The frozen DAPE of SeeSR stage 2 / inference (eval mode, no gradients).

    Full size (``"swin_l_384"``): RAM base weights (``ram_checkpoint``, default the manifest's
    ``ram_swin_large_14m.pth``), the official tag list and per-class thresholds (defaults: manifest files),
    then the LoRA of ``dape_checkpoint`` (required: ``DAPE.pth`` or a stage-1 checkpoint), merged unless
    ``merge=False``. ``"tiny"``: a random tiny RAM (``seed``, ``overrides`` such as ``token_dim``) whose LoRA
    comes from a tiny stage-1 checkpoint, or none (= a zero LoRA) without one. The LoRA rank is read from the
    file; ``alpha`` must be the one it was trained with (official 1).
    """
    if variant == "tiny":
        files: dict[str, Any] = {"checkpoint": ram_checkpoint, "tag_list": tag_list, "thresholds": thresholds}
    else:
        if dape_checkpoint is None:
            raise _missing_dape(Path(DAPE_FILE))
        files = {
            "checkpoint": ram_checkpoint or RAM_CHECKPOINT,
            "tag_list": tag_list or TAG_LIST,
            "thresholds": thresholds or TAG_THRESHOLDS,
        }
    state = read_dape_state(dape_checkpoint) if dape_checkpoint is not None else None  # fail before the build
    ram = build_ram(variant, seed=seed, **files, **overrides)
    if state is not None:
        add_dape_lora(ram, rank=_rank_of(state), alpha=alpha)
        load_dape_lora(ram, state)
        if merge:
            merge_dape_lora(ram)
    ram.to(device).eval().requires_grad_(False)
    return ram


def tiny_dape(seed: int = 0, token_dim: int = 32) -> RAM:
    """A frozen random tiny DAPE for CPU tests and tiny SeeSR: 64 px input, 5 tokens of ``token_dim``, 64 tags
    (``tag0`` ...), thresholds 0.5. Its LoRA is zero (merging a zero LoRA is the identity, so none is built);
    the same ``seed`` / ``token_dim`` give the base a tiny stage-1 run trains on."""
    return load_dape("tiny", seed=seed, token_dim=token_dim)
