"""Checkpoint files restore can use (metric weights and released method weights), where their loaders look, and how to get them.

``python -m restore.weights list|fetch|path`` is the command line; :func:`check_metric_weights` is what the
metric suite calls before pyiqa would try (and, offline, fail) to download. ``restore.weights.random_init``
writes randomly initialised files in the same layouts for offline tests and throughput benchmarks.
"""

from restore.weights.download import (
    FetchResult,
    WeightsVerificationError,
    derive_niqe_params,
    derive_niqe_params_from_basicsr,
    fetch,
)
from restore.weights.manifest import (
    MissingWeightsError,
    WeightFile,
    WeightFileNotFoundError,
    cache_dir,
    check_metric_weights,
    files_for_metric,
    find_by_file_name,
    get,
    manifest,
    metric_model_path,
    missing_weight_file,
    pyiqa_cache_synced,
    weights_dir,
)

__all__ = [
    "FetchResult",
    "MissingWeightsError",
    "WeightFile",
    "WeightFileNotFoundError",
    "WeightsVerificationError",
    "cache_dir",
    "check_metric_weights",
    "derive_niqe_params",
    "derive_niqe_params_from_basicsr",
    "fetch",
    "files_for_metric",
    "find_by_file_name",
    "get",
    "manifest",
    "metric_model_path",
    "missing_weight_file",
    "pyiqa_cache_synced",
    "weights_dir",
]
