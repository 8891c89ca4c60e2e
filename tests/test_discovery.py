"""ck.discover_circuit: the faithfulness curve against a plainly written one-run-per-size
reference, the search, pruning, the circuit returned, and bad inputs."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from _device import assert_close, equal

import circuitkit as ck
from circuitkit.circuits.discovery import prune
from circuitkit.circuits.faithfulness import circuit_edges
from circuitkit.core.errors import CircuitkitError, ShapeError
from circuitkit.core.graph import SenderOutputs


@pytest.fixture
def ioi(request):
    model = ck.tiny_model(request.param)
    ds = ck.IOIDataset(model, n=6, seed=3)
    return model, ds, ds.corrupted("ABC"), ck.metrics.logit_diff(ds)


def by_hand_replacement(model, ds, abc, ablation, per_template):
    """What an ablated sender outputs, written out: the corrupted prompts' outputs, their
    mean, or for each clean prompt the mean over the corrupted prompts of its template."""
    outputs = ck.sender_outputs(model, abc)
    if ablation == "corrupted":
        return outputs
    if not per_template:
        return outputs.mean()
    members = [
        [j for j in range(abc.n) if abc.templates[j] == ds.templates[i]] for i in range(ds.n)
    ]

    def means(x):
        return torch.stack([x[m].mean(0) for m in members])

    return SenderOutputs(
        means(outputs.embed), tuple(map(means, outputs.z)), tuple(map(means, outputs.mlp_out))
    )


def top_edges(scores, k):
    """The k edges of largest |score|, ties in the graph's order."""
    edges = scores.edges()
    ranked = sorted(edges, key=lambda edge: -abs(scores.score(edge)))  # a stable sort
    return ranked[:k]


def reference_faithfulness(model, ds, metric, scores, sizes, replacement):
    """F(top k) / F(M) for each k: one plain forward per size, every other edge ablated."""
    graph = ck.Graph.of(model)
    with torch.no_grad():
        f_model = float(metric(model(ds.tokens)).mean())
    out = []
    for k in sizes:
        ablated = graph.valid & ~graph.mask(top_edges(scores, k))
        values = ck.patch_edges(
            model, ds, [ablated], metric, replacement=replacement, reference=True, progress=False
        )
        out.append(float(values.mean()) / f_model)
    return torch.tensor(out), f_model


@pytest.mark.parametrize(
    "ioi, ablation, per_template",
    [("gpt2", "mean", True), ("llama", "corrupted", None), ("attn-only", "mean", False)],
    indirect=["ioi"],
)
def test_the_curve_is_the_plain_reference(ioi, ablation, per_template):
    model, ds, abc, metric = ioi
    circuit = ck.discover_circuit(
        model, ds, abc, metric, method="eap", ablation=ablation, per_template=per_template,
        target=0.6, progress=False,
    )  # fmt: skip
    info, curve = circuit.info, circuit.info["curve"]
    assert info["per_template"] is (ablation == "mean" and per_template is not False)
    sizes = curve.info["edges"]
    replacement = by_hand_replacement(model, ds, abc, ablation, info["per_template"])
    expected, f_model = reference_faithfulness(
        model, ds, metric, info["scores"], sizes, replacement
    )
    assert abs(f_model) > 0.05  # the ratio means something
    assert info["f_model"] == pytest.approx(f_model, abs=1e-5)
    assert_close(curve.values, expected, atol=1e-4, rtol=1e-4)
    # per example: each example's circuit metric over F(M); their mean is the faithfulness
    assert curve.examples.shape == (len(sizes), ds.n)
    assert_close(curve.examples.mean(-1), curve.values)
    # the curve varies, so the comparison can fail; every edge is the model, exactly 1
    assert curve.values.max() - curve.values.min() > 0.1
    assert sizes[0] == 0 and sizes[-1] == ck.Graph.of(model).n_edges
    assert curve.values[-1] == 1.0
    assert info["f_empty"] == pytest.approx(float(curve.values[0]) * f_model, abs=1e-5)


