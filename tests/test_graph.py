"""The graph of a model, and runs with edges patched: the batched path against the plain
one-forward-per-run reference, and identities that pin down what patching an edge means."""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from _device import DEVICE, assert_close, equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuitkit as ck
from circuitkit.core.engine import unembed_residual
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.metrics import Metric


class Data:
    """A dataset-like object: tokens and per-example word positions."""

    def __init__(self, tokens, positions):
        self.tokens = tokens
        self.positions = positions


def random_pair(model, seed: int, n: int = 3, n_pos: int = 6):
    """Clean and corrupted tokens, and a logit-difference metric read at a varying "end"."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, vocab, (n, 3), generator=g)
    end = torch.randint(n_pos - 2, n_pos, (n,), generator=g)
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]

        def pick(tokens):
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return pick(a) - pick(b)

    return clean, corrupted, Metric("diff", end, fn)


def random_masks(graph, seed: int, densities=(0.0, 0.02, 0.2, 0.6, 1.0)):
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [(torch.rand(graph.valid.shape, generator=g) < p) & graph.valid for p in densities]
    )


def test_graph_layout(tiny_gpt2, tiny_attn_only, tiny_llama):
    for model, per_layer in ((tiny_gpt2, 13), (tiny_attn_only, 12), (tiny_llama, 9)):
        graph = ck.Graph.of(model)
        cfg = model.cfg
        has_mlp = not cfg.attn_only
        assert len(graph.senders) == 1 + cfg.n_layers * (cfg.n_heads + has_mlp)
        assert len(graph.receivers) == cfg.n_layers * per_layer + 1
        assert graph.n_edges == int(graph.valid.sum()) == len(graph.edges)
        for edge in graph.edges:  # every edge is found where it is listed
            row, column = graph.index(edge)
            assert graph.receivers[row] == edge.receiver and graph.senders[column] == edge.sender
        assert torch.equal(graph.mask(graph.edges), graph.valid)
        assert graph.edges_in(graph.valid) == list(graph.edges)
    # tiny llama: 4 query heads share 2 key/value heads; both name one receiver
    graph = ck.Graph.of(tiny_llama)
    assert graph.receivers[:8] == (
        *(ck.Head(0, h).q for h in range(4)),
        ck.Head(0, 0).k,
        ck.Head(0, 2).k,
        ck.Head(0, 0).v,
        ck.Head(0, 2).v,
    )
    assert graph.receiver_index(ck.Head(1, 3).v) == graph.receiver_index(ck.Head(1, 2).v)
    assert graph.canonical(ck.Head(1, 3).k) == ck.Head(1, 2).k


def test_which_edges_exist(tiny_gpt2):
    graph = ck.Graph.of(tiny_gpt2)
    exists = [
        ck.Edge(ck.Embed(), ck.Head(0, 1).q),
        ck.Edge(ck.Head(0, 3), ck.Head(1, 0).v),
        ck.Edge(ck.Head(1, 2), ck.MLP(1)),  # an MLP reads its own layer's heads
        ck.Edge(ck.MLP(0), ck.Head(1, 0).k),
        ck.Edge(ck.MLP(2), "logits"),
    ]
    for edge in exists:
        graph.index(edge)
    for edge in [
        ck.Edge(ck.Head(1, 0), ck.Head(1, 1).q),  # same layer
        ck.Edge(ck.MLP(1), ck.MLP(1)),
        ck.Edge(ck.MLP(1), ck.Head(1, 0).q),  # an MLP comes after its layer's heads
        ck.Edge(ck.Head(2, 0), ck.MLP(1)),
    ]:
        with pytest.raises(ComponentError, match="there is no edge"):
            graph.index(edge)
    with pytest.raises(ComponentError, match="a sender is ck.Embed"):
        ck.Edge(ck.Head(0, 1).q, "logits")
    with pytest.raises(ComponentError, match="a receiver is a head's input"):
        ck.Edge(ck.Head(0, 1), ck.Head(1, 1))
    with pytest.raises(ComponentError, match="at every position"):
        ck.Edge(ck.Head(0, 1).at("end"), "logits")
    with pytest.raises(ComponentError, match="layer 7 is out of range"):
        graph.index(ck.Edge(ck.Head(7, 0), "logits"))
    with pytest.raises(ComponentError, match="attention-only"):
        ck.Graph.of(ck.tiny_model("attn-only")).index(ck.Edge(ck.MLP(0), "logits"))
    assert repr(ck.Edge(ck.Head(0, 3), ck.Head(1, 0).v)) == "Edge(Head(0, 3) -> Head(1, 0).v)"


def parallel_model():
    """A GPT-J-style block: attention and MLP read the same residual stream."""
    model = ck.tiny_model("gpt2", seed=3).to(DEVICE)
    model.cfg.parallel_attn_mlp = True
    return model


def test_parallel_blocks_and_unsupported_models():
    graph = ck.Graph.of(parallel_model())
    with pytest.raises(ComponentError, match="there is no edge"):
        graph.index(ck.Edge(ck.Head(1, 2), ck.MLP(1)))  # read at the same time, not before
    graph.index(ck.Edge(ck.Head(0, 2), ck.MLP(1)))
    post_norm = SimpleNamespace(cfg=copy.copy(ck.tiny_model("gpt2").cfg))
    post_norm.cfg.use_normalization_before_and_after = True
    with pytest.raises(CircuitkitError, match="not a sum of node outputs"):
        ck.Graph.of(post_norm)


@pytest.mark.parametrize("kind", ["gpt2", "attn-only", "llama", "parallel"])
@pytest.mark.parametrize("mean", [False, True])
def test_fast_equals_reference(kind, mean):
    model = parallel_model() if kind == "parallel" else ck.tiny_model(kind).to(DEVICE)
    clean, corrupted, metric = random_pair(model, seed=len(kind) + mean)
    graph = ck.Graph.of(model)
    replacement = ck.sender_outputs(model, corrupted)
    if mean:
        replacement = replacement.mean()
    masks = random_masks(graph, seed=3)
    # runs that start at different layers, so chunks start at different layers
    late = torch.zeros_like(graph.valid)
    late[graph.logits_row] = graph.valid[graph.logits_row]
    masks = torch.cat([masks, late[None]])
    kwargs = dict(replacement=replacement, progress=False)
    fast = ck.patch_edges(model, clean, masks, metric, max_runs_per_chunk=2, **kwargs)
    slow = ck.patch_edges(model, clean, masks, metric, reference=True, **kwargs)
    assert_close(fast, slow, atol=2e-5, rtol=1e-5)
    assert fast.std(0).min() > 1e-2  # the runs differ, so the comparison can fail


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), density=st.floats(0.0, 1.0))
def test_fast_equals_reference_on_random_runs(tiny_llama, seed, density):
    clean, corrupted, metric = random_pair(tiny_llama, seed=seed, n=2, n_pos=5)
    graph = ck.Graph.of(tiny_llama)
    masks = random_masks(graph, seed, densities=(density, density / 4))
    replacement = ck.sender_outputs(tiny_llama, corrupted)
    kwargs = dict(replacement=replacement, progress=False)
    fast = ck.patch_edges(tiny_llama, clean, masks, metric, **kwargs)
    slow = ck.patch_edges(tiny_llama, clean, masks, metric, reference=True, **kwargs)
    assert_close(fast, slow, atol=2e-5, rtol=1e-5)


def test_examples_in_groups_when_one_run_outgrows_the_budget(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=11, n=5)
    graph = ck.Graph.of(tiny_gpt2)
    masks = random_masks(graph, seed=11)
    replacement = ck.sender_outputs(tiny_gpt2, corrupted)

    def plain(logits):  # a callable on the full logits
        return metric(logits)

    kwargs = dict(replacement=replacement, progress=False)
    whole = ck.patch_edges(tiny_gpt2, clean, masks, metric, **kwargs)
    for chosen in (metric, plain):
        with pytest.warns(UserWarning, match=r"^patch_edges: memory_budget of 1 B cannot be met"):
            grouped = ck.patch_edges(tiny_gpt2, clean, masks, chosen, memory_budget=1, **kwargs)
        assert_close(grouped, whole, atol=1e-5, rtol=1e-5)


def test_the_budget_counts_the_base_run_and_is_checked(tiny_gpt2, monkeypatch):
    """What a group keeps (its cached base run among it) comes out of the budget before its
    chunks are sized; a budget below one run warns (see above); a bad one is refused."""
    from circuitkit.core import engine
    from circuitkit.methods import edge_patching

    clean, corrupted, metric = random_pair(tiny_gpt2, seed=12, n=6)
    graph = ck.Graph.of(tiny_gpt2)
    masks = random_masks(graph, seed=12)
    replacement = ck.sender_outputs(tiny_gpt2, corrupted)
    kwargs = dict(replacement=replacement, progress=False)
    whole = ck.patch_edges(tiny_gpt2, clean, masks, metric, **kwargs)
    kept, sized = [], []

    def spy_base(model, tokens):
        base = engine.base_run(model, tokens)
        kept.append(engine.kept_bytes(base))
        return base

    def spy_chunks(model, per_run, left, max_runs):
        sized.append((per_run, left))
        return engine.runs_per_chunk(model, per_run, left, max_runs)

    monkeypatch.setattr(edge_patching, "base_run", spy_base)
    monkeypatch.setattr(edge_patching, "runs_per_chunk", spy_chunks)
    budget = 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped = ck.patch_edges(tiny_gpt2, clean, masks, metric, memory_budget=budget, **kwargs)
    assert_close(grouped, whole, atol=1e-5, rtol=1e-5)
    [(per_run, left)] = sized
    assert len(kept) > 1  # the examples went in groups
    assert per_run <= left and left + max(kept) <= budget
    for bad in ("1GB", 0, -5, 1.5, math.nan, True):
        with pytest.raises(
            CircuitkitError, match=r"^patch_edges: memory_budget must be a positive"
        ):
            ck.patch_edges(tiny_gpt2, clean, masks, metric, memory_budget=bad, **kwargs)


def test_no_patched_edges_is_the_plain_model(tiny_model):
    clean, corrupted, metric = random_pair(tiny_model, seed=1)
    replacement = ck.sender_outputs(tiny_model, corrupted)
    values = ck.patch_edges(tiny_model, clean, [[]], metric, replacement=replacement)
    with torch.no_grad():
        plain = metric(tiny_model(clean))
    assert_close(values[0], plain.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mean", [False, True])
def test_every_edge_into_the_logits_reads_the_replacement(tiny_model, mean):
    """With every edge into the logits patched, the final residual stream is the replacement's
    senders' outputs plus the attention biases, which belong to no node."""
    clean, corrupted, metric = random_pair(tiny_model, seed=2)
    graph = ck.Graph.of(tiny_model)
    replacement = ck.sender_outputs(tiny_model, corrupted)
    if mean:
        replacement = replacement.mean()
    run = [e for e in graph.edges if e.receiver == "logits"]
    values = ck.patch_edges(tiny_model, clean, [run], metric, replacement=replacement)

    with torch.no_grad():
        final = replacement.embed.clone()
        for layer, block in enumerate(tiny_model.blocks):
            final = final + torch.einsum("nphk,hkd->npd", replacement.z[layer], block.attn.W_O)
            final = final + block.attn.b_O
            if replacement.mlp_out:
                final = final + replacement.mlp_out[layer]
        final = final.expand(clean.shape[0], *final.shape[1:])
        logits_at = unembed_residual(tiny_model, final[torch.arange(3), metric.positions][:, None])[
            :, 0
        ]
        expected = metric.at(logits_at)
        plain = metric(tiny_model(clean))
    assert_close(values[0], expected.cpu(), atol=1e-4, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["gpt2", "attn-only", "llama", "parallel"])
