"""Circuits: faithfulness, completeness and minimality against a plainly written mean ablation
with hand-built hooks, and the Circuit value itself."""

from __future__ import annotations

import copy

import pytest
import torch
from _device import DEVICE, assert_close

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ComponentError

WORDS = ("IO", "S1", "S1+1", "S2", "end", "and", None)


@torch.no_grad()
def reference_metric(model, circuit, ds, ref, metric, removed=(), whole_model=False):
    """The mean metric with every head outside ``circuit`` (or, with ``whole_model``, only the
    heads ``removed``) replaced by its mean over the reference prompts of the same template,
    written with one plain hook per layer and loops over examples, positions and heads."""
    cfg = model.cfg
    n, n_pos = ds.tokens.shape
    _, ref_cache = model.run_with_cache(ref.tokens)
    removed = {(h.layer, h.head) for h in removed}

    def kept(layer, head, i, p):
        if (layer, head) in removed:
            return False
        if whole_model:
            return True
        for node in circuit.nodes:
            if (node.head.layer, node.head.head) != (layer, head):
                continue
            pos = node.head.pos
            if pos is None or int(ds.positions[pos][i]) == p:
                return True
        return False

    def mean_for(name, i):
        same = ref.templates == ds.templates[i]
        return ref_cache[name][same].mean(0)

    def head_hook(z, hook):
        layer = int(hook.name.split(".")[1])
        z = z.clone()
        for i in range(n):
            mean = mean_for(hook.name, i)
            for p in range(n_pos):
                for h in range(cfg.n_heads):
                    if not kept(layer, h, i, p):
                        z[i, p, h] = mean[p, h]
        return z

    def mlp_hook(out, hook):
        layer = int(hook.name.split(".")[1])
        out = out.clone()
        for i in range(n):
            mean = mean_for(hook.name, i)
            for p in range(n_pos):
                inside = any(
                    m.layer == layer and (m.pos is None or int(ds.positions[m.pos][i]) == p)
                    for m in circuit.mlps
                )
                if not inside:
                    out[i, p] = mean[p]
        return out

    hooks = [(f"blocks.{layer}.attn.hook_z", head_hook) for layer in range(cfg.n_layers)]
    if not whole_model and circuit.mlps != "all":
        hooks += [(f"blocks.{layer}.hook_mlp_out", mlp_hook) for layer in range(cfg.n_layers)]
    logits = model.run_with_hooks(ds.tokens, fwd_hooks=hooks)
    return float(metric(logits).mean())


def random_circuit(model, g, n_nodes=4, mlps="all"):
    cfg = model.cfg
    nodes = {}
    while len(nodes) < n_nodes:
        layer = int(torch.randint(0, cfg.n_layers, (1,), generator=g))
        head = int(torch.randint(0, cfg.n_heads, (1,), generator=g))
        word = WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
        nodes[(layer, head, word)] = ck.Head(layer, head).at(word)
    roles = ["name mover", "s-inhibition"]
    classes = {role: list(nodes.values())[i::2] for i, role in enumerate(roles)}
    return ck.Circuit.from_classes(classes, mlps=mlps)


@pytest.fixture
def ioi(tiny_model):
    ds = ck.IOIDataset(tiny_model, n=6, seed=3)
    return tiny_model, ds, ds.corrupted("ABC"), ck.metrics.logit_diff(ds)


