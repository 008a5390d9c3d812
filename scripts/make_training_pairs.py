"""Synthesise a training set offline: random HR crops degraded with the Real-ESRGAN pipeline, stored as PNG folders.

    # DreamClear (tools/make_paired_data.py): 1024² GT, 256² LR, x4, USM-sharpened GT, one crop per image
    python scripts/make_training_pairs.py --src data/DIV2K/DIV2K_train_HR data/LSDIR/HR \\
        --out data/dreamclear_pairs --crop 1024 --device cuda
    # SeeSR (utils_data/make_paired_data.py): 512² GT, several passes over the images
    python scripts/make_training_pairs.py --src data/LSDIR/HR --out data/train_pairs --crop 512 --epochs 10

Writes ``OUT/gt``, ``OUT/lr`` and ``OUT/sr_bicubic`` (``NNNNNNN.png``), ``OUT/recipe.json`` first and
``OUT/meta.json`` last (restore.data.offline_pairs). Run the same command again after an interruption: finished
crops are kept and the rest is made. Then caption and encode the captions (data/README.md, "Training pairs").
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restore.data.folder_overlap import OverlappingFoldersError
from restore.data.image_io import ImageReadError
from restore.data.offline_pairs import GT_MODES, make_training_pairs
from restore.data.testsets import PrepareError, available_presets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--src",
        type=Path,
        nargs="+",
        required=True,
        help="HR image folder(s), recursive; `embedded`: the photos bundled with scikit-image (demo, tests)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (gt/, lr/, sr_bicubic/)")
    parser.add_argument(
        "--preset", default="realesrgan", choices=available_presets(), help="degradation (default realesrgan)"
    )
    parser.add_argument("--crop", type=int, default=1024, help="GT crop side (default 1024, DreamClear)")
    parser.add_argument("--epochs", type=int, default=1, help="random crops per image (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of crop positions and degradations")
    parser.add_argument(
        "--gt", choices=GT_MODES, default="sharpened", help="stored GT (default sharpened, as the recipes)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="crops sharpened together (no effect on output)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device (cuda draws other random streams than cpu)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over, replacing an earlier run's files"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _embedded_folder(out: Path) -> Path:
    """The scikit-image photos written as PNGs to ``out/hr_embedded`` (once): an HR folder for ``--src``."""
    from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, load_embedded_photo
    from restore.data.image_io import write_image

    folder = out / "hr_embedded"
    for name in EMBEDDED_PHOTO_NAMES:
        path = folder / f"{name}.png"
        if not path.exists():
            write_image(path, load_embedded_photo(name))
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """Prints a one-line summary; known problems end with 'error: ...' and exit status 2."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sources = [_embedded_folder(args.out) if str(src) == "embedded" else src for src in args.src]
    try:
        with logging_redirect_tqdm():
            summary = make_training_pairs(
                sources, args.out, args.preset, args.crop, args.epochs, args.seed, args.gt,
                args.batch_size, args.device, args.overwrite, not args.no_progress,
            )  # fmt: skip
    except (PrepareError, ImageReadError, OverlappingFoldersError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line().replace("skipped", "kept from an earlier run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
