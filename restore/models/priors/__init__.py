"""The frozen text-to-image priors, one file per family behind one interface (:class:`LatentPrior`):

- :mod:`.sd`: Stable Diffusion 1.x / 2.x (SeeSR on SD-2-base, XPSR on SD-1.5, StableSR on SD-2.1-base);
- :mod:`.sdxl`: SDXL base 1.0 (SUPIR);
- :mod:`.pixart`: PixArt-α XL/2 1024-MS (DreamClear).

Each loads the real diffusers / transformers parts (``from_pretrained``: a local folder or a hub id in the
offline cache), has a tiny random variant for CPU tests (``tiny_*``) and a full-size random build for the
``meta`` device (parameter counts, shapes; ``*_prior(device="meta")``).
"""

from restore.models.priors.base import LatentPrior
from restore.models.priors.loading import PriorNotFoundError, freeze, hub_cache_fix, loading_mode
from restore.models.priors.pixart import PixArtPrior, pixart_alpha_prior, tiny_pixart_prior
from restore.models.priors.sd import (
    SD_SCALING_FACTOR,
    SDPrior,
    sd2_base_prior,
    sd15_prior,
    sd21_base_prior,
    sd_scheduler_config,
    tiny_prior,
)
from restore.models.priors.sdxl import SDXL_SCALING_FACTOR, SDXLPrior, sdxl_base_prior, tiny_sdxl_prior
from restore.models.priors.text import MissingTextFeaturesError, TextCondition, TextFeatureStore

__all__ = [
    "SDXL_SCALING_FACTOR",
    "SD_SCALING_FACTOR",
    "LatentPrior",
    "MissingTextFeaturesError",
    "PixArtPrior",
    "PriorNotFoundError",
    "SDPrior",
    "SDXLPrior",
    "TextCondition",
    "TextFeatureStore",
    "freeze",
    "hub_cache_fix",
    "loading_mode",
    "pixart_alpha_prior",
    "sd15_prior",
    "sd21_base_prior",
    "sd2_base_prior",
    "sd_scheduler_config",
    "sdxl_base_prior",
    "tiny_pixart_prior",
    "tiny_prior",
    "tiny_sdxl_prior",
]
