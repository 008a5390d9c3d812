"""Compatibility shim for pyiqa's CLIP-based metrics on current setuptools.

openai-clip 1.0.1 (the ``clip`` package pyiqa's CLIP-IQA, LIQE, ... import) does
``from pkg_resources import packaging`` only to compare torch versions; setuptools >= 81 no longer ships
``pkg_resources``, so those metrics fail at import. :func:`install_pkg_resources_packaging` registers a
minimal ``pkg_resources`` module exposing the ``packaging`` package, and only when the real one is absent.
The metric suite installs it only after a metric failed to build for exactly that reason.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def install_pkg_resources_packaging() -> bool:
    """Register the stub if ``pkg_resources`` cannot be imported; returns True when it was installed."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return False
    import packaging
    import packaging.version  # noqa: F401  (clip uses packaging.version.parse)

    stub = types.ModuleType("pkg_resources")
    stub.__doc__ = "restore.metrics.compat stub: only `packaging` (for openai-clip)"
    stub.packaging = packaging
    sys.modules["pkg_resources"] = stub
    return True