def test_every_edge_out_of_a_node_is_patching_the_node(kind):
    tiny_model = parallel_model() if kind == "parallel" else ck.tiny_model(kind).to(DEVICE)
    clean, corrupted, metric = random_pair(tiny_model, seed=3)
    graph = ck.Graph.of(tiny_model)
    other = ck.sender_outputs(tiny_model, corrupted)
    mean = other.mean()
    nodes = [(ck.Head(1, 2), ck.Head(1, 2)), (ck.Embed(), ck.Resid(0, "pre"))]
    if not tiny_model.cfg.attn_only:
        nodes.append((ck.MLP(0), ck.MLP(0)))

    def value_of(outputs, component):
        if isinstance(component, ck.Head):
            return outputs.z[component.layer]
        if isinstance(component, ck.MLP):
            return outputs.mlp_out[component.layer]
        return outputs.embed

    for sender, component in nodes:
        run = [e for e in graph.edges if e.sender == sender]
        for replacement, value in ((other, ck.Patch), (mean, ck.SetTo)):
            patched = ck.patch_edges(tiny_model, clean, [run], metric, replacement=replacement)
            intervention = ck.Intervention(component, value(value_of(replacement, sender)))
            expected = ck.run_interventions(tiny_model, clean, [intervention], metric)
            assert_close(patched, expected, atol=2e-5, rtol=1e-5)
    unpatched = ck.patch_edges(tiny_model, clean, [[]], metric, replacement=other)
    assert (patched - unpatched).abs().max() > 1e-3


