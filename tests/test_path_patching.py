"""Path patching: the batched engine path against the plain two-forwards-per-sender reference,
and identities that pin down what a direct path is."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _device import assert_close, equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.metrics import Metric


class Data:
    """A dataset-like object: tokens and per-example word positions."""

    def __init__(self, tokens, positions):
        self.tokens = tokens
        self.positions = positions


def random_pair(model, seed: int, n: int = 3, n_pos: int = 6):
    """Clean and corrupted datasets with words "X" and "end", and a logit-difference metric."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, vocab, (n, 3), generator=g)
    end = torch.randint(n_pos - 2, n_pos, (n,), generator=g)
    positions = {"X": torch.randint(1, 4, (n,), generator=g), "end": end}
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]

        def pick(tokens):
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return pick(a) - pick(b)

    metric = Metric("diff", end, fn)
    return Data(clean, positions), Data(corrupted, positions), metric, g


def both(model, clean, corrupted, senders, receivers, metric, **kwargs):
    """The fast result and the reference result of one call."""
    kwargs.setdefault("progress", False)
    fast = ck.path_patching(model, clean, corrupted, senders, receivers, metric, **kwargs)
    slow = ck.path_patching(
        model, clean, corrupted, senders, receivers, metric, reference=True, **kwargs
    )
    return fast, slow


def random_senders(model, g):
    """Single senders and sender sets, with positions, in the layers before the receivers."""
    cfg = model.cfg

    def rand(k: int) -> int:
        return int(torch.randint(0, k, (1,), generator=g))

    pos = [None, "X", 2, (1, 3), slice(0, 4)]
    senders: list = [ck.Head(layer, rand(cfg.n_heads)).at(pos[rand(5)]) for layer in range(2)]
    # a set across layers: the later head is held at its base value outside its own entries
    senders.append({ck.Head(0, rand(cfg.n_heads)), ck.Head(1, rand(cfg.n_heads)).at("X")})
    senders.append([ck.Head(0, 0), ck.Head(0, 1).at(3)])  # two heads of one layer together
    if not cfg.attn_only:
        senders.append(ck.MLP(rand(2)).at(pos[rand(5)]))
        senders.append({ck.MLP(0), ck.Head(1, rand(cfg.n_heads))})
    return senders


def random_receivers(model, g):
    cfg = model.cfg

    def rand(k: int) -> int:
        return int(torch.randint(0, k, (1,), generator=g))

    pos = [None, "end", "X", 4]
    receivers = [
        ck.Head(2, rand(cfg.n_heads), part).at(pos[rand(4)])
        for part in ("q", "k", "v")
        if rand(3) or part == "q"
    ]
    receivers.append(ck.Head(1, rand(cfg.n_heads)).v)
    return receivers


@settings(
    max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**16), direction=st.sampled_from(["noise", "denoise"]))
def test_fast_equals_reference(tiny_model, seed, direction):
    clean, corrupted, metric, g = random_pair(tiny_model, seed)
    senders = random_senders(tiny_model, g)
    receivers = random_receivers(tiny_model, g)
    for sends, receives in [
        ("heads", "logits"),
        (senders, "logits"),
        ("heads", receivers),
        (senders, receivers),
        (senders, ck.Resid(2, "post").at("end")),
    ]:
        fast, slow = both(
            tiny_model, clean, corrupted, sends, receives, metric, direction=direction
        )
        assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
        # the experiments differ, so the comparison can fail
        assert fast.examples.std() > 1e-4, (sends, receives)


def test_mlp_senders_equal_reference(tiny_model):
    clean, corrupted, metric, g = random_pair(tiny_model, 1)
    if tiny_model.cfg.attn_only:
        with pytest.raises(ComponentError, match="senders='mlps': .*attention-only"):
            ck.path_patching(tiny_model, clean, corrupted, "mlps", "logits", metric)
        return
    for receivers in ("logits", [ck.Head(2, 1).q.at("end"), ck.Head(2, 3).k]):
        fast, slow = both(tiny_model, clean, corrupted, "mlps", receivers, metric)
        assert fast.axes == ("layer",)
        assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
        assert fast.examples.std() > 1e-4


