"""The metric suite: pyiqa metrics with the settings the papers used, scored on decoded image batches.

Settings live in the catalog (``configs/metrics/default.yaml``: column name -> pyiqa name, options,
crop_border); this module turns a list of names into built pyiqa metrics and scores batches with them.
Every per-image metric is called once per batch (pyiqa metrics are batched), scores come back as float64
CPU tensors, and set-level metrics (FID) are split into per-image features plus one final computation over
the whole set, so that a runner can gather features across DDP ranks and resumed runs.

Weights are checked against the manifest (:mod:`restore.weights`) before pyiqa is asked to build a metric,
so an offline machine gets a :class:`~restore.weights.MissingWeightsError` naming the file, URL and path
instead of a network error from inside pyiqa.

Cropping: for specs with ``crop_border: true`` the suite removes ``crop_border`` pixels from every edge of
both images before calling the metric; this is the same slicing pyiqa's own ``crop_border`` option does (for
the metrics that have one) and works for the others too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from restore import CONFIG_DIR
from restore.weights import MissingWeightsError, check_metric_weights, files_for_metric, pyiqa_cache_synced

log = logging.getLogger(__name__)

CATALOG_PATH = CONFIG_DIR / "metrics" / "default.yaml"
_SPEC_KEYS = {"name", "pyiqa", "options", "crop_border", "implementation"}

#: Faster re-implementations of pyiqa metrics that give pyiqa's numbers (``implementation: restore``).
_RESTORE_IMPLEMENTATIONS = {
    "ssim": "restore.metrics.ssim.SeparableSSIM",
    "ssimc": "restore.metrics.ssim.SeparableSSIM",
}

#: restore's own metrics, which pyiqa does not have: catalog ``pyiqa`` name -> (class, kind). Their options go
#: to the class; a missing model file raises :class:`~restore.weights.MissingWeightsError` when it is built.
_RESTORE_METRICS = {
    "tag_f1": ("restore.metrics.semantic.TagAgreement", "fr"),
}

#: What each pyiqa implementation does that a reader of a results table needs to know (read in pyiqa 0.1.16:
#: ``pyiqa/archs/*_arch.py`` and ``pyiqa/default_model_configs.py``; docs/references.md).
_NOTES = {
    "psnr": "float PSNR, data_range 1, MSE over C,H,W (+1e-8); Y options: yiq (pyiqa default) or ycbcr (BT.601 16-235)",
    "ssim": "Y x255 rounded to integers, float64, Gaussian 11/1.5, 'valid', cs clamped >= 0, no downsampling",
    "ssimc": "per-RGB-channel SSIM (x255 rounded), channel mean, Gaussian 11/1.5, 'valid'",
    "ms_ssim": "5 scales, Y of YIQ rounded, product form",
    "lpips": "inputs mapped to [-1, 1], ScalingLayer, unit-normalised features, learned 1x1 lins, spatial mean",
    "dists": "VGG16 + L2 pooling, ImageNet mean/std, no resize",
    "niqe": "Y x255 rounded, float64, 96x96 blocks (NaN below 96 px), 2 scales, MVG distance to the pristine model",
    "maniqa": "ViT-B/8 + TAB + Swin; 20 uniform 224x224 crops (pyiqa >= 0.1.12; <= 0.1.11 used random crops)",
    "musiq": "multi-scale patches: longer side 224 and 384 + original resolution",
    "clipiqa": "CLIP RN50, 5 antonym prompt pairs, softmax per pair, mean P(positive), no resize",
    "fid": "clean mode: 8-bit image, per-channel PIL bicubic float resize to 299, (x-128)/128, Inception pool3",
    "tag_f1": "restore's: F1 of the RAM tags of the restored image vs those of the GT (restore.metrics.semantic)",
}


#: Smallest image side (after cropping) a pyiqa metric can score: NIQE works on 96x96 blocks, SSIM slides an
#: 11x11 Gaussian window (pyiqa/archs/ssim_arch.py, no padding).
_MIN_SIDE = {"niqe": 96, "niqe_matlab": 96, "ssim": 11, "ssimc": 11, "cw_ssim": 11}


@dataclass(frozen=True)
class MetricSpec:
    """One metric column: its pyiqa registry name and settings."""

    name: str  # column name in results
    pyiqa: str  # pyiqa registry name
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to pyiqa.create_metric
    crop_border: bool = False  # whether the benchmark's crop_border applies
    implementation: str = "pyiqa"  # "restore": the equivalent faster code in _RESTORE_IMPLEMENTATIONS


def _plain(value: Any) -> Any:
    """Mappings/sequences (also OmegaConf containers) -> plain dict/list, for JSON and pyiqa."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return [_plain(v) for v in value]
    return value


