"""The attention kernel against its PyTorch reference, and the engine with it against the
engine's reference path.

``tests/test_kernels.py`` runs this module in a process of its own: on a GPU
(``CIRCUITKIT_TEST_DEVICE=cuda``) the kernel runs compiled; on the CPU under Triton's
interpreter, which must be on (``TRITON_INTERPRET=1``) before Triton is first imported.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _device import DEVICE, assert_close

from circuitkit.core import blocks, kernels
from circuitkit.core.components import Head, Resid
from circuitkit.core.engine import run_interventions
from circuitkit.core.interventions import Intervention, Patch
from circuitkit.core.metrics import Metric
from circuitkit.data.tiny import tiny_model as build_tiny


@pytest.fixture
def kernel():
    """``circuitkit.core.kernels``, which must run on the test device."""
    assert kernels.available(torch.device(DEVICE)), (
        f"the attention kernel cannot run on {DEVICE}: Triton is missing, or (on a CPU) "
        "TRITON_INTERPRET=1 was not set before it was imported"
    )
    return kernels


def _inputs(g, n, copies, n_new, n_past, n_heads, n_kv, d_head, dtype):
    """Queries, keys and values of the new positions as views of one projection's output (as
    ``block_forward`` makes them), and each prompt's earlier keys and values as views too."""
    batch = n * copies
    qkv = torch.randn(batch, n_new, (n_heads + 2 * n_kv) * d_head, generator=g)
    q, k, v = qkv.to(DEVICE, dtype).split([n_heads * d_head, n_kv * d_head, n_kv * d_head], -1)
    q, k, v = (t.unflatten(-1, (-1, d_head)) for t in (q, k, v))
    kept = torch.randn(2, n, n_past + 3, n_kv, d_head, generator=g).to(DEVICE, dtype)
    return q, k, v, kept[0, :, :n_past], kept[1, :, :n_past]


CASES = [
    # n, copies, n_new, n_past, heads, kv heads, d_head
    (3, 2, 5, 0, 4, 4, 8),
    (3, 2, 5, 3, 4, 2, 8),
    (2, 3, 6, 17, 6, 3, 12),  # earlier positions over one key block; d_head not a power of 2
    (2, 3, 19, 4, 2, 1, 16),  # new positions over one key block
    (1, 1, 1, 2, 4, 4, 8),
    (4, 1, 7, 5, 3, 3, 64),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("read", [False, True])
def test_attention_equals_reference(kernel, case, read):
    n, copies, n_new, n_past, n_heads, n_kv, d_head = case
    g = torch.Generator().manual_seed(hash((case, read)) % 2**31)
    q, k, v, past_keys, past_values = _inputs(g, *case, torch.float32)
    read_at = torch.randint(0, n_new, (n * copies,), generator=g).to(DEVICE) if read else None
    past = (past_keys, past_values) if n_past else (None, None)
    got = kernel.attention(q, k, v, *past, 0.3, read_at)
    double = [None if t is None else t.double() for t in (q, k, v, *past)]
    expected = kernel.attention_reference(*double, 0.3, read_at)
    assert got.shape == (n * copies, 1 if read else n_new, n_heads, d_head)
    assert got.dtype == torch.float32
    assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # every row reads its own prompt's earlier positions: other ones change the output
    if n_past and n > 1:
        other = kernel.attention(q, k, v, past_keys.flip(0), past_values.flip(0), 0.3, read_at)
        assert (other - got).abs().max() > 1e-3


def test_attention_in_half_precision(kernel):
    g = torch.Generator().manual_seed(7)
    q, k, v, past_keys, past_values = _inputs(g, 3, 2, 6, 4, 4, 2, 16, torch.bfloat16)
    got = kernel.attention(q, k, v, past_keys, past_values, 0.25)
    double = [t.double() for t in (q, k, v, past_keys, past_values)]
    expected = kernel.attention_reference(*double, 0.25)
    assert got.dtype == torch.bfloat16
    # float32 inside: only the output's rounding to bfloat16 (8 bits of mantissa)
    assert_close(got.double(), expected, atol=1e-2, rtol=1e-2)


def test_reference_is_pytorch_attention():
    """The reference the kernel is held to is plain causal attention over the earlier
    positions joined to the new ones."""
    g = torch.Generator().manual_seed(3)
    q, k, v, past_keys, past_values = _inputs(g, 3, 2, 5, 3, 4, 2, 8, torch.float32)
    got = kernels.attention_reference(q, k, v, past_keys, past_values, 0.3)
    keys = torch.cat([past_keys.repeat(2, 1, 1, 1), k], 1).repeat_interleave(2, 2)
    values = torch.cat([past_values.repeat(2, 1, 1, 1), v], 1).repeat_interleave(2, 2)
    mask = blocks.causal_mask(5, 3, q.device)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    assert_close(got, expected, atol=1e-6, rtol=1e-6)


def _sweep(model, kind: str, seed: int):
    """Runs patching every head (or residual stream) at every position from a second random
    input, and a metric reading each example's last position."""
    g = torch.Generator().manual_seed(seed)
    n, n_pos = 2, 6
    base = torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=g).to(DEVICE)
    source = torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=g).to(DEVICE)
    _, cache = model.run_with_cache(source)
    runs = []
    for layer in range(model.cfg.n_layers):
        for pos in range(n_pos):
            comps = [Head(layer, h, pos=pos) for h in range(model.cfg.n_heads)]
            if kind == "resid":
                comps = [Resid(layer, "pre", pos=pos)]
            runs += [[Intervention(c, Patch(cache[c.hook_name(model)]))] for c in comps]
    right, wrong = torch.randint(0, model.cfg.d_vocab, (2, n), generator=g)

    def logit_diff(logits_at):  # [..., n, d_vocab] -> [..., n]
        def at(tokens):
            index = tokens.to(logits_at.device).expand(*logits_at.shape[:-2], n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return at(right) - at(wrong)

    metric = Metric("logit_diff", torch.full((n,), n_pos - 1), logit_diff)
    return base, runs, metric


@pytest.mark.parametrize("kind", ["gpt2", "llama", "attn-only"])
def test_engine_with_the_kernel_equals_its_reference(kernel, monkeypatch, kind):
    model = build_tiny(kind, n_layers=2, tokenizer=False).to(DEVICE)
    calls = []
    original = kernel.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "attention", counting)
    for sweep in ("head", "resid"):
        base, runs, metric = _sweep(model, sweep, seed=len(kind))
        fast = run_interventions(model, base, runs, metric, progress=False)
        reference = run_interventions(model, base, runs, metric, reference=True, progress=False)
        assert_close(fast, reference, atol=1e-5, rtol=1e-5)
        assert (reference - reference[:1]).abs().max() > 1e-3  # the runs differ
    assert calls, "the engine did not use the kernel"