def test_last_layer_sender_to_logits_is_activation_patching(tiny_model):
    # A sender in the last layer reaches the logits only directly (and through its own
    # layer's MLP, which path patching recomputes too), so path patching it to the logits is
    # activation patching it (noising).
    clean, corrupted, metric, _ = random_pair(tiny_model, 2)
    last = tiny_model.cfg.n_layers - 1
    senders = [ck.Head(last, h) for h in range(tiny_model.cfg.n_heads)]
    senders.append(ck.Head(last, 1).at("X"))
    if not tiny_model.cfg.attn_only:
        senders.append(ck.MLP(last).at((2, 4)))
    kwargs = dict(metric=metric, progress=False)
    path = ck.path_patching(tiny_model, clean, corrupted, senders, "logits", **kwargs)
    act = ck.activation_patching(tiny_model, clean, corrupted, senders, direction="noise", **kwargs)
    assert_close(path.examples, act.examples, atol=1e-5, rtol=1e-5)
    # and not in an earlier layer, where other heads pass the change on
    early = [ck.Head(0, h) for h in range(tiny_model.cfg.n_heads)]
    path = ck.path_patching(tiny_model, clean, corrupted, early, "logits", **kwargs)
    act = ck.activation_patching(tiny_model, clean, corrupted, early, direction="noise", **kwargs)
    assert (path.examples - act.examples).abs().max() > 1e-3


def test_attention_only_direct_effect_is_the_sender_output_difference(tiny_attn_only):
    # Without MLPs the direct path is the residual stream alone: the final residual stream is
    # the clean one plus the change in the sender's output projected by its W_O.
    model = tiny_attn_only
    clean, corrupted, metric, _ = random_pair(model, 3)
    result = ck.path_patching(model, clean, corrupted, "heads", "logits", metric, progress=False)
    _, clean_cache = model.run_with_cache(clean.tokens)
    _, corrupted_cache = model.run_with_cache(corrupted.tokens)
    final = clean_cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    for layer in range(model.cfg.n_layers):
        z_name = f"blocks.{layer}.attn.hook_z"
        for head in range(model.cfg.n_heads):
            delta = corrupted_cache[z_name][:, :, head] - clean_cache[z_name][:, :, head]
            resid = final + delta @ model.W_O[layer, head]
            expected = metric(model.unembed(model.ln_final(resid)))
            assert_close(result.examples[layer, head], expected, atol=1e-5, rtol=0)
    assert result.examples.std() > 1e-3


def test_grouped_query_key_and_value_receivers_are_the_shared_head(tiny_llama):
    cfg = tiny_llama.cfg
    group = cfg.n_heads // cfg.n_key_value_heads
    assert group == 2
    clean, corrupted, metric, _ = random_pair(tiny_llama, 4)
    senders = [ck.Head(0, 1), ck.Head(1, 2), ck.MLP(1)]
    kwargs = dict(metric=metric, progress=False)
    for part in ("k", "v"):
        results = [
            ck.path_patching(
                tiny_llama, clean, corrupted, senders, ck.Head(2, h, part), **kwargs
            ).examples
            for h in range(cfg.n_heads)
        ]
        # query heads 0 and 1 read key/value head 0, heads 2 and 3 key/value head 1
        assert equal(results[0], results[1])
        assert equal(results[2], results[3])
        assert (results[0] - results[2]).abs().max() > 1e-4
        # two heads of one group name one key/value head: it is patched once
        both_heads = [ck.Head(2, 0, part), ck.Head(2, 1, part)]
        fast, slow = both(tiny_llama, clean, corrupted, senders, both_heads, metric)
        assert equal(fast.examples, results[0])
        assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
        assert fast.info["receivers"] == [repr(ck.Head(2, 0, part))]


