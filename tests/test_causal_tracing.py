"""Causal tracing, neuron interventions and causal effects against plainly written references."""

from __future__ import annotations

import copy
import importlib
import warnings

import plotly.graph_objects as go
import pytest
import torch
from _device import DEVICE, allclose, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import circuitkit as ck
from circuitkit.core.components import Embed, Neuron, Resid
from circuitkit.core.engine import run_interventions
from circuitkit.core.errors import (
    CircuitkitError,
    ComponentError,
    ShapeError,
    TokenizationError,
    TokenizationWarning,
)
from circuitkit.core.interventions import Add, Intervention, Patch, Scale
from circuitkit.core.metrics import Metric
from circuitkit.methods.causal_tracing import find_subject, subject_noise

KINDS = ("gpt2", "attn-only", "llama")
HOOK = {
    "resid": "blocks.{}.hook_resid_post",
    "mlp": "blocks.{}.hook_mlp_out",
    "attn": "blocks.{}.hook_attn_out",
}
EIFFEL = "The Eiffel Tower is located in the city of"
# The tests that read words use the tiny models' own tokenizer (conftest's fixtures), where
# " Paris", " Tokyo" and every word of the facts are one token each, "Eiffel Tower" two and
# "Sydney Opera House" three, BOS is "<|bos|>", and "William" is one token with and without its
# leading space (it begins a fact's prompt and is an IOI name).
SYDNEY = "The Sydney Opera House is located in the country of"


def bare_model(kind: str, seed: int = 0):
    """A tiny model without a tokenizer: 512 tokens, so probabilities are not all ~1e-5."""
    return ck.tiny_model(kind, seed=seed, tokenizer=False).to(DEVICE)


def snapshot(model):
    hooks = {
        name: (len(hp._forward_hooks), len(hp._backward_hooks), len(hp.fwd_hooks))
        for name, hp in model.hook_dict.items()
    }
    return hooks, copy.deepcopy(model.state_dict()), model.training


def assert_unchanged(model, before):
    hooks, state, training = snapshot(model)
    assert hooks == before[0]
    assert all(count == (0, 0, 0) for count in hooks.values())
    assert training == before[2]
    for name, tensor in state.items():
        assert torch.equal(before[1][name], tensor), name


def window_layers(layer, window, n_layers):
    """ROME's centred window, written out: layer - w//2 .. layer + ceil(w/2) - 1, clipped."""
    lo = layer - window // 2
    hi = layer + (window + 1) // 2
    return [k for k in range(lo, hi) if 0 <= k < n_layers]


def next_token_probs(logits):
    return logits[:, -1].float().softmax(-1)


# ---------------------------------------------------------------------------------------------
# trace_token_probability


@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(KINDS),
    batch=st.integers(1, 3),
    n_pos=st.integers(1, 9),
)
def test_token_probability_equals_softmax(seed, kind, batch, n_pos):
    model = bare_model(kind, seed % 3)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)
    target = int(torch.randint(0, model.cfg.d_vocab, (1,), generator=g))
    expected = model(tokens).softmax(-1)[:, :, target]

    probs = ck.trace_token_probability(model, tokens, target)
    assert probs.shape == (batch, n_pos)
    assert_close(probs, expected, atol=1e-7, rtol=1e-5)
    last = ck.trace_token_probability(model, tokens, target, position="last")
    assert_close(last, expected[:, -1], atol=1e-7, rtol=1e-5)
    first = ck.trace_token_probability(model, tokens, target, position=0)
    assert_close(first, expected[:, 0], atol=1e-7, rtol=1e-5)
    one = ck.trace_token_probability(model, tokens[0], target)
    assert_close(one, expected[0], atol=1e-7, rtol=1e-5)
    # the positions really differ, so reading the wrong one would fail
    if n_pos > 1:
        assert (expected[:, 1:] - expected[:, :1]).abs().max() > 1e-6


def test_token_probability_per_example_target_and_strings(tiny_gpt2):
    tokens = tiny_gpt2.to_tokens(["The capital of France is", "The capital of Japan is"])
    targets = torch.tensor([tiny_gpt2.to_single_token(" Paris"), 17])
    expected = tiny_gpt2(tokens).softmax(-1)
    probs = ck.trace_token_probability(tiny_gpt2, tokens, targets)
    assert_close(probs[0], expected[0, :, targets[0]], atol=1e-9, rtol=1e-5)
    assert_close(probs[1], expected[1, :, 17], atol=1e-9, rtol=1e-5)
    text = ck.trace_token_probability(tiny_gpt2, "The capital of France is", " Paris")
    assert_close(text, probs[0], atol=1e-9, rtol=1e-5)


def test_token_probability_errors(tiny_gpt2):
    before = snapshot(tiny_gpt2)
    tokens = tiny_gpt2.to_tokens("The capital of France is")
    vocab = tiny_gpt2.cfg.d_vocab
    with pytest.raises(
        TokenizationError, match=rf"token id {vocab}, outside the vocabulary 0\.\.{vocab - 1}"
    ):
        ck.trace_token_probability(tiny_gpt2, tokens, vocab)
    with pytest.raises(TokenizationError, match=r"token id -1"):
        ck.trace_token_probability(tiny_gpt2, tokens, -1)
    with pytest.raises(TokenizationError, match=r"' Parisian Louvre' is \d tokens"):
        ck.trace_token_probability(tiny_gpt2, tokens, " Parisian Louvre")
    with pytest.raises(ComponentError, match=r"position 6 is outside the prompt.*0\.\.5"):
        ck.trace_token_probability(tiny_gpt2, tokens, 5, position=6)
    with pytest.raises(ShapeError, match="integer"):
        ck.trace_token_probability(tiny_gpt2, tokens.float(), 5)
    with pytest.raises(CircuitkitError, match="position must be None, 'last' or an int"):
        ck.trace_token_probability(tiny_gpt2, tokens, 5, position="first")
    with pytest.raises(TokenizationError, match="input_ids holds token id 60000"):
        ck.trace_token_probability(tiny_gpt2, torch.tensor([1, 60000]), 5)
    assert_unchanged(tiny_gpt2, before)


