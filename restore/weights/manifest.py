"""The weights manifest: which checkpoint files each metric needs, and where its loader looks for them.

The data live in ``manifest.yaml`` next to this module. Destinations are computed at call time from
``torch.hub.get_dir()`` (so ``TORCH_HOME`` and ``torch.hub.set_dir`` are honoured) and, for Hugging Face
files, from ``huggingface_hub``'s cache constant (what timm uses). Checking before a metric is built turns
pyiqa's opaque download failure on an offline machine into a :class:`MissingWeightsError` naming each file,
its URL, the exact path and the fix.

pyiqa freezes its own cache directory (``pyiqa.utils.download_util.DEFAULT_CACHE_DIR``) when it is imported;
:func:`pyiqa_cache_synced` re-points that one constant at the current hub dir for the duration of metric
construction so that pyiqa loads from the same directory this module checks. pyiqa's loaders themselves
run unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from restore.weights.lock import check_pinned, lock_path, pinned_sha256, sha256_file

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("manifest.yaml")
DESTINATIONS = ("pyiqa", "torchvision", "clip", "hf", "weights")
#: Overrides where method weights (destination ``weights``) live; configs read the same folder as
#: ``paths.weights_dir``.
WEIGHTS_DIR_ENV = "RESTORE_WEIGHTS_DIR"
#: Suffix of the marker written next to a file made by ``random_init`` (never by a download).
RANDOM_MARKER_SUFFIX = ".random-init.json"


@dataclass(frozen=True)
class WeightFile:
    """One checkpoint file of the manifest."""

    name: str
    url: str
    destination: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    size_exact: bool = False
    license: str = ""
    used_by: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    used_for: str = ""
    replaced_by_option: str | None = None
    offline_source: str | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None

    def __post_init__(self) -> None:
        if self.destination not in DESTINATIONS:
            raise ValueError(f"{self.name}: destination {self.destination!r} not in {DESTINATIONS}")
        if self.destination == "hf" and not (self.hf_repo and self.hf_filename):
            raise ValueError(f"{self.name}: hf entries need hf_repo and hf_filename")

    @property
    def path(self) -> Path:
        """Where the consuming library looks for the file (for ``hf``: the cached file if present)."""
        if self.destination == "hf":
            cached = _hf_cached_path(self)
            return cached if cached is not None else hf_snapshot_placeholder(self)
        return cache_dir(self.destination) / self.name

    def exists(self) -> bool:
        if self.destination == "hf":
            return _hf_cached_path(self) is not None
        return self.path.is_file()

    def is_random(self) -> bool:
        """True when the file at :attr:`path` was written by ``restore.weights.random_init``."""
        return self.destination != "hf" and random_marker(self.path).is_file()

    def fetch_url(self) -> str:
        """The URL to download from, honouring ``HF_ENDPOINT`` for huggingface.co URLs as pyiqa does."""
        default = "https://huggingface.co"
        if self.url.startswith(default + "/"):
            endpoint = os.environ.get("HF_ENDPOINT", default).rstrip("/")
            return endpoint + self.url[len(default) :]
        return self.url

    def pinned_sha256(self) -> str | None:
        """The sha256 pinned in the lock file when the file was first fetched (restore.weights.lock), or None."""
        return None if self.destination == "hf" else pinned_sha256(self.path)

    def expected_sha256(self) -> tuple[str | None, str]:
        """(full sha256 the file must have, where it comes from): the manifest's, else the pinned one."""
        if self.sha256 is not None:
            return self.sha256.lower(), "the manifest's sha256"
        pinned = self.pinned_sha256()
        if pinned is not None:
            return pinned, f"the sha256 pinned in '{lock_path(self.path)}' at its first fetch"
        return None, ""

    def matches(self, digest: str) -> bool | None:
        """Whether ``digest`` is this file's: True/False, None when neither a hash nor a pin is known."""
        expected, _ = self.expected_sha256()
        if expected is None and self.sha256_prefix is None:
            return None
        if expected is not None and digest != expected:
            return False
        return self.sha256_prefix is None or digest.startswith(self.sha256_prefix.lower())

    def verify(self, path: str | Path | None = None) -> bool | None:
        """sha256 check of ``path`` (default: the installed file) against the manifest's hash or the pinned one:
        True/False, None when no hash is known."""
        if self.sha256 is None and self.sha256_prefix is None and self.pinned_sha256() is None:
            return None
        return self.matches(sha256_file(Path(path) if path is not None else self.path))