@pytest.mark.parametrize("ioi", ["gpt2"], indirect=True)
def test_per_template_means_differ_from_one_mean(ioi):
    model, ds, abc, metric = ioi
    kwargs = dict(method="eap", grid=[4, 16, 64], progress=False)
    by_template = ck.discover_circuit(model, ds, abc, metric, **kwargs)
    overall = ck.discover_circuit(model, ds, abc, metric, per_template=False, **kwargs)
    assert by_template.info["per_template"] and not overall.info["per_template"]
    grid = by_template.info["grid"]
    assert grid == overall.info["grid"] == [0, 4, 16, 64, 262]

    def on_grid(circuit):
        curve = circuit.info["curve"]
        return torch.stack([curve.values[curve.info["edges"].index(k)] for k in grid])

    assert (on_grid(by_template) - on_grid(overall)).abs().max() > 1e-2


@pytest.mark.parametrize("ioi", ["gpt2", "llama"], indirect=True)
@pytest.mark.parametrize("target, rtol", [(0.5, 0.0), (0.9, 0.0), (0.9, 0.1)])
def test_the_search_stops_where_the_curve_crosses_the_target(ioi, target, rtol):
    model, ds, abc, metric = ioi
    # normalised, so that the empty circuit is at 0 even in a random model
    circuit = ck.discover_circuit(model, ds, abc, metric, method="eap", target=target,
                                  normalize=True, rtol=rtol, progress=False)  # fmt: skip
    info, curve = circuit.info, circuit.info["curve"]
    assert curve.values[0] == 0 and curve.values[-1] == 1
    assert info["definition"] == "(F(C) - F(∅)) / (F(M) - F(∅))"
    f_circuit = curve.info["f_circuit"]
    normalized = (f_circuit - info["f_empty"]) / (info["f_model"] - info["f_empty"])
    assert_close(curve.values, normalized.float())
    faithfulness = dict(zip(curve.info["edges"], curve.values.tolist(), strict=True))
    k = info["k"]
    assert info["reached"] and faithfulness[k] >= target
    assert info["faithfulness"] == pytest.approx(faithfulness[k])
    # the grid: 0, sizes about sqrt(2) apart, every edge
    grid, n_edges = info["grid"], ck.Graph.of(model).n_edges
    spaced = {round(2 ** (i / 2)) for i in range(40)}
    assert grid == sorted({0, n_edges} | {size for size in spaced if size < n_edges})
    # k lies between the first grid size that reaches the target and the grid size before it;
    # the size evaluated just below k does not reach it
    first = min(size for size in grid if faithfulness[size] >= target)
    assert all(faithfulness[size] < target for size in grid if size < first)
    previous = max(size for size in grid if size < first)
    assert previous < k <= first
    below = max(size for size in faithfulness if size < k)
    assert faithfulness[below] < target
    assert below == previous or k - below <= max(1, rtol * k)
    assert len(faithfulness) > len(grid) or k == first