# ---------------------------------------------------------------------------------------------
# intervene_on_neuron


def hand_written_neuron_run(model, tokens, layer, neuron, scale, positions):
    def hook(act, hook):
        act = act.clone()
        if positions is None:
            act[:, :, neuron] = act[:, :, neuron] * scale
        else:
            for p in positions:
                act[:, p, neuron] = act[:, p, neuron] * scale
        return act

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", hook)])


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["gpt2", "llama"]),
    scale=st.sampled_from([0.0, -1.0, 3.5]),
    use_positions=st.booleans(),
)
def test_neuron_intervention_equals_hand_written_hook(seed, kind, scale, use_positions):
    model = bare_model(kind, seed % 2)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (2, 6), generator=g)
    layer = int(torch.randint(0, model.cfg.n_layers, (1,), generator=g))
    neuron = int(torch.randint(0, model.cfg.d_mlp, (1,), generator=g))
    positions = (1, 4) if use_positions else None
    before = snapshot(model)

    out = ck.intervene_on_neuron(
        model, tokens, layer, neuron, scale, positions=positions, read="all"
    )
    clean = model(tokens).softmax(-1)
    intervened = hand_written_neuron_run(model, tokens, layer, neuron, scale, positions)
    intervened = intervened.softmax(-1)
    assert_close(out.clean_probs, clean, atol=1e-7, rtol=1e-5)
    assert_close(out.intervened_probs, intervened, atol=1e-7, rtol=1e-5)
    assert_close(out.difference, intervened - clean, atol=1e-7, rtol=1e-4)
    kl = (clean * (clean.log() - intervened.log())).sum(-1)
    assert_close(out.kl, kl, atol=1e-6, rtol=1e-3)
    assert out.neuron == Neuron(layer, neuron, pos=positions)
    # the neuron matters, so the comparison can fail
    assert out.difference.abs().max() > 1e-6
    assert_unchanged(model, before)


def test_neuron_intervention_agrees_with_engine_scale(tiny_llama):
    tokens = tiny_llama.to_tokens(["The capital of France is", "The capital of Japan is"])
    assert tokens.shape == (2, 6)  # no padding: both read the last position
    target = tiny_llama.to_single_token(" Paris")
    metric = Metric(
        "p", torch.full((2,), tokens.shape[1] - 1), lambda la: la.softmax(-1)[..., target]
    )
    out = ck.intervene_on_neuron(tiny_llama, tokens, 2, 37, 4.0, positions=[3, 5])
    engine = run_interventions(
        tiny_llama, tokens, [[Intervention(Neuron(2, 37, pos=(3, 5)), Scale(4.0))]], metric
    )
    assert_close(out.intervened_probs[:, target], engine[0], atol=1e-9, rtol=1e-4)
    assert (out.intervened_probs[:, target] - out.clean_probs[:, target]).abs().max() > 0


def test_neuron_intervention_scales_a_neuron_not_a_position():
    # Scaling MLP output at sequence index neuron_idx (a different intervention) gives another
    # answer than scaling neuron neuron_idx.
    model = bare_model("gpt2")
    tokens = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(3))
    out = ck.intervene_on_neuron(model, tokens, 1, 2, 0.0)

    def zero_position(act, hook):
        act = act.clone()
        act[:, 2] = 0.0
        return act

    wrong = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero_position)])
    assert not allclose(out.intervened_probs, wrong.softmax(-1)[:, -1], atol=1e-6)


def test_neuron_intervention_read_positions(tiny_gpt2):
    tokens = tiny_gpt2.to_tokens("The capital of France is")
    full = ck.intervene_on_neuron(tiny_gpt2, tokens, 0, 5, 2.0, read="all")
    assert full.clean_probs.shape == (1, tokens.shape[1], tiny_gpt2.cfg.d_vocab)
    assert full.kl.shape == (1, tokens.shape[1])
    at_two = ck.intervene_on_neuron(tiny_gpt2, tokens, 0, 5, 2.0, read=2)
    assert_close(at_two.intervened_probs, full.intervened_probs[:, 2])
    last = ck.intervene_on_neuron(tiny_gpt2, "The capital of France is", 0, 5, 2.0)
    assert_close(last.intervened_probs, full.intervened_probs[:, -1])
    changes = last.top_changes(3)
    assert len(changes) == 3
    assert abs(changes[0][1]) >= abs(changes[-1][1]) > 0
    ones = ck.intervene_on_neuron(tiny_gpt2, tokens, 0, 5, 1.0)
    assert torch.equal(ones.clean_probs, ones.intervened_probs)