def test_senders_without_a_path_get_the_base_value(tiny_gpt2):
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, 5)
    receivers = [ck.Head(1, 2).q, ck.Head(1, 0).v.at("end")]
    result = ck.path_patching(
        tiny_gpt2, clean, corrupted, "heads", receivers, metric, progress=False
    )
    clean_value = metric(tiny_gpt2(clean.tokens)).cpu()
    for layer in (1, 2):  # heads in the receivers' layer and later
        for head in range(tiny_gpt2.cfg.n_heads):
            assert_close(result.examples[layer, head], clean_value)
    assert (result.examples[0] - clean_value).abs().max() > 1e-4
    with pytest.raises(ComponentError, match=r"Head\(1, 3\) has no path to the receivers"):
        ck.path_patching(
            tiny_gpt2, clean, corrupted, [ck.Head(0, 0), ck.Head(1, 3)], receivers, metric
        )


def test_ioi_dataset_words_and_default_metric(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=1)
    abc = ds.corrupted("ABC")
    senders = [ck.Head(0, 1).at("S2"), ck.Head(1, 3).at("IO"), ck.Head(1, 3)]
    receivers = [ck.Head(2, 0).q.at("end"), ck.Head(2, 3).k.at("S2")]
    fast = ck.path_patching(tiny_gpt2, ds, abc, senders, receivers, progress=False)
    slow = ck.path_patching(tiny_gpt2, ds, abc, senders, receivers, reference=True, progress=False)
    assert fast.metric == "logit_diff"
    assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
    assert fast.examples.std() > 1e-4


def test_result_axes_and_labels(tiny_gpt2):
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, 6)
    kwargs = dict(metric=metric, progress=False)
    heads = ck.path_patching(tiny_gpt2, clean, corrupted, "heads", "logits", **kwargs)
    assert heads.axes == ("layer", "head")
    assert heads.values.shape == (3, 4)
    assert heads.examples.shape == (3, 4, 3)
    assert_close(heads.values, heads.examples.mean(-1))
    assert heads.method == "path_patching"
    baseline = heads.info.pop("baseline_examples")
    assert baseline.shape == (clean.tokens.shape[0],)
    assert heads.info == {
        "direction": "noise",
        "senders": "heads",
        "receivers": ["Resid(2, 'post')"],
        "baseline": pytest.approx(float(baseline.mean())),
    }
    mlps = ck.path_patching(tiny_gpt2, clean, corrupted, "mlps", "logits", **kwargs)
    assert mlps.axes == ("layer",) and mlps.values.shape == (3,)
    senders = [ck.Head(0, 1).at("X"), {ck.Head(1, 0), ck.MLP(0)}]
    listed = ck.path_patching(tiny_gpt2, clean, corrupted, senders, "logits", **kwargs)
    assert listed.axes == ("sender",)
    assert listed.labels["sender"] == ["Head(0, 1).at('X')", "MLP(0) + Head(1, 0)"]
    one = ck.path_patching(tiny_gpt2, clean, corrupted, ck.Head(0, 1).at("X"), "logits", **kwargs)
    assert_close(one.examples[0], listed.examples[0])
    frame = listed.to_dataframe()
    assert list(frame.columns) == ["sender", "value", "sem"]
    assert ck.plot(heads).data[0].type == "heatmap"


def test_layers_restrict_a_sweep_to_those_layers(tiny_llama):
    clean, corrupted, metric, _ = random_pair(tiny_llama, 8)
    kwargs = dict(metric=metric, progress=False)
    receivers = [ck.Head(2, 1).q.at("end"), ck.Head(2, 3).v]
    for senders, receiver in (("heads", receivers), ("heads", "logits"), ("mlps", "logits")):
        every = ck.path_patching(tiny_llama, clean, corrupted, senders, receiver, **kwargs)
        some = ck.path_patching(
            tiny_llama, clean, corrupted, senders, receiver, layers=[2, 0], **kwargs
        )
        assert some.axes == every.axes
        assert some.labels["layer"] == ["2", "0"]
        assert_close(some.examples, every.examples[[2, 0]], atol=1e-5, rtol=1e-5)
        assert (every.examples[0] - every.examples[2]).abs().max() > 1e-4
        assert some.provenance["args"]["layers"] == [2, 0]
    with pytest.raises(ComponentError, match="layers= restricts a sweep"):
        ck.path_patching(tiny_llama, clean, corrupted, [ck.Head(0, 0)], layers=[0], **kwargs)
    with pytest.raises(ComponentError, match="layer 7 is out of range"):
        ck.path_patching(tiny_llama, clean, corrupted, "heads", layers=[7], **kwargs)


