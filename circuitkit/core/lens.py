"""The one module through which circuitkit reaches TransformerLens.

Every other module imports the TransformerLens names it needs from here, so the TransformerLens
line circuitkit runs on is chosen in one place, at import:

- the 3.x line (``LINE == 3``) has ``HookedTransformer``, its components and its loaders;
- the 4.x line (``LINE == 4``) removed them: models are ``TransformerBridge`` objects, which wrap
  a Hugging Face model and give it TransformerLens hook names. The names of the 3.x classes are
  still defined here, as a class that nothing is an instance of, so that code which tests
  ``isinstance(module, GatedMLP)`` (the engine's fused blocks) simply finds no match.

``Model`` covers both kinds of model; ``is_bridge(model)`` tells them apart.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

from transformer_lens import ActivationCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.activation_functions import apply_softcap, softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

try:
    VERSION: str = importlib.metadata.version("transformer-lens")
except importlib.metadata.PackageNotFoundError:  # a source checkout on the path
    VERSION = "unknown"

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4 removed the HookedTransformer stack
    LINE = 4
else:
    LINE = 3

if LINE == 3:
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens.components import (
        MLP,
        Attention,
        GatedMLP,
        GroupedQueryAttention,
        LayerNorm,
        LayerNormPre,
        RMSNorm,
        RMSNormPre,
        TransformerBlock,
    )
else:

    class _RemovedIn4:
        """Stands for a TransformerLens 3.x class on the 4.x line; nothing is an instance of it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(
                f"TransformerLens {VERSION} has no HookedTransformer classes (removed in 4.0); "
                "load models with ck.load_model(..., backend='bridge'), or install the 3.x "
                "line: pip install 'circuitkit[tl3]'"
            )

    HookedTransformer = HookedTransformerConfig = _RemovedIn4  # type: ignore[misc,assignment]
    MLP = Attention = GatedMLP = GroupedQueryAttention = _RemovedIn4  # type: ignore[misc]
    LayerNorm = LayerNormPre = RMSNorm = RMSNormPre = TransformerBlock = _RemovedIn4  # type: ignore[misc]
    loading = None

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# Either kind of model circuitkit works on.
Model = Union["HookedTransformer", "TransformerBridge"]


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (on either line).

    A bridge can exist only once its module is imported, so this imports nothing.

    Example::

        is_bridge(ck.load_model("smollm2-135m", backend="bridge"))   # True
    """
    module = sys.modules.get("transformer_lens.model_bridge")
    bridge_class = getattr(module, "TransformerBridge", None)
    return bridge_class is not None and isinstance(model, bridge_class)


def bridge_class() -> type:
    """The ``TransformerBridge`` class of the installed TransformerLens 4."""
    if LINE < 4:
        raise ImportError(
            f"TransformerBridge models need TransformerLens 4; TransformerLens {VERSION} is "
            "installed. Install it with pip install 'circuitkit[tl4]'"
        )
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


_RESID_MID = re.compile(r"blocks\.(\d+)\.hook_resid_mid")


def bridge_hooks(
    model: object, fwd_hooks: Sequence[tuple[str, Callable]]
) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` (``(name, fn(act, hook))`` pairs, as ``run_with_hooks`` takes them) made to
    act on a ``TransformerBridge`` as they act on a ``HookedTransformer``; on a
    ``HookedTransformer``, ``fwd_hooks`` as they are.

    On a bridge ``blocks.L.hook_resid_mid`` is the input hook of the MLP's norm: what a hook
    returns there reaches the MLP, but the block adds the residual stream it held before the
    hook to the MLP's output, so a change made there would skip the rest of the model. Each
    hook there that returns a new value therefore also adds its change to the block's
    ``hook_mlp_out``, after every other hook on it: the block's output then holds the
    changed residual stream, as a HookedTransformer's does, and hooks on ``hook_mlp_out``
    still see the MLP's output alone. A hook that only reads sees the residual stream itself.
    """
    if not is_bridge(model):
        return list(fwd_hooks)
    hooks: list[tuple[str, Callable]] = []
    carried: list[tuple[str, Callable]] = []
    hook_dict = model.hook_dict  # type: ignore[attr-defined]
    for name, fn in fwd_hooks:
        match = _RESID_MID.fullmatch(name)
        mlp_out = None if match is None else f"blocks.{match[1]}.hook_mlp_out"
        if mlp_out is None or mlp_out not in hook_dict:
            hooks.append((name, fn))
            continue
        changes: list = []

        def at_mid(act: Any, hook: Any, fn: Callable = fn, changes: list = changes) -> Any:
            result = fn(act, hook)
            if result is not None:
                changes.append(result - act)
            return result

        def at_mlp_out(act: Any, hook: Any, changes: list = changes) -> Any:
            return act + changes.pop() if changes else None

        hooks.append((name, at_mid))
        carried.append((mlp_out, at_mlp_out))
    return hooks + carried


__all__ = [
    "LINE",
    "MLP",
    "POST_NORM_ARCHITECTURES",
    "VERSION",
    "ActivationCache",
    "Attention",
    "GatedMLP",
    "GroupedQueryAttention",
    "HookPoint",
    "HookedTransformer",
    "HookedTransformerConfig",
    "LayerNorm",
    "LayerNormPre",
    "Model",
    "RMSNorm",
    "RMSNormPre",
    "TransformerBlock",
    "TransformerLensKeyValueCacheEntry",
    "apply_softcap",
    "bridge_class",
    "bridge_hooks",
    "get_act_name",
    "is_bridge",
    "loading",
    "softcap_enabled",
]