def test_neuron_intervention_errors(tiny_gpt2, tiny_attn_only):
    before = snapshot(tiny_gpt2)
    tokens = tiny_gpt2.to_tokens("The capital of France is")
    with pytest.raises(
        ComponentError, match=r"layer 3 is out of range; this model has layers 0\.\.2"
    ):
        ck.intervene_on_neuron(tiny_gpt2, tokens, 3, 0)
    with pytest.raises(ComponentError, match=r"neuron 256 is out of range.*neurons 0\.\.255"):
        ck.intervene_on_neuron(tiny_gpt2, tokens, 0, 256)
    with pytest.raises(ComponentError, match=r"neuron -1 is out of range"):
        ck.intervene_on_neuron(tiny_gpt2, tokens, 0, -1)
    with pytest.raises(ComponentError, match=r"position 9 is outside the prompt"):
        ck.intervene_on_neuron(tiny_gpt2, tokens, 0, 1, positions=[9])
    with pytest.raises(ComponentError, match="attention-only"):
        ck.intervene_on_neuron(tiny_attn_only, tokens, 0, 1)
    with pytest.raises(CircuitkitError, match="scale must be a finite number"):
        ck.intervene_on_neuron(tiny_gpt2, tokens, 0, 1, "half")
    assert_unchanged(tiny_gpt2, before)


# ---------------------------------------------------------------------------------------------
# causal_trace


