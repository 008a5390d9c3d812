"""Image-quality metrics for evaluation: pyiqa's implementations with the papers' settings.

:class:`MetricSuite` builds the metrics named in the catalog (``configs/metrics/default.yaml``) and scores
decoded image batches (per-image metrics) or extracts per-image features (set-level metrics such as FID,
finalised once over the whole set). :mod:`restore.metrics.fid` reproduces pyiqa's folder-based FID from
tensors. Weight files are checked with :mod:`restore.weights` before pyiqa would try to download them.
"""

from restore.metrics.fid import FIDFeatures, fid_from_features
from restore.metrics.suite import CATALOG_PATH, MetricSpec, MetricSuite, load_catalog, resolve_spec

__all__ = [
    "CATALOG_PATH",
    "FIDFeatures",
    "MetricSpec",
    "MetricSuite",
    "fid_from_features",
    "load_catalog",
    "resolve_spec",
]
