"""Shared fixtures: tiny random models (built in milliseconds, with a small tokenizer of their
own, so they need no model package) and the offline default model."""

from __future__ import annotations

import pytest
from _device import DEVICE

from circuitkit.core import models
from circuitkit.data.tiny import tiny_model as build_tiny

TINY_KINDS = ("gpt2", "attn-only", "llama")


@pytest.fixture
def tiny_gpt2():
    """LayerNorm, learned positions, GELU MLP; the small tokenizer of tiny models."""
    return build_tiny("gpt2").to(DEVICE)


@pytest.fixture
def tiny_attn_only():
    """Attention-only, LayerNorm, learned positions; the small tokenizer of tiny models."""
    return build_tiny("attn-only").to(DEVICE)


@pytest.fixture
def tiny_llama():
    """RMSNorm, rotary, grouped-query attention, gated SiLU MLP; the small tokenizer."""
    return build_tiny("llama").to(DEVICE)


@pytest.fixture(params=TINY_KINDS)
def tiny_model(request):
    """Each tiny model kind in turn."""
    return build_tiny(request.param).to(DEVICE)


@pytest.fixture(scope="session")
def smollm():
    """The offline default, smollm2-135m (from the on-disk cache; converted on first use)."""
    return models.load_model("smollm2-135m", device=DEVICE)
