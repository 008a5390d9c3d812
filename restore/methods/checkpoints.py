"""Loading a method's weights: train.py checkpoints (``eval.py method=... ckpt_path=...``) and released folders
of the ControlNet-style methods (SeeSR, XPSR: ``unet/`` + ``controlnet/`` in the diffusers layout)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from restore.weights.checkpoint_file import load_checkpoint_file

__all__ = [
    "CheckpointMismatchError",
    "MethodWeightsError",
    "load_controlnet_release",
    "load_method_weights",
    "read_diffusers_weights",
]

log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's trainable weights do not match the module's trainable weights (keys differ)."""


class MethodWeightsError(ValueError):
    """The method has no usable weights; the message names the option that provides them."""


def load_method_weights(module: nn.Module, ckpt_path: str | os.PathLike | None, method: str) -> None:
    """Load a train.py (Lightning) checkpoint into ``module``, strictly.

    Without ``ckpt_path`` the module must have been built with released weights (``pretrained=<file>``,
    loaded by its constructor); a randomly initialised network is refused, since its scores mean nothing.
    """
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        fix = "pass ckpt_path=<run dir>/checkpoints/last.ckpt of a train.py run, or method.pretrained=<file>"
        ckpt = load_checkpoint_file(path, written_by="train.py (a Lightning checkpoint)", fix=fix)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise MethodWeightsError(
                f"ckpt_path={ckpt_path} is not a train.py (Lightning) checkpoint; for released network weights "
                f"use method.pretrained=<file> instead"
            )
        module.load_state_dict(ckpt["state_dict"], strict=True)
        log.info(f"loaded weights from {path} (global step {ckpt.get('global_step')})")
    elif not getattr(getattr(module, "hparams", {}), "get", lambda _k: None)("pretrained"):
        raise MethodWeightsError(
            f"method `{method}` needs trained weights: pass ckpt_path=<run dir>/checkpoints/last.ckpt (from "
            "train.py) or method.pretrained=<released weights file>; evaluating a randomly initialised "
            "network is meaningless"
        )


def read_diffusers_weights(folder: Path, method: str = "") -> dict[str, Tensor]:
    """The weights of a diffusers model folder (``diffusion_pytorch_model.safetensors`` or ``.bin``)."""
    safetensors = folder / "diffusion_pytorch_model.safetensors"
    if safetensors.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors))
    bin_file = folder / "diffusion_pytorch_model.bin"
    if bin_file.is_file():
        return load_checkpoint_file(
            bin_file,
            written_by=f"diffusers' save_pretrained (an official {method} release)",
            fix=f"download the official {method} folder again",
        )
    raise FileNotFoundError(
        f"no diffusion_pytorch_model.safetensors (or .bin) in {folder}: an official {method} folder holds "
        "unet/ and controlnet/ subfolders written by diffusers' save_pretrained"
    )


def _check_keys(method: str, part: str, expected: Sequence[str], found: Sequence[str]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"official {method} {part}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}); is it a {method} checkpoint for this prior's UNet config "
            "(and, for ablation variants, the same added modules)?"
        )


def load_controlnet_release(
    controlnet: nn.Module, unet: nn.Module, folder: str | os.PathLike, unet_modules: str, method: str
) -> tuple[int, int]:
    """Load a released ``unet/`` + ``controlnet/`` folder into a ControlNet and the prior UNet.

    Both key sets must equal ours exactly (zero missing / unexpected, shapes checked by ``load_state_dict``).
    From the UNet only the keys of its trained ``unet_modules`` (e.g. ``image_attentions``) are copied: its
    other weights are the frozen prior's, the same tensors, and loading them again would only cost time.
    Returns (ControlNet tensors, UNet tensors) loaded.
    """
    root = Path(folder).expanduser()
    controlnet_state = read_diffusers_weights(root / "controlnet", method)
    _check_keys(method, "controlnet", list(controlnet.state_dict()), list(controlnet_state))
    controlnet.load_state_dict(controlnet_state, strict=True)
    unet_state = read_diffusers_weights(root / "unet", method)
    _check_keys(method, "unet", list(unet.state_dict()), list(unet_state))
    trained = {k: v for k, v in unet_state.items() if f".{unet_modules}." in k}
    incompatible = unet.load_state_dict(trained, strict=False)
    if incompatible.unexpected_keys:
        raise CheckpointMismatchError(f"unexpected UNet keys: {incompatible.unexpected_keys[:3]}")
    log.info(
        f"loaded official {method} weights from {root} ({len(controlnet_state)} ControlNet, {len(trained)} UNet tensors)"
    )
    return len(controlnet_state), len(trained)
