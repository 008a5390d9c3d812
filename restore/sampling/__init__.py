"""restore.sampling: the pieces of diffusion-SR sampling (colour fix, LRE start, CFG, latent tiling, tiled VAE)
and the sampling loop that combines them (:mod:`restore.sampling.sampler`)."""

from restore.sampling.sampler import (
    SamplingSettings,
    build_scheduler,
    resize_bicubic,
    sample,
    super_resolve,
    upscale_for_sampling,
)

__all__ = [
    "SamplingSettings",
    "build_scheduler",
    "resize_bicubic",
    "sample",
    "super_resolve",
    "upscale_for_sampling",
]
