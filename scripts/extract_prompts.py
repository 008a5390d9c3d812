"""Pre-compute text prompts (MLLM captions, DAPE tags) for a folder of images into one JSONL side-file.

    python scripts/extract_prompts.py (--input DIR | --input-embedded) --out PROMPTS.jsonl
        --field NAME[=SOURCE] [--field NAME[=SOURCE] ...] [--overwrite-field NAME ...] [--batch-size 8]
        [--device cuda] [--dtype auto|float16|bfloat16|float32] [--tiny] [--model-path NAME=ID_OR_DIR ...]
        [--max-new-tokens N] [--ram-checkpoint PATH] [--dape-checkpoint PATH] [--no-progress]

One JSON object per image, ``{"path": <image path relative to DIR>, NAME: <text>, ...}``, the format
``restore.data.prompts.PromptTable`` reads (data/README.md, "Prompt side-files"). SOURCE is a captioner config
of configs/model/captioner/ (``llava15_7b``: XPSR's high-level caption, ``qinstruct``: its low-level quality
text, ``tiny_llava``), a captioner .yaml file, ``dape`` (SeeSR's tags: RAM Swin-L + DAPE.pth, see
--ram-checkpoint / --dape-checkpoint) or ``dape_tiny``. ``--field highlevel`` / ``lowlevel`` / ``tags`` (also
with ``_gt``) alone take the sources llava15_7b / qinstruct / dape. ``--tiny`` swaps every model for a tiny
random one (CPU, no download). ``--input-embedded`` prompts the photos bundled with scikit-image (keys
``skimage/<name>.png``).

Resumable: images whose record already holds every requested field are skipped, progress is appended after
every batch, and the file is compacted (one record per image) at the start and at the end. A second run with a
new --field fills only that field; --overwrite-field NAME recomputes NAME for every image. Unreadable images
are skipped with the reason and listed at the end. Examples (XPSR's two texts per image, for the LR and the HR
images, as qyp2000/XPSR ``utils_data/{high,low}level_prompt_train.py`` write them)::

    python scripts/extract_prompts.py --input trainset/LR --out trainset/prompts.jsonl \\
        --field highlevel=llava15_7b --field lowlevel=qinstruct --device cuda
    python scripts/extract_prompts.py --input trainset/HR --out trainset/prompts.jsonl \\
        --field highlevel_gt=llava15_7b --field lowlevel_gt=qinstruct --device cuda
    python scripts/extract_prompts.py --input-embedded --out /tmp/p.jsonl --field highlevel=llava15_7b \\
        --field tags=dape --tiny
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import restore  # noqa: F401  (installed editable in .venv)
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restore.data.prompt_extraction import (
    build_prompt_sources,
    embedded_entries,
    extract_prompts,
    folder_entries,
    parse_field_specs,
)
from restore.models.captioners import CaptionerNotFoundError
from restore.weights.manifest import MissingWeightsError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="image folder (recursive); keys are paths relative to it")
    src.add_argument(
        "--input-embedded",
        action="store_true",
        help="the photos bundled with scikit-image (skimage/<name>.png)",
    )
    ap.add_argument("--out", type=Path, required=True, help="JSONL side-file to create or complete")
    ap.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME[=SOURCE]",
        help="a field and its source: llava15_7b | qinstruct | tiny_llava | <file.yaml> | dape | dape_tiny "
        "(default for highlevel / lowlevel / tags[_gt]: llava15_7b / qinstruct / dape)",
    )
    ap.add_argument(
        "--overwrite-field",
        action="append",
        default=[],
        metavar="NAME",
        help="recompute this field even where it already holds text",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="captioner weights: auto = float16 on CUDA (official), float32 on a CPU",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny random captioners / DAPE: CPU, no download")
    ap.add_argument(
        "--model-path",
        action="append",
        default=[],
        metavar="NAME=ID_OR_DIR",
        help="load field NAME's captioner from this hub id or local llava-hf folder instead of its config's",
    )
    ap.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the config's (official budget)"
    )
    ap.add_argument("--ram-checkpoint", type=Path, default=None, help="ram_swin_large_14m.pth (dape source)")
    ap.add_argument("--dape-checkpoint", type=Path, default=None, help="DAPE.pth or a stage-1 checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype
        if dtype == "auto":
            dtype = "float16" if torch.device(device).type == "cuda" else "float32"
        fields = parse_field_specs(args.field)
        model_paths = parse_field_specs(args.model_path) if args.model_path else {}
        entries = embedded_entries() if args.input_embedded else folder_entries(args.input)
        sources = build_prompt_sources(
            fields,
            tiny=args.tiny,
            device=device,
            torch_dtype=dtype,
            model_paths=model_paths,
            ram_checkpoint=args.ram_checkpoint,
            dape_checkpoint=args.dape_checkpoint,
            max_new_tokens=args.max_new_tokens,
        )
        report = extract_prompts(
            entries,
            args.out,
            sources,
            batch_size=args.batch_size,
            overwrite_fields=args.overwrite_field,
            progress=not args.no_progress,
        )
    except (CaptionerNotFoundError, MissingWeightsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    for key, reason in report.unreadable:
        print(f"  unreadable: {key}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