def test_grouped_key_receiver_is_shared_by_its_group(tiny_llama):
    """An edge into Head(1, 1).k is the edge into its key/value head, Head(1, 0).k: it changes
    the attention of query heads 0 and 1 of layer 1 and leaves heads 2 and 3 alone."""
    clean, corrupted, metric = random_pair(tiny_llama, seed=4)
    graph = ck.Graph.of(tiny_llama)
    assert torch.equal(
        graph.mask([ck.Edge(ck.Head(0, 3), ck.Head(1, 1).k)]),
        graph.mask([ck.Edge(ck.Head(0, 3), ck.Head(1, 0).k)]),
    )
    replacement = ck.sender_outputs(tiny_llama, corrupted)
    patterns = []

    def keep(pattern, hook):
        patterns.append(pattern.detach().clone())

    name = ck.Head(1, 0).pattern.hook_name(tiny_llama)
    with tiny_llama.hooks(fwd_hooks=[(name, keep)]):
        for edge in ([], [ck.Edge(ck.Head(0, 3), ck.Head(1, 1).k)]):
            ck.patch_edges(
                tiny_llama, clean, [edge], metric, replacement=replacement, reference=True
            )
    change = (patterns[1] - patterns[0]).abs().amax(dim=(0, 2, 3))
    assert (change[:2] > 1e-4).all() and (change[2:] == 0).all()


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


