"""RAM (Recognize Anything) tagger: the backbone of SeeSR's DAPE (RAM: Zhang et al., 2023; SeeSR: Wu et al.,
CVPR 2024; official code: cswry/SeeSR ``ram/models/ram_lora.py``, see docs/references.md).

:mod:`.swin` (image encoder), :mod:`.tagging_head` (label-query decoder), :mod:`.ram` (the tagger, its files
and its checkpoint loader). LoRA and the DAPE weights live in :mod:`restore.models.dape`.
"""

from restore.models.ram.ram import (
    RAM,
    RAM_VARIANTS,
    MissingModelFileError,
    RAMConfig,
    build_ram,
    load_ram_checkpoint,
)

__all__ = ["RAM", "RAM_VARIANTS", "MissingModelFileError", "RAMConfig", "build_ram", "load_ram_checkpoint"]
