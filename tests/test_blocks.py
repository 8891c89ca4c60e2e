"""Fused blocks against TransformerLens's own block forward."""

from __future__ import annotations

import pytest
import torch
from _device import DEVICE, assert_close
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from circuitkit.core import blocks
from circuitkit.data.tiny import tiny_model as build_tiny

N, N_POS, RUNS = 3, 7, 2


def _inputs(model, pos: int, seed: int):
    """A chunk of RUNS runs on N prompts: their residual stream from ``pos`` on, and the keys and
    values of the positions before ``pos`` (the same for every run), as TransformerLens makes
    them."""
    g = torch.Generator().manual_seed(seed)
    block = model.blocks[1]
    prompts = torch.randn(N, N_POS, model.cfg.d_model, generator=g).to(DEVICE)
    entry = TransformerLensKeyValueCacheEntry.init_cache_entry(model.cfg, DEVICE, N)
    if pos:
        block(prompts[:, :pos], past_kv_cache_entry=entry)
    residual = torch.randn(RUNS * N, N_POS - pos, model.cfg.d_model, generator=g).to(DEVICE)
    return block, residual, entry.past_keys, entry.past_values


def _reference(block, residual, keys, values):
    entry = None
    if keys.shape[1]:
        entry = TransformerLensKeyValueCacheEntry(
            keys.repeat(RUNS, 1, 1, 1), values.repeat(RUNS, 1, 1, 1), frozen=True
        )
    return block(residual, past_kv_cache_entry=entry)


def _fused(block, residual, keys, values, read=None):
    pos = keys.shape[1]
    past = blocks.past(block, keys, values) if pos else None
    if read is not None:
        mask = blocks.read_mask(read, pos, pos + residual.shape[1])
    elif pos:
        mask = blocks.causal_mask(residual.shape[1], pos, residual.device)
    else:
        mask = None
    weights = blocks.block_weights(block)
    return blocks.block_forward(block, residual, past, weights, mask=mask, read=read)


@pytest.mark.parametrize("pos", [0, 3])
def test_fused_block_equals_transformer_lens(tiny_model, pos):
    block, residual, keys, values = _inputs(tiny_model, pos, seed=pos)
    assert blocks.fusable(block) and blocks.skipped_hooks_free(block)
    expected = _reference(block, residual, keys, values)
    got = _fused(block, residual, keys, values)
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the last block at one read position per row: that row's output there
    read = torch.randint(0, N_POS - pos, (RUNS * N,)).to(DEVICE)
    at_read = _fused(block, residual, keys, values, read=read)
    rows = torch.arange(RUNS * N, device=read.device)
    assert at_read.shape == (RUNS * N, 1, tiny_model.cfg.d_model)
    assert_close(at_read[:, 0], expected[rows, read], atol=1e-4, rtol=1e-4)
    # the inputs matter: another residual stream gives another output
    assert (got - _fused(block, residual.flip(0), keys, values)).abs().max() > 1e-2


def test_earlier_keys_join_each_row_once():
    """``Past.joined``: row r continues prompt r % n, earlier positions first."""
    g = torch.Generator().manual_seed(0)
    n, runs, n_past, new = 3, 4, 5, 2
    keys, values = torch.randn(2, n, n_past, 2, 8, generator=g).to(DEVICE)
    past = blocks.Past(keys, values)
    new_keys, new_values = torch.randn(2, runs * n, new, 2, 8, generator=g).to(DEVICE)
    got_keys, got_values = past.joined(new_keys, new_values)
    for got, earlier, later in ((got_keys, keys, new_keys), (got_values, values, new_values)):
        assert got.shape == (runs * n, n_past + new, 2, 8) and got.is_contiguous()
        expected = torch.cat([earlier.repeat(runs, 1, 1, 1), later], dim=1)
        assert torch.equal(got, expected)


def test_hooks_act_as_in_transformer_lens(tiny_llama):
    block, residual, keys, values = _inputs(tiny_llama, 2, seed=5)

    def halve(z, hook):
        return z / 2

    block.attn.hook_z.add_hook(halve)
    try:
        expected = _reference(block, residual, keys, values)
        got = _fused(block, residual, keys, values)
        assert not blocks.hooks_free(block)
    finally:
        block.attn.hook_z.remove_hooks()
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - _fused(block, residual, keys, values)).abs().max() > 1e-2


def test_blocks_it_cannot_compute_are_left_to_transformer_lens():
    model = build_tiny("gpt2", tokenizer=False)
    block = model.blocks[0]
    block.ln1.hook_scale.add_hook(lambda scale, hook: scale)
    try:
        assert blocks.fusable(block) and not blocks.skipped_hooks_free(block)
    finally:
        block.ln1.hook_scale.remove_hooks()
    model.cfg.use_attn_result = True
    assert not blocks.fusable(block)
