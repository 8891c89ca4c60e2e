"""Faithfulness curves (circuitkit.circuits.curves): CPR and CMD on curves with closed-form
areas, and every circuit of a curve against a plain one-forward-per-circuit reference."""

from __future__ import annotations

import math

import pytest
import torch
from _device import DEVICE
from test_faithfulness import (
    KINDS,
    ablated_activations,
    edge_reference,
    listed,
    node_reference,
)

import circuitkit as ck
from circuitkit.circuits.curves import MIB_SIZES, cmd, cpr, faithfulness_curve
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.interface.plot import plot_curves
from circuitkit.methods.ablation import Ablation


def synthetic(fractions, values, *, labels_only=False):
    """A curve Result with the given points."""
    info = {} if labels_only else {"fractions": list(fractions)}
    return ck.Result(
        values=torch.as_tensor(values, dtype=torch.float64),
        axes=("size",),
        labels={"size": [str(x) for x in fractions]},
        info=info,
    )


# -- CPR and CMD --------------------------------------------------------------------------------


def test_cpr_and_cmd_of_curves_with_closed_form_areas():
    g = torch.Generator().manual_seed(0)
    grids = [list(MIB_SIZES)]
    for _ in range(4):
        grids.append(sorted(torch.rand(int(torch.randint(2, 12, (1,), generator=g)), generator=g)
                            .double().tolist()))  # fmt: skip
    for x in grids:
        span = x[-1] - x[0]
        x_t = torch.tensor(x, dtype=torch.float64)
        for labels_only in (False, True):
            # f = 1: CPR is the span of the axis (0.999 on MIB's sizes), CMD 0
            perfect = synthetic(x, torch.ones(len(x)), labels_only=labels_only)
            assert cpr(perfect) == pytest.approx(span, abs=1e-12) and cmd(perfect) == 0
            # f constant c: CPR c * span, CMD |1 - c| * span
            for c in (0.0, 0.3, 1.7, -0.4):
                constant = synthetic(x, [c] * len(x), labels_only=labels_only)
                assert cpr(constant) == pytest.approx(c * span, abs=1e-12)
                assert cmd(constant) == pytest.approx(abs(1 - c) * span, abs=1e-12)
        # f linear in x (the trapezoid rule is exact): below 1 everywhere, so CMD = span - CPR
        a, b = -0.2, 0.9
        line = synthetic(x, a + b * x_t)
        area = a * span + b * (x[-1] ** 2 - x[0] ** 2) / 2
        assert cpr(line) == pytest.approx(area, abs=1e-12)
        assert cmd(line) == pytest.approx(span - area, abs=1e-12)
    assert cpr(perfect) == cpr(synthetic(x, [1.0] * len(x), labels_only=True))
    # MIB's sizes: a perfect curve scores 0.999, not 1 (no division by the span)
    assert cpr(synthetic(MIB_SIZES, [1.0] * 10)) == pytest.approx(0.999, abs=1e-12)


def test_cpr_and_cmd_read_only_curves():
    with pytest.raises(CircuitkitError, match="cpr: expected a faithfulness curve"):
        cpr(ck.Result(torch.ones(3), ("edges",), {}))
    with pytest.raises(CircuitkitError, match="cmd: the curve's fractions must increase"):
        cmd(synthetic([0.1, 0.05], [1.0, 1.0]))
    with pytest.raises(CircuitkitError, match="cpr: the curve's 'size' labels must be fractions"):
        cpr(ck.Result(torch.ones(2), ("size",), {"size": ["a", "b"]}))


# -- curves against the reference ----------------------------------------------------------------

EDGE_CHOICES = ("corrupted", "mean", "mean-template", "zero", "resample")
SIZES = (0.0, 0.01, 0.05, 0.2, 0.6, 1.0)


def ranked(values, absolute, sign):
    """Indices from the most to the least important score (ties in order)."""
    key = [abs(v) if absolute else sign * v for v in values]
    return sorted(range(len(values)), key=lambda i: -key[i])