def load_catalog(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The metric catalog (default ``configs/metrics/default.yaml``) as plain dicts."""
    with open(path or CATALOG_PATH) as f:
        return _plain(yaml.safe_load(f) or {})


def _pyiqa_configs() -> Mapping[str, Mapping[str, Any]]:
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return DEFAULT_CONFIGS


def resolve_spec(entry: str | Mapping[str, Any], catalog: Mapping[str, Mapping[str, Any]]) -> MetricSpec:
    """A catalog name, a raw pyiqa name, or a mapping {name, pyiqa, options, crop_border} -> MetricSpec."""
    if isinstance(entry, str):
        name, fields = entry, dict(catalog.get(entry, {"pyiqa": entry}))
    elif isinstance(entry, Mapping):
        entry = _plain(entry)
        if "name" not in entry:
            raise ValueError(f"metric mapping needs a 'name': {entry}")
        name = entry["name"]
        fields = {**catalog.get(name, {}), **{k: v for k, v in entry.items() if k != "name"}}
    else:
        raise TypeError(f"metric entries are names or mappings, got {type(entry).__name__}")
    unknown = set(fields) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"metric {name!r}: unknown keys {sorted(unknown)} (allowed: {sorted(_SPEC_KEYS - {'name'})})"
        )
    pyiqa_name = fields.get("pyiqa", name)
    if pyiqa_name in _RESTORE_METRICS:
        if "crop_border" in (fields.get("options") or {}):
            raise ValueError(f"metric {name!r}: set crop_border: true on the spec, not in options")
        return MetricSpec(
            name=name,
            pyiqa=pyiqa_name,
            options=_plain(fields.get("options") or {}),
            crop_border=bool(fields.get("crop_border")),
            implementation="restore",
        )
    if pyiqa_name not in _pyiqa_configs():
        raise ValueError(
            f"unknown metric {name!r}: not in the catalog ({', '.join(catalog) or 'empty'}) and not a pyiqa "
            "metric (see pyiqa.list_models())"
        )
    options = _plain(fields.get("options") or {})
    if "crop_border" in options:
        raise ValueError(
            f"metric {name!r}: set crop_border: true on the spec, not in options (the suite applies the "
            "benchmark's crop_border)"
        )
    implementation = fields.get("implementation", "pyiqa")
    if implementation not in ("pyiqa", "restore") or (
        implementation == "restore" and pyiqa_name not in _RESTORE_IMPLEMENTATIONS
    ):
        raise ValueError(
            f"metric {name!r}: implementation must be 'pyiqa' or, for {sorted(_RESTORE_IMPLEMENTATIONS)}, "
            f"'restore'; got {implementation!r}"
        )
    return MetricSpec(
        name=name,
        pyiqa=pyiqa_name,
        options=options,
        crop_border=bool(fields.get("crop_border")),
        implementation=implementation,
    )


def _kind(pyiqa_name: str) -> str:
    if pyiqa_name in _RESTORE_METRICS:
        return _RESTORE_METRICS[pyiqa_name][1]
    if "fid" in pyiqa_name:  # pyiqa's own rule (InferenceModel.forward)
        return "set"
    if pyiqa_name == "inception_score":
        return "set"
    return "fr" if _pyiqa_configs()[pyiqa_name]["metric_mode"] == "FR" else "nr"


def _niqe_params_note(spec: MetricSpec) -> dict[str, Any]:
    from restore.weights import get
    from restore.weights.download import read_provenance
    from restore.weights.manifest import sha256_file

    explicit = spec.options.get("pretrained_model_path")
    if explicit is not None:
        path = Path(explicit)
    else:
        version = spec.options.get("version", "original")
        path = get("niqe_modelparameters.mat" if version == "original" else "niqe_matlab_params.mat").path
    source = read_provenance(path) or f"{path.name} (pyiqa's pristine model file)"
    return {"params_file": path.name, "params_sha256": sha256_file(path), "params_source": source}


class MetricSuite:
    """Builds the configured metrics once and scores batches of restored (and ground-truth) images."""

    def __init__(
        self,
        metrics: Sequence[str | Mapping[str, Any]],
        catalog: Mapping[str, Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        crop_border: int = 0,
        has_reference: bool = True,
        on_missing_weights: Literal["error", "warn"] = "error",
    ) -> None:
        if on_missing_weights not in ("error", "warn"):
            raise ValueError(f"on_missing_weights must be 'error' or 'warn', got {on_missing_weights!r}")
        if crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {crop_border}")
        import pyiqa

        self.catalog = _plain(catalog) if catalog is not None else load_catalog()
        self.device = torch.device(device)
        self.crop_border = int(crop_border)
        self.has_reference = has_reference
        self.pyiqa_version = pyiqa.__version__
        self.specs: dict[str, MetricSpec] = {}
        self.kind: dict[str, str] = {}
        self.lower_better: dict[str, bool] = {}
        self.missing: dict[str, str] = {}
        self._metrics: dict[str, Any] = {}
        self._random: dict[str, bool] = {}

        for entry in metrics:
            spec = resolve_spec(entry, self.catalog)
            if spec.name in self.specs or spec.name in self.missing:
                raise ValueError(f"metric {spec.name!r} listed twice")
            kind = _kind(spec.pyiqa)
            if kind == "set" and spec.pyiqa != "fid":
                raise ValueError(f"set-level metric {spec.pyiqa!r} is not supported (only 'fid')")
            if not has_reference and kind in ("fr", "set"):
                log.info("metric %s left out: it needs ground truth and the benchmark has none", spec.name)
                continue
            try:
                if spec.pyiqa in _RESTORE_METRICS:  # its own loader names missing files while building
                    metric = self._build(spec, kind)
                else:
                    check_metric_weights(spec.pyiqa, spec.options)
                    metric = None
            except MissingWeightsError as err:
                if on_missing_weights == "error":
                    raise
                # one line here; the full message (URLs, exact paths) goes to results.json's missing_metrics
                files = ", ".join(wf.name for wf in err.missing)
                log.warning(
                    "metric %s skipped: weights missing (%s); get them with "
                    "`python -m restore.weights fetch --metric %s`",
                    spec.name,
                    files,
                    spec.pyiqa,
                )
                self.missing[spec.name] = str(err)
                continue
            metric = metric if metric is not None else self._build(spec, kind)
            self.specs[spec.name], self.kind[spec.name], self._metrics[spec.name] = spec, kind, metric
            self.lower_better[spec.name] = bool(metric.lower_better)
            self._random[spec.name] = any(wf.is_random() for wf in files_for_metric(spec.pyiqa, spec.options))
            if self._random[spec.name]:
                log.warning("metric %s uses RANDOM weights (restore.weights.random_init)", spec.name)

        self.names: list[str] = list(self.specs)
        self.per_image: list[str] = [n for n in self.names if self.kind[n] != "set"]
        self.set_level: list[str] = [n for n in self.names if self.kind[n] == "set"]

    def _build(self, spec: MetricSpec, kind: str) -> Any:
        if kind == "set":
            from restore.metrics.fid import FIDFeatures

            return FIDFeatures(self.device, **spec.options)
        if spec.pyiqa in _RESTORE_METRICS:
            from hydra.utils import get_class

            return get_class(_RESTORE_METRICS[spec.pyiqa][0])(**spec.options).to(self.device).eval()
        if spec.implementation == "restore":
            from hydra.utils import get_class

            defaults = {k: v for k, v in _pyiqa_configs()[spec.pyiqa]["metric_opts"].items() if k != "type"}
            cls = get_class(_RESTORE_IMPLEMENTATIONS[spec.pyiqa])
            return cls(**{**defaults, **spec.options}).to(self.device).eval()
        import pyiqa

        from restore.metrics.compat import install_pkg_resources_packaging

        with pyiqa_cache_synced():
            try:
                metric = pyiqa.create_metric(spec.pyiqa, device=self.device, **spec.options)
            except ModuleNotFoundError as err:
                if err.name != "pkg_resources" or not install_pkg_resources_packaging():
                    raise
                log.info("installed a pkg_resources stub for openai-clip (metric %s)", spec.name)
                metric = pyiqa.create_metric(spec.pyiqa, device=self.device, **spec.options)
        return metric.eval()

    # -----------------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, dict[str, Any]]:
        """name -> settings actually used (JSON-serialisable; for results.json and the config hash)."""
        out = {}
        for name, spec in self.specs.items():
            entry: dict[str, Any] = {
                "pyiqa": spec.pyiqa,
                "pyiqa_version": self.pyiqa_version,
                "options": {**spec.options, "crop_border": self._crop_for(spec)},
                "lower_better": self.lower_better[name],
                "kind": self.kind[name],
                "weights": [wf.name for wf in files_for_metric(spec.pyiqa, spec.options)],
                "implementation": spec.implementation
                if spec.implementation == "pyiqa"
                else _RESTORE_METRICS[spec.pyiqa][0]
                if spec.pyiqa in _RESTORE_METRICS
                else f"{_RESTORE_IMPLEMENTATIONS[spec.pyiqa]} (equals pyiqa's {spec.pyiqa})",
            }
            if spec.pyiqa in _NOTES:
                entry["notes"] = _NOTES[spec.pyiqa]
            if spec.pyiqa in ("niqe", "niqe_matlab"):
                entry.update(_niqe_params_note(spec))
            if self._random[name]:
                entry["random_weights"] = True
            out[name] = entry
        return out

    def _crop_for(self, spec: MetricSpec) -> int:
        return self.crop_border if spec.crop_border else 0

    def _crop(self, spec: MetricSpec, images: torch.Tensor | None) -> torch.Tensor | None:
        c = self._crop_for(spec)
        if images is None or c == 0:
            return images
        if min(images.shape[-2:]) <= 2 * c:
            raise ValueError(f"image {tuple(images.shape[-2:])} too small for crop_border={c}")
        return images[..., c:-c, c:-c]

    def _check(self, sr: torch.Tensor, gt: torch.Tensor | None, needs_gt: bool) -> None:
        if not isinstance(sr, torch.Tensor) or sr.ndim != 4 or sr.shape[1] != 3 or not sr.is_floating_point():
            raise ValueError(f"sr must be a float (N, 3, H, W) tensor, got {getattr(sr, 'shape', type(sr))}")
        if gt is None:
            if needs_gt:
                raise ValueError("full-reference metrics and FID need gt")
        elif gt.shape != sr.shape:
            raise ValueError(f"sr {tuple(sr.shape)} and gt {tuple(gt.shape)} must have the same shape")

    @torch.no_grad()
    def score(self, sr: torch.Tensor, gt: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-image scores of a batch: name -> float64 CPU tensor (N,), each metric called once."""
        self._check(sr, gt, needs_gt=any(self.kind[n] == "fr" for n in self.per_image))
        sr = sr.to(self.device)
        gt = gt.to(self.device) if gt is not None else None
        out = {}
        for name in self.per_image:
            spec, metric = self.specs[name], self._metrics[name]
            min_side = _MIN_SIDE.get(spec.pyiqa, 1) + 2 * self._crop_for(spec)
            if min(sr.shape[-2:]) < min_side:
                # pyiqa fails on these; one odd image must not abort a whole benchmark: NaN, which the results
                # count and the tables footnote (restore.evaluation.table.nonfinite_notes)
                log.warning(
                    "%s: a %s image is smaller than the %d px it needs (crop_border %d included): NaN",
                    name,
                    tuple(sr.shape[-2:]),
                    min_side,
                    self._crop_for(spec),
                )
                out[name] = torch.full((sr.shape[0],), float("nan"), dtype=torch.float64)
                continue
            x = self._crop(spec, sr)
            value = metric(x, self._crop(spec, gt)) if self.kind[name] == "fr" else metric(x)
            value = value.detach().reshape(-1).to("cpu", torch.float64)
            if value.numel() != sr.shape[0]:
                raise RuntimeError(f"metric {name} returned {value.numel()} values for {sr.shape[0]} images")
            out[name] = value
        return out

    @torch.no_grad()
    def set_features(self, sr: torch.Tensor, gt: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
        """Per-image features of the set-level metrics: name -> {"sr": (N, D), "gt": (N, D)} float64 CPU."""
        if not self.set_level:
            return {}
        self._check(sr, gt, needs_gt=True)
        out = {}
        for name in self.set_level:
            spec, extractor = self.specs[name], self._metrics[name]
            out[name] = {"sr": extractor(self._crop(spec, sr)), "gt": extractor(self._crop(spec, gt))}
        return out

    def finalize(self, features: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        """Set-level values from the features of the WHOLE set (chunks in a list are concatenated)."""
        from restore.metrics.fid import fid_from_feature_dict

        out = {}
        for name in self.set_level:
            if name not in features:
                raise KeyError(f"no features for set-level metric {name!r}")
            parts = {side: _concat(features[name][side]) for side in ("sr", "gt")}
            out[name] = fid_from_feature_dict(parts)
        return out


def _concat(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        return value
    return np.concatenate([_concat(v) for v in value], axis=0)