def test_a_hook_on_the_joined_keys_keeps_pytorch_attention(kernel, monkeypatch):
    """``hook_rot_k`` sees the earlier positions' keys joined to the new ones, which the kernel
    never makes: a block with a hook there computes attention with PyTorch, as TransformerLens
    does."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    model = build_tiny("llama", n_layers=2, tokenizer=False).to(DEVICE)
    block = model.blocks[1]
    assert blocks._kernel_attention(block, torch.zeros(1, device=DEVICE))
    g = torch.Generator().manual_seed(5)
    n, n_past, n_new, copies = 3, 2, 4, 2
    prompts = torch.randn(n, n_past, model.cfg.d_model, generator=g).to(DEVICE)
    entry = TransformerLensKeyValueCacheEntry.init_cache_entry(model.cfg, DEVICE, n)
    block(prompts, past_kv_cache_entry=entry)
    residual = torch.randn(copies * n, n_new, model.cfg.d_model, generator=g).to(DEVICE)
    calls, seen = [], []
    monkeypatch.setattr(kernel, "attention", lambda *a, **k: calls.append(1))

    def halve(keys, hook):
        seen.append(keys.shape[1])
        return keys / 2

    block.attn.hook_rot_k.add_hook(halve)
    try:
        assert not blocks._kernel_attention(block, torch.zeros(1, device=DEVICE))
        past = blocks.past(block, entry.past_keys, entry.past_values)
        mask = blocks.causal_mask(n_new, n_past, residual.device)
        got = blocks.block_forward(block, residual, past, blocks.block_weights(block), mask=mask)
        expected = block(
            residual,
            past_kv_cache_entry=TransformerLensKeyValueCacheEntry(
                entry.past_keys.repeat(copies, 1, 1, 1),
                entry.past_values.repeat(copies, 1, 1, 1),
                frozen=True,
            ),
        )
    finally:
        block.attn.hook_rot_k.remove_hooks()
    assert not calls
    assert seen == [n_past + n_new, n_past + n_new]
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_fails_is_set_aside(kernel, monkeypatch):
    """A Triton that cannot build the kernel for the GPU at hand: one warning, then PyTorch's
    attention for the rest of the process, with the same results."""
    model = build_tiny("gpt2", n_layers=2, tokenizer=False).to(DEVICE)
    base, runs, metric = _sweep(model, "resid", seed=3)
    monkeypatch.setattr(kernel, "_failure", None)  # put back as it was after the test

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(kernel, "attention", broken)
    with pytest.warns(RuntimeWarning, match="attention kernel failed") as caught:
        fast = run_interventions(model, base, runs, metric, progress=False)
    assert len(caught) == 1
    assert not kernel.available(torch.device(DEVICE))
    reference = run_interventions(model, base, runs, metric, reference=True, progress=False)
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_computes_something_else_is_set_aside(kernel, monkeypatch):
    """A kernel that builds but computes something else (a Triton or GPU it was never run on):
    its first output of a configuration is compared with PyTorch's attention, and the
    disagreement sets it aside with one warning, before it changes any result."""
    model = build_tiny("llama", n_layers=2, tokenizer=False).to(DEVICE)
    base, runs, metric = _sweep(model, "head", seed=4)
    monkeypatch.setattr(kernel, "_failure", None)
    monkeypatch.setattr(kernel, "_confirmed", set())
    original = kernel.attention
    monkeypatch.setattr(kernel, "attention", lambda *a, **k: original(*a, **k).flip(0))
    with pytest.warns(RuntimeWarning, match="differs from PyTorch's attention") as caught:
        fast = run_interventions(model, base, runs, metric, progress=False)
    assert len(caught) == 1
    assert not kernel.available(torch.device(DEVICE))
    reference = run_interventions(model, base, runs, metric, reference=True, progress=False)
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_each_configuration_is_confirmed_once(kernel, monkeypatch):
    model = build_tiny("gpt2", n_layers=2, tokenizer=False).to(DEVICE)
    base, runs, metric = _sweep(model, "head", seed=6)
    monkeypatch.setattr(kernel, "_failure", None)
    monkeypatch.setattr(kernel, "_confirmed", set())
    checks = []
    confirm = kernel.confirm

    def counted(*args, **kwargs):
        checks.append(kernel.configuration(*args[:3]))
        return confirm(*args, **kwargs)

    monkeypatch.setattr(kernel, "confirm", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_interventions(model, base, runs, metric, progress=False)
        run_interventions(model, base, runs, metric, progress=False)
    # the blocks that compute every new position, and the last one at the read position
    assert len(checks) == len(set(checks)) == 2
    assert kernel._confirmed == set(checks)
