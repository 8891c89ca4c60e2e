"""Faithfulness under each ablation choice (circuitkit.circuits.faithfulness) against plainly
written references: one forward per circuit, with hooks that put the ablated values in place
(node level) or subtract each ablated edge from its receiver's input (edge level)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _device import DEVICE, assert_close

import circuitkit as ck
from circuitkit.circuits.faithfulness import (
    DEFAULT_CHOICES,
    faithfulness_table,
    ratio_interval,
)
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.graph import split_inputs
from circuitkit.methods.ablation import Ablation, check_ablation

WORDS = ("IO", "S1", "S2", "end", None)
KINDS = ("gpt2", "attn-only", "llama")  # the tiny models of conftest.py
CHOICES = (
    *DEFAULT_CHOICES,
    Ablation("resample", per_template=True),
    Ablation("corrupted", positions="all"),
    Ablation("zero", positions="all"),
    Ablation("zero", level="edge"),
    Ablation("mean", level="edge"),
    Ablation("resample", level="edge"),
    Ablation("resample", per_template=True, level="edge"),
)


# -- the plain references ----------------------------------------------------------------------


def sender_hooks(model):
    """The hooks whose activations an ablation replaces: the embeddings, each z, each MLP."""
    cfg = model.cfg
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{x}.attn.hook_z" for x in range(cfg.n_layers)]
    if not cfg.attn_only:
        names += [f"blocks.{x}.hook_mlp_out" for x in range(cfg.n_layers)]
    return names


@torch.no_grad()
def sender_caches(model, *inputs):
    """``{hook name: activation}`` of the senders' hooks, one plain forward per input."""
    names = set(sender_hooks(model))
    return [
        dict(model.run_with_cache(getattr(x, "tokens", x), names_filter=names.__contains__)[1])
        for x in inputs
    ]


def ablated_activations(model, ds, ref, paired, choice, seed=0, n_samples=1, caches=None):
    """One dict per draw: {hook name: [n, pos, ...]} the value of every example's ablated
    activation at every position, read from plain caches of ``ds``, ``ref`` and ``paired``
    (``caches``, or computed here)."""
    clean_cache, ref_cache, paired_cache = caches or sender_caches(model, ds, ref, paired)
    names = sender_hooks(model)
    n = ds.tokens.shape[0]
    if choice.value == "zero":
        return [{name: torch.zeros_like(clean_cache[name]) for name in names}]
    if choice.value == "corrupted":
        return [{name: paired_cache[name] for name in names}]
    if choice.value == "mean":
        out = {}
        for name in names:
            rows = []
            for i in range(n):
                same = ref.templates == ds.templates[i] if choice.per_template else slice(None)
                rows.append(ref_cache[name][same].mean(0))
            out[name] = torch.stack(rows)
        return [out]
    # resample: a reference prompt per example (of the same template), from a seeded generator
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_samples):
        if choice.per_template:
            members = {t: (ref.templates == t).nonzero()[:, 0] for t in ds.templates.tolist()}
            sizes = torch.tensor([len(members[t]) for t in ds.templates.tolist()])
            offsets = (torch.rand(n, generator=generator) * sizes).long()
            index = torch.stack(
                [members[t][o] for t, o in zip(ds.templates.tolist(), offsets, strict=True)]
            )
        else:
            n_ref = getattr(ref, "tokens", ref).shape[0]
            index = torch.randint(0, n_ref, (n,), generator=generator)
        draws.append({name: ref_cache[name][index] for name in names})
    return draws


