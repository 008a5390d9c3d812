"""restore: training and evaluation of diffusion-prior real-world super-resolution."""

import logging
from pathlib import Path

__version__ = "0.1.0"

#: Repository root when running from a checkout (editable install); holds ``configs/``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"

# bitsandbytes (pulled in by pyiqa; imported by transformers / diffusers) warns at import on every CPU-only run that
# an optional 4-bit CPU kernel package is absent. restore never uses 4-bit CPU kernels, so the line is only noise
# in every command's output; real bitsandbytes errors (e.g. 8-bit loading without CUDA) still surface.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