@pytest.mark.parametrize("index", range(len(EDGE_CHOICES)), ids=EDGE_CHOICES)
def test_edge_curve_equals_the_plain_reference(index):
    name, kind = EDGE_CHOICES[index], KINDS[index % len(KINDS)]
    model = ck.tiny_model(kind, seed=index).to(DEVICE)
    ds = ck.IOIDataset(model, n=5, seed=10 + index)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    scores = ck.edge_attribution_patching(model, ds, abc, metric, progress=False)
    absolute = index % 2 == 0  # MIB ranks by |score| for CMD, by signed score for CPR
    curve = faithfulness_curve(
        model, ds, abc, metric, scores=scores, sizes=SIZES, ablation=name, absolute=absolute,
        seed=index, progress=False,
    )  # fmt: skip
    choice = Ablation(name.split("-")[0], per_template=name.endswith("template"), level="edge")
    (acts,) = ablated_activations(model, ds, abc, abc, choice, seed=index)
    edges = scores.edges()
    values = [scores.score(edge) for edge in edges]
    order = ranked(values, absolute, sign=-1)  # noising scores: the most negative helps most
    n_edges = ck.Graph.of(model).n_edges
    assert curve.info["n_items"] == n_edges == len(edges)
    assert curve.info["k"] == [int(x * n_edges) for x in SIZES]
    expected = torch.stack(
        [
            edge_reference(
                model, ds.tokens, listed(model, [edges[i] for i in order[:k]]), acts, metric
            )  # fmt: skip
            for k in curve.info["k"]
        ]
    ).double()
    assert torch.allclose(curve.info["m_circuit_examples"], expected, atol=1e-4)
    m_full = float(metric(model(ds.tokens)).detach().mean())
    assert curve.info["m_full"] == pytest.approx(m_full, abs=1e-4)
    assert curve.info["m_empty"] == pytest.approx(float(expected[0].mean()), abs=1e-4)
    # normalised: the empty circuit 0, every edge 1, ratios of means in between
    assert curve.values[0] == 0 and curve.values[-1] == 1
    normalised = (expected.mean(-1) - expected[0].mean()) / (m_full - expected[0].mean())
    assert torch.allclose(curve.values, normalised, atol=1e-3)
    assert torch.allclose(curve.examples.mean(-1), curve.values, atol=1e-9)
    assert curve.axes == ("size",) and curve.labels["size"] == [str(x) for x in SIZES]
    assert curve.info["cpr"] == cpr(curve) and curve.info["cmd"] == cmd(curve)
    low, high = curve.ci(0.9, n_boot=200)
    assert bool((low <= curve.values + 1e-9).all() and (curve.values <= high + 1e-9).all())


@pytest.mark.parametrize("kind", KINDS)
def test_node_curve_equals_the_plain_reference(kind):
    model = ck.tiny_model(kind, seed=3).to(DEVICE)
    ds = ck.IOIDataset(model, n=5, seed=4)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    cfg = model.cfg
    heads = ck.attribution_patching(model, ds, abc, metric, "head", progress=False)
    if kind == "gpt2":  # heads and MLPs, ranked together
        scores = [heads, ck.attribution_patching(model, ds, abc, metric, "mlp", progress=False)]
        scored = [ck.Head(x, h) for x in range(cfg.n_layers) for h in range(cfg.n_heads)]
        scored += [ck.MLP(x) for x in range(cfg.n_layers)]
        values = heads.effect().values.flatten().tolist() + scores[1].effect().values.tolist()
    elif kind == "llama":  # heads only: the MLPs stay in every circuit
        scores = heads
        scored = [ck.Head(x, h) for x in range(cfg.n_layers) for h in range(cfg.n_heads)]
        values = heads.effect().values.flatten().tolist()
    else:  # given as {component: score}
        g = torch.Generator().manual_seed(1)
        scored = [ck.Head(x, h) for x in range(cfg.n_layers) for h in range(cfg.n_heads)]
        values = torch.randn(len(scored), generator=g).tolist()
        scores = dict(zip(scored, values, strict=True))
    curve = faithfulness_curve(
        model, ds, abc, metric, scores=scores, sizes=SIZES, level="node", ablation="mean",
        progress=False,
    )  # fmt: skip
    (acts,) = ablated_activations(model, ds, abc, abc, Ablation("mean"))
    order = ranked(values, absolute=True, sign=1)
    assert curve.info["n_items"] == len(scored)
    expected = []
    for k in curve.info["k"]:
        kept = {scored[i] for i in order[:k]}
        circuit = ck.Circuit.from_classes(
            {"x": [s for s in scored if isinstance(s, ck.Head) and s in kept]},
            mlps=[m for m in scored if isinstance(m, ck.MLP) and m in kept]
            if kind == "gpt2"
            else "all",
        )
        expected.append(node_reference(model, ds, circuit, acts, metric))
    expected = torch.stack(expected).double()
    assert torch.allclose(curve.info["m_circuit_examples"], expected, atol=1e-4)
    assert curve.values[0] == 0 and curve.values[-1] == 1
    assert (
        curve.info["level"] == "node" and curve.info["ablation"] == "mean, node, circuit positions"
    )