@torch.no_grad()
def node_reference(model, ds, circuit, acts, metric, all_positions=False):
    """The per-example metric with every head outside ``circuit`` (and every MLP outside it,
    when it lists its MLPs) set to ``acts``, looping over examples, positions and heads."""
    cfg = model.cfg
    n, n_pos = ds.tokens.shape

    def at(pos, i, p):
        return pos is None or all_positions or int(ds.positions[pos][i]) == p

    def head_hook(z, hook):
        layer = int(hook.name.split(".")[1])
        z = z.clone()
        for i in range(n):
            for p in range(n_pos):
                for h in range(cfg.n_heads):
                    kept = any(
                        (node.head.layer, node.head.head) == (layer, h) and at(node.head.pos, i, p)
                        for node in circuit.nodes
                    )
                    if not kept:
                        z[i, p, h] = acts[hook.name][i, p, h]
        return z

    def mlp_hook(out, hook):
        layer = int(hook.name.split(".")[1])
        out = out.clone()
        for i in range(n):
            for p in range(n_pos):
                if not any(m.layer == layer and at(m.pos, i, p) for m in circuit.mlps):
                    out[i, p] = acts[hook.name][i, p]
        return out

    hooks = [(f"blocks.{x}.attn.hook_z", head_hook) for x in range(cfg.n_layers)]
    if circuit.mlps != "all" and not cfg.attn_only:
        hooks += [(f"blocks.{x}.hook_mlp_out", mlp_hook) for x in range(cfg.n_layers)]
    return metric(model.run_with_hooks(ds.tokens, fwd_hooks=hooks)).float()


def group_of(model):
    return model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)


@torch.no_grad()
def edge_reference(model, tokens, keeps, acts, metric):
    """The per-example metric when every edge ``sender -> receiver`` with ``keeps(sender,
    receiver)`` False is ablated: the receiver's input loses ``out - ablated`` of that sender
    (a head's output is its ``z`` times its ``W_O``).
    Senders: "embed", ("head", l, h), ("mlp", l); receivers: ("q", l, h), ("k", l, g),
    ("v", l, g) (g a key/value head), ("mlp", l), "logits"."""
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    w_o = [model.blocks[x].attn.W_O for x in range(n_layers)]
    deltas = {}  # sender -> its output in this run minus its ablated value
    through = {}  # sender -> the sum of the deltas of the senders up to it, in computed order
    last = []

    def record(sender, delta):
        deltas[sender] = delta
        through[sender] = delta + through[last[-1]] if last else delta
        last.append(sender)

    def senders_into(layer, mlp=False):
        found = ["embed"]
        for earlier in range(layer):
            found += [("head", earlier, h) for h in range(n_heads)]
            if not cfg.attn_only:
                found.append(("mlp", earlier))
        if mlp:
            found += [("head", layer, h) for h in range(n_heads)]
        return found

    def corrected(x, receiver, senders):
        # the sum over the ablated senders: over all (a prefix of the computed order), less the
        # kept ones
        kept = [sender for sender in senders if keeps(sender, receiver)]
        return x - (through[senders[-1]] - sum((deltas[s] for s in kept), torch.zeros_like(x)))

    def record_embed(x, hook):
        record("embed", x - acts["blocks.0.hook_resid_pre"])

    def record_z(z, hook, layer):
        ablated = acts[hook.name]
        for h in range(n_heads):
            record(("head", layer, h), (z[:, :, h] - ablated[:, :, h]) @ w_o[layer][h])

    def record_mlp(x, hook, layer):
        record(("mlp", layer), x - acts[hook.name])

    def attn_inputs(x, hook, layer, part):
        x = x.clone()
        for unit in range(x.shape[2]):
            x[:, :, unit] = corrected(x[:, :, unit], (part, layer, unit), senders_into(layer))
        return x

    hooks = [("blocks.0.hook_resid_pre", record_embed)]
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_z", lambda z, hook, x=layer: record_z(z, hook, x)))
        for part in ("q", "k", "v"):
            hooks.append(
                (
                    f"blocks.{layer}.hook_{part}_input",
                    lambda x, hook, layer=layer, part=part: attn_inputs(x, hook, layer, part),
                )
            )
        if not cfg.attn_only:
            hooks.append(
                (
                    f"blocks.{layer}.hook_mlp_in",
                    lambda x, hook, layer=layer: corrected(
                        x, ("mlp", layer), senders_into(layer, mlp=True)
                    ),
                )
            )
            hooks.append(
                (f"blocks.{layer}.hook_mlp_out", lambda x, hook, y=layer: record_mlp(x, hook, y))
            )
    hooks.append(
        (
            f"blocks.{n_layers - 1}.hook_resid_post",
            lambda x, hook: corrected(x, "logits", senders_into(n_layers)),
        )
    )
    with split_inputs(model):
        return metric(model.run_with_hooks(tokens, fwd_hooks=hooks)).float()


