"""Command line for the weights manifest: ``python -m restore.weights {list,fetch,path}``.

    list                         table of every file: name, size, used_by, present/missing, path
    fetch NAME... | --metric M... | --all [--from-basicsr] [--force] [--repin]
                                 download into the cache the loader reads (verified against the manifest's
                                 sha256 or the one pinned in the folder's weights.lock.json, atomic)
    path NAME                    print the path the loader reads NAME from

Caches follow TORCH_HOME (torch.hub.get_dir()), HF_HOME and RESTORE_WEIGHTS_DIR (method weights), so fetching on a machine with internet and
copying those directories makes an offline machine complete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from restore.weights.download import WeightsVerificationError, fetch
from restore.weights.manifest import WeightFile, files_for_metric, get, manifest


def _size(wf: WeightFile) -> str:
    if wf.size is None:
        return "?"
    value, unit = float(wf.size), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    text = f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
    return text if wf.size_exact else "~" + text


def cmd_list() -> int:
    rows = [("name", "size", "used_by", "status", "path")]
    for wf in manifest():
        status = "present" if wf.exists() else "missing"
        if status == "present" and wf.is_random():
            status = "present (RANDOM)"
        rows.append((wf.name, _size(wf), ",".join(wf.used_by) or wf.used_for, status, str(wf.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _select(names: Sequence[str], metrics: Sequence[str], all_files: bool) -> list[WeightFile]:
    chosen: dict[str, WeightFile] = {}
    if all_files:
        chosen.update((wf.name, wf) for wf in manifest())
    for name in names:
        wf = get(name)
        chosen[wf.name] = wf
    for metric in metrics:
        files = files_for_metric(metric)
        if not files:
            print(f"{metric}: needs no manifest file")
        chosen.update((wf.name, wf) for wf in files)
    return list(chosen.values())


def cmd_fetch(args: argparse.Namespace) -> int:
    selected = _select(args.names, args.metric, args.all)
    if not selected:
        print("nothing to fetch: give file names, --metric or --all", file=sys.stderr)
        return 2
    failed = 0
    for wf in selected:
        try:
            result = fetch(
                wf,
                force=args.force,
                from_basicsr=args.from_basicsr and wf.offline_source == "basicsr",
                repin=args.repin,
            )
        except (OSError, WeightsVerificationError, ValueError) as err:
            print(f"FAILED   {wf.name}: {err}", file=sys.stderr)
            failed += 1
            continue
        failed += result.status == "invalid"
        extra = f" ({result.message})" if result.message else ""
        print(f"{result.status:<10} {wf.name} -> {result.path}\n           source: {result.source}{extra}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restore.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="all manifest files with status and path")
    p_fetch = sub.add_parser("fetch", help="download (or derive) files into their caches")
    p_fetch.add_argument("names", nargs="*", help="manifest file names")
    p_fetch.add_argument("--metric", nargs="+", default=[], help="every file these pyiqa metrics need")
    p_fetch.add_argument("--all", action="store_true", help="every manifest file")
    p_fetch.add_argument(
        "--from-basicsr",
        action="store_true",
        help="build niqe_modelparameters.mat from basicsr's bundled npz instead of downloading",
    )
    p_fetch.add_argument("--force", action="store_true", help="replace files that fail sha256 verification")
    p_fetch.add_argument(
        "--repin",
        action="store_true",
        help="forget the sha256 pinned at the first fetch (weights.lock.json) and pin the file fetched now",
    )
    p_path = sub.add_parser("path", help="where the loader reads NAME from")
    p_path.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "list":
        return cmd_list()
    if args.command == "fetch":
        return cmd_fetch(args)
    try:
        print(get(args.name).path)
    except KeyError as err:
        print(err.args[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
