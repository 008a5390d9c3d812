"""Prefetch every weight file the benchmark metrics need, on a login node with internet.

    python scripts/prefetch_weights.py                 # the paper suite: lpips dists fid niqe maniqa musiq clipiqa
    python scripts/prefetch_weights.py --metric musiq  # just these
    TORCH_HOME=/shared/torch HF_HOME=/shared/hf python scripts/prefetch_weights.py   # a shared cache

Files go where pyiqa, torchvision, CLIP and the Hugging Face hub look for them (``TORCH_HOME``/``HF_HOME``
respected); copy those folders to an offline machine, or point its TORCH_HOME/HF_HOME at the shared copy.
Thin wrapper over ``python -m restore.weights fetch`` (see ``python -m restore.weights list``).
"""

from __future__ import annotations

import argparse
import sys

from restore.weights.__main__ import main as weights_main

#: Learned metrics of SeeSR Table 2 (configs/benchmark/*.yaml) and the NIQE pristine model.
PAPER_SUITE = ["lpips", "dists", "fid", "niqe", "maniqa", "musiq", "clipiqa"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metric", nargs="+", default=PAPER_SUITE, help="pyiqa metric names")
    args = parser.parse_args(argv)
    return weights_main(["fetch", "--metric", *args.metric])


if __name__ == "__main__":
    sys.exit(main())
