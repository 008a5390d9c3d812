"""Real-ESRGAN second-order degradation (spec: ../shared/specs/degradation_metrics.md §A).

Public API: :class:`RealESRGANDegradation` (``deg(hq, generator) -> DegradationOutput(lq, gt)``).
The building blocks (kernels, filtering, noise, JPEG) are importable for tests and custom pipelines.
"""

from restore.data.degradation.pipeline import (
    DegradationConfig,
    DegradationOutput,
    DegradationParams,
    RealESRGANDegradation,
)

__all__ = ["DegradationConfig", "DegradationOutput", "DegradationParams", "RealESRGANDegradation"]
