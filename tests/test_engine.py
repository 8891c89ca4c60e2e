"""The engine's fast path against its reference path, and its promises about the model."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import pytest
import torch
from _device import DEVICE, allclose, assert_close, equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuitkit as ck
from circuitkit.core import engine
from circuitkit.core.components import Attn, Embed, Head, Neuron, Resid
from circuitkit.core.engine import record_activations, run_interventions
from circuitkit.core.errors import ComponentError, MetricError, ShapeError
from circuitkit.core.interventions import (
    Add,
    Intervention,
    Patch,
    Scale,
    SetTo,
    Zero,
    value_tensor,
)
from circuitkit.core.metrics import Metric


def random_case(model, seed: int, n: int = 4, n_pos: int = 7):
    """Random base and source tokens, a source cache, and a logit-difference-like metric."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    base = torch.randint(0, vocab, (n, n_pos), generator=g)
    source = torch.randint(0, vocab, (n, n_pos), generator=g)
    _, cache = model.run_with_cache(source)
    read = torch.randint(1, n_pos, (n,), generator=g)
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]

        def pick(tokens):
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return pick(a) - pick(b)

    positions = {"end": read, "first": torch.zeros(n, dtype=torch.long)}
    return base, cache, Metric("diff", read, fn), positions, g


def random_runs(model, cache, g, n_pos: int) -> list[list[Intervention]]:
    """Single and combined interventions on every component kind, with every value kind."""
    cfg = model.cfg

    def rand(k: int) -> int:
        return int(torch.randint(0, k, (1,), generator=g))

    runs: list[list[Intervention]] = []
    for layer in range(cfg.n_layers):
        for part in ("z", "q", "k", "v", "pattern"):
            head = Head(layer, rand(cfg.n_heads), part)
            pos = [None, rand(n_pos), "end", slice(1, 4)][rand(4)]
            runs.append([Intervention(head.at(pos), Patch(cache[head.hook_name(model)]))])
        for where in ("pre", "mid", "post"):
            if where == "mid" and cfg.attn_only:
                continue
            resid = Resid(layer, where, pos="end")
            runs.append([Intervention(resid, Patch(cache[resid.hook_name(model)]))])
        runs.append([Intervention(Attn(layer), Zero())])
        runs.append([Intervention(Attn(layer, pos=(0, 2)), Scale(-1.5))])
        noise = torch.randn(n_pos, cfg.d_model, generator=g)
        runs.append([Intervention(Attn(layer, pos=slice(2, None)), Add(noise))])
        runs.append([Intervention(Head(layer, 0), SetTo(torch.randn(cfg.d_head, generator=g)))])
        if not cfg.attn_only:
            runs.append(
                [
                    Intervention(Neuron(layer, rand(cfg.d_mlp)), Scale(3.0)),
                    Intervention(ck.MLP(layer, pos=1), Zero()),
                ]
            )
    # Sets applied together: several heads from the source, one head zeroed, across layers.
    last = cfg.n_layers - 1
    z0, zl = cache["blocks.0.attn.hook_z"], cache[f"blocks.{last}.attn.hook_z"]
    runs.append(
        [
            Intervention(Head(0, 0), Patch(z0)),
            Intervention(Head(0, 1), Patch(z0)),
            Intervention(Head(last, 1), Zero()),
            Intervention(Head(last, 0, pos="end"), Patch(zl)),
        ]
    )
    runs.append([Intervention(Embed(pos=(1, 2)), Zero())])
    runs.append([])  # the unpatched base run
    return runs


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**16))
def test_fast_path_equals_reference(tiny_model, seed):
    base, cache, metric, positions, g = random_case(tiny_model, seed)
    runs = random_runs(tiny_model, cache, g, base.shape[1])
    kwargs = dict(positions=positions, progress=False)
    reference = run_interventions(tiny_model, base, runs, metric, reference=True, **kwargs)
    fast = run_interventions(tiny_model, base, runs, metric, max_runs_per_chunk=5, **kwargs)
    assert fast.shape == (len(runs), base.shape[0])
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    # the unpatched run is the plain model
    plain = metric(tiny_model(base)).cpu()
    assert_close(fast[-1], plain, atol=1e-5, rtol=1e-5)
    # patched runs really change the metric, so the comparison can fail
    assert (fast[:-1] - plain).abs().max() > 1e-3


def test_chunking_does_not_change_results(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 7)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    one = run_interventions(
        tiny_gpt2, base, runs, metric, positions=positions, max_runs_per_chunk=1, progress=False
    )
    with pytest.warns(UserWarning, match="memory_budget of 1 B cannot be met"):
        tiny_budget = run_interventions(
            tiny_gpt2, base, runs, metric, positions=positions, memory_budget=1, progress=False
        )
    many = run_interventions(tiny_gpt2, base, runs, metric, positions=positions, progress=False)
    assert_close(one, many, atol=1e-5, rtol=1e-5)
    assert_close(tiny_budget, one, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["head", "resid"])