@pytest.mark.parametrize("ioi", ["llama"], indirect=True)
def test_the_circuit_returned(ioi):
    model, ds, abc, metric = ioi
    circuit = ck.discover_circuit(model, ds, abc, metric, target=0.7, progress=False)
    info, graph = circuit.info, ck.Graph.of(model)
    scores = info["scores"]
    # EAP-IG scores by default, as edge_attribution_patching gives them against the values
    # the evaluation ablates with (the per-template mean of the ABC prompts)
    again = ck.edge_attribution_patching(model, ds, abc, metric, method="eap-ig", steps=5,
                                         ablation="mean-template", progress=False)  # fmt: skip
    assert_close(scores.values, again.values)
    assert info["method"] == "eap-ig" and info["steps"] == 5
    assert info["scores_from"] == "ablation" and scores.info["ablation"] == "mean-template"
    # the edges: the top k, pruned, largest |score| first
    kept = graph.mask(top_edges(scores, info["k"]))
    assert equal(info["edge_mask"], prune(graph, kept))
    assert equal(graph.mask(circuit.edges), info["edge_mask"])
    assert len(circuit.edges) == info["n_edges"] <= info["k"]
    magnitudes = [abs(scores.score(edge)) for edge in circuit.edges]
    assert magnitudes == sorted(magnitudes, reverse=True)
    # its faithfulness, measured again with patch_edges on the pruned edges
    replacement = by_hand_replacement(model, ds, abc, "mean", True)
    values = ck.patch_edges(model, ds, [[], graph.valid & ~graph.mask(circuit.edges)], metric,
                            replacement=replacement, progress=False)  # fmt: skip
    measured = float(values[1].mean() / values[0].mean())
    assert info["faithfulness"] == pytest.approx(measured, abs=1e-4)
    # nodes: the heads that send a kept edge, classed by what their strongest edge feeds
    senders = {edge.sender for edge in circuit.edges}
    assert set(circuit.heads) == {s for s in senders if isinstance(s, ck.Head)}
    assert set(circuit.mlps) == {s for s in senders if isinstance(s, ck.MLP)}
    kinds = {"q": "queries", "k": "keys", "v": "values"}
    for node in circuit.nodes:
        out = [e for e in circuit.edges if e.sender == node.head]
        strongest = max(out, key=lambda e: abs(scores.score(e)))
        receiver = strongest.receiver
        feeds = (
            "logits" if receiver == "logits"
            else "MLPs" if isinstance(receiver, ck.MLP) else kinds[receiver.part]
        )  # fmt: skip
        assert node.role == f"writes to {feeds}"
        assert node.effect == pytest.approx(sum(scores.score(e) for e in out), abs=1e-6)
        assert node.head.pos is None
    # a key or value input is named by a head of its group that is in the circuit
    for edge in circuit.edges:
        if isinstance(edge.receiver, ck.Head) and edge.receiver.part in ("k", "v"):
            assert ck.Head(edge.receiver.layer, edge.receiver.head) in circuit
    # scores given: the same search, no scoring
    again = ck.discover_circuit(model, ds, abc, metric, target=0.7, scores=scores, progress=False)
    assert again.edges == circuit.edges and again.info["given_scores"]
    assert_close(again.info["curve"].values, info["curve"].values)
    assert circuit.name == "discovered"
    assert info["provenance"]["method"] == "discover_circuit"
    assert info["curve"].provenance["args"]["target"] == 0.7
    assert set(info["seconds"]) == {"scores", "search", "refine", "total"}
    fig = ck.plot(info["curve"])
    assert fig.data[0].type == "scatter" and list(fig.data[0].x) == info["curve"].labels["edges"]
    drawn = ck.plot_circuit(circuit)
    separators = sum(x is None for t in drawn.data if t.mode == "lines" for x in t.x)
    assert separators == len(circuit.edges)


@pytest.mark.parametrize("ioi", ["attn-only"], indirect=True)
def test_path_scores_are_single_edge_patches(ioi):
    model, ds, abc, metric = ioi
    circuit = ck.discover_circuit(model, ds, abc, metric, method="path", grid=[8, 32],
                                  progress=False)  # fmt: skip
    scores, graph = circuit.info["scores"], ck.Graph.of(model)
    assert scores.info["method"] == "path" and scores.examples.shape[-1] == ds.n
    replacement = by_hand_replacement(model, ds, abc, "mean", True)
    g = torch.Generator().manual_seed(0)
    chosen = [graph.edges[i] for i in torch.randperm(graph.n_edges, generator=g)[:12].tolist()]
    kwargs = dict(replacement=replacement, reference=True, progress=False)
    values = ck.patch_edges(model, ds, [[], *([edge] for edge in chosen)], metric, **kwargs)
    expected = (values[1:] - values[0]).mean(-1)
    got = torch.tensor([scores.score(edge) for edge in chosen])
    assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().max() > 1e-3


@pytest.mark.parametrize("ioi", ["gpt2"], indirect=True)
def test_scores_from_the_corrupted_run(ioi):
    model, ds, abc, metric = ioi
    kwargs = dict(method="eap", grid=[8, 64], progress=False)
    paired = ck.discover_circuit(model, ds, abc, metric, scores_from="corrupted", **kwargs)
    own = ck.discover_circuit(model, ds, abc, metric, **kwargs)
    expected = ck.edge_attribution_patching(model, ds, abc, metric, progress=False)
    assert_close(paired.info["scores"].values, expected.values)
    assert (own.info["scores"].values - expected.values).abs().max() > 1e-2
    # with ablation="corrupted" both score against the corrupted run
    twins = [
        ck.discover_circuit(model, ds, abc, metric, ablation="corrupted", scores_from=source,
                            **kwargs).info["scores"]
        for source in ("ablation", "corrupted")
    ]  # fmt: skip
    assert_close(twins[0].values, twins[1].values)


