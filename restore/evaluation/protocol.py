"""Checks an evaluation protocol (``configs/protocol/``) makes before anything is scored.

A protocol names the pyiqa releases its numbers need and, per benchmark, the ground-truth size of the test set its
tables used (StableSR's RealSR crops are 512 px, DreamClear's 1024 px). Scoring a differently prepared set under
its name would give numbers that look comparable and are not, so both are refused with what to do instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from restore.evaluation.benchmark import Benchmark, BenchmarkError

__all__ = ["ProtocolError", "check_protocol"]


class ProtocolError(BenchmarkError):
    """The installed pyiqa or the prepared test set is not what the chosen protocol's numbers need."""


def _check_pyiqa(protocol: Mapping[str, Any]) -> None:
    wanted = protocol.get("pyiqa")
    if not wanted:
        return
    import pyiqa
    from packaging.specifiers import SpecifierSet

    if pyiqa.__version__ not in SpecifierSet(str(wanted)):
        raise ProtocolError(
            f"protocol={protocol.get('name')} needs pyiqa {wanted} (its metric defaults differ between releases); "
            f"installed: {pyiqa.__version__}. Install a matching pyiqa or choose another protocol"
        )


def _check_testset(protocol: Mapping[str, Any], benchmark: Benchmark) -> None:
    testset = (protocol.get("testsets") or {}).get(benchmark.name)
    size = (testset or {}).get("gt_size")
    if not size or not benchmark.has_reference:
        return
    from restore.data.image_io import image_size

    items, _ = benchmark.collect()
    wrong = [(it.name, image_size(it.gt)) for it in items if it.gt is not None]
    wrong = [(name, s) for name, s in wrong if s is not None and tuple(s) != (size, size)]
    if wrong:
        name, found = wrong[0]
        raise ProtocolError(
            f"protocol={protocol.get('name')} scores {benchmark.name} on {size}x{size} GT ({testset.get('note')}); "
            f"{len(wrong)} of {len(items)} GT images in {benchmark.gt_dir} are another size (e.g. {name}: "
            f"{found[0]}x{found[1]}). Prepare that set ({testset.get('prepare')}) and point benchmark.lr_dir / "
            "benchmark.gt_dir at it, or choose the protocol this set was prepared for"
        )


def check_protocol(protocol: Mapping[str, Any] | None, benchmark: Benchmark) -> None:
    """Refuse a pyiqa outside the protocol's range and a test set whose GT size is not the protocol's."""
    if not protocol:
        return
    _check_pyiqa(protocol)
    _check_testset(protocol, benchmark)