def test_model_unchanged_after_success_and_errors(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=5)
    graph = ck.Graph.of(tiny_gpt2)
    replacement = ck.sender_outputs(tiny_gpt2, corrupted)
    snapshot = _snapshot(tiny_gpt2)

    def broken(logits):
        raise RuntimeError("metric failed")

    for reference in (False, True):
        kwargs = dict(replacement=replacement, reference=reference, progress=False)
        ck.patch_edges(tiny_gpt2, clean, random_masks(graph, 0), metric, **kwargs)
        assert_unchanged(tiny_gpt2, snapshot)
        with pytest.raises(RuntimeError, match="metric failed"):
            ck.patch_edges(tiny_gpt2, clean, random_masks(graph, 0), broken, **kwargs)
        assert_unchanged(tiny_gpt2, snapshot)


@pytest.mark.parametrize("reference", [False, True])
def test_a_metric_that_runs_the_model_sees_the_plain_model(tiny_model, reference):
    """The metric is called with no patch hook attached and the split-input flags put back:
    its own forward pass gives the plain model's logits in every run."""
    clean, corrupted, metric = random_pair(tiny_model, seed=8)
    graph = ck.Graph.of(tiny_model)
    replacement = ck.sender_outputs(tiny_model, corrupted)
    masks = random_masks(graph, 1)
    snapshot = _snapshot(tiny_model)
    with torch.no_grad():
        plain = tiny_model(clean)
    seen = []

    def runs_the_model(logits):
        seen.append(_snapshot(tiny_model)[4])
        own = tiny_model(clean)  # the metric's own forward pass
        return metric(logits) + (own - plain).abs().amax(dim=(1, 2))

    kwargs = dict(replacement=replacement, reference=reference, progress=False)
    values = ck.patch_edges(tiny_model, clean, masks, runs_the_model, **kwargs)
    expected = ck.patch_edges(tiny_model, clean, masks, metric, **kwargs)
    slow = ck.patch_edges(tiny_model, clean, masks, metric, replacement=replacement, reference=True)
    assert_close(values, expected, atol=1e-5, rtol=0)
    assert_close(values, slow, atol=1e-4, rtol=1e-5)
    assert seen and all(flags == snapshot[4] for flags in seen)
    assert_unchanged(tiny_model, snapshot)


def test_bad_inputs(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=6)
    graph = ck.Graph.of(tiny_gpt2)
    replacement = ck.sender_outputs(tiny_gpt2, corrupted)
    edge = ck.Edge(ck.Head(0, 0), "logits")
    with pytest.raises(CircuitkitError, match="wrap a single edge in a list"):
        ck.patch_edges(tiny_gpt2, clean, [edge], metric, replacement=replacement)
    with pytest.raises(CircuitkitError, match="replacement must be SenderOutputs"):
        ck.patch_edges(tiny_gpt2, clean, [[edge]], metric, replacement=corrupted)
    with pytest.raises(ShapeError, match=r"replacement has 3 examples of 6 positions but base"):
        ck.patch_edges(
            tiny_gpt2, clean[:2], [[edge]], lambda x: x[:, -1, 0], replacement=replacement
        )
    with pytest.raises(ShapeError, match="made for 3 examples but the base input has 2"):
        ck.patch_edges(tiny_gpt2, clean[:2], [[edge]], metric, replacement=replacement.mean())
    with pytest.raises(ShapeError, match="an edge mask is a bool tensor"):
        ck.patch_edges(tiny_gpt2, clean, [graph.valid.float()], metric, replacement=replacement)
    wrong = torch.zeros_like(graph.valid)
    wrong[0, -1] = True  # Head(0, 0).q reading the last MLP
    with pytest.raises(ComponentError, match="not edges"):
        ck.patch_edges(tiny_gpt2, clean, [wrong], metric, replacement=replacement)


