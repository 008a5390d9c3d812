"""Paper table (SeeSR Table 2 layout) or ablation table from evaluation results.

    python scripts/make_table.py DIR_OR_FILE... [--out table.md] [--format markdown|latex]
                                 [--metrics psnr,ssim,...] [--last NAME] [--force] [--keep-newest]
    python scripts/make_table.py --ablation SWEEP_DIR... [--out ...] [--format ...] [--metrics ...]

Each argument is a results.json or a directory searched recursively for them (one per method and
benchmark run). The table is printed; with --out it is also written, refusing to replace an existing file
unless --force. Best values are bold, second best underlined; see restore/evaluation/table.py.

--ablation (= --layout ablation): one table per benchmark with the runs as rows, labelled by the overrides
that vary across the sweep (``fusion=serial``) in sweep order, and the metrics as columns; e.g. the sweep
directory of ``python train.py -m ... evaluate.benchmark=samples`` (logs/<task>/multiruns/<time>/, holding
<job>/eval/<benchmark>/results.json). See restore/evaluation/ablation.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restore.evaluation.ablation import ablation_table
from restore.evaluation.results import ResultsFormatError
from restore.evaluation.table import load_results, results_table, write_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="results.json files or run directories")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--format", choices=["markdown", "latex"], default="markdown")
    ap.add_argument("--metrics", help="comma-separated metric keys, in row order (default: all)")
    ap.add_argument("--last", help="method to put in the last column (the 'ours' convention; paper layout)")
    ap.add_argument(
        "--layout",
        choices=["paper", "ablation"],
        default="paper",
        help="paper: methods as columns (SeeSR Tab. 2); ablation: runs as rows, metrics as columns",
    )
    ap.add_argument(
        "--ablation", action="store_const", const="ablation", dest="layout", help="--layout ablation"
    )
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
        on_duplicate = "newest" if args.keep_newest else "error"
        if args.layout == "ablation":
            if args.last:
                raise ValueError(
                    "--last orders the columns of the paper layout; ablation rows follow the sweep"
                )
            text = ablation_table(results, metrics=metrics, fmt=args.format, on_duplicate=on_duplicate)
        else:
            text = results_table(
                results, metrics=metrics, fmt=args.format, last=args.last, on_duplicate=on_duplicate
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