def _snapshot(model):
    hooks = {
        name: (len(hp._forward_hooks), len(hp._backward_hooks), len(hp.fwd_hooks))
        for name, hp in model.hook_dict.items()
    }
    params = [p.requires_grad for p in model.parameters()]
    return hooks, copy.deepcopy(model.state_dict()), model.training, params


def _assert_unchanged(model, snapshot):
    hooks, state, training, params = snapshot
    assert _snapshot(model)[0] == hooks
    assert model.training == training
    assert [p.requires_grad for p in model.parameters()] == params
    for name, tensor in model.state_dict().items():
        assert equal(state[name], tensor), name


def test_model_unchanged_after_success_and_errors(tiny_gpt2):
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, 7)
    snapshot = _snapshot(tiny_gpt2)

    def broken(logits):
        raise RuntimeError("metric failed")

    for reference in (False, True):
        for receivers in ("logits", [ck.Head(2, 1).q]):
            kwargs = dict(reference=reference, progress=False)
            ck.path_patching(tiny_gpt2, clean, corrupted, "heads", receivers, metric, **kwargs)
            _assert_unchanged(tiny_gpt2, snapshot)
            with pytest.raises(RuntimeError, match="metric failed"):
                ck.path_patching(tiny_gpt2, clean, corrupted, "heads", receivers, broken, **kwargs)
            _assert_unchanged(tiny_gpt2, snapshot)
            with pytest.raises(ComponentError, match="unknown position word 'S9'"):
                ck.path_patching(
                    tiny_gpt2, clean, corrupted, ck.Head(0, 0).at("S9"), receivers, metric, **kwargs
                )
            _assert_unchanged(tiny_gpt2, snapshot)


@pytest.mark.parametrize(
    "senders, receivers, error, message",
    [
        ("head", "logits", ComponentError, r"senders must be 'heads', 'mlps'.*got 'head'"),
        ("heads", "logit", ComponentError, r"receivers must be 'logits'.*got 'logit'"),
        ([], "logits", ComponentError, r"non-empty list"),
        ([ck.Head(0, 1).q], "logits", ComponentError, r"a sender must be a head's output"),
        ([ck.Attn(0)], "logits", ComponentError, r"a sender must be .*got Attn\(0\)"),
        ([[]], "logits", ComponentError, r"a non-empty set of components"),
        ([[ck.Head(0, 1), ck.Head(0, 1)]], "logits", ComponentError, r"names a component twice"),
        ("heads", [ck.Head(2, 0)], ComponentError, r"a receiver must be .*got Head\(2, 0\)"),
        ("heads", ck.MLP(2), ComponentError, r"a receiver must be"),
        ("heads", ck.Resid(1, "post"), ComponentError, r"final residual stream"),
        (
            [ck.Head(5, 0)],
            "logits",
            ComponentError,
            r"sender Head\(5, 0\): layer 5 is out of range",
        ),
        ([ck.Head(0, 4)], "logits", ComponentError, r"sender Head\(0, 4\): head 4 is out of range"),
        ("heads", ck.Head(1, 7).q, ComponentError, r"receiver Head\(1, 7\)\.q: head 7 is out"),
        ("heads", ck.Head(1, 0).q.at(9), ComponentError, r"position 9 is outside the prompt"),
    ],
)
def test_bad_senders_and_receivers(tiny_gpt2, senders, receivers, error, message):
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, 0)
    with pytest.raises(error, match=message):
        ck.path_patching(tiny_gpt2, clean, corrupted, senders, receivers, metric, progress=False)