def test_runs_in_one_block_share_the_later_blocks(tiny_model, kind, monkeypatch):
    """A sweep whose runs each sit in one block runs, at each position, the runs of earlier
    layers through every later block together: one fused call per block for them and the runs
    that start there, not one per group and block after it."""
    from circuitkit.core import blocks

    model = tiny_model
    base, cache, metric, positions, g = random_case(model, 11)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    runs, pos = [], 3
    for layer in range(n_layers):
        if kind == "head":
            for head in range(n_heads):
                comp = Head(layer, head, pos=pos)
                runs.append([Intervention(comp, Patch(cache[comp.hook_name(model)]))])
        else:
            comp = Resid(layer, "pre", pos=pos)
            runs.append([Intervention(comp, Patch(cache[comp.hook_name(model)]))])
    calls = []
    original = blocks.block_forward

    def counting(block, resid_pre, *args, **kwargs):
        calls.append(resid_pre.shape[0])
        return original(block, resid_pre, *args, **kwargs)

    monkeypatch.setattr(blocks, "block_forward", counting)
    fast = run_interventions(model, base, runs, metric, positions=positions, progress=False)
    per_layer = n_heads if kind == "head" else 1
    n = base.shape[0]
    # block l takes the runs of layers before it in one call; those starting at it join them
    # when they compute the same positions (a patched residual stream), and go by themselves
    # when they compute their first position alone (a head's output at one position) or when
    # the block is the last, where the runs passing through compute the read position alone
    expected = [per_layer * n]
    for layer in range(1, n_layers):
        if kind == "head" or layer == n_layers - 1:
            expected += [layer * per_layer * n, per_layer * n]
        else:
            expected += [(layer + 1) * per_layer * n]
    assert calls == expected
    reference = run_interventions(
        model, base, runs, metric, positions=positions, reference=True, progress=False
    )
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert (reference - reference[:1]).abs().max() > 1e-3  # the runs differ


def test_merged_chunks_keep_to_their_size_and_position():
    starts = [(2, 3, True), (0, 3, True), (1, 0, False), (0, 3, True), (1, 3, False), (0, 5, True)]
    single = [True, True, True, True, False, True]
    chunks = list(engine.merged_chunks(starts, single, lambda start: 3))
    assert chunks == [[[4]], [[2]], [[1, 3], [0]], [[5]]]
    assert sorted(r for chunk in chunks for group in chunk for r in group) == list(range(6))
    # one run per chunk: every run alone
    chunks = list(engine.merged_chunks(starts, single, lambda start: 1))
    assert sorted(len(chunk) for chunk in chunks) == [1] * 6


def test_plain_callable_metric_equals_position_metric(tiny_llama):
    base, cache, metric, positions, g = random_case(tiny_llama, 3)
    runs = random_runs(tiny_llama, cache, g, base.shape[1])
    fast = run_interventions(tiny_llama, base, runs, metric, positions=positions, progress=False)
    full = run_interventions(
        tiny_llama, base, runs, lambda logits: metric(logits), positions=positions, progress=False
    )
    assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_grouped_query_key_is_shared_by_its_group(tiny_llama):
    # Head(l, h).k addresses the key/value head that query head h reads: the two query heads of
    # a group give the same result, a head of another group a different one.
    cfg = tiny_llama.cfg
    group = cfg.n_heads // cfg.n_key_value_heads
    assert group > 1
    base, cache, metric, positions, _ = random_case(tiny_llama, 5)
    k1 = cache["blocks.1.attn.hook_k"]
    assert k1.shape[2] == cfg.n_key_value_heads
    runs = [[Intervention(Head(1, h).k, Patch(k1))] for h in range(cfg.n_heads)]
    values = run_interventions(tiny_llama, base, runs, metric, progress=False)
    assert equal(values[0], values[group - 1])
    assert not allclose(values[0], values[group])


def _snapshot(model):
    hooks = {
        name: (len(hp._forward_hooks), len(hp._backward_hooks), len(hp.fwd_hooks))
        for name, hp in model.hook_dict.items()
    }
    return hooks, copy.deepcopy(model.state_dict()), model.training, copy.deepcopy(model.cfg)


def _assert_unchanged(model, snapshot):
    hooks, state, training, cfg = snapshot
    now = _snapshot(model)
    assert now[0] == hooks
    assert now[2] == training
    assert now[3] == cfg
    for name, tensor in state.items():
        assert equal(now[1][name], tensor), name


def test_model_unchanged_after_success_and_errors(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 11)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    snapshot = _snapshot(tiny_gpt2)
    for reference in (False, True):
        run_interventions(
            tiny_gpt2, base, runs, metric, positions=positions, progress=False, reference=reference
        )
        _assert_unchanged(tiny_gpt2, snapshot)

        def broken(logits):
            raise RuntimeError("metric failed")

        with pytest.raises(RuntimeError, match="metric failed"):
            run_interventions(
                tiny_gpt2,
                base,
                runs,
                broken,
                positions=positions,
                progress=False,
                reference=reference,
            )
        _assert_unchanged(tiny_gpt2, snapshot)

        with pytest.raises(MetricError, match=r"shape \(4,\)"):
            run_interventions(
                tiny_gpt2,
                base,
                runs,
                lambda logits: logits[:, -1],
                progress=False,
                positions=positions,
                reference=reference,
            )
        _assert_unchanged(tiny_gpt2, snapshot)