def between_nodes(model, circuit):
    """``keeps`` for a circuit of nodes: an edge is kept when both ends are in the circuit
    (the embeddings and the logits always are)."""
    heads = {(h.layer, h.head) for h in circuit.heads}
    layers = range(model.cfg.n_layers)
    mlps = set(layers) if circuit.mlps == "all" else {m.layer for m in circuit.mlps}
    group = group_of(model)

    def sender_in(sender):
        if sender == "embed":
            return True
        if sender[0] == "head":
            return sender[1:] in heads
        return sender[1] in mlps

    def receiver_in(receiver):
        if receiver == "logits":
            return True
        part, layer, *unit = receiver
        if part == "q":
            return (layer, unit[0]) in heads
        if part in ("k", "v"):
            return any((layer, h) in heads for h in range(unit[0] * group, (unit[0] + 1) * group))
        return layer in mlps

    return lambda sender, receiver: sender_in(sender) and receiver_in(receiver)


def listed(model, edges):
    """``keeps`` for a list of ``ck.Edge``: kept when listed."""
    group = group_of(model)

    def sender(s):
        if isinstance(s, ck.Embed):
            return "embed"
        return ("head", s.layer, s.head) if isinstance(s, ck.Head) else ("mlp", s.layer)

    def receiver(r):
        if r == "logits":
            return "logits"
        if isinstance(r, ck.MLP):
            return ("mlp", r.layer)
        return (r.part, r.layer, r.head if r.part == "q" else r.head // group)

    kept = {(sender(e.sender), receiver(e.receiver)) for e in edges}
    return lambda s, r: (s, r) in kept


@torch.no_grad()
def reference_runs(model, ds, circuit, draws, metric, choice):
    """``(model, circuit, everything ablated)`` per example, averaged over the draws."""
    out = []
    for acts in draws:
        if choice.level == "node":
            full = metric(model(ds.tokens)).float()
            kept = node_reference(model, ds, circuit, acts, metric, choice.positions == "all")
            empty = node_reference(model, ds, ck.Circuit(mlps=()), acts, metric)
        else:
            full = edge_reference(model, ds.tokens, lambda s, r: True, acts, metric)
            kept = edge_reference(model, ds.tokens, between_nodes(model, circuit), acts, metric)
            empty = edge_reference(model, ds.tokens, lambda s, r: False, acts, metric)
        out.append(torch.stack([full, kept, empty]))
    return torch.stack(out).mean(0)


def random_circuit(model, g, n_nodes=4):
    cfg = model.cfg
    nodes = {}
    while len(nodes) < n_nodes:
        layer = int(torch.randint(0, cfg.n_layers, (1,), generator=g))
        head = int(torch.randint(0, cfg.n_heads, (1,), generator=g))
        word = WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
        nodes[(layer, head, word)] = ck.Head(layer, head).at(word)
    mlps = "all"
    if not cfg.attn_only:
        word = WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
        mlps = (ck.MLP(0), ck.MLP(cfg.n_layers - 1).at(word))
    return ck.Circuit.from_classes({"x": list(nodes.values())}, mlps=mlps)


# -- the ablation value -------------------------------------------------------------------------


def test_ablation_value():
    ioi = Ablation("mean", per_template=True)
    assert ioi == DEFAULT_CHOICES[0] and ioi.positions == "circuit"
    assert (
        repr(ioi) == "Ablation(value='mean', per_template=True, level='node', positions='circuit')"
    )
    assert ioi.label == "mean-template, node, circuit positions"
    assert Ablation("corrupted", level="edge").positions == "all"
    assert Ablation("corrupted", level="edge").label == "corrupted, edge"
    assert check_ablation("mean-template", "f") == ioi
    assert check_ablation("resample", "f", level="edge") == Ablation("resample", level="edge")
    assert len({c.label for c in CHOICES}) == len(CHOICES)
    with pytest.raises(CircuitkitError, match="Ablation: value must be one of"):
        Ablation("noise")
    with pytest.raises(CircuitkitError, match="per_template is for mean and resample"):
        Ablation("zero", per_template=True)
    with pytest.raises(CircuitkitError, match="level='edge' needs positions='all'"):
        Ablation("mean", level="edge", positions="circuit")
    with pytest.raises(CircuitkitError, match="Ablation: positions must be"):
        Ablation("mean", positions="S2")
    with pytest.raises(CircuitkitError, match="f: ablation must be a ck.Ablation or one of"):
        check_ablation("mean_template", "f")
    with pytest.raises(CircuitkitError, match="f: the ablation is at level 'node'"):
        check_ablation(ioi, "f", level="edge")


# -- fast against the plain references ----------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CHOICES)), ids=[c.label for c in CHOICES])
def test_table_equals_the_plain_reference(index):
    # the tiny model kinds in turn: each sees node and edge choices
    choice, kind = CHOICES[index], KINDS[index % len(KINDS)]
    tiny_model = ck.tiny_model(kind).to(DEVICE)
    g = torch.Generator().manual_seed(index)
    ds = ck.IOIDataset(tiny_model, n=5, seed=index)
    abc = ds.corrupted("ABC")
    # a reference of other prompts (7 of them, as a token tensor); per template, the ABC
    # corruption, which has every template of ds
    ref = torch.cat([abc.tokens, ds.corrupted("random_names").tokens[:2]])
    if choice.per_template:
        ref = abc
    metric = ck.metrics.logit_diff(ds)
    circuit = random_circuit(tiny_model, g)
    n_samples = 2 if choice.value == "resample" else 1
    table = faithfulness_table(
        tiny_model, circuit, ds, abc, reference=ref, metric=metric, choices=[choice],
        n_samples=n_samples, seed=index, n_boot=200, progress=False,
    )  # fmt: skip
    draws = ablated_activations(tiny_model, ds, ref, abc, choice, seed=index, n_samples=n_samples)
    full, kept, empty = reference_runs(tiny_model, ds, circuit, draws, metric, choice).mean(-1)
    row = table.iloc[0]
    assert row["ablation"] == choice.label and row["n"] == ds.n
    assert row["f_model"] == pytest.approx(float(full), abs=1e-4)
    assert row["f_circuit"] == pytest.approx(float(kept), abs=1e-4)
    assert row["f_empty"] == pytest.approx(float(empty), abs=1e-4)
    f_model, f_circuit, f_empty = row["f_model"], row["f_circuit"], row["f_empty"]
    assert row["faithfulness"] == pytest.approx(f_circuit / f_model, rel=1e-9)
    assert row["normalized"] == pytest.approx((f_circuit - f_empty) / (f_model - f_empty), rel=1e-9)
    # the ablation does something, so the comparison can fail
    assert abs(float(empty - full)) > 1e-3
    # faithfulness() gives the same F(C), for the choices it can run (corrupted: reference=abc)
    if choice.value != "corrupted":
        f = ck.faithfulness(
            tiny_model, circuit, ds, reference=ref, metric=metric, ablation=choice,
            n_samples=n_samples, seed=index, progress=False,
        )  # fmt: skip
        assert f.f_circuit == pytest.approx(row["f_circuit"], abs=1e-5)
        assert f.ablation == choice and f.result.info["ablation"] == choice.label


def test_edge_level_ablates_the_edges_a_circuit_does_not_list(tiny_model):
    g = torch.Generator().manual_seed(7)
    ds = ck.IOIDataset(tiny_model, n=4, seed=7)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    edges = ck.Graph.of(tiny_model).edges
    chosen = torch.randperm(len(edges), generator=g)[: len(edges) // 3].tolist()
    circuit = ck.Circuit(edges=tuple(edges[i] for i in chosen))
    for choice in (Ablation("corrupted", level="edge"), Ablation("mean", level="edge")):
        f = ck.faithfulness(
            tiny_model, circuit, ds, reference=abc, metric=metric, ablation=choice,
            progress=False,
        )  # fmt: skip
        (acts,) = ablated_activations(tiny_model, ds, abc, abc, choice)
        expected = edge_reference(tiny_model, ds.tokens, listed(tiny_model, circuit.edges), acts,
                                  metric)  # fmt: skip
        assert f.f_circuit == pytest.approx(float(expected.mean()), abs=1e-4)
        # the engine's reference path agrees per example
        slow = ck.faithfulness(
            tiny_model, circuit, ds, reference=abc, metric=metric, ablation=choice,
            reference_engine=True, progress=False,
        )  # fmt: skip
        assert_close(slow.result.examples, f.result.examples, atol=1e-4, rtol=1e-4)


def test_node_and_edge_level_agree_for_a_circuit_of_nodes(tiny_llama):
    # the edges between a circuit's nodes carry all it reads: removing a node or its edges
    # out of the circuit is the same run
    g = torch.Generator().manual_seed(3)
    ds = ck.IOIDataset(tiny_llama, n=4, seed=3)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    circuit = random_circuit(tiny_llama, g, n_nodes=5)
    for value in ("zero", "mean", "resample", "corrupted"):
        node, edge = (
            ck.faithfulness(
                tiny_llama,
                circuit,
                ds,
                reference=abc,
                metric=metric,
                progress=False,
                ablation=Ablation(value, level=level, positions="all"),
            )  # fmt: skip
            for level in ("node", "edge")
        )
        assert_close(edge.result.examples, node.result.examples, atol=1e-4, rtol=1e-4)


def test_existing_calls_are_unchanged(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=2)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    circuit = ck.Circuit.from_classes({"x": [ck.Head(2, 1).at("end"), ck.Head(1, 0).at("S2")]})
    kwargs = dict(reference=abc, metric=metric, progress=False)
    default = ck.faithfulness(tiny_gpt2, circuit, ds, **kwargs)
    assert default.ablation == Ablation("mean", per_template=True) == DEFAULT_CHOICES[0]
    given = ck.faithfulness(tiny_gpt2, circuit, ds, ablation="mean-template", **kwargs)
    assert torch.equal(default.result.examples, given.result.examples)
    by_method = ck.faithfulness(
        tiny_gpt2, circuit, ds, method="resample", per_template=False, seed=4, **kwargs
    )
    by_ablation = ck.faithfulness(tiny_gpt2, circuit, ds, ablation="resample", seed=4, **kwargs)
    assert torch.equal(by_method.result.examples, by_ablation.result.examples)
    with pytest.raises(CircuitkitError, match="faithfulness: give the ablation either"):
        ck.faithfulness(tiny_gpt2, circuit, ds, method="zero", ablation="zero", **kwargs)


# -- the table ----------------------------------------------------------------------------------


def test_table_intervals(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=12, seed=5)
    abc = ds.corrupted("ABC")

    def shifted(logits):  # a metric well away from 0, so every ratio has an interval
        return ck.metrics.logit_diff(ds)(logits) + 20.0

    circuit = ck.Circuit.from_classes({"x": [ck.Head(2, 1), ck.Head(1, 0).at("S2")]})
    table = faithfulness_table(
        tiny_gpt2, circuit, ds, reference=abc, metric=shifted, n_boot=500, progress=False,
        choices=["mean-template", "zero", Ablation("corrupted", level="edge")],
    )  # fmt: skip
    assert list(table["ablation"]) == [
        "mean-template, node, circuit positions",
        "zero, node, circuit positions",
        "corrupted, edge",
    ]
    columns = {"faithfulness", "ci_low", "ci_high", "normalized", "normalized_ci_low"}
    assert columns | {"normalized_ci_high", "f_circuit", "f_model", "f_empty"} <= set(table)
    for _, row in table.iterrows():
        assert row["ci_low"] < row["faithfulness"] < row["ci_high"]
        if not math.isnan(row["normalized_ci_low"]):
            assert row["normalized_ci_low"] <= row["normalized"] <= row["normalized_ci_high"]
    assert len(set(table["f_model"].round(5))) == 1  # one full model


def test_ratio_interval_is_the_bootstrap_of_the_ratio():
    g = torch.Generator().manual_seed(0)
    for n, level in ((8, 0.9), (30, 0.95)):
        b = 2.0 + torch.randn(n, generator=g)
        a = 0.7 * b + 0.3 * torch.randn(n, generator=g)
        low, high = ratio_interval(a, b, level, n_boot=1000, seed=3)
        # the ratios of the same draws (bootstrap_interval's: one randint of n_boot x n)
        draws = torch.randint(0, n, (1000, n), generator=torch.Generator().manual_seed(3))
        ratios = (a.double()[draws].mean(1) / b.double()[draws].mean(1)).sort().values
        for bound, q in ((low, (1 - level) / 2), (high, (1 + level) / 2)):
            rank = q * (len(ratios) - 1)
            assert ratios[math.floor(rank) - 1] <= bound <= ratios[math.ceil(rank) + 1]
        assert low < float(a.mean() / b.mean()) < high
        assert ratio_interval(-a, -b, level, n_boot=1000, seed=3) == pytest.approx((low, high))
    assert all(math.isnan(x) for x in ratio_interval(torch.ones(5), torch.randn(5, generator=g)))
    assert all(math.isnan(x) for x in ratio_interval(torch.ones(1), torch.ones(1)))
    with pytest.raises(ShapeError, match="ratio_interval: numerator has 3 values"):
        ratio_interval(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(level=2), r"level must be a number between 0 and 1 \(such as 0\.95\), got 2$"),
        (dict(level=math.nan), r"level must be a number between 0 and 1 .*got nan$"),
        (dict(level=-0.5), r"level must be a number between 0 and 1 .*got -0\.5$"),
        (dict(n_boot=0), r"n_boot must be an int from 1 to 1e6 .*got 0$"),
        (dict(n_boot=2.5), r"n_boot must be an int from 1 to 1e6 .*got 2\.5$"),
        (dict(n_boot=math.nan), r"n_boot must be an int from 1 to 1e6 .*got nan$"),
    ],
)
def test_intervals_check_level_and_n_boot_first(tiny_gpt2, bad, message):
    """Faithfulness.ci, ratio_interval and faithfulness_table (its ``ci=``) name themselves and
    the argument; the table refuses before its first forward pass."""
    ds = ck.IOIDataset(tiny_gpt2, n=6, seed=0)
    abc = ds.corrupted("ABC")
    circuit = ck.Circuit.from_classes({"x": [ck.Head(2, 1)]})
    f = ck.faithfulness(tiny_gpt2, circuit, ds, reference=abc, progress=False)
    level, n_boot = bad.get("level", 0.95), bad.get("n_boot", 100)
    with pytest.raises(CircuitkitError, match=rf"^Faithfulness\.ci: {message}"):
        f.ci(level, n_boot=n_boot)
    with pytest.raises(CircuitkitError, match=rf"^ratio_interval: {message}"):
        ratio_interval(torch.ones(1), torch.ones(1), level, n_boot=n_boot)

    def never(logits):
        raise AssertionError("the table ran the model before checking its arguments")

    with pytest.raises(
        CircuitkitError, match=rf"^faithfulness_table: {message.replace('level must', 'ci must')}"
    ):
        faithfulness_table(tiny_gpt2, circuit, ds, reference=abc, metric=never, ci=level,
                           n_boot=n_boot, progress=False)  # fmt: skip
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())
    low, high = f.ci(0.9, n_boot=200)
    assert low <= f.ratio <= high


