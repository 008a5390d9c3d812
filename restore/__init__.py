"""restore: training and evaluation of diffusion-prior real-world super-resolution."""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root when running from a checkout (editable install); holds ``configs/``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
