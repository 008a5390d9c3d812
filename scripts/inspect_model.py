"""Print a full-size model part's state dict as ``key<TAB>shape`` lines (built on the meta device: no memory).

    python scripts/inspect_model.py model=seesr|xpsr part=unet|controlnet
    python scripts/inspect_model.py model=dreamclear part=controlformer|official
    python scripts/inspect_model.py model=stablesr part=encoder|unet|official|cfw
    python scripts/inspect_model.py model=supir part=control|connectors
    python scripts/inspect_model.py model=sd15|sd2_base|sdxl_base|pixart_alpha part=vae|unet|transformer|text_encoder

Shapes are written ``AxBxC`` (1-d: ``320``), one line per tensor in ``state_dict()`` order: the layout of a
released checkpoint's key list, so ``diff <(python scripts/inspect_model.py model=seesr part=unet) <(keys.tsv)``
compares the network with the official one key by key.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:  # torch and diffusers load lazily, so that a wrong argument fails fast
    import torch


def _seesr_unet() -> torch.nn.Module:
    from restore.models.seesr import build_seesr_unet

    return build_seesr_unet(device="meta")


def _seesr_controlnet() -> torch.nn.Module:
    from restore.models.seesr import build_seesr_unet, seesr_controlnet_from_unet

    return seesr_controlnet_from_unet(build_seesr_unet(device="meta"))


def _xpsr_unet() -> torch.nn.Module:
    from restore.models.xpsr import build_xpsr_unet

    return build_xpsr_unet(device="meta")


def _xpsr_controlnet() -> torch.nn.Module:
    from restore.models.xpsr import build_xpsr_controlnet, build_xpsr_unet

    return build_xpsr_controlnet(build_xpsr_unet(device="meta"))


def _dreamclear_controlformer() -> torch.nn.Module:
    from restore.models.dreamclear import DreamClearControlFormer
    from restore.models.priors import pixart_alpha_prior

    return DreamClearControlFormer(pixart_alpha_prior(device="meta").transformer)


class _StateOnly:
    """A state dict standing in for a module (for layouts that exist only as checkpoints)."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _dreamclear_official() -> _StateOnly:
    from restore.models.dreamclear import ours_to_official

    return _StateOnly(ours_to_official(_dreamclear_controlformer().state_dict()))


def _stablesr_encoder() -> torch.nn.Module:
    import torch

    from restore.models.stablesr import TimeAwareEncoder, stablesr_encoder_config

    with torch.device("meta"):
        return TimeAwareEncoder(**stablesr_encoder_config())


def _stablesr_unet() -> torch.nn.Module:
    from restore.models.priors import sd21_base_prior
    from restore.models.stablesr import add_sft

    unet = sd21_base_prior(device="meta").unet
    add_sft(unet)
    return unet


def _stablesr_official() -> _StateOnly:
    from restore.models.stablesr import ours_to_official, sft_state_dict

    return _StateOnly(ours_to_official(_stablesr_encoder().state_dict(), sft_state_dict(_stablesr_unet())))


def _stablesr_cfw() -> torch.nn.Module:
    import torch

    from restore.models.cfw import build_cfw_autoencoder

    with torch.device("meta"):
        return build_cfw_autoencoder()


def _supir_control() -> _StateOnly:
    from restore.models.priors import sdxl_base_prior
    from restore.models.supir import GLVControl, glv_ours_to_official

    return _StateOnly(glv_ours_to_official(GLVControl(sdxl_base_prior(device="meta").unet).state_dict()))


def _supir_connectors() -> _StateOnly:
    from restore.models.priors import sdxl_base_prior
    from restore.models.supir import add_connectors, connector_state_dict, ours_to_official

    unet = sdxl_base_prior(device="meta").unet
    add_connectors(unet)
    return _StateOnly(ours_to_official(connector_state_dict(unet)))


def _prior_part(builder: str, part: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from restore.models import priors

        return getattr(getattr(priors, builder)(device="meta"), part)

    return build


_PRIORS = {
    "sd15": ("sd15_prior", ("vae", "unet", "text_encoder")),
    "sd2_base": ("sd2_base_prior", ("vae", "unet", "text_encoder")),
    "sdxl_base": ("sdxl_base_prior", ("vae", "unet", "text_encoder", "text_encoder_2")),
    "pixart_alpha": ("pixart_alpha_prior", ("vae", "transformer", "text_encoder")),
}

MODELS: dict[str, dict[str, Callable[[], torch.nn.Module]]] = {
    "seesr": {"unet": _seesr_unet, "controlnet": _seesr_controlnet},
    "xpsr": {"unet": _xpsr_unet, "controlnet": _xpsr_controlnet},
    # the trainable parts of DreamClear (on PixArt-α's transformer), in our layout or the released one
    "dreamclear": {"controlformer": _dreamclear_controlformer, "official": _dreamclear_official},
    # StableSR: the time-aware encoder, the SD-2.1 UNet with its SFT layers, both trained parts in the released
    # layout (stablesr_000117.ckpt), and the stage-2 CFW autoencoder
    "stablesr": {
        "encoder": _stablesr_encoder,
        "unet": _stablesr_unet,
        "official": _stablesr_official,
        "cfw": _stablesr_cfw,
    },
    # SUPIR's trained parts in the released layout (SUPIR-v0Q.ckpt): the adaptor and the connectors
    "supir": {"control": _supir_control, "connectors": _supir_connectors},
    **{
        name: {part: _prior_part(builder, part) for part in parts}
        for name, (builder, parts) in _PRIORS.items()
    },
}
_KEYS = ("model", "part")


def parse_args(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments; both ``model`` and ``part`` are required and must name a known builder."""
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"expected arguments {' '.join(k + '=...' for k in _KEYS)}, got {item!r}")
        args[key] = value
    missing = [k for k in _KEYS if k not in args]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    if args["model"] not in MODELS:
        raise ValueError(f"unknown model {args['model']!r}; options: {', '.join(sorted(MODELS))}")
    parts = MODELS[args["model"]]
    if args["part"] not in parts:
        raise ValueError(
            f"unknown part {args['part']!r} for model {args['model']!r}; options: {', '.join(sorted(parts))}"
        )
    return args


def state_dict_lines(model: torch.nn.Module) -> list[str]:
    """``key<TAB>AxBxC`` for every tensor of ``model.state_dict()``, in order."""
    return [f"{key}\t{'x'.join(str(d) for d in t.shape)}" for key, t in model.state_dict().items()]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"inspect_model.py: error: {err}", file=sys.stderr)
        return 2
    model = MODELS[args["model"]][args["part"]]()
    sys.stdout.write("\n".join(state_dict_lines(model)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
