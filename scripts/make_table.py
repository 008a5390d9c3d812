"""Paper table (SeeSR Table 2 layout) from evaluation results.

    python scripts/make_table.py DIR_OR_FILE... [--out table.md] [--format markdown|latex]
                                 [--metrics psnr,ssim,...] [--last NAME] [--force] [--keep-newest]

Each argument is a results.json or a directory searched recursively for them (one per method and
benchmark run). The table is printed; with --out it is also written, refusing to replace an existing file
unless --force. Best values are bold, second best underlined; see restore/evaluation/table.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restore.evaluation.results import ResultsFormatError
from restore.evaluation.table import load_results, results_table, write_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="results.json files or run directories")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--format", choices=["markdown", "latex"], default="markdown")
    ap.add_argument("--metrics", help="comma-separated metric keys, in row order (default: all)")
    ap.add_argument("--last", help="method to put in the last column (the 'ours' convention)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument(
        "--keep-newest",
        action="store_true",
        help="for a (method, benchmark) found twice, keep the newest ('created') instead of failing",
    )
    args = ap.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        results = load_results(args.paths)
        text = results_table(
            results,
            metrics=metrics,
            fmt=args.format,
            last=args.last,
            on_duplicate="newest" if args.keep_newest else "error",
        )
        print(text, end="")
        if args.out is not None:
            write_table(args.out, text, overwrite=args.force)
            print(f"wrote {args.out}", file=sys.stderr)
    except (FileNotFoundError, FileExistsError, ResultsFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