@pytest.mark.parametrize(
    "ioi, ablation, per_template", [("gpt2", "mean", True), ("llama", "corrupted", False)],
    indirect=["ioi"],
)  # fmt: skip
def test_node_level_circuits_are_node_ablations(ioi, ablation, per_template):
    model, ds, abc, metric = ioi
    circuit = ck.discover_circuit(model, ds, abc, metric, method="eap", level="node",
                                  ablation=ablation, target=0.6, progress=False)  # fmt: skip
    info, graph = circuit.info, ck.Graph.of(model)
    nodes = info["node_scores"]
    # a node's score: the sum of its outgoing edges' scores, node attribution patching of its
    # output (for a head, of its z) against the same ablated values
    assert_close(nodes.values, info["scores"].values[:, 1:].sum(0))
    if ablation == "corrupted":
        heads = ck.attribution_patching(model, ds, abc, metric, "head", direction="noise",
                                        progress=False)  # fmt: skip
        mlps = ck.attribution_patching(model, ds, abc, metric, "mlp", direction="noise",
                                       progress=False)  # fmt: skip
        by_node = dict(zip(nodes.labels["node"], nodes.values.tolist(), strict=True))
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                got = by_node[repr(ck.Head(layer, head))]
                assert got == pytest.approx(float(heads.info["attribution"][layer, head]),
                                            abs=1e-4)  # fmt: skip
            got = by_node[repr(ck.MLP(layer))]
            assert got == pytest.approx(float(mlps.info["attribution"][layer]), abs=1e-4)
    # the circuit: the top k nodes by |score|
    ranked = nodes.values.abs().argsort(descending=True, stable=True)[: info["k"]].tolist()
    top = {graph.senders[1 + i] for i in ranked}
    assert set(circuit.heads) | set(circuit.mlps) == top
    assert info["n_nodes"] == info["k"] == len(top) and not circuit.edges
    assert info["curve"].axes == ("nodes",) and info["curve"].values[-1] == 1.0
    # its faithfulness is ck.faithfulness's under the same node-level ablation, in the
    # reference engine
    f = ck.faithfulness(model, circuit, ds, reference=abc, reference_engine=True, progress=False,
                        ablation=ck.Ablation(ablation, per_template=per_template))  # fmt: skip
    assert info["faithfulness"] == pytest.approx(f.ratio, abs=1e-4)
    assert info["reached"] and info["faithfulness"] >= 0.6
    # and the circuit's edges are those between its nodes
    assert equal(info["edge_mask"], circuit_edges(graph, circuit))


@pytest.mark.parametrize("ioi", ["attn-only"], indirect=True)
def test_node_path_scores_are_single_node_ablations(ioi):
    model, ds, abc, metric = ioi
    circuit = ck.discover_circuit(model, ds, abc, metric, method="path", level="node",
                                  grid=[2], progress=False)  # fmt: skip
    nodes = circuit.info["node_scores"]
    ablation = ck.Ablation("mean", per_template=True)
    heads = [ck.Head(layer, head) for layer in range(model.cfg.n_layers)
             for head in range(model.cfg.n_heads)]  # fmt: skip
    everything = ck.Circuit.from_classes({"all": heads})
    for index in (0, 3, len(nodes.values) - 1):
        head = ck.Graph.of(model).senders[1 + index]
        f = ck.faithfulness(model, everything.without([head]), ds, reference=abc, metric=metric,
                            ablation=ablation, reference_engine=True, progress=False)  # fmt: skip
        assert float(nodes.values[index]) == pytest.approx(f.f_circuit - f.f_model, abs=1e-4)
    assert nodes.values.abs().max() > 1e-3


