"""Extra inputs for modules attached to stock diffusers models by hooks (SeeSR's RAM tokens, XPSR's low-level
prompt), passed around the model call instead of through a forked ``forward``.

A hooked model gets a named :class:`SideInput` slot (a plain object in ``model.__dict__``, so not in the state
dict). :func:`provide` is a context manager that sets the slot's value for the calls inside the block and
restores the previous value on exit (also on exceptions), so contexts nest; the hooks read the slot and raise
when it is empty instead of silently skipping their module.

Why a context and not a new ``forward`` argument (see also :mod:`restore.models.rca`): the stock signatures stay
unchanged, so diffusers pipelines, ``DistributedDataParallel`` and ``torch.compile`` call the models as
before, and no unknown key travels through ``cross_attention_kwargs`` (diffusers warns per call for those).
Slots are found through DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers. ``copy.deepcopy``
copies a slot with its model, and hook objects that hold it are copied consistently (EMA copies work).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["SideInput", "attach_side_input", "has_side_input", "provide", "side_input_of"]

_SLOTS_ATTR = "_side_inputs"


class SideInput:
    """One named extra input of a model: ``value`` is set by :func:`provide` for the duration of a call."""

    def __init__(self, name: str, width: int | None = None) -> None:
        self.name = name
        #: last-dimension size the consumers expect (checked by :func:`provide`), or None for any
        self.width = width
        self.value: Any = None


def _slots(model: nn.Module) -> dict[str, SideInput] | None:
    slots = model.__dict__.get(_SLOTS_ATTR)
    return slots if isinstance(slots, dict) else None


def attach_side_input(model: nn.Module, name: str, width: int | None = None) -> SideInput:
    """Create the slot ``name`` on ``model`` (error if it exists) and return it, for the hooks to hold."""
    slots = _slots(model)
    if slots is None:
        slots = {}
        model.__dict__[_SLOTS_ATTR] = slots
    if name in slots:
        raise ValueError(f"{type(model).__name__} already has a side input named {name!r}")
    slots[name] = SideInput(name, width)
    return slots[name]


def has_side_input(model: nn.Module, name: str) -> bool:
    """Whether ``model`` itself (not a wrapper) has the slot ``name``."""
    slots = _slots(model)
    return slots is not None and name in slots


def side_input_of(model: nn.Module, name: str, missing: str = "") -> SideInput:
    """The slot ``name`` of ``model``, looking through DDP and ``torch.compile`` wrappers.

    ``missing``: the error message when there is none (default: a generic one).
    """
    current: nn.Module | None = model
    for _ in range(4):  # a DDP of a compiled model at most; deeper nesting is not a real use
        if current is None:
            break
        slots = _slots(current)
        if slots is not None and name in slots:
            return slots[name]
        current = current._modules.get("module") or current._modules.get("_orig_mod")
    raise ValueError(missing or f"{type(model).__name__} has no side input {name!r}")


@contextmanager
def provide(
    model: nn.Module | Sequence[nn.Module], name: str, value: Any, missing: str = ""
) -> Iterator[None]:
    """Set side input ``name`` of ``model`` (one model or several) to ``value`` inside the block.

    A tensor value is checked against the slot's ``width`` (its last dimension). Not thread-safe for one
    model shared between threads (the value is stored on the model).
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    slots = [side_input_of(m, name, missing) for m in models]
    for slot in slots:
        shape = getattr(value, "shape", None)
        if slot.width is not None and shape is not None and shape[-1] != slot.width:
            raise ValueError(f"{name} has width {shape[-1]}, the model expects {slot.width}")
    previous = [slot.value for slot in slots]
    for slot in slots:
        slot.value = value
    try:
        yield
    finally:
        for slot, prev in zip(slots, previous, strict=True):
            slot.value = prev
