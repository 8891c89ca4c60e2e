"""Import paths of modules that moved into sub-packages.

circuitkit's modules live in five layers (``core``, ``data``, ``methods``, ``circuits``,
``interface``). The flat paths of earlier releases (``circuitkit.attribution``,
``circuitkit.patching``, ...) still import, with a ``DeprecationWarning`` that names the new
path, until the next release. ``circuitkit.metrics``, ``circuitkit.provenance`` and
``circuitkit.distributed`` are public namespaces (``ck.metrics``) and import without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

PUBLIC = {
    "circuitkit.metrics": "circuitkit.core.metrics",
    "circuitkit.provenance": "circuitkit.core.provenance",
    "circuitkit.distributed": "circuitkit.core.distributed",
}
DEPRECATED = {
    "circuitkit.errors": "circuitkit.core.errors",
    "circuitkit.components": "circuitkit.core.components",
    "circuitkit.blocks": "circuitkit.core.blocks",
    "circuitkit.inputs": "circuitkit.core.inputs",
    "circuitkit.engine": "circuitkit.core.engine",
    "circuitkit.results": "circuitkit.core.results",
    "circuitkit.models": "circuitkit.core.models",
    "circuitkit.graph": "circuitkit.core.graph",
    "circuitkit.ablation": "circuitkit.methods.ablation",
    "circuitkit.attribution": "circuitkit.methods.logit_attribution",
    "circuitkit.patching": "circuitkit.methods.activation_patching",
    "circuitkit.path_patching": "circuitkit.methods.path_patching",
    "circuitkit.attribution_patching": "circuitkit.methods.attribution_patching",
    "circuitkit.causal_tracing": "circuitkit.methods.causal_tracing",
    "circuitkit.attention": "circuitkit.methods.attention_scores",
    "circuitkit.discovery": "circuitkit.circuits.discovery",
    "circuitkit.plot": "circuitkit.interface.plot",
    "circuitkit.plot_circuit": "circuitkit.interface.plot_circuit",
    "circuitkit.report": "circuitkit.interface.report",
    "circuitkit.cli": "circuitkit.interface.cli",
}


def moved_module(old: str) -> ModuleType:
    """The module an old flat path names, with a DeprecationWarning (stacklevel: the caller)."""
    new = DEPRECATED[old]
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module(new)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and puts the module at its new path in its place in ``sys.modules``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in DEPRECATED or fullname in PUBLIC:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module: ModuleType) -> None:
        name = module.__name__
        if name in PUBLIC:
            real = importlib.import_module(PUBLIC[name])
        else:
            real = moved_module(name)
        # The import system returns what sys.modules holds once exec_module returns.
        sys.modules[name] = real


def install() -> None:
    """Let the old paths import (idempotent)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