class MissingWeightsError(FileNotFoundError):
    """Weight files a metric needs are not in the local caches (and downloading may be impossible)."""

    def __init__(self, metric: str, missing: Sequence[WeightFile]) -> None:
        self.metric = metric
        self.missing = list(missing)
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"metric {self.metric!r} needs weight files that are not present locally:"]
        for wf in self.missing:
            lines += [f"  - {wf.name}", f"      url:  {wf.fetch_url()}", f"      path: {wf.path}"]
        names = " ".join(wf.name for wf in self.missing)
        caches = sorted({str(cache_root(wf.destination)) for wf in self.missing})
        lines.append(
            f"fix: run `python -m restore.weights fetch {names}` on a machine with internet "
            f"(then copy {' and '.join(caches)} here), or download each url above to its path."
        )
        if any(wf.destination == "hf" for wf in self.missing):
            lines.append(
                "hf files live in huggingface_hub's cache layout (snapshots/<commit>/): fetch them with the "
                "command above or `huggingface-cli download <repo> <file>`, not by copying to a path."
            )
        if any(wf.offline_source == "basicsr" for wf in self.missing):
            lines.append(
                "offline: `python -m restore.weights fetch niqe_modelparameters.mat --from-basicsr` builds the "
                "NIQE parameters from basicsr's bundled niqe_pris_params.npz when basicsr is installed."
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# locations


def torch_hub_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir())


def cache_dir(destination: str) -> Path:
    """The directory a destination kind resolves to now."""
    if destination == "pyiqa":
        return torch_hub_dir() / "pyiqa"
    if destination == "torchvision":
        return torch_hub_dir() / "checkpoints"
    if destination == "clip":
        # pyiqa/archs/clip_model.py: download_root or os.path.join(torch.hub.get_dir(), 'clip')
        return torch_hub_dir() / "clip"
    if destination == "hf":
        return hf_hub_cache()
    if destination == "weights":
        return weights_dir()
    raise ValueError(f"unknown destination {destination!r}")


def cache_root(destination: str) -> Path:
    """The directory to copy between machines for a destination kind."""
    if destination == "weights":
        return weights_dir()
    return hf_hub_cache() if destination == "hf" else torch_hub_dir()


def weights_dir() -> Path:
    """Where released method weights live (``paths.weights_dir`` of the configs): ``$RESTORE_WEIGHTS_DIR``, else
    ``$PROJECT_ROOT/weights``, else ``weights/`` of the checkout."""
    if os.environ.get(WEIGHTS_DIR_ENV):
        return Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()
    from restore import PROJECT_ROOT

    return Path(os.environ.get("PROJECT_ROOT") or PROJECT_ROOT) / "weights"


def find_by_file_name(name: str) -> WeightFile | None:
    """The manifest entry whose file is called ``name`` (e.g. to tell where a missing method file comes from)."""
    return next((wf for wf in manifest() if Path(wf.name).name == name), None)


class WeightFileNotFoundError(FileNotFoundError):
    """A method's weights file (released checkpoint, reference restorer) is missing; the message names the fix."""


def missing_weight_file(path: str | os.PathLike, option: str) -> WeightFileNotFoundError:
    """The error for a missing weights file at ``path``: where a manifest file of that name is published and how
    to fetch it, else which config ``option`` takes another path."""
    path = Path(path)
    message = f"weights file '{path}' does not exist"
    known = find_by_file_name(path.name)
    if known is None:
        return WeightFileNotFoundError(f"{message}: place the file there or pass another path ({option})")
    return WeightFileNotFoundError(
        f"{message}. It is published at {known.url}: run `python -m restore.weights fetch {known.name}` on a "
        f"machine with internet (it lands in {known.path}; copy it here), or download the url to '{path}' "
        f"({option})"
    )


def hf_hub_cache() -> Path:
    # huggingface_hub (hence timm) resolves HF_HOME/HF_HUB_CACHE when it is imported; use its value.
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_snapshot_placeholder(wf: WeightFile) -> Path:
    folder = "models--" + wf.hf_repo.replace("/", "--")
    return hf_hub_cache() / folder / "snapshots" / "<commit>" / wf.hf_filename


def _hf_cached_path(wf: WeightFile) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(wf.hf_repo, wf.hf_filename, cache_dir=hf_hub_cache())
    return Path(found) if isinstance(found, str) else None


def random_marker(path: Path) -> Path:
    return path.with_name(path.name + RANDOM_MARKER_SUFFIX)


@contextlib.contextmanager
def pyiqa_cache_synced() -> Iterator[Path]:
    """Point pyiqa's import-time cache constant at ``torch.hub.get_dir()/pyiqa`` while the block runs.

    ``pyiqa.utils.download_util.load_file_from_url`` reads the module global ``DEFAULT_CACHE_DIR`` on every
    call, so setting it (and restoring it afterwards) makes pyiqa honour ``TORCH_HOME`` as it is now rather
    than as it was when pyiqa was first imported. Weight loading happens in the metric constructors.
    """
    import pyiqa.utils.download_util as download_util

    target = cache_dir("pyiqa")
    previous = download_util.DEFAULT_CACHE_DIR
    download_util.DEFAULT_CACHE_DIR = str(target)
    try:
        yield target
    finally:
        download_util.DEFAULT_CACHE_DIR = previous


# ---------------------------------------------------------------------------------------------------------
# the manifest


