"""Attention-pattern scores against patterns read plainly from a full cache."""

from __future__ import annotations

import pytest
import torch
from _device import assert_close

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ComponentError


def plain_patterns(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(
        model.cfg.n_layers)])  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_attention_scores_equal_the_cached_patterns(tiny_model, seed):
    ds = ck.IOIDataset(tiny_model, n=7, seed=seed)
    patterns = plain_patterns(tiny_model, ds.tokens)  # [layer, n, head, q, k]
    g = torch.Generator().manual_seed(seed)
    random_keys = torch.randint(0, 5, (ds.n,), generator=g)
    keys = ["IO", "S1", 2, random_keys]
    # a small budget: several batches
    scores = ck.attention_scores(tiny_model, ds, "end", keys, memory_budget=200_000, progress=False)
    assert scores.axes == ("layer", "head", "key")
    assert scores.labels["key"] == ["IO", "S1", "2", "tensor"]
    assert scores.examples.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, 4, ds.n)
    for i in range(ds.n):
        q = int(ds.positions["end"][i])
        for j, k in enumerate([ds.positions["IO"][i], ds.positions["S1"][i], 2, random_keys[i]]):
            assert_close(scores.examples[:, :, j, i], patterns[:, i, :, q, int(k)])
    assert scores.values.std() > 1e-3  # heads differ, so the comparison can fail
    chosen = [ck.Head(2, 1), ck.Head(0, 3)]
    some = ck.attention_scores(tiny_model, ds, "S2", ["S1", "S1+1"], heads=chosen, progress=False)
    assert some.axes == ("head", "key") and some.labels["head"] == ["2.1", "0.3"]
    for i in range(ds.n):
        q, s1, after = (int(ds.positions[w][i]) for w in ("S2", "S1", "S1+1"))
        for row, head in enumerate(chosen):
            expected = patterns[head.layer, i, head.head, q, [s1, after]]
            assert_close(some.examples[row, :, i], expected)


def test_head_scores_equal_the_cached_patterns(tiny_llama):
    ds = ck.IOIDataset(tiny_llama, n=5, seed=2)
    patterns = plain_patterns(tiny_llama, ds.tokens)
    scores = ck.attention_head_scores(tiny_llama, ds, progress=False)
    assert scores.axes == ("layer", "head", "score")
    assert scores.labels["score"] == ["previous token", "duplicate token", "induction"]
    for i in range(ds.n):
        start, end = int(ds.positions["start"][i]), int(ds.positions["end"][i])
        previous = torch.stack(
            [patterns[:, i, :, q, q - 1] for q in range(start + 1, end + 1)]
        ).mean(0)
        s1, after, s2 = (int(ds.positions[w][i]) for w in ("S1", "S1+1", "S2"))
        assert_close(scores.examples[..., 0, i], previous)
        assert_close(scores.examples[..., 1, i], patterns[:, i, :, s2, s1])
        assert_close(scores.examples[..., 2, i], patterns[:, i, :, s2, after])
    assert scores.values.std() > 1e-3


def test_bad_positions(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=3)
    with pytest.raises(ComponentError, match="unknown position word 'S3'"):
        ck.attention_scores(tiny_gpt2, ds, "S3", ["IO"], progress=False)
    with pytest.raises(ComponentError, match="points outside the prompt"):
        ck.attention_scores(tiny_gpt2, ds, "end", [99], progress=False)
    with pytest.raises(CircuitkitError, match="keys is empty"):
        ck.attention_scores(tiny_gpt2, ds, "end", [], progress=False)
    with pytest.raises(ComponentError, match="layer 5 is out of range"):
        ck.attention_scores(tiny_gpt2, ds, "end", "IO", heads=[ck.Head(5, 0)], progress=False)
    with pytest.raises(ComponentError, match="pass a dataset"):
        ck.attention_scores(tiny_gpt2, ds.tokens, "end", "IO", progress=False)
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())
