"""Attribution patching: the fast paths against their plainly written references, against exact
patching where the metric is linear in every activation, and on smollm2."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from _device import DEVICE, assert_close, equal

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ShapeError
from circuitkit.core.graph import SenderOutputs
from circuitkit.core.metrics import Metric
from circuitkit.methods.attribution_patching import _edge_reference


class Data:
    """A dataset-like object: tokens and per-example word positions."""

    def __init__(self, tokens, positions):
        self.tokens = tokens
        self.positions = positions


def random_pair(model, seed: int, n: int = 3, n_pos: int = 6, fixed_end: bool = False):
    """Clean and corrupted datasets with words "X" and "end", and a logit-difference metric read
    at "end" (the last position everywhere with ``fixed_end``)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, vocab, (n, 3), generator=g)
    end = torch.randint(n_pos - 2, n_pos, (n,), generator=g)
    if fixed_end:
        end = torch.full((n,), n_pos - 1)
    positions = {"X": torch.randint(1, 4, (n,), generator=g), "end": end}
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]

        def pick(tokens):
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return pick(a) - pick(b)

    return Data(clean, positions), Data(corrupted, positions), Metric("diff", end, fn)


@contextmanager
def frozen(model, tokens):
    """Attention patterns and layer-norm scales held at their values in the run on ``tokens``.

    With them fixed, an attention-only model is affine in every activation, so a logit
    difference is linear in each: first-order estimates are then exact. Runs may be stacked
    along the batch, and the layer norms may see one input per head (split inputs); the held
    values are tiled to fit. Exact runs under it use the reference modes, which compute every
    position.
    """
    n_layers = model.cfg.n_layers
    names = [ck.Head(layer, 0).pattern.hook_name(model) for layer in range(n_layers)]
    names += [f"blocks.{layer}.ln1.hook_scale" for layer in range(n_layers)]
    names.append("ln_final.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)

    def hold(act, hook):
        value = cache[hook.name]
        if hook.name.endswith("pattern"):
            value = value[:, :, -act.shape[2] :]
        else:
            value = value[:, -act.shape[1] :]
            if act.ndim == value.ndim + 1:
                value = value.unsqueeze(2)
        value = value.repeat(act.shape[0] // value.shape[0], *[1] * (value.ndim - 1))
        return value.expand(act.shape)

    with model.hooks(fwd_hooks=[(name, hold) for name in names]):
        yield


REFERENCE_CASES = [
    # (model kind, component kind, direction, per_position, positions)
    ("gpt2", "resid_pre", "denoise", True, None),
    ("gpt2", "mlp", "noise", False, ["X", "end"]),
    ("attn-only", "q", "noise", False, None),
    ("attn-only", "pattern", "denoise", False, ["end"]),
    ("llama", "head", "noise", False, ["X", 0]),
    ("llama", "k", "denoise", False, None),
    ("llama", "v", "noise", False, ["end"]),
    ("llama", "resid_mid", "denoise", False, None),
]


@pytest.mark.parametrize("model_kind, kind, direction, per_position, positions", REFERENCE_CASES)
def test_fast_equals_reference(model_kind, kind, direction, per_position, positions):
    model = ck.tiny_model(model_kind).to(DEVICE)
    clean, corrupted, metric = random_pair(model, seed=len(kind))
    kwargs = dict(
        direction=direction, per_position=per_position, positions=positions, progress=False
    )
    fast = ck.attribution_patching(model, clean, corrupted, metric, kind, **kwargs)
    slow = ck.attribution_patching(model, clean, corrupted, metric, kind, reference=True, **kwargs)
    assert_close(fast.examples, slow.examples, atol=2e-5, rtol=1e-5)
    assert fast.values.std() > 1e-3  # the cells differ, so the check can fail


def test_fast_equals_reference_on_a_component_list(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=2)
    comps = [
        ck.Embed(),
        ck.PosEmbed().at("X"),
        ck.Head(1, 2).q.at((2, 4)),
        ck.Neuron(0, 5),
        ck.Neuron(2, 7).at("end"),
        ck.Attn(2),
        ck.Resid(2, "post").at(slice(3, 6)),
    ]
    fast = ck.attribution_patching(tiny_gpt2, clean, corrupted, metric, comps, progress=False)
    slow = ck.attribution_patching(
        tiny_gpt2, clean, corrupted, metric, comps, reference=True, progress=False
    )
    assert fast.axes == ("component",)
    assert fast.labels["component"][1] == "PosEmbed().at('X')"
    assert_close(fast.examples, slow.examples, atol=2e-5, rtol=1e-5)
    assert fast.values.std() > 1e-3


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_equals_activation_patching_where_the_metric_is_linear(tiny_attn_only, direction):
    model = tiny_attn_only
    clean, corrupted, metric = random_pair(model, seed=3, fixed_end=True)
    base = corrupted if direction == "denoise" else clean
    sweeps = [("resid_pre", True), ("attn", False), ("head", True), ("v", False)]
    with frozen(model, base.tokens):
        for kind, per_position in sweeps:
            kwargs = dict(direction=direction, per_position=per_position, progress=False)
            approx = ck.attribution_patching(model, clean, corrupted, metric, kind, **kwargs)
            # the reference engine runs whole forwards, which the held values fit
            exact = ck.activation_patching(
                model, clean, corrupted, kind, metric, reference=True, **kwargs
            )
            assert_close(approx.examples, exact.examples, atol=1e-5, rtol=1e-5)
            assert exact.values.std() > 1e-2, kind


def test_differs_from_activation_patching_on_a_nonlinear_model(tiny_gpt2, tiny_attn_only):
    """The check above can fail: with MLPs, or with patterns free to move, the first-order
    estimate is not the exact effect."""
    for model in (tiny_gpt2, tiny_attn_only):
        clean, corrupted, metric = random_pair(model, seed=3, fixed_end=True)
        kwargs = dict(per_position=True, progress=False)
        approx = ck.attribution_patching(model, clean, corrupted, metric, "resid_pre", **kwargs)
        exact = ck.activation_patching(model, clean, corrupted, "resid_pre", metric, **kwargs)
        assert (approx.examples - exact.examples).abs().max() > 0.1


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_eap_equals_single_edge_patching_where_the_metric_is_linear(tiny_attn_only, direction):
    model = tiny_attn_only
    clean, corrupted, metric = random_pair(model, seed=4, fixed_end=True)
    base, other = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    graph = ck.Graph.of(model)
    kwargs = dict(direction=direction, progress=False)
    with frozen(model, base.tokens):
        eap = ck.edge_attribution_patching(model, clean, corrupted, metric, **kwargs)
        eap_ig = ck.edge_attribution_patching(
            model, clean, corrupted, metric, method="eap-ig", steps=3, **kwargs
        )
        runs = [[], *([edge] for edge in graph.edges)]
        replacement = ck.sender_outputs(model, other)
        patched = ck.patch_edges(model, base, runs, metric, replacement=replacement, reference=True)
    exact = patched[1:] - patched[0]
    rows, columns = graph.valid.nonzero(as_tuple=True)
    assert_close(eap.examples[rows, columns], exact, atol=1e-5, rtol=1e-5)
    assert_close(eap_ig.examples, eap.examples, atol=1e-5, rtol=1e-5)
    assert exact.std() > 1e-2
    assert_close(torch.tensor(eap.info["base"]), patched[0].mean(), atol=1e-5, rtol=0)


def test_eap_differs_from_single_edge_patching_on_a_nonlinear_model(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=4, fixed_end=True)
    graph = ck.Graph.of(tiny_gpt2)
    eap = ck.edge_attribution_patching(tiny_gpt2, clean, corrupted, metric, progress=False)
    runs = [[], *([edge] for edge in graph.edges)]
    replacement = ck.sender_outputs(tiny_gpt2, corrupted)
    patched = ck.patch_edges(tiny_gpt2, clean, runs, metric, replacement=replacement)
    rows, columns = graph.valid.nonzero(as_tuple=True)
    assert (eap.examples[rows, columns] - (patched[1:] - patched[0])).abs().max() > 0.1


@pytest.mark.parametrize(
    "kind, method", [("gpt2", "eap-ig"), ("llama", "eap"), ("llama", "eap-ig")]
)
def test_eap_equals_reference(kind, method):
    model = ck.tiny_model(kind).to(DEVICE)
    clean, corrupted, metric = random_pair(model, seed=5)
    graph = ck.Graph.of(model)
    direction = "denoise" if method == "eap" else "noise"
    fast = ck.edge_attribution_patching(
        model, clean, corrupted, metric, method=method, steps=2, direction=direction, progress=False
    )
    # a sample of edges, with every kind of receiver, for the one-pass-per-edge reference
    g = torch.Generator().manual_seed(5)
    valid = graph.valid.nonzero()
    sample = valid[torch.randperm(len(valid), generator=g)[:24]].tolist()
    sample += [[graph.logits_row, 0], [graph.attn_rows(2).stop - 1, 1]]
    base, other = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    steps = 2 if method == "eap-ig" else 1
    slow, base_values = _edge_reference(
        model, graph, base.tokens, other.tokens, metric, steps, sample, False, ""
    )
    rows, columns = torch.tensor(sample).T
    assert_close(fast.examples[rows, columns], slow[:, rows, columns].T, atol=2e-5, rtol=1e-4)
    assert_close(fast.info["base_examples"], base_values, atol=1e-5, rtol=0)
    assert slow[:, rows, columns].std() > 1e-2


def ablated_by_hand(model, ds, abc, value, seed=0):
    """The senders' ablated outputs, written out: the mean over the ABC prompts, that mean
    within each prompt's template, one ABC prompt drawn per example (the draws of ck.ablate:
    a generator seeded with ``seed``), or zeros."""
    outputs = ck.sender_outputs(model, abc)
    if value == "zero":
        return SenderOutputs(
            outputs.embed[:1] * 0, tuple(z[:1] * 0 for z in outputs.z),
            tuple(out[:1] * 0 for out in outputs.mlp_out),
        )  # fmt: skip
    if value == "resample":
        index = torch.randint(0, abc.n, (ds.n,), generator=torch.Generator().manual_seed(seed))
        index = index.to(outputs.embed.device)
    else:
        index = None

    def take(x):
        if index is not None:
            return x[index]
        if value == "mean":
            return x.mean(0, keepdim=True)
        same = [[j for j in range(abc.n) if abc.templates[j] == t] for t in ds.templates]
        return torch.stack([x[m].mean(0) for m in same])

    return SenderOutputs(
        take(outputs.embed), tuple(map(take, outputs.z)), tuple(map(take, outputs.mlp_out))
    )


@pytest.mark.parametrize(
    "kind, value, method",
    [("gpt2", "mean-template", "eap-ig"), ("llama", "mean", "eap"), ("llama", "resample", "eap-ig"),
     ("attn-only", "zero", "eap-ig")],
)  # fmt: skip
def test_eap_against_ablated_values_equals_reference(kind, value, method):
    model = ck.tiny_model(kind).to(DEVICE)
    ds = ck.IOIDataset(model, n=6, seed=3)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    graph = ck.Graph.of(model)
    fast = ck.edge_attribution_patching(
        model, ds, abc, metric, method=method, steps=2, ablation=value, progress=False
    )
    assert fast.info["ablation"] == value
    other = ablated_by_hand(model, ds, abc, value)
    g = torch.Generator().manual_seed(2)
    valid = graph.valid.nonzero()
    sample = valid[torch.randperm(len(valid), generator=g)[:20]].tolist()
    sample += [[graph.logits_row, 0], [graph.attn_rows(1).stop - 1, 1]]
    steps = 2 if method == "eap-ig" else 1
    slow, _ = _edge_reference(model, graph, ds.tokens, other, metric, steps, sample, False, "")
    rows, columns = torch.tensor(sample).T
    assert_close(fast.examples[rows, columns], slow[:, rows, columns].T, atol=2e-5, rtol=1e-4)
    assert slow[:, rows, columns].std() > 1e-2
    # against other values than the corrupted run's: other scores
    paired = ck.edge_attribution_patching(model, ds, abc, metric, method=method, steps=2,
                                          progress=False)  # fmt: skip
    assert (paired.examples - fast.examples).abs().max() > 1e-2


def test_eap_against_the_mean_equals_single_edge_mean_ablation_where_linear(tiny_attn_only):
    model = tiny_attn_only
    clean, corrupted, metric = random_pair(model, seed=4, fixed_end=True)
    graph = ck.Graph.of(model)
    with frozen(model, clean.tokens):
        eap = ck.edge_attribution_patching(
            model, clean, corrupted, metric, ablation="mean", progress=False
        )
        eap_ig = ck.edge_attribution_patching(
            model, clean, corrupted, metric, method="eap-ig", steps=3, ablation="mean",
            progress=False,
        )  # fmt: skip
        mean = ck.sender_outputs(model, corrupted).mean()
        runs = [[], *([edge] for edge in graph.edges)]
        patched = ck.patch_edges(model, clean, runs, metric, replacement=mean, reference=True)
    exact = patched[1:] - patched[0]
    rows, columns = graph.valid.nonzero(as_tuple=True)
    assert_close(eap.examples[rows, columns], exact, atol=1e-5, rtol=1e-5)
    assert_close(eap_ig.examples, eap.examples, atol=1e-5, rtol=1e-5)
    assert exact.std() > 1e-2


def test_eap_ig_with_one_step_is_eap(tiny_llama):
    clean, corrupted, metric = random_pair(tiny_llama, seed=6)
    eap = ck.edge_attribution_patching(tiny_llama, clean, corrupted, metric, progress=False)
    one = ck.edge_attribution_patching(
        tiny_llama, clean, corrupted, metric, method="eap-ig", steps=1, progress=False
    )
    five = ck.edge_attribution_patching(
        tiny_llama, clean, corrupted, metric, method="eap-ig", steps=5, progress=False
    )
    assert_close(one.examples, eap.examples, atol=1e-6, rtol=0)
    assert (five.examples - eap.examples).abs().max() > 1e-2


def test_axes_and_labels_are_activation_patchings(tiny_llama):
    clean, corrupted, metric = random_pair(tiny_llama, seed=7)
    for kind, kwargs in [
        ("k", {}),
        ("head", {"per_position": True}),
        ("resid_mid", {"positions": ["end", 1]}),
        ([ck.Head(1, 1), ck.MLP(0).at("X")], {}),
    ]:
        approx = ck.attribution_patching(
            tiny_llama, clean, corrupted, metric, kind, progress=False, **kwargs
        )
        exact = ck.activation_patching(
            tiny_llama, clean, corrupted, kind, metric, progress=False, **kwargs
        )
        assert approx.axes == exact.axes and approx.labels == exact.labels
        assert approx.examples.shape == exact.examples.shape
        assert approx.metric == exact.metric and approx.info["direction"] == "denoise"
        assert_close(approx.values - approx.info["base"], approx.info["attribution"])
    assert approx.info["component"] == ["Head(1, 1)", "MLP(0).at('X')"]
    assert approx.provenance["method"] == "attribution_patching"


def test_batches_and_plain_metrics_give_the_same_values(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=8)

    def plain(logits):  # a callable on the full logits
        return metric(logits)

    kwargs = dict(progress=False)
    node = ck.attribution_patching(tiny_gpt2, clean, corrupted, metric, "head", **kwargs)
    edge = ck.edge_attribution_patching(
        tiny_gpt2, clean, corrupted, metric, method="eap-ig", steps=2, **kwargs
    )
    for chosen, budget in ((metric, 1), (plain, None), (plain, 1)):
        other_node = ck.attribution_patching(
            tiny_gpt2, clean, corrupted, chosen, "head", memory_budget=budget, **kwargs
        )
        other_edge = ck.edge_attribution_patching(
            tiny_gpt2,
            clean,
            corrupted,
            chosen,
            method="eap-ig",
            steps=2,
            memory_budget=budget,
            **kwargs,
        )
        assert_close(other_node.examples, node.examples, atol=1e-5, rtol=1e-5)
        assert_close(other_edge.examples, edge.examples, atol=1e-5, rtol=1e-5)


def test_ioi_dataset_words_and_default_metric(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=1)
    abc = ds.corrupted("ABC")
    kwargs = dict(component="head", positions=["S2", "end"], progress=False)
    fast = ck.attribution_patching(tiny_gpt2, ds, abc, **kwargs)
    slow = ck.attribution_patching(tiny_gpt2, ds, abc, reference=True, **kwargs)
    assert fast.labels["pos"] == ["S2", "end"] and fast.metric == "logit_diff"
    assert_close(fast.examples, slow.examples, atol=2e-5, rtol=1e-5)
    edges = ck.edge_attribution_patching(tiny_gpt2, ds, abc, progress=False)
    assert edges.metric == "logit_diff" and edges.values.abs().max() > 0


def _snapshot(model):
    hooks = {
        name: (len(hp._forward_hooks), len(hp._backward_hooks), len(hp.fwd_hooks))
        for name, hp in model.hook_dict.items()
    }
    flags = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in, model.cfg.use_attn_result)
    params = [(p.requires_grad, p.grad) for p in model.parameters()]
    return hooks, copy.deepcopy(model.state_dict()), model.training, params, flags


def assert_unchanged(model, snapshot):
    hooks, state, training, params, flags = snapshot
    now = _snapshot(model)
    assert now[0] == hooks and now[2] == training and now[3] == params and now[4] == flags
    for name, tensor in model.state_dict().items():
        assert equal(state[name], tensor), name


def test_model_unchanged_after_success_and_errors(tiny_llama):
    clean, corrupted, metric = random_pair(tiny_llama, seed=9)

    def broken(logits):
        raise RuntimeError("metric failed")

    calls = [
        lambda m, **kw: ck.attribution_patching(tiny_llama, clean, corrupted, m, "head", **kw),
        lambda m, **kw: ck.edge_attribution_patching(
            tiny_llama, clean, corrupted, m, method="eap-ig", steps=2, **kw
        ),
    ]
    expected = []
    for frozen_weights in (False, True):
        tiny_llama.requires_grad_(not frozen_weights)  # parameters with and without gradients
        snapshot = _snapshot(tiny_llama)
        for i, call in enumerate(calls):
            for reference in (False, True):
                if reference and i == 1:
                    continue  # the edge reference takes a pass per edge; tested on a sample
                result = call(metric, reference=reference, progress=False)
                assert_unchanged(tiny_llama, snapshot)
                if not reference:
                    expected.append(result.examples)
                with pytest.raises(RuntimeError, match="metric failed"):
                    call(broken, reference=reference, progress=False)
                assert_unchanged(tiny_llama, snapshot)
    # the same values whether or not the parameters require gradients
    assert_close(expected[0], expected[2])
    assert_close(expected[1], expected[3])


def test_bad_inputs(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=10)
    with pytest.raises(CircuitkitError, match="the metric comes before the component"):
        ck.attribution_patching(tiny_gpt2, clean, corrupted, "head", metric)
    with pytest.raises(CircuitkitError, match="direction must be 'denoise' or 'noise'"):
        ck.attribution_patching(tiny_gpt2, clean, corrupted, metric, direction="both")
    with pytest.raises(ShapeError, match=r"clean has shape \(3, 6\) but corrupted has \(3, 5\)"):
        ck.attribution_patching(tiny_gpt2, clean.tokens, corrupted.tokens[:, :5], metric)
    with pytest.raises(ShapeError, match="made for 3 examples"):
        ck.attribution_patching(tiny_gpt2, clean.tokens[:2], corrupted.tokens[:2], metric)
    with pytest.raises(ShapeError, match="pass metric"):
        ck.edge_attribution_patching(tiny_gpt2, clean.tokens, corrupted.tokens)
    with pytest.raises(CircuitkitError, match="method must be 'eap' or 'eap-ig'"):
        ck.edge_attribution_patching(tiny_gpt2, clean, corrupted, metric, method="ig")
    with pytest.raises(CircuitkitError, match="steps must be a positive int"):
        ck.edge_attribution_patching(tiny_gpt2, clean, corrupted, metric, steps=0)
    with pytest.raises(CircuitkitError, match="ablation must be a ck.Ablation or one of"):
        ck.edge_attribution_patching(tiny_gpt2, clean, corrupted, metric, ablation="median")
    with pytest.raises(CircuitkitError, match="which is noising; use direction='noise'"):
        ck.edge_attribution_patching(
            tiny_gpt2, clean, corrupted, metric, ablation="mean", direction="denoise"
        )


@pytest.mark.real
def test_fast_equals_reference_on_smollm(smollm):
    clean, corrupted, metric = random_pair(smollm, seed=11, n=2, n_pos=8)
    comps = [ck.Head(9, 6).at("end")]
    kwargs = dict(progress=False)
    fast = ck.attribution_patching(smollm, clean, corrupted, metric, comps, **kwargs)
    slow = ck.attribution_patching(
        smollm, clean, corrupted, metric, comps, reference=True, **kwargs
    )
    assert_close(fast.examples, slow.examples, atol=1e-4, rtol=1e-3)
    assert (fast.values - fast.info["base"]).abs().min() > 1e-3

    graph = ck.Graph.of(smollm)
    scores = ck.edge_attribution_patching(smollm, clean, corrupted, metric, **kwargs)
    edges = [
        ck.Edge(ck.Head(9, 6), "logits"),
        ck.Edge(ck.MLP(4), ck.Head(20, 5).k),  # query head 5 reads key/value head 1
    ]
    sample = [graph.index(edge) for edge in edges]
    slow_scores, _ = _edge_reference(
        smollm, graph, clean.tokens, corrupted.tokens, metric, 1, sample, False, ""
    )
    rows, columns = torch.tensor(sample).T
    assert_close(
        scores.examples[rows, columns], slow_scores[:, rows, columns].T, atol=1e-4, rtol=1e-3
    )
    assert slow_scores[:, rows, columns].abs().min() > 1e-5
