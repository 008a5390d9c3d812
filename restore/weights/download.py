"""Download manifest files into the caches their loaders read, verified and atomically, or derive them offline.

Downloads go to a temporary file in the destination directory (``torch.hub.download_url_to_file``), are
checked against the manifest's sha256 or file-name hash prefix, and are renamed into place only when they
pass. A file already present is never replaced unless it fails verification and ``force`` is given; files
without a known hash are never replaced (delete them by hand).

``niqe_modelparameters.mat`` has an offline source: basicsr ships the same NIQE pristine model as
``basicsr/metrics/niqe_pris_params.npz`` (rebuilt into the .mat it reproduces pyiqa's recorded NIQE values:
benchmarks/metric_calibration.py). It is located with ``importlib.util.find_spec`` without
importing basicsr (whose import needs a torchvision shim) and written with ``scipy.io.savemat`` under the keys
pyiqa reads (``mu_prisparam``, ``cov_prisparam``) plus a ``restore_source`` provenance string.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from restore.weights.manifest import WeightFile, cache_dir, sha256_file

#: The key under which a derived .mat records where its numbers came from (pyiqa ignores it).
PROVENANCE_KEY = "restore_source"


class WeightsVerificationError(ValueError):
    """A downloaded file does not match the manifest's hash."""


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    status: str  # "present" | "downloaded" | "derived" | "invalid"
    source: str
    message: str = ""


def basicsr_niqe_npz() -> Path | None:
    """Path of basicsr's bundled ``niqe_pris_params.npz``, found without importing basicsr."""
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "metrics" / "niqe_pris_params.npz"
        if candidate.is_file():
            return candidate
    return None


def _basicsr_version() -> str:
    for dist in ("basicsr", "basicsr-fixed"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "basicsr (version unknown)"


def derive_niqe_params(dest: Path, npz_path: Path | None = None) -> str:
    """Write pyiqa's ``niqe_modelparameters.mat`` layout at ``dest`` from basicsr's npz; returns the source."""
    import numpy as np
    import scipy.io

    npz_path = npz_path or basicsr_niqe_npz()
    if npz_path is None:
        raise FileNotFoundError("basicsr is not installed: its niqe_pris_params.npz cannot be used")
    source = f"{_basicsr_version()} basicsr/metrics/niqe_pris_params.npz sha256={sha256_file(npz_path)}"
    with np.load(npz_path) as npz:
        arrays = {"mu_prisparam": npz["mu_pris_param"], "cov_prisparam": npz["cov_pris_param"]}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        scipy.io.savemat(tmp, {**arrays, PROVENANCE_KEY: source}, appendmat=False)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return source


def read_provenance(mat_path: Path) -> str | None:
    """The ``restore_source`` string of a .mat written by :func:`derive_niqe_params`, else None."""
    import scipy.io

    data = scipy.io.loadmat(mat_path)
    value = data.get(PROVENANCE_KEY)
    if value is None:
        return None
    # savemat stores a str as a 1-element char array
    return str(value.ravel()[0]).strip()


def _download_verified(wf: WeightFile, dest: Path, progress: bool) -> None:
    from torch.hub import download_url_to_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        download_url_to_file(wf.fetch_url(), str(tmp), hash_prefix=None, progress=progress)
        if wf.verify(tmp) is False:
            expected = wf.sha256 or f"{wf.sha256_prefix}..."
            raise WeightsVerificationError(
                f"{wf.name}: sha256 {sha256_file(tmp)} of the download does not match {expected}; not installed"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(
    wf: WeightFile, *, force: bool = False, from_basicsr: bool = False, progress: bool = True
) -> FetchResult:
    """Make ``wf`` present at its destination; see the module docstring for the rules."""
    if wf.destination == "hf":
        return _fetch_hf(wf)
    dest = cache_dir(wf.destination) / wf.name
    if dest.exists():
        verdict = wf.verify(dest)
        if verdict is not False:
            note = "sha256 ok" if verdict else "no hash to check"
            return FetchResult(wf.name, dest, "present", "existing file", f"already present ({note}); kept")
        if not force:
            return FetchResult(
                wf.name,
                dest,
                "invalid",
                "existing file",
                "present but fails sha256 verification; rerun with --force to replace it",
            )
    if from_basicsr:
        if wf.offline_source != "basicsr":
            raise ValueError(f"{wf.name} has no basicsr source (only niqe_modelparameters.mat does)")
        return FetchResult(wf.name, dest, "derived", derive_niqe_params(dest))
    try:
        _download_verified(wf, dest, progress)
    except (urllib.error.URLError, OSError) as err:
        if wf.offline_source == "basicsr" and basicsr_niqe_npz() is not None:
            source = derive_niqe_params(dest)
            return FetchResult(wf.name, dest, "derived", source, f"download failed ({err}); derived instead")
        raise
    return FetchResult(wf.name, dest, "downloaded", wf.fetch_url(), "sha256 ok" if wf.verify(dest) else "")


def _fetch_hf(wf: WeightFile) -> FetchResult:
    from huggingface_hub import hf_hub_download

    if wf.exists():
        return FetchResult(wf.name, wf.path, "present", "huggingface cache", "already present; kept")
    # huggingface_hub verifies LFS files against their sha256 etag and writes into its own cache layout.
    path = Path(hf_hub_download(wf.hf_repo, wf.hf_filename))
    return FetchResult(wf.name, path, "downloaded", wf.fetch_url())


def derive_niqe_params_from_basicsr() -> Path:
    """Install ``niqe_modelparameters.mat`` from basicsr's npz in the pyiqa cache (kept if already there)."""
    from restore.weights.manifest import get

    return fetch(get("niqe_modelparameters.mat"), from_basicsr=True).path