def noise_as_documented(model, n_pos, subject, samples, noise, seed):
    """The corrupted run's noise, built from the docstring of causal_trace, not its code."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subject), model.cfg.d_model, generator=g)
    delta = torch.zeros(samples, n_pos, model.cfg.d_model)
    delta[:, list(subject)] = draws * noise * float(model.W_E.detach().std())
    return delta.to(model.cfg.device)


@torch.no_grad()
def reference_trace(
    model, tokens, subject, target, kind, window, samples, noise, seed, layers=None, positions=None
):
    """One run_with_hooks per (layer, position, noise sample), with plain hooks."""
    n_pos = tokens.shape[1]
    n_layers = model.cfg.n_layers
    layers = range(n_layers) if layers is None else layers
    positions = range(n_pos) if positions is None else positions
    delta = noise_as_documented(model, n_pos, subject, samples, noise, seed)
    _, clean_cache = model.run_with_cache(tokens)

    def noisy(s):
        return ("hook_embed", lambda act, hook: act + delta[s])

    def restore(name, p):
        def hook(act, hook):
            act = act.clone()
            act[:, p] = clean_cache[name][:, p]
            return act

        return (name, hook)

    clean = float(next_token_probs(model(tokens))[0, target])
    corrupted = torch.tensor(
        [
            float(next_token_probs(model.run_with_hooks(tokens, fwd_hooks=[noisy(s)]))[0, target])
            for s in range(samples)
        ]
    )
    grid = torch.zeros(len(layers), len(positions), samples)
    for i, layer in enumerate(layers):
        names = [HOOK[kind].format(k) for k in window_layers(layer, window, n_layers)]
        for j, p in enumerate(positions):
            for s in range(samples):
                hooks = [noisy(s), *(restore(name, p) for name in names)]
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                grid[i, j, s] = float(next_token_probs(logits)[0, target])
    return clean, corrupted, grid


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(KINDS))
def test_causal_trace_equals_reference(seed, kind):
    model = bare_model(kind, seed % 3)
    g = torch.Generator().manual_seed(seed)
    n_pos = 7
    tokens = torch.randint(0, 512, (1, n_pos), generator=g)
    start = int(torch.randint(1, 4, (1,), generator=g))
    subject = tuple(range(start, start + 2))
    target = int(torch.randint(0, 512, (1,), generator=g))
    kinds = [("resid", 1), ("attn", 2)] + ([] if model.cfg.attn_only else [("mlp", 3)])
    before = snapshot(model)
    for trace_kind, window in kinds:
        args = dict(samples=3, noise=3.0, seed=seed)
        trace = ck.causal_trace(
            model, tokens[0], subject, target, trace_kind, window, progress=False, **args
        )
        clean, corrupted, grid = reference_trace(
            model, tokens, subject, target, trace_kind, window, **args
        )
        assert trace.scores.axes == ("layer", "pos")
        assert trace.scores.examples.shape == grid.shape
        assert_close(trace.scores.examples, grid, atol=1e-7, rtol=1e-4)
        assert_close(trace.corrupted_by_sample, corrupted, atol=1e-7, rtol=1e-4)
        assert trace.clean_prob == pytest.approx(clean, rel=1e-4)
        assert trace.corrupted_prob == pytest.approx(float(corrupted.mean()), rel=1e-4)
        # restoring makes a difference somewhere, so the comparison can fail
        assert (grid - corrupted).abs().max() > 1e-5
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_restoring_before_the_noise_gives_the_clean_run(kind):
    model = bare_model(kind, 1)
    tokens = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    subject, target, samples = (2, 3, 4), 11, 4
    trace = ck.causal_trace(model, tokens[0], subject, target, samples=samples, progress=False)
    assert abs(trace.clean_prob - trace.corrupted_prob) > 1e-5
    # the whole residual stream before layer 0 at the subject: the noise is undone exactly
    delta = subject_noise(model, 8, subject, samples=samples, noise=3.0, seed=0)
    clean_resid = model.run_with_cache(tokens)[1]["blocks.0.hook_resid_pre"]
    metric = Metric("p", torch.full((samples,), 7), lambda la: la.softmax(-1)[..., target])
    restored = run_interventions(
        model,
        tokens.repeat(samples, 1),
        [
            [
                Intervention(Embed(pos=subject), Add(delta)),
                Intervention(
                    Resid(0, "pre", pos=subject), Patch(clean_resid.expand(samples, -1, -1))
                ),
            ]
        ],
        metric,
        progress=False,
    )
    assert_close(restored[0], torch.full((samples,), trace.clean_prob))
    # the last layer's output at the last position is all the prediction reads
    assert_close(trace.scores.examples[-1, -1], torch.full((samples,), trace.clean_prob))
    # positions before the subject are the same in both runs: restoring them does nothing
    assert_close(trace.scores.examples[:, :2], trace.corrupted_by_sample.expand(3, 2, samples))


def test_zero_noise_is_flat_at_the_clean_probability(tiny_llama):
    trace = ck.causal_trace(
        tiny_llama, EIFFEL, "Eiffel Tower", " Paris", "mlp", noise=0.0, samples=2, progress=False
    )
    expected = torch.full_like(trace.scores.values, trace.clean_prob)
    assert_close(trace.scores.values, expected, atol=1e-9, rtol=1e-5)
    assert trace.corrupted_prob == pytest.approx(trace.clean_prob, rel=1e-5)
    assert trace.noise_std == 0.0


def test_subject_positions_and_labels(tiny_gpt2):
    tokens = tiny_gpt2.to_tokens(EIFFEL)[0]
    positions = find_subject(tiny_gpt2, tokens, "Eiffel Tower")
    assert "".join(tiny_gpt2.to_str_tokens(tokens[list(positions)])).strip() == "Eiffel Tower"
    assert positions == tuple(range(positions[0], positions[-1] + 1))
    trace = ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", samples=1, progress=False)
    assert trace.subject_positions == positions
    starred = [label for label in trace.scores.labels["pos"] if label.endswith("*")]
    assert len(starred) == len(positions)
    assert trace.scores.labels["pos"][0] == "0:<|bos|>"
    assert trace.target == " Paris"
    assert trace.target_token == tiny_gpt2.to_single_token(" Paris")
    # a subject inside a word still covers the whole token
    assert find_subject(tiny_gpt2, tokens, "ower") == (positions[-1],)


def test_repeated_subject_needs_an_occurrence(tiny_gpt2):
    prompt = "Paris is nice. Paris is the capital of"
    tokens = tiny_gpt2.to_tokens(prompt)[0]
    with pytest.raises(TokenizationError, match=r"occurs 2 times.*occurrence=0\.\.1"):
        ck.causal_trace(tiny_gpt2, prompt, "Paris", " France", progress=False)
    first = find_subject(tiny_gpt2, tokens, "Paris", occurrence=0)
    second = find_subject(tiny_gpt2, tokens, "Paris", occurrence=1)
    assert first < second
    assert tiny_gpt2.to_string(tokens[list(second)]).strip() == "Paris"
    trace = ck.causal_trace(
        tiny_gpt2, prompt, "Paris", " France", occurrence=1, samples=1, progress=False
    )
    assert trace.subject_positions == second
    with pytest.raises(TokenizationError, match="occurrence 2 asked for"):
        find_subject(tiny_gpt2, tokens, "Paris", occurrence=2)


def test_causal_trace_errors(tiny_gpt2, tiny_attn_only):
    before = snapshot(tiny_gpt2)
    with pytest.raises(TokenizationError, match=r"subject 'Louvre' does not occur"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Louvre", " Paris")
    with pytest.raises(TokenizationError, match=r"target ' Parisian Louvre' is \d tokens"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Parisian Louvre")
    vocab = tiny_gpt2.cfg.d_vocab
    with pytest.raises(TokenizationError, match=rf"outside the vocabulary 0\.\.{vocab - 1}"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", 10**6)
    with pytest.raises(CircuitkitError, match="kind must be one of"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", kind="heads")
    with pytest.raises(ComponentError, match="attention-only"):
        ck.causal_trace(tiny_attn_only, EIFFEL, "Eiffel Tower", " Paris", kind="mlp")
    with pytest.raises(CircuitkitError, match="window must be a positive"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", window=0)
    with pytest.raises(CircuitkitError, match="samples must be a positive int"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", samples=0)
    with pytest.raises(ComponentError, match=r"layer 3 is out of range.*0\.\.2"):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", layers=[3])
    with pytest.raises(ComponentError, match="position 40 is outside the prompt"):
        ck.causal_trace(tiny_gpt2, EIFFEL, [40], " Paris")
    assert_unchanged(tiny_gpt2, before)


def test_seed_layers_and_positions(tiny_gpt2):
    args = (tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", "attn", 2)
    full = ck.causal_trace(*args, samples=2, seed=1, progress=False)
    again = ck.causal_trace(*args, samples=2, seed=1, progress=False)
    other = ck.causal_trace(*args, samples=2, seed=2, progress=False)
    assert torch.equal(full.scores.values, again.scores.values)
    assert not torch.allclose(full.scores.values, other.scores.values)
    last = tiny_gpt2.to_tokens(EIFFEL).shape[1] - 1
    part = ck.causal_trace(*args, samples=2, seed=1, layers=[2, 0], positions=[-1, 3])
    assert part.layers == [2, 0] and part.positions == (last, 3)
    expected = full.scores.examples[[2, 0]][:, [last, 3]]
    assert_close(part.scores.examples, expected, atol=1e-9, rtol=1e-5)


def test_average_indirect_effect_groups(tiny_gpt2):
    sydney = (tiny_gpt2, SYDNEY, "Sydney Opera House", " Australia")
    trace = ck.causal_trace(*sydney, samples=2, progress=False)
    subject = trace.subject_positions
    assert subject == (2, 3, 4) and trace.scores.values.shape[1] == 11  # then six more
    effect = trace.scores.values - trace.corrupted_prob
    result = ck.average_indirect_effect([trace, trace])
    assert result.axes == ("token", "layer")
    assert result.labels["token"] == list(ck.causal_tracing.TOKEN_GROUPS)
    rows = dict(zip(result.labels["token"], result.values, strict=True))
    assert_close(rows["first subject token"], effect[:, subject[0]])
    assert_close(rows["middle subject tokens"], effect[:, subject[1:-1]].mean(1))
    assert_close(rows["last subject token"], effect[:, subject[-1]])
    assert_close(rows["first subsequent token"], effect[:, subject[-1] + 1])
    assert_close(rows["further tokens"], effect[:, subject[-1] + 2 : -1].mean(1))
    assert_close(rows["last token"], effect[:, -1])
    assert result.info["n_prompts"]["last token"] == 2
    short = ck.causal_trace(
        tiny_gpt2, "The capital of France is", "France", " Paris", samples=1, progress=False
    )
    mixed = ck.average_indirect_effect([trace, short])
    assert mixed.info["n_prompts"]["middle subject tokens"] == 1
    assert mixed.info["n_prompts"]["first subject token"] == 2
    assert mixed.info["n_prompts"]["last subject token"] == 2
    assert mixed.info["n_prompts"]["first subsequent token"] == 1  # " is" is the last token
    # traces of some positions count in the groups they cover
    ends = [subject[-1], -1]
    part = ck.causal_trace(*sydney, samples=2, positions=ends, progress=False)
    partial = ck.average_indirect_effect([part])
    assert partial.labels["token"] == ["last subject token", "last token"]
    assert_close(partial.values, result.values[[2, 5]], atol=1e-9, rtol=1e-5)
    bare = bare_model("llama")
    tokens = torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(1))
    bare_trace = ck.causal_trace(bare, tokens, [1, 2], 7, samples=1, progress=False)
    assert bare_trace.scores.labels["pos"][1] == "1*"
    bare_rows = ck.average_indirect_effect([bare_trace]).labels["token"]
    assert bare_rows == [g for g in ck.causal_tracing.TOKEN_GROUPS if g != "middle subject tokens"]
    with pytest.raises(ShapeError, match="no position of any token group"):
        ck.average_indirect_effect([ck.causal_trace(*trace_args(tiny_gpt2), positions=[1])])


def trace_args(model):
    return (model, EIFFEL, "Eiffel Tower", " Paris")


def test_plots(tiny_gpt2):
    traces = [
        ck.causal_trace(*trace_args(tiny_gpt2), kind=kind, samples=1, progress=False)
        for kind in ("resid", "mlp", "attn")
    ]
    one = ck.plot(traces[0])
    assert isinstance(one, go.Figure) and len(one.data) == 1
    assert list(one.data[0].y) == traces[0].scores.labels["pos"]
    assert one.data[0].colorscale is not None
    three = ck.plot_causal_trace(*traces)
    assert [d.type for d in three.data] == ["heatmap"] * 3
    assert ck.plot(traces).layout.title.text == three.layout.title.text
    with pytest.raises(ShapeError, match="one to three traces"):
        ck.plot_causal_trace(*traces, traces[0])
    with pytest.raises(ShapeError, match="expected a Result, a CausalTrace"):
        ck.plot("a trace")
    indirect = ck.plot(traces[1].indirect_effect)
    assert indirect.data[0].type == "heatmap"


# ---------------------------------------------------------------------------------------------
# causal_effects


@torch.no_grad()
def reference_effects(model, base, source, target, kind, window, per_position, effect):
    """Each effect with plain hooks: one run_with_hooks per (layer, position)."""
    n_layers, n_pos = model.cfg.n_layers, base.shape[1]
    _, base_cache = model.run_with_cache(base)
    _, source_cache = model.run_with_cache(source)
    rows = torch.arange(base.shape[0])
    base_value = next_token_probs(model(base))[rows, target]

    def patch(name, cache, positions):
        def hook(act, hook):
            act = act.clone()
            act[:, positions] = cache[name][:, positions]
            return act

        return (name, hook)

    out = []
    for layer in range(n_layers):
        inside = window_layers(layer, window, n_layers)
        for p in range(n_pos) if per_position else [None]:
            at = list(range(n_pos)) if p is None else [p]
            if effect == "indirect":
                tokens = base
                hooks = [patch(HOOK[kind].format(k), source_cache, at) for k in inside]
            elif effect == "direct":
                tokens = source
                hooks = [patch(HOOK[kind].format(k), base_cache, at) for k in inside]
            else:
                tokens = source
                everywhere = list(range(n_pos))
                hooks = [
                    patch(HOOK[kind].format(k), base_cache, everywhere)
                    for k in range(n_layers)
                    if k not in inside
                ]
                others = [q for q in everywhere if q not in at]
                if others:
                    hooks += [patch(HOOK[kind].format(k), base_cache, others) for k in inside]
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            out.append(next_token_probs(logits)[rows, target] - base_value)
    return torch.stack(out).reshape(n_layers, *([n_pos] if per_position else []), -1)


def random_pair(seed, n=2, n_pos=6):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 512, (n, n_pos), generator=g)
    source = base.clone()
    source[:, 1:3] = torch.randint(0, 512, (n, 2), generator=g)
    target = torch.randint(0, 512, (n,), generator=g)
    return base, source, target


@settings(max_examples=3, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(KINDS),
    window=st.sampled_from([1, 2]),
    per_position=st.booleans(),
)
def test_causal_effects_equal_reference(seed, kind, window, per_position):
    model = bare_model(kind, seed % 3)
    base, source, target = random_pair(seed)
    kinds = ("resid", "attn") if model.cfg.attn_only else ("resid", "mlp", "attn")
    before = snapshot(model)
    effects = ck.causal_effects(
        model,
        base,
        source,
        target,
        kinds=kinds,
        window=window,
        per_position=per_position,
        progress=False,
    )
    for effect in ("indirect", "direct", "window_only"):
        for trace_kind in kinds:
            if effect == "window_only" and trace_kind == "resid":
                assert "resid" not in effects.window_only
                continue
            result = getattr(effects, effect)[trace_kind]
            expected = reference_effects(
                model, base, source, target, trace_kind, window, per_position, effect
            )
            assert result.axes == (("layer", "pos") if per_position else ("layer",))
            assert_close(result.examples, expected, atol=1e-6, rtol=1e-4)
            # the base run's residual stream at every position is the base run: exactly 0
            if effect != "direct" or trace_kind != "resid" or per_position:
                assert result.examples.abs().max() > 1e-5
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_effect_identities(kind):
    model = bare_model(kind, 2)
    base, source, target = random_pair(9, n=3)
    rows = torch.arange(3)
    with torch.no_grad():
        p_base = next_token_probs(model(base))[rows, target]
        p_source = next_token_probs(model(source))[rows, target]
    kinds = ("resid", "attn") if model.cfg.attn_only else ("resid", "mlp", "attn")
    args = dict(kinds=kinds, progress=False)
    everywhere = ck.causal_effects(model, base, source, target, per_position=False, **args)
    by_position = ck.causal_effects(model, base, source, target, **args)
    whole_model = ck.causal_effects(
        model, base, source, target, per_position=False, window=2 * model.cfg.n_layers, **args
    )
    total = p_source - p_base
    assert total.abs().max() > 1e-5
    assert_close(everywhere.total_by_example, total, atol=1e-7, rtol=1e-5)
    assert everywhere.total == pytest.approx(float(total.mean()), rel=1e-5, abs=1e-9)
    assert everywhere.base_value == pytest.approx(float(p_base.mean()), rel=1e-5)
    # layer 0's output at every position carries everything the input changes
    assert_close(everywhere.indirect["resid"].examples[0], total, atol=1e-7, rtol=1e-4)
    assert_close(everywhere.direct["resid"].examples[0], torch.zeros(3), atol=1e-7, rtol=0)
    # the last layer's output at the last position is all the prediction reads
    assert_close(by_position.indirect["resid"].examples[-1, -1], total, atol=1e-7, rtol=1e-4)
    assert_close(by_position.direct["resid"].examples[-1, -1], torch.zeros(3), atol=1e-7, rtol=0)
    # a window covering every layer keeps every source activation: nothing is noised
    for trace_kind in kinds[1:]:
        assert_close(whole_model.window_only[trace_kind].examples[0], total, atol=1e-7, rtol=1e-4)
        every_layer = whole_model.indirect[trace_kind].values
        assert_close(every_layer, every_layer[:1].expand(model.cfg.n_layers))
    # a subset of layers is the same rows of the full sweep
    part = ck.causal_effects(model, base, source, target, layers=[2, 0], **args)
    for name in ("indirect", "direct", "window_only"):
        for trace_kind, result in getattr(part, name).items():
            full = getattr(by_position, name)[trace_kind]
            assert result.labels["layer"] == ["2", "0"]
            assert_close(result.examples, full.examples[[2, 0]])
    # position 0 is the same in both inputs: restoring it does nothing
    assert_close(by_position.indirect["resid"].examples[:, 0], torch.zeros(model.cfg.n_layers, 3))


def test_causal_effects_logit_diff_and_strings(tiny_llama):
    base, source = "The capital of France is", "The capital of Japan is"
    effects = ck.causal_effects(
        tiny_llama,
        base,
        source,
        " Tokyo",
        foil=" Paris",
        measure="logit_diff",
        kinds=("mlp",),
        progress=False,
    )
    tokyo, paris = tiny_llama.to_single_token(" Tokyo"), tiny_llama.to_single_token(" Paris")

    def logit_diff(logits):
        return float((logits[0, -1, tokyo] - logits[0, -1, paris]).detach())

    base_tokens, source_tokens = tiny_llama.to_tokens(base), tiny_llama.to_tokens(source)
    total = logit_diff(tiny_llama(source_tokens)) - logit_diff(tiny_llama(base_tokens))
    assert effects.total == pytest.approx(total, rel=1e-4, abs=1e-6)
    assert effects.measure == "logit_diff"
    _, source_cache = tiny_llama.run_with_cache(source_tokens)

    def restore(act, hook):
        act = act.clone()
        act[:, 4] = source_cache["blocks.1.hook_mlp_out"][:, 4]
        return act

    restored = tiny_llama.run_with_hooks(
        base_tokens, fwd_hooks=[("blocks.1.hook_mlp_out", restore)]
    )
    expected = logit_diff(restored) - logit_diff(tiny_llama(base_tokens))
    assert float(effects.indirect["mlp"].values[1, 4]) == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-4


def test_causal_effects_errors(tiny_gpt2, tiny_attn_only):
    before = snapshot(tiny_gpt2)
    base, source = "The capital of France is", "The capital of Japan is"
    longer = "The capital of the United States is"
    n_longer = tiny_gpt2.to_tokens(longer).shape[1]
    with pytest.raises(
        ShapeError, match=rf"base has shape \(1, 6\) but source has \(1, {n_longer}\)"
    ):
        ck.causal_effects(tiny_gpt2, base, longer, " Tokyo")
    with pytest.raises(TokenizationError, match=r"target ' Tokyo Japan' is 2 tokens"):
        ck.causal_effects(tiny_gpt2, base, source, " Tokyo Japan")
    with pytest.raises(CircuitkitError, match="needs foil="):
        ck.causal_effects(tiny_gpt2, base, source, " Tokyo", measure="logit_diff")
    with pytest.raises(CircuitkitError, match="foil is only used"):
        ck.causal_effects(tiny_gpt2, base, source, " Tokyo", foil=" Paris")
    with pytest.raises(CircuitkitError, match="measure must be"):
        ck.causal_effects(tiny_gpt2, base, source, " Tokyo", measure="kl")
    with pytest.raises(CircuitkitError, match="kind must be one of"):
        ck.causal_effects(tiny_gpt2, base, source, " Tokyo", kinds=["head"])
    with pytest.raises(ComponentError, match="attention-only"):
        ck.causal_effects(tiny_attn_only, base, source, " Tokyo", kinds=["mlp"])
    with pytest.raises(ShapeError, match="target lists 2 tokens for 1 examples"):
        ck.causal_effects(tiny_gpt2, base, source, [" Tokyo", " Paris"])
    assert_unchanged(tiny_gpt2, before)


# ---------------------------------------------------------------------------------------------
# Targets given as text, and arguments of the wrong kind


def no_warnings(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


def test_target_without_its_leading_space_warns(tiny_gpt2):
    trace_args = dict(samples=1, layers=[0], positions=[-1], progress=False)
    effect_args = dict(per_position=False, layers=[0], progress=False)
    calls = {
        "causal_trace": (
            "target",
            lambda target: ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", target, **trace_args),
        ),
        "trace_token_probability": (
            "target_idx",
            lambda target: ck.trace_token_probability(tiny_gpt2, EIFFEL, target),
        ),
        "causal_effects": (
            "target",
            lambda target: ck.causal_effects(
                tiny_gpt2, EIFFEL, EIFFEL, [target], kinds=("resid",), **effect_args
            ),
        ),
    }
    for where, (name, call) in calls.items():
        with pytest.warns(TokenizationWarning) as caught:
            call("William")
        assert len(caught) == 1
        message = str(caught[0].message)
        assert message.startswith(f"{where}: {name} 'William' has no leading space")
        assert "Pass ' William'" in message
        assert caught[0].filename == __file__  # it points at the call, not into circuitkit
        no_warnings(lambda call=call: call(" William"))
        no_warnings(lambda call=call: call(tiny_gpt2.to_single_token("William")))
    # the foil is a target too
    with pytest.warns(TokenizationWarning, match="causal_effects: foil 'William'"):
        ck.causal_effects(
            tiny_gpt2,
            EIFFEL,
            EIFFEL,
            " Rome",
            foil="William",
            measure="logit_diff",
            kinds=("resid",),
            **effect_args,
        )
    # after a trailing space the unspaced word is what follows; punctuation takes no space
    after_space = "The play was written by "
    no_warnings(lambda: ck.trace_token_probability(tiny_gpt2, after_space, "William"))
    no_warnings(lambda: ck.trace_token_probability(tiny_gpt2, EIFFEL, "."))


def test_target_of_several_tokens_suggests_the_spaced_word(tiny_gpt2):
    n_tokens = len(tiny_gpt2.to_tokens("Tokyo", prepend_bos=False)[0])
    assert n_tokens > 1 and len(tiny_gpt2.to_tokens(" Tokyo", prepend_bos=False)[0]) == 1
    with pytest.raises(
        TokenizationError,
        match=rf"target 'Tokyo' is {n_tokens} tokens.*' Tokyo', with a leading space",
    ):
        ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", "Tokyo")
    with pytest.raises(TokenizationError, match=r"target is an empty string"):
        ck.causal_effects(tiny_gpt2, EIFFEL, EIFFEL, "")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(layers=2), ComponentError, r"causal_trace: layers must be a sequence.*got 2"),
        (dict(layers="01"), ComponentError, r"causal_trace: layers must be a sequence"),
        (dict(layers=[0.5]), ComponentError, r"causal_trace: layers must be a sequence"),
        (dict(positions=3), ComponentError, r"causal_trace: positions must be a sequence"),
        (dict(positions=["end"]), ComponentError, r"causal_trace: positions must be ints"),
        (dict(subject=5), TokenizationError, r"causal_trace: subject must be a string.*got 5"),
        (dict(subject=[]), TokenizationError, r"causal_trace: subject must be a string"),
        (dict(occurrence="first"), CircuitkitError, r"causal_trace: occurrence must be None"),
        (dict(seed="0"), CircuitkitError, r"causal_trace: seed must be an int, got '0'"),
        (dict(noise=float("nan")), CircuitkitError, r"causal_trace: noise must be a finite"),
    ],
)
def test_causal_trace_arguments_of_the_wrong_kind(tiny_gpt2, kwargs, error, message):
    args = {"subject": "Eiffel Tower", **kwargs}
    subject = args.pop("subject")
    with pytest.raises(error, match=message):
        ck.causal_trace(tiny_gpt2, EIFFEL, subject, " Paris", samples=1, progress=False, **args)


def test_effects_and_probability_arguments_of_the_wrong_kind(tiny_gpt2):
    base, source = "The capital of France is", "The capital of Japan is"
    with pytest.raises(ComponentError, match=r"causal_effects: layers must be a sequence"):
        ck.causal_effects(tiny_gpt2, base, source, " Tokyo", layers=1)
    with pytest.raises(TokenizationError, match=r"trace_token_probability: target_idx must be"):
        ck.trace_token_probability(tiny_gpt2, base, 1.5)


def test_the_engine_is_called_with_the_methods_name(tiny_gpt2, monkeypatch):
    # so that an error the engine raises names the function the user called
    names = []

    def spy(module):
        engine_call = module.run_interventions

        def call(*args, **kwargs):
            names.append(kwargs.get("where"))
            return engine_call(*args, **kwargs)

        monkeypatch.setattr(module, "run_interventions", call)

    spy(importlib.import_module("circuitkit.methods.causal_tracing"))
    spy(importlib.import_module("circuitkit.methods.causal_effects"))
    ck.causal_trace(tiny_gpt2, EIFFEL, "Eiffel Tower", " Paris", samples=1, layers=[0])
    assert names and set(names) == {"causal_trace"}
    names.clear()
    ck.causal_effects(tiny_gpt2, EIFFEL, EIFFEL, " Paris", kinds=("resid",), per_position=False)
    assert names and set(names) == {"causal_effects"}


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_causal_trace_on_smollm(smollm):
    tokens = smollm.to_tokens(EIFFEL)
    subject = find_subject(smollm, tokens[0], "Eiffel Tower")
    cells = dict(layers=[2, 15], positions=[subject[-1], tokens.shape[1] - 1])
    args = dict(samples=2, noise=3.0, seed=0)
    trace = ck.causal_trace(
        smollm, EIFFEL, "Eiffel Tower", " Paris", "mlp", progress=False, **cells, **args
    )
    clean, corrupted, grid = reference_trace(
        smollm, tokens, subject, trace.target_token, "mlp", 10, **args, **cells
    )
    assert_close(trace.scores.examples, grid, atol=1e-5, rtol=1e-3)
    assert_close(trace.corrupted_by_sample, corrupted, atol=1e-5, rtol=1e-3)
    assert trace.clean_prob == pytest.approx(clean, rel=1e-4)
    assert trace.clean_prob == pytest.approx(
        float(ck.trace_token_probability(smollm, tokens[0], " Paris", position="last")), rel=1e-4
    )
    # the noise hides the subject, and restoring some cells brings part of the fact back
    assert trace.clean_prob > 0.2 and trace.corrupted_prob < 0.5 * trace.clean_prob
    assert float((grid - corrupted).abs().max()) > 0.01


@pytest.mark.real
def test_causal_effects_and_neurons_on_smollm(smollm):
    base, source = "The capital of France is", "The capital of Japan is"
    effects = ck.causal_effects(
        smollm,
        base,
        source,
        " Tokyo",
        kinds=("resid",),
        per_position=False,
        layers=[0, 29],
        progress=False,
    )
    p_base = float(ck.trace_token_probability(smollm, base, " Tokyo", position="last"))
    p_source = float(ck.trace_token_probability(smollm, source, " Tokyo", position="last"))
    assert effects.total == pytest.approx(p_source - p_base, rel=1e-3)
    assert effects.total > 0.3
    assert_close(
        effects.indirect["resid"].values[0], torch.tensor(effects.total), atol=1e-4, rtol=1e-3
    )
    assert_close(effects.direct["resid"].values[-1], torch.tensor(0.0), atol=1e-5, rtol=0)

    tokens = smollm.to_tokens(base)
    out = ck.intervene_on_neuron(smollm, tokens, 20, 1000, 0.0, positions=[-1])
    intervened = hand_written_neuron_run(smollm, tokens, 20, 1000, 0.0, [-1])
    assert_close(out.intervened_probs, intervened.softmax(-1)[:, -1], atol=1e-6, rtol=1e-4)
    assert out.kl.item() > 0


@pytest.mark.real
def test_target_without_its_leading_space_warns_on_smollm(smollm):
    spaced = float(ck.trace_token_probability(smollm, EIFFEL, " Paris", position="last"))
    with pytest.warns(TokenizationWarning, match=r"target_idx 'Paris' has no leading space"):
        unspaced = float(ck.trace_token_probability(smollm, EIFFEL, "Paris", position="last"))
    # the warning is right: the model predicts " Paris", almost never "Paris"
    assert spaced > 0.2 and unspaced < 0.01 * spaced
    with pytest.warns(TokenizationWarning, match=r"causal_trace: target 'Paris'.*Pass ' Paris'"):
        trace = ck.causal_trace(
            smollm, EIFFEL, "Eiffel Tower", "Paris", samples=1, layers=[0], positions=[-1]
        )
    assert trace.clean_prob == pytest.approx(unspaced, rel=1e-3)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "2"])
def test_intervene_on_neuron_refuses_a_scale_that_is_not_a_finite_number(scale):
    model = ck.tiny_model("gpt2")
    with pytest.raises(CircuitkitError, match="intervene_on_neuron: scale must be a finite number"):
        ck.intervene_on_neuron(model, "When Mary and John went", 0, 0, scale=scale)