def test_edge_scores_result(tiny_llama):
    clean, corrupted, metric = random_pair(tiny_llama, seed=7)
    scores = ck.edge_attribution_patching(tiny_llama, clean, corrupted, metric, progress=False)
    graph = ck.Graph.of(tiny_llama)
    assert isinstance(scores, ck.EdgeScores)
    assert scores.axes == ("receiver", "sender")
    assert scores.values.shape == graph.valid.shape
    assert (scores.values[~graph.valid] == 0).all()
    assert scores.edges() == list(graph.edges)
    top = scores.top_edges(5)
    assert [abs(v) for _, v in top] == sorted((abs(v) for _, v in top), reverse=True)
    assert abs(top[0][1]) == scores.values.abs().max().item()
    edge, value = top[0]
    assert scores.score(edge) == value
    kv = ck.Edge(ck.Head(0, 1), ck.Head(1, 3).k)
    assert scores.score(kv) == scores.score(ck.Edge(ck.Head(0, 1), ck.Head(1, 2).k))
    frame = scores.to_dataframe()
    assert list(frame.columns) == ["receiver", "sender", "value", "sem"]
    assert len(frame) == graph.n_edges
    assert scores.top(1)[0] == (
        {
            "receiver": repr(edge.receiver) if edge.receiver != "logits" else "logits",
            "sender": repr(edge.sender),
        },
        value,
    )
    assert ck.plot(scores).data[0].type == "heatmap"


def test_edge_scores_save_and_load(tiny_attn_only, tmp_path):
    clean, corrupted, metric = random_pair(tiny_attn_only, seed=8)
    scores = ck.edge_attribution_patching(tiny_attn_only, clean, corrupted, metric, progress=False)
    loaded = ck.EdgeScores.load(scores.save(tmp_path / "edges"))
    assert isinstance(loaded, ck.EdgeScores) and loaded.equals(scores)
    assert loaded.top_edges(3) == scores.top_edges(3)


@pytest.mark.real
def test_patch_edges_on_smollm(smollm):
    graph = ck.Graph.of(smollm)
    assert graph.n_edges == 70_651
    clean, corrupted, metric = random_pair(smollm, seed=9, n=2, n_pos=6)
    replacement = ck.sender_outputs(smollm, corrupted).mean()
    masks = random_masks(graph, 9, densities=(0.002, 0.05))
    kwargs = dict(replacement=replacement, progress=False)
    fast = ck.patch_edges(smollm, clean, masks, metric, **kwargs)
    slow = ck.patch_edges(smollm, clean, masks, metric, reference=True, **kwargs)
    assert_close(fast, slow, atol=1e-3, rtol=1e-4)
    assert (fast[0] - fast[1]).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["shared", "few others", "many others", "none"])
def test_correction_sums_shared_senders_once(case):
    """Senders every receiver patches are summed once; the rest per receiver: the same sums."""
    from circuitkit.methods.edge_patching import _correction

    g = torch.Generator().manual_seed(3)
    c, n_receivers, n_senders, n, n_pos, d = 3, 4, 10, 2, 3, 5
    deltas = torch.randn(c, n_senders + 2, n, n_pos, d, generator=g)
    weights = torch.zeros(c, n_receivers, n_senders)
    if case in ("shared", "few others"):  # 6 senders patched everywhere, and a few others
        weights[:, :, :6] = 1.0
        density = 0.0 if case == "shared" else 0.15
        weights[:, :, 6:] = (torch.rand(c, n_receivers, 4, generator=g) < density).float()
        weights[0, 1, 7] = 1.0  # at least one sender that only some receivers patch
    elif case == "many others":  # most senders patched by some receivers only
        weights = (torch.rand(c, n_receivers, n_senders, generator=g) < 0.7).float()
    expected = torch.einsum("crs,csnpd->cnprd", weights, deltas[:, :n_senders])
    assert_close(_correction(deltas, weights), expected, atol=1e-5, rtol=1e-5)