def single_removals(model, ds, abc, metric, circuit, level):
    """The normalised faithfulness of the circuit and of each circuit with one edge (node)
    less, evaluated plainly: one forward per run."""
    graph = ck.Graph.of(model)
    if level == "edge":
        replacement = by_hand_replacement(model, ds, abc, "mean", True)
        kept = graph.mask(circuit.edges)
        masks = [graph.valid, torch.zeros_like(graph.valid), kept]
        for edge in circuit.edges:
            without = kept.clone()
            without[graph.index(edge)] = False
            masks.append(without)
        runs = [graph.valid & ~mask for mask in masks]
        values = ck.patch_edges(model, ds, runs, metric, replacement=replacement, reference=True,
                                progress=False)  # fmt: skip
        means = values.mean(-1)
    else:
        ablation = ck.Ablation("mean", per_template=True)

        def f_of(candidate):
            return ck.faithfulness(model, candidate, ds, reference=abc, metric=metric,
                                   ablation=ablation, reference_engine=True,
                                   progress=False).f_circuit  # fmt: skip

        model_run = ck.faithfulness(model, circuit, ds, reference=abc, metric=metric,
                                    ablation=ablation, progress=False).f_model  # fmt: skip
        means = [model_run, f_of(ck.Circuit(mlps=())), f_of(circuit)]
        for head in circuit.heads:
            means.append(f_of(circuit.without([head])))
        for mlp in circuit.mlps:
            means.append(f_of(replace(circuit, mlps=[m for m in circuit.mlps if m != mlp])))
        means = torch.tensor(means)
    full, empty = float(means[0]), float(means[1])
    normalised = (means[2:] - empty) / (full - empty)
    return float(normalised[0]), normalised[1:]


@pytest.mark.parametrize(
    "ioi, level", [("gpt2", "edge"), ("llama", "edge"), ("gpt2", "node"), ("llama", "node")],
    indirect=["ioi"],
)  # fmt: skip
def test_the_refined_circuit_is_minimal_for_its_target(ioi, level):
    model, ds, abc, metric = ioi
    target = 0.7
    kwargs = dict(method="eap", level=level, target=target, normalize=True, progress=False)
    plain = ck.discover_circuit(model, ds, abc, metric, **kwargs)
    circuit = ck.discover_circuit(model, ds, abc, metric, refine=True, **kwargs)
    refined = circuit.info["refined"]
    size = "n_edges" if level == "edge" else "n_nodes"
    assert refined["minimal"] and refined["k_before"] == plain.info[size]
    assert circuit.info[size] == refined["k_before"] - refined["removed"] < plain.info[size]
    # it reaches the target, and no single removal of the result does
    f, without_one = single_removals(model, ds, abc, metric, circuit, level)
    assert circuit.info["faithfulness"] == pytest.approx(f, abs=1e-4)
    assert f >= target and circuit.info["reached"]
    assert len(without_one) == circuit.info[size] and (without_one < target).all()
    # the cost bound: passes of at most m + log2(m) + 1 runs, at most one pass per removal + 1
    m = refined["k_before"]
    assert refined["passes"] <= refined["removed"] + 1
    assert refined["runs"] <= refined["passes"] * (m + math.log2(m) + 1)
    # a cap on the runs stops it early, then not certified minimal
    capped = ck.discover_circuit(model, ds, abc, metric, refine=True, refine_runs=2, **kwargs)
    assert capped.info["refined"]["runs"] <= 2 and not capped.info["refined"]["minimal"]
    assert capped.info["reached"]