@pytest.mark.parametrize("seed", [0, 1])
def test_faithfulness_equals_plain_mean_ablation(ioi, seed):
    model, ds, abc, metric = ioi
    g = torch.Generator().manual_seed(seed)
    circuit = random_circuit(model, g, n_nodes=5)
    # a head in two classes at two positions
    circuit = ck.Circuit(
        (*circuit.nodes, ck.CircuitHead(ck.Head(0, 1).at("S2"), "induction")),
        name="random",
    )
    f = ck.faithfulness(model, circuit, ds, reference=abc, metric=metric, progress=False)
    expected = reference_metric(model, circuit, ds, abc, metric)
    plain = float(metric(model(ds.tokens)).mean().detach())
    assert f.f_circuit == pytest.approx(expected, abs=1e-4)
    assert f.f_model == pytest.approx(plain, abs=1e-4)
    assert f.ratio == pytest.approx(expected / plain, rel=1e-4)
    assert f.n_heads == len(circuit)
    # the engine's reference mode gives the same
    slow = ck.faithfulness(
        model, circuit, ds, reference=abc, metric=metric, reference_engine=True, progress=False
    )
    assert_close(slow.result.examples, f.result.examples, atol=1e-4, rtol=1e-4)
    # the ablation changes the metric, so the comparison can fail
    assert abs(f.f_circuit - f.f_model) > 1e-3
    assert f.result.axes == ("run",) and f.result.examples.shape == (2, ds.n)
    low, high = f.ci(0.9, seed=1)
    assert low <= f.ratio <= high and low < high and (low, high) == f.ci(0.9, seed=1)
    assert f.result.provenance["method"] == "faithfulness"


def test_mlps_in_the_circuit(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=1)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    g = torch.Generator().manual_seed(5)
    circuit = random_circuit(tiny_gpt2, g, n_nodes=3, mlps=(ck.MLP(0), ck.MLP(2).at("end")))
    f = ck.faithfulness(tiny_gpt2, circuit, ds, reference=abc, metric=metric, progress=False)
    expected = reference_metric(tiny_gpt2, circuit, ds, abc, metric)
    assert f.f_circuit == pytest.approx(expected, abs=1e-4)
    all_mlps = ck.faithfulness(
        tiny_gpt2,
        ck.Circuit(circuit.nodes),
        ds,
        reference=abc,
        metric=metric,
        progress=False,
    )
    assert abs(all_mlps.f_circuit - f.f_circuit) > 1e-3  # the MLP ablations do something