def test_bad_inputs_leave_the_model_unchanged(tiny_llama):
    model = tiny_llama
    before = copy.deepcopy(model.state_dict())
    ds = ck.IOIDataset(model, n=4, seed=1)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    circuit = ck.Circuit.from_classes({"x": [ck.Head(0, 0).at("end")]})
    other = ck.IOIDataset(model, n=3, seed=2).corrupted("ABC")
    kwargs = dict(metric=metric, progress=False)
    with pytest.raises(CircuitkitError, match="faithfulness_table: choices must be a non-empty"):
        faithfulness_table(model, circuit, ds, reference=abc, choices="zero", **kwargs)
    with pytest.raises(CircuitkitError, match="faithfulness_table: ablation must be"):
        faithfulness_table(model, circuit, ds, reference=abc, choices=["mean_all"], **kwargs)
    with pytest.raises(ShapeError, match="faithfulness_table: corrupted ablation patches"):
        faithfulness_table(model, circuit, ds, other, reference=abc, choices=["corrupted"],
                           **kwargs)  # fmt: skip
    with pytest.raises(ShapeError, match="faithfulness: corrupted ablation patches"):
        ck.faithfulness(model, circuit, ds, reference=other, ablation="corrupted", **kwargs)
    for level in ("node", "edge"):
        with pytest.raises(CircuitkitError, match="faithfulness: mean ablation needs reference"):
            ck.faithfulness(model, circuit, ds, reference=None,
                            ablation=Ablation("mean", level=level), **kwargs)  # fmt: skip
        with pytest.raises(CircuitkitError, match="per_template=True needs datasets with"):
            ck.faithfulness(model, circuit, ds, reference=abc.tokens,
                            ablation=Ablation("mean", True, level=level), **kwargs)  # fmt: skip
    with pytest.raises(ComponentError, match="faithfulness_table: .*layer 7 is out of range"):
        faithfulness_table(model, ck.Circuit.from_classes({"x": [ck.Head(7, 0)]}), ds,
                           reference=abc, **kwargs)  # fmt: skip
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