def test_pruning_by_hand(tiny_gpt2, tiny_llama):
    graph = ck.Graph.of(tiny_gpt2)
    H, E, M = ck.Head, ck.Embed(), ck.MLP
    useful = [
        ck.Edge(E, H(0, 0).q), ck.Edge(H(0, 0), "logits"),  # 0.0 writes to the logits
        ck.Edge(H(0, 1), M(0)), ck.Edge(M(0), H(2, 3).v), ck.Edge(H(2, 3), "logits"),
        ck.Edge(E, "logits"),
    ]  # fmt: skip
    useless = [
        ck.Edge(E, H(1, 1).v), ck.Edge(H(1, 1), H(2, 2).q),  # 2.2 feeds nothing
        ck.Edge(H(0, 2), M(1)),  # MLP 1 feeds nothing
        ck.Edge(H(0, 0), H(1, 3).k),  # 1.3 feeds nothing, though 0.0 is in the circuit
    ]  # fmt: skip
    pruned = prune(graph, graph.mask(useful + useless))
    assert set(graph.edges_in(pruned)) == set(useful)
    assert equal(prune(graph, pruned), pruned)
    # grouped-query: Head(1, 0).k is the key input of heads 0 and 1 of layer 1
    graph = ck.Graph.of(tiny_llama)
    shared = [ck.Edge(E, H(1, 0).k), ck.Edge(H(1, 1), "logits")]
    unshared = [ck.Edge(E, H(1, 2).k)]  # heads 2 and 3 feed nothing
    pruned = prune(graph, graph.mask(shared + unshared))
    assert set(graph.edges_in(pruned)) == set(shared)


@pytest.mark.parametrize("ioi", ["gpt2", "llama"], indirect=True)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_edges_change_nothing(ioi, seed):
    model, ds, abc, metric = ioi
    graph = ck.Graph.of(model)
    g = torch.Generator().manual_seed(seed)
    kept = torch.stack(
        [(torch.rand(graph.valid.shape, generator=g) < p) & graph.valid for p in (0.05, 0.2)]
    )
    pruned = torch.stack([prune(graph, mask) for mask in kept])
    assert (pruned.sum((1, 2)) < kept.sum((1, 2))).all()  # some edges go
    mean = ck.sender_outputs(model, abc).mean()
    runs = torch.cat([graph.valid & ~kept, graph.valid & ~pruned])
    values = ck.patch_edges(model, ds, runs, metric, replacement=mean, progress=False)
    assert_close(values[2:], values[:2], atol=1e-5, rtol=1e-5)
    # the dropped edges do change the metric when their receivers matter
    everything = ck.patch_edges(model, ds, [graph.valid], metric, replacement=mean, progress=False)
    assert (values[:2] - everything).abs().max() > 1e-3


def test_max_edges_and_grid():
    # weights on which no circuit of three edges reaches the full model's logit difference
    model = ck.tiny_model("gpt2", seed=1)
    ds = ck.IOIDataset(model, n=6, seed=3)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    kwargs = dict(method="eap", progress=False)
    with pytest.warns(UserWarning, match="no circuit of at most 3 edges reaches faithfulness"):
        small = ck.discover_circuit(model, ds, abc, metric, max_edges=3, target=1.0, **kwargs)
    assert small.info["k"] == 3 and not small.info["reached"]
    assert small.info["curve"].info["edges"] == [0, 1, 2, 3, ck.Graph.of(model).n_edges]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = ck.discover_circuit(model, ds, abc, metric, grid=[100, 10], **kwargs)
    n_edges = ck.Graph.of(model).n_edges
    assert given.info["grid"] == [0, 10, 100, n_edges]
    assert set(given.info["grid"]) <= set(given.info["curve"].info["edges"])


