"""Build the evaluation sets of the SeeSR / StableSR protocol as ``OUT/lq`` (+ ``OUT/gt``) PNG folders.

Nothing is downloaded: point the subcommands at data you fetched as described in ``data/README.md``.
Every subcommand is deterministic (same inputs and options -> identical bytes), shows a progress bar,
writes ``OUT/meta.json`` (how the set was made; written last, so its presence marks a finished run) and
ends with a one-line summary. Files already in ``OUT`` are never replaced unless ``--overwrite`` is given,
and image files in ``OUT/lq`` / ``OUT/gt`` that this run would not write are always an error (they would
silently join the test set). ``--out`` must lie outside every source folder and vice versa (symlinks
resolved), so that no run can write over its own sources.

Examples::

    # RealSR V3 x4 (Canon + Nikon): pairs *_LR4.png with *_HR.png, centre crops LR 128 / GT 512
    python scripts/prepare_testsets.py realsr --src RealSR_V3/Canon/Test/4 RealSR_V3/Nikon/Test/4 \\
        --out data/benchmarks/realsr
    # DRealSR x4 test: pairs *_x4.png with *_x1.png (they may sit in different sub-folders of --src)
    python scripts/prepare_testsets.py drealsr --src DRealSR/Test_x4 --out data/benchmarks/drealsr
    # any two folders, matched by file stem (suffixes are stripped when present)
    python scripts/prepare_testsets.py realsr --lr-dir my/LR --gt-dir my/HR --lr-suffix x4 --gt-suffix "" \\
        --out data/benchmarks/mine
    # DIV2K-Val: 3,000 random 512 crops of the 100 DIV2K validation images, degraded to 128 LR
    python scripts/prepare_testsets.py div2k_val --src data/DIV2K/DIV2K_valid_HR \\
        --out data/benchmarks/div2k_val --preset stablesr_mild --num 3000 --seed 0
    # RealLR200 (LR only): normalise every image to an 8-bit RGB PNG
    python scripts/prepare_testsets.py reallr200 --src RealLR200 --out data/benchmarks/reallr200
    # tiny paired set from the photos bundled with scikit-image (benchmark=samples), no download
    python scripts/prepare_testsets.py samples --out data/benchmarks/samples

Pairing rules (realsr / drealsr):

- ``--src DIR [DIR ...]``: every image under the folders (recursive) whose file stem ends with the GT
  suffix (RealSR ``_HR``, DRealSR ``_x1``) or the LR suffix (RealSR ``_LR4``, DRealSR ``_x4``) is a GT or
  LR file; the stem without that suffix is the pair's name (``Canon_001_LR4.png`` -> ``Canon_001``), also
  the output file name. Images with neither suffix are ignored (logged: e.g. RealSR's ``_LR2``/``_LR3``).
- ``--lr-dir`` / ``--gt-dir``: every image of the folder is LR (resp. GT); the name is the file stem
  with the suffix removed when present (``--lr-suffix`` / ``--gt-suffix``, same defaults as above).
- Two files with the same name on one side, or names present on one side only, are an error listing
  them. The GT must be exactly ``--scale`` times the LR size (else an error naming the files).

Crop geometry: the LR is centre-cropped to ``--lr-size`` (offsets ``floor((h - 128) / 2)``, as
:class:`restore.data.transforms.CenterCrop`) and the GT to the same region, i.e. offsets ``4x`` the LR
offsets. An independent centre crop of the GT would be up to 2 px off when the LR size is odd.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from restore.data.folder_overlap import check_folders_disjoint
from restore.data.testsets import (  # noqa: F401  (re-exported for scripts and tests that import this file)
    LOG,
    META_FILE,
    PAIRING_RULES,
    CropPlan,
    Pair,
    PrepareError,
    Summary,
    available_presets,
    check_output_folder,
    crop_pair,
    crop_randomness,
    degrade_crops,
    find_pairs,
    match_dirs,
    plan_random_crops,
    prepare_div2k_val,
    prepare_lr_only,
    prepare_paired,
    prepare_samples,
)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_testsets.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, required=True, help="output folder (lq/, gt/, meta.json)")
        p.add_argument("--overwrite", action="store_true", help="replace files written by an earlier run")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    for name, (lr_suffix, gt_suffix) in PAIRING_RULES.items():
        p = sub.add_parser(
            name,
            help=f"real captures: centre-crop pairs (stems '*{lr_suffix}' LR / '*{gt_suffix}' GT)",
            description=f"StableSR protocol for {name}: centre crop LR --lr-size, GT the same region x --scale.",
        )
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--src", type=Path, nargs="+", help="folder(s) holding LR and GT files (recursive)")
        src.add_argument("--lr-dir", type=Path, help="folder of LR images (needs --gt-dir)")
        p.add_argument("--gt-dir", type=Path, help="folder of GT images (with --lr-dir)")
        p.add_argument("--lr-suffix", default=lr_suffix, help=f"LR stem suffix (default {lr_suffix!r})")
        p.add_argument("--gt-suffix", default=gt_suffix, help=f"GT stem suffix (default {gt_suffix!r})")
        p.add_argument("--lr-size", type=int, default=128, help="LR centre crop side (default 128)")
        p.add_argument("--scale", type=int, default=4, help="GT size / LR size (default 4)")
        common(p)

    def synthetic(p: argparse.ArgumentParser, preset: str | None, crop: int) -> None:
        if preset is None:  # published DIV2K-Val sets exist for both presets: the user must say which
            p.add_argument("--preset", required=True, choices=available_presets(), help="degradation preset")
        else:
            p.add_argument(
                "--preset",
                default=preset,
                choices=available_presets(),
                help=f"degradation (default {preset})",
            )
        p.add_argument("--crop", type=int, default=crop, help=f"GT crop side (default {crop}); LR = crop / 4")
        p.add_argument("--seed", type=int, default=0, help="seed of crop positions and degradations (>= 0)")
        p.add_argument(
            "--batch-size", type=int, default=8, help="crops sharpened together (results do not depend on it)"
        )
        p.add_argument(
            "--device",
            default="cpu",
            help="torch device (default cpu); cuda draws other random streams than cpu",
        )
        common(p)

    p = sub.add_parser(
        "div2k_val",
        help="random GT crops of HR images, degraded (DIV2K-Val 3k)",
        description="Synthetic pairs: --num random GT crops of the --src images, degraded with --preset.",
    )
    p.add_argument("--src", type=Path, required=True, help="HR images, e.g. data/DIV2K/DIV2K_valid_HR")
    p.add_argument("--num", type=int, default=3000, help="number of crops, spread evenly (default 3000)")
    p.add_argument("--skip-small", action="store_true", help="skip (and log) images smaller than --crop")
    synthetic(p, None, 512)
    p = sub.add_parser(
        "samples",
        help="tiny paired set from the photos bundled with scikit-image (no download)",
        description="Centre crops of the photos bundled with scikit-image, degraded with --preset.",
    )
    synthetic(p, "realesrgan", 256)

    p = sub.add_parser(
        "reallr200",
        help="LR-only folder -> lq/*.png (8-bit RGB)",
        description="Copy an LR-only set (RealLR200, DPED, ...) as 8-bit RGB PNGs.",
    )
    p.add_argument("--src", type=Path, required=True, help="folder of LR images (recursive)")
    p.add_argument("--max-side", type=int, default=None, help="centre-crop sides longer than this")
    common(p)
    return parser


def run(args: argparse.Namespace) -> Summary:
    """Dispatch parsed arguments to the matching function."""
    progress = not args.no_progress
    if args.command in PAIRING_RULES:
        if args.src is not None:
            if args.gt_dir is not None:
                raise PrepareError("--gt-dir goes with --lr-dir, not with --src")
            check_folders_disjoint(args.src, [args.out])
            pairs = find_pairs(args.src, args.lr_suffix, args.gt_suffix)
            sources = {"src": [str(s) for s in args.src]}
        else:
            if args.gt_dir is None:
                raise PrepareError("--lr-dir needs --gt-dir")
            check_folders_disjoint([args.lr_dir], [args.out], "--lr-dir")
            check_folders_disjoint([args.gt_dir], [args.out], "--gt-dir")
            pairs = match_dirs(args.lr_dir, args.gt_dir, args.lr_suffix, args.gt_suffix)
            sources = {"lr_dir": str(args.lr_dir), "gt_dir": str(args.gt_dir)}
        sources.update(lr_suffix=args.lr_suffix, gt_suffix=args.gt_suffix)
        return prepare_paired(
            pairs, args.out, args.lr_size, args.scale, args.overwrite, progress, args.command, sources
        )
    if args.command == "div2k_val":
        return prepare_div2k_val(
            args.src,
            args.out,
            args.preset,
            args.num,
            args.crop,
            args.seed,
            args.batch_size,
            args.device,
            args.skip_small,
            args.overwrite,
            progress,
        )
    if args.command == "samples":
        return prepare_samples(
            args.out,
            args.preset,
            args.crop,
            args.seed,
            args.batch_size,
            args.device,
            args.overwrite,
            progress,
        )
    return prepare_lr_only(args.src, args.out, args.max_side, args.overwrite, progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: prints the summary line; known problems end with 'error: ...' and exit status 2."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    LOG.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm():
            summary = run(args)
    except (PrepareError, OSError, ValueError) as err:  # OSError covers ImageReadError, FileExistsError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