def test_metric_of_the_wrong_shape_fails_before_any_patched_run(tiny_gpt2, monkeypatch):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 3)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    chunks, forwards = [], []
    run_blocks, run_with_hooks = engine.run_blocks, tiny_gpt2.run_with_hooks

    def counted_chunk(*args, **kwargs):
        chunks.append(1)
        return run_blocks(*args, **kwargs)

    def counted_forward(*args, **kwargs):
        forwards.append(1)
        return run_with_hooks(*args, **kwargs)

    monkeypatch.setattr(engine, "run_blocks", counted_chunk)
    monkeypatch.setattr(tiny_gpt2, "run_with_hooks", counted_forward)
    one_number = Metric("mean_diff", metric.positions, lambda at: metric.fn(at).mean())
    for bad in (lambda logits: logits[:, -1, 0].mean(), one_number):
        for reference in (False, True):
            with pytest.raises(MetricError) as caught:
                run_interventions(tiny_gpt2, base, runs, bad, reference=reference, progress=False)
            assert str(caught.value).startswith(
                "run_interventions: the metric must return one value per example, shape (4,), "
                "but it returned a tensor of shape () (one number for the whole batch"
            )
    assert chunks == [] and forwards == []
    # a good metric does run the chunks, so the counts can tell
    run_interventions(tiny_gpt2, base, runs[:2], metric, progress=False)
    assert chunks


def test_errors_name_the_function_the_user_called(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 4)
    runs = [[Intervention(Attn(0), Zero())]]

    def not_per_example(logits):
        return logits[:, -1]

    with pytest.raises(MetricError, match=r"^my_method: the metric must return"):
        run_interventions(tiny_gpt2, base, runs, not_per_example, where="my_method")
    with pytest.raises(MetricError, match=r"^my_sweep \(heads\): the metric must return"):
        run_interventions(tiny_gpt2, base, runs, not_per_example, desc="my_sweep (heads)")
    with pytest.raises(ShapeError, match=r"^my_method: tokens must be an integer"):
        run_interventions(tiny_gpt2, base.float(), runs, metric, where="my_method")

    def not_finite(logits):
        return logits[:, -1, 0] / 0.0

    with pytest.raises(MetricError, match=r"^my_method: the metric returned NaN or infinite"):
        run_interventions(tiny_gpt2, base, runs, not_finite, where="my_method")


def test_user_hooks_are_kept(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 2)
    calls = []
    tiny_gpt2.add_hook("blocks.0.hook_resid_pre", lambda act, hook: calls.append(1))
    try:
        run_interventions(
            tiny_gpt2, base, [[Intervention(Attn(1), Zero())]], metric, progress=False
        )
        assert len(tiny_gpt2.hook_dict["blocks.0.hook_resid_pre"].fwd_hooks) == 1
    finally:
        tiny_gpt2.reset_hooks()


@pytest.mark.parametrize("reference", [False, True])
def test_nan_in_result_is_an_error(tiny_gpt2, reference):
    # finite on the base run, NaN wherever a run changes the metric: only the check of the
    # patched runs' values can catch it
    base, cache, metric, positions, g = random_case(tiny_gpt2, 1)
    unpatched = metric(tiny_gpt2(base))

    def fn(logits_at):
        changed = (metric.fn(logits_at) - unpatched).abs() > 1e-3
        return torch.where(changed, math.nan, 0.0)

    nan_when_changed = Metric("nan_when_changed", metric.positions, fn)
    runs = [[], [Intervention(Head(1, 1), Zero())]]
    with pytest.raises(MetricError, match="the metric returned NaN or infinite values"):
        run_interventions(
            tiny_gpt2, base, runs, nan_when_changed, reference=reference, progress=False
        )


@pytest.mark.parametrize(
    "component, message",
    [
        (Head(7, 0), r"layer 7 is out of range; this model has layers 0\.\.2"),
        (Head(0, 9), r"head 9 is out of range; layer 0 has heads 0\.\.3"),
        (Neuron(0, 10_000), r"neuron 10000 is out of range"),
        (Resid(-2), r"layer -2 is out of range"),
    ],
)
def test_bad_addresses(tiny_gpt2, component, message):
    base, cache, metric, _, _ = random_case(tiny_gpt2, 0)
    with pytest.raises(ComponentError, match=message):
        run_interventions(tiny_gpt2, base, [[Intervention(component, Zero())]], metric)


def test_bad_positions_and_values(tiny_gpt2):
    base, cache, metric, positions, _ = random_case(tiny_gpt2, 0)
    z = cache["blocks.0.attn.hook_z"]
    with pytest.raises(ComponentError, match="unknown position word 'S9'"):
        run_interventions(
            tiny_gpt2,
            base,
            [Intervention(Head(0, 0, pos="S9"), Zero())],
            metric,
            positions=positions,
        )
    with pytest.raises(ComponentError, match="outside the prompt"):
        run_interventions(tiny_gpt2, base, [Intervention(Head(0, 0, pos=40), Zero())], metric)
    with pytest.raises(ShapeError, match="expected"):
        run_interventions(tiny_gpt2, base, [Intervention(Head(0, 0), Patch(z[:2]))], metric)
    with pytest.raises(ShapeError, match="does not broadcast"):
        run_interventions(tiny_gpt2, base, [Intervention(Attn(0), SetTo(torch.ones(3)))], metric)
    with pytest.raises(ComponentError, match="same activation entries"):
        run_interventions(
            tiny_gpt2,
            base,
            [[Intervention(Head(0, 0), Zero()), Intervention(Head(0, 0, pos=1), Scale(2.0))]],
            metric,
        )
    with pytest.raises(ShapeError, match="made for 4 examples"):
        run_interventions(tiny_gpt2, base[:2], [Intervention(Attn(0), Zero())], metric)
    with pytest.raises(ShapeError, match=r"integer \[n, pos\]"):
        run_interventions(tiny_gpt2, base.float(), [Intervention(Attn(0), Zero())], metric)


