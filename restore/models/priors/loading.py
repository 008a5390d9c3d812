"""Loading a prior's parts with ``from_pretrained`` (a local diffusers folder or a hub id in the offline cache),
and the one error message for a part that cannot be found."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["PriorNotFoundError", "freeze", "hub_cache_fix", "load_parts", "loading_mode", "offline_default"]


class PriorNotFoundError(FileNotFoundError):
    """A prior part could not be loaded from the local folder / the offline Hugging Face cache."""


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop gradients to all its parameters; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


def offline_default(local_files_only: bool | None) -> bool:
    """``local_files_only``, or ``HF_HUB_OFFLINE`` when it is ``None``."""
    if local_files_only is not None:
        return local_files_only
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def loading_mode(offline: bool) -> str:
    """How a Hugging Face load was attempted, for error messages."""
    return "offline (HF_HUB_OFFLINE / local_files_only)" if offline else "online"


def hub_cache_fix(source: str) -> str:
    """The fix for a model missing from the Hugging Face cache (priors, captioners): names HF_HOME and the
    download command."""
    hf_home = os.environ.get("HF_HOME", "<unset: ~/.cache/huggingface>")
    return (
        f"or the hub repo {source!r} already in the Hugging Face cache under HF_HOME={hf_home}. "
        f"Fix: on a machine with internet run `huggingface-cli download {source}` (same HF_HOME) and copy the "
        "cache, or pass the local folder path instead of the hub id."
    )


def load_parts(
    source: str,
    loaders: Mapping[str, Callable[[str], Any]],
    folders: Mapping[str, str],
    expected_files: Mapping[str, str],
    offline: bool,
) -> dict[str, Any]:
    """``{part: loaders[part](folders[part])}``; a part that cannot be found raises :class:`PriorNotFoundError`
    naming the source, every expected subfolder with its files, and the Hugging Face cache fix."""
    parts: dict[str, Any] = {}
    for name, load in loaders.items():
        try:
            parts[name] = load(folders[name])
        except (OSError, ValueError) as err:  # hub "not found" errors subclass one of these
            layout = "\n".join(
                f"  {source}/{folders[p]}/  ({files})" for p, files in expected_files.items() if p in loaders
            )
            raise PriorNotFoundError(
                f"cannot load the prior's {name!r} from {source!r} ({loading_mode(offline)}): "
                f"{type(err).__name__}: {err}\nExpected either a local folder in the diffusers layout:\n"
                f"{layout}\n{hub_cache_fix(source)}"
            ) from err
    return parts