def test_curve_errors(tiny_gpt2):
    model = tiny_gpt2
    ds = ck.IOIDataset(model, n=4, seed=0)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    scores = ck.edge_attribution_patching(model, ds, abc, metric, progress=False)
    heads = ck.attribution_patching(model, ds, abc, metric, "head", progress=False)
    kwargs = dict(progress=False)
    where = "faithfulness_curve"
    with pytest.raises(CircuitkitError, match=f"{where}: level must be 'edge' or 'node'"):
        faithfulness_curve(model, ds, abc, metric, scores=scores, level="head", **kwargs)
    with pytest.raises(CircuitkitError, match=f"{where}: the ablation is at level 'node'"):
        faithfulness_curve(model, ds, abc, metric, scores=scores, ablation=Ablation("mean"),
                           **kwargs)  # fmt: skip
    with pytest.raises(CircuitkitError, match=f"{where}: with level='edge', scores must be"):
        faithfulness_curve(model, ds, abc, metric, scores=heads, **kwargs)
    with pytest.raises(CircuitkitError, match=f"{where}: with level='node', scores must be"):
        faithfulness_curve(model, ds, abc, metric, scores=scores, level="node", **kwargs)
    with pytest.raises(CircuitkitError, match=f"{where}: node scores are results over"):
        attn = ck.attribution_patching(model, ds, abc, metric, "attn", progress=False)
        faithfulness_curve(model, ds, abc, metric, scores=attn, level="node", **kwargs)
    with pytest.raises(ComponentError, match=f"{where}: node scores are for heads"):
        faithfulness_curve(model, ds, abc, metric, scores={ck.Head(0, 0).at("end"): 1.0},
                           level="node", **kwargs)  # fmt: skip
    with pytest.raises(ComponentError, match=f"{where}: scores give some component more"):
        faithfulness_curve(model, ds, abc, metric, scores=[heads, heads], level="node", **kwargs)
    for sizes, match in (([], "non-empty"), ([0.5, 0.1], "must increase"), ([2], "in \\[0, 1\\]")):
        with pytest.raises(CircuitkitError, match=f"{where}: sizes {match}|{where}: .*{match}"):
            faithfulness_curve(model, ds, abc, metric, scores=scores, sizes=sizes, **kwargs)
    with pytest.raises(ShapeError, match=f"{where}: clean has shape"):
        faithfulness_curve(model, ds, abc.tokens[:3], metric, scores=scores, **kwargs)
    with pytest.raises(CircuitkitError, match=f"{where}: the full model and the empty circuit"):
        faithfulness_curve(model, ds, abc, lambda logits: logits[:, -1, 0] * 0, scores=scores,
                           **kwargs)  # fmt: skip
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())


# -- drawing ------------------------------------------------------------------------------------


def test_plot_draws_curves_on_a_log_axis_with_cpr_and_cmd():
    g = torch.Generator().manual_seed(2)
    one = synthetic(MIB_SIZES, torch.linspace(0.2, 1.0, 10))
    one.examples = one.values[:, None] + 0.1 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    two = synthetic((0.0, *MIB_SIZES), torch.linspace(0.0, 0.9, 11))
    fig = ck.plot(one)
    (trace,) = fig.data
    assert fig.layout.xaxis.type == "log" and list(trace.x) == list(MIB_SIZES)
    assert f"CPR {cpr(one):.3f}, CMD {cmd(one):.3f}" in trace.name
    assert trace.error_y.array is not None and len(trace.error_y.array) == 10
    fig = plot_curves({"EAP-IG": one, "EAP": two})
    assert [t.name.split(" (")[0] for t in fig.data] == ["EAP-IG", "EAP"]
    assert len(fig.data[1].x) == 10  # the fraction 0 has no place on a log axis
    assert math.isclose(fig.layout.shapes[0].y0, 1.0)  # the full model
    linear = plot_curves({"EAP": two}, log_x=False, error=None)
    assert linear.layout.xaxis.type == "linear" and len(linear.data[0].x) == 11
    with pytest.raises(ShapeError, match="plot_curves: 'x' is not a faithfulness curve"):
        plot_curves({"x": ck.Result(torch.ones(2), ("layer",), {})})
    with pytest.raises(CircuitkitError, match="plot_curves: give the curves as"):
        plot_curves([one])