@pytest.mark.parametrize("ioi", ["gpt2"], indirect=True)
def test_bad_inputs_and_the_model_unchanged(ioi):
    model, ds, abc, metric = ioi
    before = copy.deepcopy(model.state_dict())
    flags = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in, model.cfg.use_attn_result)
    grads = [(p.requires_grad, p.grad) for p in model.parameters()]

    def unchanged():
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())
        assert all(not hp._backward_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
        now = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in, model.cfg.use_attn_result)
        assert now == flags and [(p.requires_grad, p.grad) for p in model.parameters()] == grads

    def call(*args, **kwargs):
        return ck.discover_circuit(model, *args, **{"progress": False, **kwargs})

    other = ck.tiny_model("attn-only")
    other_scores = ck.edge_attribution_patching(other, ds, abc, metric, progress=False)

    bad = [
        ((ds, abc, metric), {"target": 0}, "target is a faithfulness in \\(0, 1\\]"),
        ((ds, abc, metric), {"target": 1.5}, "got 1.5"),
        ((ds, abc, metric), {"target": float("nan")}, "got nan"),
        ((ds, abc, metric), {"target": True}, "got True"),
        ((ds, abc, metric), {"method": "acdc"}, "method must be 'eap-ig', 'eap' or 'path'"),
        ((ds, abc, metric), {"steps": 0}, "steps must be a positive int"),
        ((ds, abc, metric), {"ablation": "zero"}, "ablation must be 'mean'"),
        ((ds, abc, metric), {"level": "edges"}, "level must be 'edge'"),
        ((ds, abc, metric), {"scores_from": "mean"}, "scores_from must be 'ablation'"),
        ((ds, abc, metric), {"refine": 1}, "refine must be True or False"),
        ((ds, abc, metric), {"refine_runs": 0}, "refine_runs caps the circuits"),
        ((ds, abc, metric), {"rtol": 1}, "rtol must be a number in \\[0, 1\\)"),
        ((ds, abc, metric), {"max_edges": 0}, "max_edges must be a positive int"),
        ((ds, abc, metric), {"grid": [-1]}, "grid sizes must be ints in 0..262"),
        ((ds, abc, metric), {"grid": [263]}, "grid sizes must be ints in 0..262"),
        ((ds, abc, metric), {"grid": [5], "max_edges": 4}, "ints in 0..4"),
        ((ds, abc, metric), {"grid": []}, "grid must be a non-empty list"),
        ((ds, abc, metric), {"grid": "10"}, "grid must be a non-empty list"),
        ((ds, abc, "logit_diff"), {}, "metric must be a metric, got the string"),
        ((ds, abc, metric), {"ablation": "corrupted", "per_template": True}, "per_template is"),
        ((ds.tokens, abc.tokens, metric), {"per_template": True}, "needs datasets with .templ"),
        ((ds.tokens, abc.tokens), {}, "pass metric=..."),
        ((ds, abc, metric), {"scores": ck.Result(torch.zeros(3), ("x",), {})}, "scores must be"),
        ((ds, abc, metric), {"scores": other_scores}, "scores must be the EdgeScores of this"),
    ]
    for args, kwargs, message in bad:
        with pytest.raises(CircuitkitError, match=message):
            call(*args, **kwargs)
        unchanged()
    with pytest.raises(ShapeError, match="clean has shape \\(6, .*\\) but corrupted has \\(4,"):
        call(ds, abc.tokens[:4], metric)
    with pytest.raises(ShapeError, match="made for 6 examples but the base input has 4"):
        call(ds.tokens[:4], abc.tokens[:4], metric)

    def zero(logits):
        return logits[:, -1, 0] * 0

    with pytest.raises(CircuitkitError, match="F\\(M\\) is 0, so faithfulness is undefined"):
        call(ds, abc, zero, method="eap", grid=[1])
    unchanged()
    call(ds, abc, metric, method="eap", grid=[10])
    unchanged()


@pytest.mark.real
def test_discover_circuit_on_smollm(smollm):
    """A small real case: the top edges of EAP on IOI, and the circuit measured again."""
    ds = ck.IOIDataset(smollm, n=4, seed=0)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        circuit = ck.discover_circuit(smollm, ds, abc, metric, method="eap", target=0.9,
                                      grid=[16], max_edges=256, progress=False)  # fmt: skip
    info, graph = circuit.info, ck.Graph.of(smollm)
    assert info["grid"] == [0, 16, 256] and info["reached"] == (not caught)
    replacement = by_hand_replacement(smollm, ds, abc, "mean", True)
    values = ck.patch_edges(smollm, ds, [[], graph.valid & ~info["edge_mask"]], metric,
                            replacement=replacement, progress=False)  # fmt: skip
    measured = float(values[1].mean() / values[0].mean())
    assert info["faithfulness"] == pytest.approx(measured, abs=1e-3)
    curve = info["curve"]
    assert curve.values[-1] == 1 and (curve.values[:-1] < 0.95).all()  # far from the model
    # the largest edges are late heads writing to the logits
    top = [edge for edge, _ in info["scores"].top_edges(5)]
    assert any(e.receiver == "logits" and isinstance(e.sender, ck.Head) and e.sender.layer >= 20
               for e in top)  # fmt: skip
