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
import sys
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
    "get_act_name",
    "is_bridge",
    "loading",
    "softcap_enabled",
]
