"""Real-ESRGAN second-order degradation (Real-ESRGAN, Wang et al., ICCVW 2021, §3; official code:
xinntao/Real-ESRGAN + XPixelGroup/BasicSR, see docs/references.md).

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