def test_whole_and_empty_circuits(ioi):
    model, ds, abc, metric = ioi
    cfg = model.cfg
    everything = ck.Circuit.from_classes(
        {"all": [ck.Head(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]}
    )
    f = ck.faithfulness(model, everything, ds, reference=abc, metric=metric, progress=False)
    assert f.ratio == pytest.approx(1.0, abs=1e-5)
    empty = ck.faithfulness(model, ck.Circuit(), ds, reference=abc, metric=metric, progress=False)
    ablated = ck.ablate(
        model, ds, "head", method="mean", reference=abc, metric=metric, per_template=True,
        progress=False,
    )  # fmt: skip
    assert empty.f_circuit == pytest.approx(float(ablated.values[1]), abs=1e-5)
    assert len(ck.Circuit()) == 0


def test_completeness_and_minimality(ioi):
    model, ds, abc, metric = ioi
    g = torch.Generator().manual_seed(11)
    circuit = random_circuit(model, g, n_nodes=4)
    kwargs = dict(reference=abc, metric=metric, progress=False)
    result = ck.completeness(model, circuit, ds, n_random=2, greedy=2, seed=3, **kwargs)
    labels = result.labels["set"]
    assert labels[:3] == ["empty", "name mover", "s-inhibition"]
    assert labels[3:] == ["random 0", "random 1", "greedy 1", "greedy 2"]
    assert result.axes == ("set", "run") and result.examples.shape == (len(labels), 2, ds.n)
    for label, heads in zip(labels, result.info["sets"], strict=True):
        k = [ck.Head(*map(int, h.split("."))) for h in heads]
        row = labels.index(label)
        in_circuit = reference_metric(model, circuit.without(k), ds, abc, metric)
        in_model = reference_metric(model, circuit, ds, abc, metric, k, whole_model=True)
        assert float(result.values[row, 0]) == pytest.approx(in_circuit, abs=1e-4)
        assert float(result.values[row, 1]) == pytest.approx(in_model, abs=1e-4)
    assert_close(result.info["incompleteness"], (result.values[:, 0] - result.values[:, 1]).abs())
    # the greedy search adds the head with the largest gap, one at a time
    greedy = result.info["sets"][-2:]
    assert len(greedy[0]) == 1 and greedy[1][:1] == greedy[0]

    minimal = ck.minimality(model, circuit, ds, **kwargs)
    heads = list(circuit.heads)
    assert minimal.axes == ("head",) and len(minimal.labels["head"]) == len(heads)
    for i, (head, k_labels) in enumerate(zip(heads, minimal.info["k"], strict=True)):
        k = [ck.Head(*map(int, h.split("."))) for h in k_labels]
        role = [n.role for n in circuit.nodes if n.head.layer == head.layer
                and n.head.head == head.head]  # fmt: skip
        same_class = {(h.layer, h.head) for r in role for h in circuit.classes[r]} - {
            (head.layer, head.head)
        }
        assert {(h.layer, h.head) for h in k} == same_class
        without_k = reference_metric(model, circuit.without(k), ds, abc, metric)
        without_both = reference_metric(model, circuit.without([*k, head]), ds, abc, metric)
        assert float(minimal.values[i]) == pytest.approx(without_both - without_k, abs=1e-4)
    assert_close(minimal.info["score"], minimal.values.abs())
    assert minimal.values.abs().max() > 1e-3
    alone = ck.minimality(model, circuit, ds, k="empty", **kwargs)
    assert all(k == [] for k in alone.info["k"])


def test_circuit_value():
    circuit = ck.Circuit.from_classes(
        {
            "name mover": [ck.Head(9, 9).at("end"), ck.Head(9, 6).at("end")],
            "induction": [ck.Head(5, 5).at("S2")],
            "duplicate token": [ck.Head(0, 1).at("S2"), ck.Head(3, 0)],
        },
        name="IOI",
        effects={ck.Head(9, 9).at("end"): -1.5},
    )
    assert len(circuit) == 5
    assert circuit.heads[0] == ck.Head(0, 1) and circuit.heads[-1] == ck.Head(9, 9)
    assert ck.Head(9, 9) in circuit and ck.Head(9, 8) not in circuit
    assert circuit.positions_of(ck.Head(9, 9)) == ("end",)
    text = repr(circuit)
    assert "Circuit('IOI', 5 heads, MLPs: all" in text
    assert "name mover       9.6@end, 9.9@end" in text and "3.0" in text
    frame = circuit.to_dataframe()
    assert list(frame.columns) == ["class", "layer", "head", "position", "effect"]
    assert frame["effect"].tolist()[0] == -1.5 and frame["position"].tolist()[-1] == "all"
    smaller = circuit.without([ck.Head(9, 9), ck.Head(5, 5)])
    assert len(smaller) == 3 and "induction" not in smaller.classes
    edged = ck.Circuit(circuit.nodes, edges=(ck.Edge(ck.Head(5, 5), ck.Head(9, 9).q),))
    assert "1 edges" in repr(edged) and edged.without([ck.Head(9, 9)]).edges == ()
    assert edged != circuit and ck.Circuit(circuit.nodes) == ck.Circuit(circuit.nodes)
    with pytest.raises(ComponentError, match="listed twice"):
        ck.Circuit.from_classes({"a": [ck.Head(1, 1)], "b": [ck.Head(1, 1)]})
    with pytest.raises(ComponentError, match="head's output"):
        ck.CircuitHead(ck.Head(1, 1).q)
    with pytest.raises(ComponentError, match="mlps must be 'all'"):
        ck.Circuit(mlps=(ck.Head(1, 1),))


def test_bad_inputs_leave_the_model_unchanged(ioi):
    model, ds, abc, metric = ioi
    before = copy.deepcopy(model.state_dict())
    circuit = ck.Circuit.from_classes({"x": [ck.Head(0, 0).at("end")]})
    kwargs = dict(reference=abc, metric=metric, progress=False)
    with pytest.raises(ComponentError, match="faithfulness: .*layer 7 is out of range"):
        ck.faithfulness(model, ck.Circuit.from_classes({"x": [ck.Head(7, 0)]}), ds, **kwargs)
    with pytest.raises(ComponentError, match="unknown position word 'S3'"):
        ck.faithfulness(model, ck.Circuit.from_classes({"x": [ck.Head(0, 0).at("S3")]}), ds,
                        **kwargs)  # fmt: skip
    with pytest.raises(CircuitkitError, match="mean ablation needs reference"):
        ck.faithfulness(model, circuit, ds, reference=None, metric=metric, progress=False)
    with pytest.raises(CircuitkitError, match="circuit must be a ck.Circuit"):
        ck.faithfulness(model, [ck.Head(0, 0)], ds, **kwargs)
    with pytest.raises(ComponentError, match="not in the circuit"):
        ck.completeness(model, circuit, ds, sets=[[ck.Head(1, 1)]], **kwargs)
    with pytest.raises(ComponentError, match="not in the circuit"):
        ck.minimality(model, circuit, ds, k={ck.Head(0, 0): [ck.Head(1, 1)]}, **kwargs)
    with pytest.raises(CircuitkitError, match="k must be 'class'"):
        ck.minimality(model, circuit, ds, k="some", **kwargs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.real
def test_faithfulness_on_smollm(smollm):
    ds = ck.IOIDataset(smollm, n=3, seed=0)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    circuit = ck.Circuit.from_classes(
        {
            "name mover": [ck.Head(23, 0).at("end"), ck.Head(23, 3).at("end")],
            "s-inhibition": [ck.Head(20, 0).at("end")],
            "induction": [ck.Head(8, 1).at("S2")],
        }
    )
    f = ck.faithfulness(smollm, circuit, ds, reference=abc, metric=metric, progress=False)
    expected = reference_metric(smollm, circuit, ds, abc, metric)
    assert f.f_circuit == pytest.approx(expected, abs=1e-3)
    assert f.f_model == pytest.approx(float(metric(smollm(ds.tokens)).mean().detach()), abs=1e-3)
    assert abs(f.f_circuit - f.f_model) > 1e-2


def test_find_ioi_circuit_follows_its_rules():
    # deep enough for four rounds; weights and prompts on which every round finds heads
    tiny_llama = ck.tiny_model("llama", n_layers=4, seed=3).to(DEVICE)
    ds = ck.IOIDataset(tiny_llama, n=8, seed=1)
    abc = ds.corrupted("ABC")
    circuit = ck.find_ioi_circuit(
        tiny_llama, ds, reference=abc, relative_threshold=0.0, z_threshold=0.0,
        max_per_class=2, min_attention=0.05, progress=False,
    )  # fmt: skip
    info = circuit.info
    metric = ck.metrics.logit_diff(ds)
    base = ck.run_interventions(tiny_llama, ds.tokens, [[]], metric, progress=False)[0]
    attention, scores = info["attention"].values, info["head_scores"].values
    step_of = {"end": ("direct", "queries"), "S2": ("s2",), "S1+1": ("s1+1",)}
    assert circuit.name == "IOI" and {"direct", "queries", "s2", "s1+1"} <= set(info)
    for role, heads in circuit.classes.items():
        assert len(heads) <= 2, role
    for node in circuit.nodes:
        head, effect = node.head, node.effect
        steps = [s for s in step_of[head.pos] if s in info]
        expected = [float((info[s].examples[head.layer, head.head] - base).mean()) for s in steps]
        assert any(effect == pytest.approx(e, abs=1e-5) for e in expected), node
        to_io, to_s1, to_s2 = attention[head.layer, head.head].tolist()
        previous, duplicate, induction = scores[head.layer, head.head].tolist()
        if node.role in ("name mover", "negative name mover"):
            assert to_io > to_s1 + to_s2 and (effect < 0) == (node.role == "name mover")
        if node.role in ("other direct", "other negative direct"):
            assert (effect < 0) == (node.role == "other direct")
        if node.role == "s-inhibition":
            assert to_s2 >= 0.05 and effect < 0
        if node.role in ("induction", "duplicate token"):
            assert (induction > duplicate) == (node.role == "induction") and effect < 0
        if node.role == "previous token":
            assert previous >= 0.05 and effect < 0
    # each round's receivers are the heads of the round before
    carriers = [
        f"Head({n.head.layer}, {n.head.head}).q.at('end')"
        for n in circuit.nodes
        if n.role in ("name mover", "other direct")
    ]
    assert info["queries"].info["receivers"] == carriers
    inhibitors = [f"Head({h.layer}, {h.head}).v.at('S2')" for h in circuit.classes["s-inhibition"]]
    assert info["s2"].info["receivers"] == inhibitors
    # the edges are the paths the rounds found: each from a circuit head into the logits or
    # into an input of a head of the round before
    heads = {(n.head.layer, n.head.head) for n in circuit.nodes}
    assert circuit.edges and len(set(circuit.edges)) == len(circuit.edges)
    for edge in circuit.edges:
        assert (edge.sender.layer, edge.sender.head) in heads
        if edge.receiver != "logits":
            assert (edge.receiver.layer, edge.receiver.head) in heads
            assert edge.receiver.part in ("q", "k", "v") and edge.receiver.layer > edge.sender.layer
    into_logits = {(e.sender.layer, e.sender.head) for e in circuit.edges if e.receiver == "logits"}
    assert into_logits == {
        (n.head.layer, n.head.head)
        for n in circuit.nodes
        if n.role in ("name mover", "negative name mover", "other direct", "other negative direct")
    }
    # strict thresholds keep fewer heads
    strict = ck.find_ioi_circuit(
        tiny_llama, ds, reference=abc, relative_threshold=0.5, progress=False
    )
    assert len(strict) < len(circuit)
    with pytest.raises(CircuitkitError, match="relative_threshold must lie in"):
        ck.find_ioi_circuit(tiny_llama, ds, reference=abc, relative_threshold=2.0)


def test_find_ioi_circuit_on_some_layers():
    tiny_llama = ck.tiny_model("llama", n_layers=4).to(DEVICE)
    ds = ck.IOIDataset(tiny_llama, n=8, seed=0)
    abc = ds.corrupted("ABC")
    kwargs = dict(
        reference=abc, relative_threshold=0.0, z_threshold=0.0, min_attention=0.05,
        progress=False,
    )  # fmt: skip
    every = ck.find_ioi_circuit(tiny_llama, ds, **kwargs)
    some = ck.find_ioi_circuit(tiny_llama, ds, layers=[2, 0], **kwargs)
    assert {h.layer for h in every.heads} - {0, 2}, "the test needs heads outside layers 0, 2"
    assert some.heads and {h.layer for h in some.heads} <= {0, 2}
    assert some.info["layers"] == [2, 0] and every.info["layers"] is None
    # the first round is the same sweep, restricted: effects read from the rows of those layers
    direct = some.info["direct"]
    assert direct.labels["layer"] == ["2", "0"]
    assert_close(direct.examples, every.info["direct"].examples[[2, 0]], atol=1e-5, rtol=1e-5)
    base = some.info["base_examples"]
    step_of = {"end": ("direct", "queries"), "S2": ("s2",), "S1+1": ("s1+1",)}
    for node in some.nodes:
        row = [2, 0].index(node.head.layer)
        expected = [
            float((some.info[s].examples[row, node.head.head] - base).mean())
            for s in step_of[node.head.pos]
            if s in some.info
        ]
        assert any(node.effect == pytest.approx(e, abs=1e-5) for e in expected), node


@pytest.mark.parametrize("z_threshold", [float("nan"), float("inf"), -1.0])
def test_find_ioi_circuit_refuses_a_threshold_that_is_not_finite(tiny_llama, z_threshold):
    ds = ck.IOIDataset(tiny_llama, n=4)
    with pytest.raises(CircuitkitError, match="find_ioi_circuit: z_threshold must be a finite"):
        ck.find_ioi_circuit(
            tiny_llama, ds, reference=ds.corrupted("ABC"), z_threshold=z_threshold, progress=False
        )