@cache
def _load_manifest(path: str) -> tuple[tuple[WeightFile, ...], frozenset[str]]:
    with open(path) as f:
        data = yaml.safe_load(f)
    entries = tuple(WeightFile(**entry) for entry in data["files"])
    names = [wf.name for wf in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in {path}")
    return entries, frozenset(data.get("weight_free", []))


def manifest() -> tuple[WeightFile, ...]:
    """All manifest entries, in file order."""
    return _load_manifest(str(MANIFEST_PATH))[0]


def weight_free_metrics() -> frozenset[str]:
    """pyiqa metrics known to load no file."""
    return _load_manifest(str(MANIFEST_PATH))[1]


def get(name: str) -> WeightFile:
    """The entry called ``name`` (for ``hf`` entries the bare file name also works when unambiguous)."""
    entries = manifest()
    for wf in entries:
        if wf.name == name:
            return wf
    matches = [wf for wf in entries if wf.destination == "hf" and wf.hf_filename == name]
    if len(matches) == 1:
        return matches[0]
    raise KeyError(f"{name!r} is not in the weights manifest; known: {', '.join(wf.name for wf in entries)}")


def manifest_metrics() -> list[str]:
    """pyiqa metric names that appear in some entry's ``used_by``."""
    seen: dict[str, None] = {}
    for wf in manifest():
        seen.update(dict.fromkeys(wf.used_by))
    return list(seen)


def _pyiqa_default_configs() -> Mapping[str, Mapping[str, Any]]:
    """pyiqa's DEFAULT_CONFIGS without importing pyiqa's package (whose __init__ imports every arch)."""
    if "pyiqa.default_model_configs" in sys.modules:
        return sys.modules["pyiqa.default_model_configs"].DEFAULT_CONFIGS
    return _default_configs_from_file()


@cache
def _default_configs_from_file() -> Mapping[str, Mapping[str, Any]]:
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
    module_spec = importlib.util.spec_from_file_location("_restore_pyiqa_default_model_configs", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # a plain dict literal; imports only collections
    return module.DEFAULT_CONFIGS


def effective_options(pyiqa_name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """pyiqa's default metric_opts for ``pyiqa_name`` updated with ``options`` (as create_metric does)."""
    config = _pyiqa_default_configs().get(pyiqa_name, {})
    merged = dict(config.get("metric_opts", {}))
    merged.update(options or {})
    return merged


def _condition_holds(opts: Mapping[str, Any], key: str, allowed: Any) -> bool:
    values = allowed if isinstance(allowed, list) else [allowed]
    if key not in opts:
        return None in values
    return any(v is not None and str(opts[key]) == str(v) for v in values)


def files_for_metric(pyiqa_name: str, options: Mapping[str, Any] | None = None) -> list[WeightFile]:
    """The manifest files pyiqa loads when building ``pyiqa_name`` with ``options`` (default: pyiqa's)."""
    opts = effective_options(pyiqa_name, options)
    found = []
    for wf in manifest():
        if pyiqa_name not in wf.used_by:
            continue
        if wf.replaced_by_option and opts.get(wf.replaced_by_option) is not None:
            continue
        conditions = wf.used_by[pyiqa_name] or {}
        if all(_condition_holds(opts, k, v) for k, v in conditions.items()):
            found.append(wf)
    return found


def check_metric_weights(pyiqa_name: str, options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`MissingWeightsError` listing every file ``pyiqa_name`` needs that is not present, and
    :class:`~restore.weights.lock.WeightsVerificationError` when a present one no longer matches its pin.

    Metrics needing no file pass silently; names the manifest does not know are left to pyiqa.
    """
    if pyiqa_name in weight_free_metrics():
        return
    if pyiqa_name not in manifest_metrics():
        log.debug("metric %r is not in the weights manifest: no weight check, pyiqa handles it", pyiqa_name)
        return
    files = files_for_metric(pyiqa_name, options)
    missing = [wf for wf in files if not wf.exists()]
    if missing:
        raise MissingWeightsError(pyiqa_name, missing)
    for wf in files:  # pyiqa loads them itself: compare with their pins first (cheap unless the file changed)
        if wf.destination != "hf":
            check_pinned(wf.path)


#: Metrics whose constructor loads a user ``pretrained_model_path`` exactly as it loads the default file
#: (MANIQA does not: it then expects the weights under a 'params' key).
_PATH_EQUIVALENT = frozenset(
    {"lpips", "lpips+", "lpips-vgg", "lpips-vgg+", "dists", "niqe", "niqe_matlab", "musiq"}
)


def metric_model_path(pyiqa_name: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{"pretrained_model_path": <cache path>}`` for metrics that accept it equivalently, else ``{}``.

    For calling pyiqa directly (outside :func:`pyiqa_cache_synced`) with the file this module checks.
    """
    if pyiqa_name not in _PATH_EQUIVALENT:
        return {}
    for wf in files_for_metric(pyiqa_name, options):
        if wf.replaced_by_option == "pretrained_model_path":
            return {"pretrained_model_path": str(wf.path)}
    return {}
