"""Download manifest files into the caches their loaders read, verified and atomically, or derive them offline.

Downloads go to a temporary file in the destination directory (``torch.hub.download_url_to_file`` through
:mod:`restore.atomic_write`), are checked against the manifest's sha256 or file-name hash prefix, and are renamed
into place only when they pass. Every installed file's full sha256 is pinned in the folder's ``weights.lock.json``
(:mod:`restore.weights.lock`); where the manifest publishes no full hash, the pin is what later fetches and loads
check against (trust on first use; ``repin`` forgets a pin). A file already present is never replaced unless it
fails verification and ``force`` is given; files without any known hash are never replaced (delete them by hand).

``niqe_modelparameters.mat`` has an offline source: basicsr ships the same NIQE pristine model as
``basicsr/metrics/niqe_pris_params.npz`` (rebuilt into the .mat it reproduces pyiqa's recorded NIQE values:
benchmarks/metric_calibration.py). It is located with ``importlib.util.find_spec`` without
importing basicsr (whose import needs a torchvision shim) and written with ``scipy.io.savemat`` under the keys
pyiqa reads (``mu_prisparam``, ``cov_prisparam``) plus a ``restore_source`` provenance string.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from restore.atomic_write import atomic_path
from restore.weights.lock import WeightsVerificationError, lock_path, pin, sha256_file, unpin
from restore.weights.manifest import WeightFile, cache_dir

__all__ = [
    "FetchResult",
    "WeightsVerificationError",
    "basicsr_niqe_npz",
    "derive_niqe_params",
    "derive_niqe_params_from_basicsr",
    "fetch",
    "read_provenance",
]

#: The key under which a derived .mat records where its numbers came from (pyiqa ignores it).
PROVENANCE_KEY = "restore_source"


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
    with atomic_path(dest) as tmp:
        scipy.io.savemat(tmp, {**arrays, PROVENANCE_KEY: source}, appendmat=False)
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


def _mismatch(wf: WeightFile, what: str, digest: str) -> str:
    expected, source = wf.expected_sha256()
    if expected is None:
        expected, source = f"{wf.sha256_prefix}...", "the hash prefix in its file name"
    message = f"{wf.name}: sha256 {digest} of {what} does not match {expected}, {source}"
    if wf.sha256 is None and wf.pinned_sha256() is not None:
        message += (
            f"; if the file changed upstream on purpose, run `python -m restore.weights fetch {wf.name} --repin` "
            "to pin the new hash"
        )
    return message


def _download_verified(wf: WeightFile, dest: Path, progress: bool) -> str:
    """Download ``wf`` to ``dest`` when it matches its known hash; returns its sha256."""
    from torch.hub import download_url_to_file

    with atomic_path(dest) as tmp:
        download_url_to_file(wf.fetch_url(), str(tmp), hash_prefix=None, progress=progress)
        digest = sha256_file(tmp)
        if wf.matches(digest) is False:
            raise WeightsVerificationError(_mismatch(wf, "the download", digest) + "; not installed")
    return digest


def _pin_note(wf: WeightFile, dest: Path, digest: str) -> str:
    """Pin ``digest`` for the installed ``dest`` unless pinned already; the note for the report."""
    if wf.pinned_sha256() == digest:
        return ""
    pin(dest, digest, wf.fetch_url())
    return f"; sha256 {digest[:12]}... pinned in {lock_path(dest)}"


def fetch(
    wf: WeightFile,
    *,
    force: bool = False,
    from_basicsr: bool = False,
    progress: bool = True,
    repin: bool = False,
) -> FetchResult:
    """Make ``wf`` present at its destination; see the module docstring for the rules.

    ``repin`` forgets the hash pinned at an earlier fetch first (for a file that changed upstream on purpose).
    """
    if wf.destination == "hf":
        return _fetch_hf(wf)
    dest = cache_dir(wf.destination) / wf.name
    if repin:
        unpin(dest)
    if dest.exists():
        digest = sha256_file(dest)
        verdict = wf.matches(digest)
        if verdict is not False:
            note = "sha256 ok" if verdict else "no hash to check"
            if not wf.is_random():  # a random_init stand-in is never pinned as the real file
                note += _pin_note(wf, dest, digest)
            return FetchResult(wf.name, dest, "present", "existing file", f"already present ({note}); kept")
        if not force:
            return FetchResult(
                wf.name,
                dest,
                "invalid",
                "existing file",
                f"{_mismatch(wf, 'the file present', digest)}; rerun with --force to replace it",
            )
    if from_basicsr:
        if wf.offline_source != "basicsr":
            raise ValueError(f"{wf.name} has no basicsr source (only niqe_modelparameters.mat does)")
        return FetchResult(wf.name, dest, "derived", derive_niqe_params(dest))
    try:
        digest = _download_verified(wf, dest, progress)
    except (urllib.error.URLError, OSError) as err:
        if wf.offline_source == "basicsr" and basicsr_niqe_npz() is not None:
            source = derive_niqe_params(dest)
            return FetchResult(wf.name, dest, "derived", source, f"download failed ({err}); derived instead")
        raise
    note = ("sha256 ok" if wf.matches(digest) else "no published hash") + _pin_note(wf, dest, digest)
    return FetchResult(wf.name, dest, "downloaded", wf.fetch_url(), note)


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
