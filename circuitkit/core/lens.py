"""The one module through which circuitkit reaches TransformerLens.

Every other module imports the TransformerLens names it needs from here, so the TransformerLens
line circuitkit runs on (the 3.x ``HookedTransformer`` line) is chosen in one place.
"""

from __future__ import annotations

import transformer_lens
import transformer_lens.loading_from_pretrained as loading
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
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
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
from transformer_lens.utils import apply_softcap

VERSION: str = getattr(transformer_lens, "__version__", "unknown")

__all__ = [
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
    "RMSNorm",
    "RMSNormPre",
    "TransformerBlock",
    "TransformerLensKeyValueCacheEntry",
    "apply_softcap",
    "get_act_name",
    "loading",
    "softcap_enabled",
]