# -- the default model --------------------------------------------------------------------------


IOI_HEADS = {
    "name mover": [ck.Head(23, 0).at("end"), ck.Head(23, 3).at("end")],
    "s-inhibition": [ck.Head(20, 0).at("end")],
    "induction": [ck.Head(8, 1).at("S2")],
}


@pytest.fixture(scope="module")
def smollm_table(smollm):
    """The table of every default choice on 2 prompts, and what the references need."""
    ds = ck.IOIDataset(smollm, n=2, seed=0)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    circuit = ck.Circuit.from_classes(IOI_HEADS)
    table = faithfulness_table(
        smollm, circuit, ds, abc, reference=abc, metric=metric, n_boot=200, progress=False
    )
    clean_cache, abc_cache = sender_caches(smollm, ds, abc)
    with torch.no_grad():
        plain = float(metric(smollm(ds.tokens)).mean())
    return ds, abc, metric, circuit, table, (clean_cache, abc_cache, abc_cache), plain


@pytest.mark.real
@pytest.mark.parametrize(
    "index", range(len(DEFAULT_CHOICES)), ids=[c.label for c in DEFAULT_CHOICES]
)
def test_table_on_smollm(smollm, smollm_table, index):
    choice = DEFAULT_CHOICES[index]
    ds, abc, metric, circuit, table, caches, plain = smollm_table
    row = table.iloc[index]
    assert row["ablation"] == choice.label
    (acts,) = ablated_activations(smollm, ds, abc, abc, choice, caches=caches)
    if choice.level == "node":
        expected = node_reference(smollm, ds, circuit, acts, metric, choice.positions == "all")
    else:
        expected = edge_reference(smollm, ds.tokens, between_nodes(smollm, circuit), acts, metric)
    assert row["f_circuit"] == pytest.approx(float(expected.mean()), abs=2e-3)
    assert row["f_model"] == pytest.approx(plain, abs=2e-3) and plain > 1  # it does the task
    assert abs(row["f_circuit"] - row["f_model"]) > 1e-2
    assert row["f_empty"] != pytest.approx(row["f_model"], abs=1e-2)
    assert row["ci_low"] <= row["faithfulness"] <= row["ci_high"]
