"""Refusing a data step whose source folders and output folders overlap.

A builder that reads images from one folder and writes into another destroys its own input when the two
overlap: with ``--overwrite`` an output written over a source replaces the original (a test set cropped in
place), and an output folder inside a source folder is read back as source images by the next run. Paths are
compared after resolving symlinks, in both directions (source inside output, output inside source).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OverlappingFoldersError", "check_folders_disjoint"]


class OverlappingFoldersError(ValueError):
    """A source folder and an output folder are the same folder or one contains the other."""


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_folders_disjoint(
    sources: Iterable[str | os.PathLike],
    outputs: Iterable[str | os.PathLike],
    source_option: str = "--src",
    output_option: str = "--out",
) -> None:
    """Raise :class:`OverlappingFoldersError` naming both paths and the fix when any folder of ``sources`` and any
    of ``outputs`` are equal or nested (symlinks resolved). ``*_option`` name the arguments in the message."""
    outputs = [(Path(o), Path(o).resolve()) for o in outputs]
    for source in sources:
        real_source = Path(source).resolve()
        for output, real_output in outputs:
            if _within(real_source, real_output):
                relation = f"the source is inside the output ('{real_source}' in '{real_output}')"
            elif _within(real_output, real_source):
                relation = f"the output is inside the source ('{real_output}' in '{real_source}')"
            else:
                continue
            raise OverlappingFoldersError(
                f"{source_option} '{source}' and {output_option} '{output}' overlap: {relation}. Writing there "
                "would replace source images (with --overwrite) or mix outputs into the sources of the next run; "
                f"choose an {output_option} folder outside every {source_option} folder"
            )