@pytest.mark.real
def test_fast_path_equals_reference_on_smollm(smollm):
    base, cache, metric, positions, g = random_case(smollm, 123, n=2, n_pos=9)
    cfg = smollm.cfg
    runs = [
        [Intervention(Head(layer, h, part).at(p), Patch(cache[f"blocks.{layer}.attn.hook_{part}"]))]
        for layer, h, part, p in [
            (0, 4, "z", None),
            (3, 8, "q", 5),
            (5, 2, "k", "end"),
            (11, 7, "v", None),
            (17, 0, "pattern", 8),
            (29, 3, "z", "end"),
        ]
    ]
    runs += [
        [Intervention(Resid(14, "mid", pos="end"), Patch(cache["blocks.14.hook_resid_mid"]))],
        [Intervention(Neuron(20, 1000), Scale(5.0)), Intervention(Attn(20), Zero())],
        [Intervention(ck.MLP(2, pos=(1, 3)), Add(torch.randn(cfg.d_model, generator=g)))],
        [],
    ]
    kwargs = dict(positions=positions, progress=False)
    reference = run_interventions(smollm, base, runs, metric, reference=True, **kwargs)
    fast = run_interventions(smollm, base, runs, metric, **kwargs)
    assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    assert (fast[:-1] - fast[-1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# record_activations


RECORDED = [
    Head(1, 2).q,
    Head(2, 0).k,
    Resid(0, "post"),
    Attn(1),
    Embed(),
    Head(1, 3).q.at("end"),  # the same hook as Head(1, 2).q: one shared tensor
]


@settings(
    max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**16))
def test_recording_fast_path_equals_reference(tiny_model, seed):
    base, cache, metric, positions, g = random_case(tiny_model, seed)
    runs = random_runs(tiny_model, cache, g, base.shape[1])
    kwargs = dict(positions=positions, progress=False)
    reference = record_activations(tiny_model, base, runs, RECORDED, reference=True, **kwargs)
    fast = record_activations(tiny_model, base, runs, RECORDED, max_runs_per_chunk=4, **kwargs)
    assert fast[0] is fast[-1]
    _, full_cache = tiny_model.run_with_cache(base)
    for component, got, expected in zip(RECORDED, fast, reference, strict=True):
        base_act = full_cache[component.hook_name(tiny_model)]
        assert got.shape == (len(runs), *base_act.shape)
        # float32 rounding: the fast path computes the blocks with other kernels
        assert_close(got, expected, atol=1e-4, rtol=1e-4)
        # the unpatched run records the plain model's activation; some runs change it
        assert_close(got[-1], base_act, atol=1e-4, rtol=1e-4)
    assert (fast[0][:-1] - fast[0][-1]).abs().max() > 1e-3


def test_recording_sees_the_interventions_and_chunks_do_not_matter(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 4)
    runs = [
        [Intervention(Attn(1), Zero())],
        [Intervention(Attn(1, pos=(0, 2)), Scale(2.0))],
        [Intervention(Head(0, 1), Patch(cache["blocks.0.attn.hook_z"]))],
        [],
    ]
    components = [Attn(1), Resid(2, "pre")]
    kwargs = dict(positions=positions, progress=False)
    attn, resid = record_activations(tiny_gpt2, base, runs, components, **kwargs)
    _, base_cache = tiny_gpt2.run_with_cache(base)
    assert equal(attn[0], torch.zeros_like(attn[0]))
    assert_close(attn[1][:, (0, 2)], 2 * base_cache["blocks.1.hook_attn_out"][:, (0, 2)])
    one_at_a_time = record_activations(
        tiny_gpt2, base, runs, components, max_runs_per_chunk=1, **kwargs
    )
    with pytest.warns(UserWarning, match="memory_budget of 1 B cannot be met"):
        tiny_budget = record_activations(
            tiny_gpt2, base, runs, components, memory_budget=1, **kwargs
        )
    for a, b, c in zip([attn, resid], one_at_a_time, tiny_budget, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert equal(b, c)
    empty = record_activations(tiny_gpt2, base, [], components)
    assert [tuple(e.shape) for e in empty] == [(0, *attn.shape[1:]), (0, *resid.shape[1:])]


def test_only_unpatched_runs(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 6)
    values = run_interventions(tiny_gpt2, base, [[], []], metric, progress=False)
    assert_close(values, metric(tiny_gpt2(base)).expand(2, -1))


def test_recording_leaves_the_model_unchanged_and_checks_its_input(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 8)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    snapshot = _snapshot(tiny_gpt2)
    for reference in (False, True):
        record_activations(
            tiny_gpt2,
            base,
            runs,
            RECORDED,
            positions=positions,
            reference=reference,
            progress=False,
        )
        _assert_unchanged(tiny_gpt2, snapshot)
        with pytest.raises(ComponentError, match="unknown position word 'end'"):
            record_activations(tiny_gpt2, base, runs, RECORDED, reference=reference)
        _assert_unchanged(tiny_gpt2, snapshot)
    with pytest.raises(ck.CircuitkitError, match="record_activations: record must be a non-empty"):
        record_activations(tiny_gpt2, base, runs, [])
    with pytest.raises(ComponentError, match="layer 3 is out of range"):
        record_activations(tiny_gpt2, base, runs, [Resid(3)])
    with pytest.raises(ShapeError, match=r"record_activations: tokens must be an integer"):
        record_activations(tiny_gpt2, base.float(), runs, [Resid(1)])


# ---------------------------------------------------------------------------------------------
# Precision: bfloat16 models and TF32 matrix products


def test_bfloat16_model_fast_path_equals_reference(tiny_model):
    base, cache, metric, positions, g = random_case(tiny_model, 21)
    runs = random_runs(tiny_model, cache, g, base.shape[1])
    exact = run_interventions(tiny_model, base, runs, metric, positions=positions, progress=False)
    model = tiny_model.to(torch.bfloat16)
    _, cache16 = model.run_with_cache(base)
    assert cache16["blocks.0.attn.hook_z"].dtype == torch.bfloat16
    kwargs = dict(positions=positions, progress=False)
    reference = run_interventions(model, base, runs, metric, reference=True, **kwargs)
    fast = run_interventions(model, base, runs, metric, max_runs_per_chunk=5, **kwargs)
    assert fast.dtype == reference.dtype == torch.float32
    spread = exact.std().item()
    # bfloat16 keeps 8 bits of mantissa: both paths agree with each other and with float32 to
    # a few percent of the spread of the results, far less than the runs differ by
    assert (fast - reference).abs().max() < 0.1 * spread
    assert (fast - exact).abs().max() < 0.15 * spread
    assert (exact[:-1] - exact[-1]).abs().max() > 0.5 * spread


def test_tf32_is_scoped_and_keeps_results_close(tiny_gpt2):
    before = torch.get_float32_matmul_precision()
    base, cache, metric, positions, g = random_case(tiny_gpt2, 22)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    kwargs = dict(positions=positions, progress=False)
    exact = run_interventions(tiny_gpt2, base, runs, metric, **kwargs)
    with ck.tf32():
        assert torch.get_float32_matmul_precision() == "high"
        fast = run_interventions(tiny_gpt2, base, runs, metric, **kwargs)
    assert torch.get_float32_matmul_precision() == before
    assert_close(fast, exact, atol=1e-2 * exact.std().item(), rtol=1e-2)
    with pytest.raises(RuntimeError, match="inside"):
        with ck.tf32():
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("seed", [0, 1])
def test_recording_up_to_last_positions(tiny_model, seed):
    base, cache, metric, positions, g = random_case(tiny_model, seed, n=5, n_pos=8)
    runs = random_runs(tiny_model, cache, g, base.shape[1])
    last = torch.randint(0, base.shape[1], (base.shape[0],), generator=g)
    last[0] = base.shape[1] - 1  # one example recorded whole
    kwargs = dict(positions=positions, progress=False)
    recorded = [Head(1, 2).q, Head(2, 1).pattern, Resid(1, "post"), Embed()]
    full = record_activations(tiny_model, base, runs, recorded, **kwargs)
    fast = record_activations(
        tiny_model, base, runs, recorded, last_positions=last, max_runs_per_chunk=7, **kwargs
    )
    slow = record_activations(
        tiny_model, base, runs, recorded, last_positions=last, reference=True, **kwargs
    )
    _, base_cache = tiny_model.run_with_cache(base)
    for component, whole, got, expected in zip(recorded, full, fast, slow, strict=True):
        assert_close(got, expected, atol=1e-4, rtol=1e-4)
        base_act = base_cache[component.hook_name(tiny_model)]
        for i, stop in enumerate((last + 1).tolist()):
            up_to = [slice(None)] * (component.pos_dim - 1) + [slice(None, stop)]
            after = [slice(None)] * (component.pos_dim - 1) + [slice(stop, None)]
            assert_close(
                got[(slice(None), i, *up_to)], whole[(slice(None), i, *up_to)], atol=1e-4, rtol=1e-4
            )
            assert_close(
                got[(slice(None), i, *after)],
                base_act[(i, *after)].expand_as(got[(slice(None), i, *after)]),
            )
        # the runs change the positions that are recorded, so the comparison can fail
        assert (whole[:-1] - whole[-1]).abs().max() > 1e-3
    with pytest.raises(ShapeError, match="last_positions must lie in 0..7"):
        record_activations(tiny_model, base, runs, recorded, last_positions=last + 8, **kwargs)


# ---------------------------------------------------------------------------------------------
# Plain callable metrics: probed for the positions they read


def plain_metrics(model, base, metric):
    """Plain callables as users write them, by the positions of the logits they read."""
    n, n_pos = base.shape
    rows = torch.arange(n)
    read = metric.positions  # per example, as a dataset's "end"
    a, b = 3, 11
    return {
        "last": lambda logits: logits[:, -1, a] - logits[:, -1, b],
        "per_example": lambda logits: logits[rows, read, a] - logits[rows, read, b],
        "several": lambda logits: (
            logits[:, 1, a] + logits[:, 3].log_softmax(-1)[:, b] - logits[:, -1].logsumexp(-1)
        ),
        "per_example_several": lambda logits: logits[rows, read, a] + logits[rows, read - 1, b],
        "every_position": lambda logits: (logits[:, :, a] - logits[:, :, b]).mean(dim=1),
    }


# what each plain metric reads: positions per example, and vocabulary entries at each of them
# (None: the whole vocabulary, which a softmax reads)
PLAIN_READS = {
    "last": (1, 2),
    "per_example": (1, 2),
    "several": (3, None),
    "per_example_several": (2, 1),
    "every_position": ("all", 2),
}


def _returns_of(monkeypatch, name: str) -> list:
    """What each call of the engine's function ``name`` returns, in order."""
    returned = []
    function = getattr(engine, name)

    def spy(*args, **kwargs):
        returned.append(function(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(engine, name, spy)
    return returned


def _unembedded_positions(monkeypatch):
    """The number of positions of each residual stream the engine unembeds whole."""
    counts = []
    unembed = engine.unembed_residual

    def counted(model, residual, base=None):
        counts.append(residual.shape[-2])
        return unembed(model, residual, base)

    monkeypatch.setattr(engine, "unembed_residual", counted)
    return counts


@pytest.mark.parametrize("kind", list(PLAIN_READS))
def test_plain_callable_reads_only_its_positions(tiny_model, kind, monkeypatch):
    """A plain callable gets the logits of what the probe finds it reads on the base run alone:
    a few positions, and at those a few vocabulary entries, with the values of full logits."""
    base, cache, metric, positions, g = random_case(tiny_model, 31)
    runs = random_runs(tiny_model, cache, g, base.shape[1])
    fn = plain_metrics(tiny_model, base, metric)[kind]
    kwargs = dict(positions=positions, progress=False)
    reference = run_interventions(tiny_model, base, runs, fn, reference=True, **kwargs)
    counts = _unembedded_positions(monkeypatch)
    chosen = _returns_of(monkeypatch, "_probed_metric")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the probe found what the metric reads
        fast = run_interventions(tiny_model, base, runs, fn, max_runs_per_chunk=5, **kwargs)
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert (fast[:-1] - fast[-1]).abs().max() > 1e-3  # the runs change the metric
    k, m = PLAIN_READS[kind]
    k = base.shape[1] if k == "all" else k
    [probed] = chosen
    assert isinstance(probed, engine._ProbedMetric)
    assert probed.positions.shape == (base.shape[0], k)
    # the probe unembeds the base run whole; a chunk, the positions read or none of them
    assert counts[0] == base.shape[1]
    if m is None:
        assert probed.columns is None
        assert len(counts) > 1 and max(counts[1:]) <= k
    else:
        assert probed.columns.shape == (base.shape[0], k, m)
        assert counts == [base.shape[1]]


def test_plain_lambda_equals_metric(tiny_gpt2):
    # the same logit difference at the last position, as a lambda and as a Metric
    base, cache, metric, positions, g = random_case(tiny_gpt2, 32)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    n, n_pos = base.shape
    diff = Metric("diff", torch.full((n,), n_pos - 1), lambda at: at[..., 5] - at[..., 8])
    kwargs = dict(positions=positions, progress=False)
    as_metric = run_interventions(tiny_gpt2, base, runs, diff, **kwargs)
    as_lambda = run_interventions(
        tiny_gpt2, base, runs, lambda logits: logits[:, -1, 5] - logits[:, -1, 8], **kwargs
    )
    assert_close(as_lambda, as_metric, atol=1e-5, rtol=1e-5)


def _falls_back(model, base, runs, fn, match, **kwargs):
    """The fast path's values, after checking that it warns exactly once, saying ``match``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = run_interventions(model, base, runs, fn, max_runs_per_chunk=5, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"run_interventions: the metric {match}")
    assert "computing full logits (about " in messages[0]
    assert "pass a ck.metrics.Metric to read only some" in messages[0]
    return fast


def test_plain_callable_that_reads_everything_falls_back(tiny_model):
    base, cache, metric, positions, g = random_case(tiny_model, 33)
    runs = random_runs(tiny_model, cache, g, base.shape[1])
    kwargs = dict(positions=positions, progress=False)

    def everywhere(logits):
        return logits.log_softmax(-1)[..., 7].mean(dim=1)

    reference = run_interventions(tiny_model, base, runs, everywhere, reference=True, **kwargs)
    fast = _falls_back(tiny_model, base, runs, everywhere, "reads every position", **kwargs)
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_plain_callables_the_probe_cannot_confirm_fall_back(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 34)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    kwargs = dict(positions=positions, progress=False)
    big = float(tiny_gpt2(base).detach().abs().max()) * 2

    def argmax(logits):  # no gradient
        return (logits[:, -1].argmax(-1) % 2).float()

    def gated(logits):  # reads position 0, where its gradient is zero
        return logits[:, -1, 2] * (logits[:, 0, 0] < big).float()

    def in_place(logits):  # changes its input: no gradient can be taken
        logits -= logits.logsumexp(-1, keepdim=True)
        return logits[:, -1, 2]

    for fn, match in [
        (argmax, "cannot be differentiated"),
        (gated, "reads positions of the logits where its gradient is zero"),
        (in_place, "cannot be differentiated"),
    ]:
        reference = run_interventions(tiny_gpt2, base, runs, fn, reference=True, **kwargs)
        fast = _falls_back(tiny_gpt2, base, runs, fn, match, **kwargs)
        assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_metric_that_runs_the_model_sees_the_plain_model(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 35)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    n, n_pos = base.shape

    def plain(logits):
        return tiny_gpt2(base)[:, -1, 0] + 0 * logits[:, -1, 0]

    as_metric = Metric(
        "model", torch.full((n,), n_pos - 1), lambda at: tiny_gpt2(base)[:, -1, 0] + 0 * at[..., 0]
    )
    unpatched = tiny_gpt2(base)[:, -1, 0]
    for fn in (plain, as_metric):
        kwargs = dict(positions=positions, progress=False)
        reference = run_interventions(tiny_gpt2, base, runs, fn, reference=True, **kwargs)
        fast = run_interventions(tiny_gpt2, base, runs, fn, max_runs_per_chunk=5, **kwargs)
        assert_close(fast, reference, atol=1e-5, rtol=1e-5)
        # no run's interventions reach the model the metric runs
        assert_close(fast, unpatched.expand_as(fast), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Token ids, memory budgets and sizes checked up front


def test_bad_token_ids_are_refused_by_every_entry_point(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 36)
    runs = [[Intervention(Attn(0), Zero())]]
    vocab = tiny_gpt2.cfg.d_vocab
    negative, past_vocab = base.clone(), base.clone()
    negative[1, 2] = -1
    past_vocab[0, 3] = vocab
    calls = {
        "run_interventions": lambda tokens: run_interventions(tiny_gpt2, tokens, runs, metric),
        "record_activations": lambda tokens: record_activations(tiny_gpt2, tokens, runs, [Attn(0)]),
    }
    for where, call in calls.items():
        with pytest.raises(ck.CircuitkitError, match=rf"^{where}: tokens holds token ids from -1"):
            call(negative)
        with pytest.raises(
            ck.CircuitkitError, match=rf"^{where}: .* to {vocab}, outside the valid range \[0, "
        ):
            call(past_vocab)
        for dtype in (torch.bool, torch.complex64):
            with pytest.raises(ShapeError, match=rf"^{where}: tokens must be an integer .*{dtype}"):
                call(base.to(dtype))
        with pytest.raises(ShapeError, match=rf"^{where}: tokens has no examples"):
            call(base[:0])
        with pytest.raises(ShapeError, match=rf"^{where}: tokens has no positions"):
            call(base[:, :0])
    # int32 ids are ids
    int32 = run_interventions(tiny_gpt2, base.int(), runs, metric, progress=False)
    assert equal(int32, run_interventions(tiny_gpt2, base, runs, metric, progress=False))


@pytest.mark.parametrize("budget", ["1GB", -1, 0, math.nan, math.inf, 1.5, True, [1]])
def test_bad_memory_budgets(tiny_gpt2, budget):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 37)
    runs = [[Intervention(Attn(0), Zero())]]
    with pytest.raises(ck.CircuitkitError, match=r"^run_interventions: memory_budget must be a"):
        run_interventions(tiny_gpt2, base, runs, metric, memory_budget=budget)
    with pytest.raises(ck.CircuitkitError, match=r"^record_activations: memory_budget must be a"):
        record_activations(tiny_gpt2, base, runs, [Attn(1)], memory_budget=budget)


def test_whole_float_memory_budget_is_a_number_of_bytes(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 38)
    runs = [[Intervention(Attn(0), Zero())], []]
    as_float = run_interventions(tiny_gpt2, base, runs, metric, memory_budget=1e9, progress=False)
    as_int = run_interventions(tiny_gpt2, base, runs, metric, memory_budget=10**9, progress=False)
    assert equal(as_float, as_int)


class _ManyRuns(Sequence):
    """A sequence of many unpatched runs that fails if any of them is read."""

    def __init__(self, n_runs):
        self.n_runs = n_runs

    def __len__(self):
        return self.n_runs

    def __getitem__(self, index):
        raise AssertionError("a run was read before the call was refused")


def test_huge_calls_are_refused_up_front(tiny_gpt2):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 39)
    # results are made on the model's device first: on a GPU its memory is checked first
    memory = r"GPU memory \(cuda[:0-9]*\)" if DEVICE.startswith("cuda") else "CPU memory"
    with pytest.raises(
        ck.CircuitkitError,
        match=rf"^run_interventions: 1,000,000,000,000 runs need about .* TiB of {memory} for "
        r"their results, but .* is available; split the runs",
    ):
        run_interventions(tiny_gpt2, base, _ManyRuns(10**12), metric)
    with pytest.raises(
        ck.CircuitkitError,
        match=r"^record_activations: 1,000,000,000 runs need about .* for the recorded activations",
    ):
        # more than any GPU's memory holds too
        record_activations(tiny_gpt2, base, _ManyRuns(10**9), [Resid(1)])


@pytest.mark.parametrize("reads", ["two logits", "a softmax"])
def test_budget_holds_the_base_runs_cached_activations(tiny_gpt2, monkeypatch, reads):
    base, cache, metric, positions, g = random_case(tiny_gpt2, 40)
    runs = random_runs(tiny_gpt2, cache, g, base.shape[1])
    n = base.shape[0]
    if reads == "a softmax":  # reads every logit: the whole unembedding is laid out and kept
        metric = Metric("logsumexp", metric.positions, lambda at: at.logsumexp(-1))
    with torch.no_grad():
        base_run = engine.base_run(tiny_gpt2, base)
        if reads == "a softmax":
            final = base_run.resid[tiny_gpt2.cfg.n_layers]
            engine.read_metric(tiny_gpt2, final, metric, 1, n, 0, base_run)  # lays it out
    kept = engine.kept_bytes(base_run)
    assert kept > 0
    budgets = []
    runs_per_chunk = engine.runs_per_chunk

    def spied(model, per_run, memory_budget, max_runs):
        budgets.append((per_run, memory_budget))
        return runs_per_chunk(model, per_run, memory_budget, max_runs)

    monkeypatch.setattr(engine, "runs_per_chunk", spied)
    kwargs = dict(positions=positions, progress=False)
    enough = 1024**3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide = run_interventions(tiny_gpt2, base, runs, metric, memory_budget=enough, **kwargs)
    # chunks are sized to what the cached activations and the patched-in values leave
    values = {}
    for run in runs:
        for intervention in run if isinstance(run, (list, tuple)) else [run]:
            tensor = value_tensor(intervention.value)
            if tensor is not None:
                values[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    assert values  # the runs patch cached activations in
    assert budgets and {budget for _, budget in budgets} == {enough - kept - sum(values.values())}
    one_run = max(per_run for per_run, _ in budgets)
    # a budget that holds one run but not the cached activations too: one warning, same values
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        narrow = run_interventions(tiny_gpt2, base, runs, metric, memory_budget=one_run, **kwargs)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith("run_interventions: memory_budget of ")
    assert "the base run's cached activations and the runs' values take " in messages[0]
    assert_close(narrow, wide, atol=1e-5, rtol=1e-5)


def test_the_chunk_loop_never_waits_for_the_device(tiny_model, monkeypatch):
    """Reading a device tensor on the host (``.item()``, ``bool()``, ``nonzero``) waits for the
    GPU to finish its queue; the chunk loop makes none, so the host queues the next chunk while
    the GPU computes: a sweep of many chunks reads as often as one run does. Counted on any
    device: the same calls would wait on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "is_nonzero"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    base, cache, metric, positions, g = random_case(tiny_model, 17)
    runs = [
        [Intervention(comp, Patch(cache[comp.hook_name(tiny_model)]))]
        for layer in range(tiny_model.cfg.n_layers)
        for pos in range(base.shape[1])
        for comp in (Head(layer, 1, pos=pos), Resid(layer, "pre", pos=pos))
    ]
    run_fast = engine._run_fast

    def counted(*args, **kwargs):
        with CountReads():
            return run_fast(*args, **kwargs)

    monkeypatch.setattr(engine, "_run_fast", counted)
    run_interventions(tiny_model, base, runs[:1], metric, positions=positions, progress=False)
    one_run = list(reads)
    reads.clear()
    fast = run_interventions(tiny_model, base, runs, metric, positions=positions, progress=False)
    # the metric's read positions checked before the loop, every result checked after it
    assert reads == one_run and len(reads) <= 2
    reference = run_interventions(
        tiny_model, base, runs, metric, positions=positions, reference=True, progress=False
    )
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def _column_metrics(model, n: int, g):
    """Metrics at each example's last position: a difference of two logits, one logit per
    example from a few, one that reads the whole vocabulary, and two whose gradient hides
    what they read (an argmax; a logit compared with every other)."""
    vocab = model.cfg.d_vocab
    a, b = torch.randint(0, vocab, (2, n), generator=g)
    few = torch.randint(0, vocab, (n, 3), generator=g)

    def pick(logits_at, tokens):
        index = tokens.to(logits_at.device).expand(*logits_at.shape[:-2], n)[..., None]
        return logits_at.gather(-1, index)[..., 0]

    return {
        "difference": lambda at: pick(at, a) - pick(at, b),
        # example i reads 1, 2 or 3 entries: a sum over its first (i % 3) + 1 of ``few``
        "uneven": lambda at: sum(
            torch.where(torch.arange(n, device=at.device) % 3 >= j, pick(at, few[:, j]), 0.0)
            for j in range(3)
        ),
        "logprob": lambda at: pick(torch.log_softmax(at, -1), a),
        "argmax": lambda at: at.argmax(-1).float(),
        "beats the rest": lambda at: pick(at, a) - at.max(-1).values,
    }


@pytest.mark.parametrize("name", ["difference", "uneven", "logprob", "argmax", "beats the rest"])
def test_metrics_of_a_few_logits_unembed_those_alone(tiny_model, monkeypatch, name):
    """A ``Metric`` confirmed on the base run to read a few vocabulary entries gets the logits of
    those alone, exactly; any other gets the whole vocabulary."""
    base, cache, _, positions, g = random_case(tiny_model, 23)
    n, n_pos = base.shape
    fn = _column_metrics(tiny_model, n, g)[name]
    metric = Metric(name, torch.full((n,), n_pos - 1), fn)
    runs = random_runs(tiny_model, cache, g, n_pos)
    chosen = _returns_of(monkeypatch, "_column_metric")
    fast = run_interventions(tiny_model, base, runs, metric, positions=positions, progress=False)
    reference = run_interventions(
        tiny_model, base, runs, metric, positions=positions, reference=True, progress=False
    )
    assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    columns = name in ("difference", "uneven")
    assert isinstance(chosen[0], engine._ColumnMetric) == columns
    if columns:
        assert chosen[0].columns.shape == (n, 2 if name == "difference" else 3)
    if name != "argmax":
        assert (reference - reference[:1]).abs().max() > 1e-3  # the runs differ
