"""What tells the runs of a Hydra multirun apart: the overrides whose values vary across its jobs.

``python train.py -m experiment=xpsr_tiny method.fusion=sfa,serial`` starts two jobs whose task overrides are
``[experiment=xpsr_tiny, method.fusion=sfa]`` and ``[experiment=xpsr_tiny, method.fusion=serial]``; only
``method.fusion`` names the variant. A job's own config does not say which of its overrides were swept, so
they are read from what the sweeper saved before launching: ``<sweep dir>/multirun.yaml`` (the command-line
overrides, ``a=1,2`` being a sweep) and ``hydra.sweeper.params`` (sweeps defined in a config). The results
of ``train.py evaluate=...`` carry them (``"overrides"``, ``"job_num"``), so ablation tables can label and
order their rows (:mod:`restore.evaluation.ablation`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_label", "short_names", "sweep_job_num", "sweep_overrides", "variant_label"]

log = logging.getLogger(__name__)

MULTIRUN_FILE = "multirun.yaml"


def _multirun_hydra() -> Any | None:
    """This job's ``hydra`` config node when it runs inside a multirun, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.get("mode") == RunMode.MULTIRUN else None


def _split(override: str) -> tuple[str, str]:
    """``"+method.fusion=serial"`` -> ``("method.fusion", "serial")``: the key without +/++/~, the value as typed."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _swept_keys(overrides: Sequence[str]) -> set[str]:
    """Keys of the sweep overrides (``a=1,2``, ``a=range(3)``, ``a=choice(x,y)``, ``a=interval(0,1)``...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {
        f"{o.key_or_group}@{o.package}" if o.package else o.key_or_group
        for o in parsed
        if o.is_sweep_override()
    }


def sweep_overrides() -> dict[str, str]:
    """``key -> value`` of this job's overrides whose key is swept in its multirun; ``{}`` outside a multirun.

    Keys as given on the command line (``method.fusion``, ``method/prior``), values as typed, in the job's order.
    Without ``multirun.yaml`` (a launcher that leaves no file there) every task override of the job is kept.
    """
    hc = _multirun_hydra()
    if hc is None:
        return {}
    job = dict(_split(str(o)) for o in hc.overrides.task)
    params = hc.sweeper.get("params") or {}
    swept = _swept_keys([f"{k}={v}" for k, v in params.items()])
    saved = Path(str(hc.sweep.dir)) / MULTIRUN_FILE
    try:
        from omegaconf import OmegaConf

        swept |= _swept_keys([str(o) for o in OmegaConf.load(saved).hydra.overrides.task])
    except Exception as err:  # absent or unreadable: better a long label than a wrong one
        log.info(f"cannot tell the swept overrides from '{saved}' ({err}); labelling runs with all of them")
        return job
    return {k: v for k, v in job.items() if k in swept}


def sweep_job_num() -> int | None:
    """This job's number in its multirun (``hydra.job.num``: the sweep order), ``None`` outside one."""
    hc = _multirun_hydra()
    return None if hc is None else int(hc.job.num)


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """Each key's shortest trailing part that no other key ends with: ``method.fusion`` -> ``fusion``,
    ``method/prior`` -> ``prior``; ``a.lr`` and ``b.lr`` keep ``a.lr`` and ``b.lr``."""
    keys = list(dict.fromkeys(keys))
    parts = {k: k.replace("/", ".").split(".") for k in keys}
    names = {}
    for key in keys:
        for n in range(1, len(parts[key]) + 1):
            tail = parts[key][-n:]
            if all(other == key or parts[other][-n:] != tail for other in keys):
                break
        names[key] = key if n == len(parts[key]) else ".".join(tail)
    return names


def variant_label(overrides: Mapping[str, str], keys: Iterable[str] | None = None) -> str:
    """``"fusion=serial lr=1e-3"``: the overrides (``keys`` of them, default all) with short names."""
    keys = list(overrides) if keys is None else [k for k in keys if k in overrides]
    names = short_names(keys)
    return " ".join(f"{names[k]}={overrides[k]}" for k in keys)


def run_label(name: str, overrides: Mapping[str, str]) -> str:
    """A run's method label in a sweep: ``"xpsr_tiny fusion=serial"``; just ``name`` without overrides."""
    variant = variant_label(overrides)
    return f"{name} {variant}" if variant else name