def test_bad_inputs(tiny_gpt2):
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, 0)
    with pytest.raises(ShapeError, match=r"path_patching: clean has shape \(3, 6\) but corrupted"):
        ck.path_patching(tiny_gpt2, clean.tokens, corrupted.tokens[:, :5], metric=metric)
    with pytest.raises(CircuitkitError, match="direction must be 'noise' or 'denoise'"):
        ck.path_patching(tiny_gpt2, clean, corrupted, metric=metric, direction="both")
    with pytest.raises(ShapeError, match="pass metric"):
        ck.path_patching(tiny_gpt2, clean.tokens, corrupted.tokens)
    with pytest.raises(ShapeError, match="path_patching: the metric 'diff' is made for 3 examples"):
        ck.path_patching(tiny_gpt2, clean.tokens[:2], corrupted.tokens[:2], metric=metric)


@pytest.mark.real
def test_fast_equals_reference_on_smollm(smollm):
    clean, corrupted, metric, _ = random_pair(smollm, 11, n=2, n_pos=8)
    senders = [
        ck.Head(0, 4),
        ck.Head(3, 7).at("X"),
        ck.MLP(2),
        {ck.Head(1, 1), ck.Head(4, 8).at((2, 3))},
    ]
    receivers = [ck.Head(6, 1).q.at("end"), ck.Head(6, 4).k, ck.Head(5, 0).v]
    for receives in ("logits", receivers):
        fast, slow = both(smollm, clean, corrupted, senders, receives, metric)
        assert_close(fast.examples, slow.examples, atol=1e-4, rtol=1e-4)
        assert fast.examples.std() > 1e-3
    # 9 query heads share 3 key/value heads: heads 3 and 5 read key/value head 1
    keys = [
        ck.path_patching(
            smollm, clean, corrupted, senders[0], ck.Head(6, h).k, metric, progress=False
        ).examples
        for h in (3, 5)
    ]
    assert equal(keys[0], keys[1])
    assert (keys[0] - metric(smollm(clean.tokens)).cpu()).abs().max() > 1e-4


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_baseline_is_the_unpatched_base_run_and_top_ranks_changes(tiny_gpt2, direction):
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, seed=5)
    result = ck.path_patching(
        tiny_gpt2, clean, corrupted, "heads", "logits", metric, direction=direction, progress=False
    )
    base = clean.tokens if direction == "noise" else corrupted.tokens
    with torch.no_grad():
        expected = metric(tiny_gpt2(base)).cpu()
    assert_close(result.baseline(), expected, atol=1e-5, rtol=0)
    change = result.examples - expected
    ((cell, effect),) = result.top(1)
    best = change.mean(-1).abs().flatten().argmax()
    layer, head = divmod(int(best), tiny_gpt2.cfg.n_heads)
    assert cell == {"layer": layer, "head": head}
    assert effect == pytest.approx(float(change.mean(-1).flatten()[best]), abs=1e-5)


@pytest.mark.parametrize("memory_budget", [None, 1])
def test_baseline_to_a_head_receiver_is_the_unpatched_run(tiny_gpt2, memory_budget):
    # the fast path computes the baseline in its first chunk of receiver runs; a budget of one
    # byte makes one chunk per sender, so senders of later chunks are checked too
    clean, corrupted, metric, _ = random_pair(tiny_gpt2, seed=11)
    receivers = [ck.Head(1, 0).q, ck.Head(1, 1).v]
    kwargs = dict(direction="denoise", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-byte budget cannot be met, and says so
        fast = ck.path_patching(
            tiny_gpt2,
            clean,
            corrupted,
            "heads",
            receivers,
            metric,
            memory_budget=memory_budget,
            **kwargs,
        )
    slow = ck.path_patching(
        tiny_gpt2, clean, corrupted, "heads", receivers, metric, reference=True, **kwargs
    )
    with torch.no_grad():
        expected = metric(tiny_gpt2(corrupted.tokens))
    assert_close(fast.baseline(), expected, atol=1e-5, rtol=0)
    assert_close(fast.examples, slow.examples, atol=1e-5, rtol=0)
    # senders in the receivers' layer or later reach them through no path: the base value
    assert_close(fast.examples[1:], expected.expand_as(fast.examples[1:]), atol=1e-5, rtol=0)
