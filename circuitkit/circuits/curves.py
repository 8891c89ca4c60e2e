"""Faithfulness curves: how much of a behaviour the top-scoring edges (or nodes) carry, for
circuits from a few edges to all of them, and the two areas that summarise a curve.

Context. A circuit-discovery method (EAP, EAP-IG, ...) gives every edge of the model's graph a
score. MIB's circuit localisation track (Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark"; ``MIB_circuit_track/evaluation.py``, ``evaluate_area_under_curve``)
judges the ranking, not one circuit: for each fraction ``x`` of the edges (``MIB_SIZES``:
0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%) the circuit ``C_x`` is the top
``k = int(x * n_edges)`` edges by score, every other edge is ablated, and the circuit's
faithfulness is

    f(x) = (m(C_x) - m(∅)) / (m(M) - m(∅))

where ``m`` is the metric's **mean over the dataset, taken before the ratio** (a ratio of
means, not a mean of per-example ratios), ``m(M)`` the full model's and ``m(∅)`` the empty
circuit's (every edge ablated). So ``f`` is 0 for the empty circuit and 1 for the full model;
it is not clipped, and may leave [0, 1]. Two numbers summarise the curve:

- **CPR** (circuit performance ratio), the area under ``f``: higher is better;
- **CMD** (circuit-model difference), the area under ``|1 - f|``: lower is better.

Both are the trapezoid rule over the fractions given, on a linear axis, not divided by the
axis's range (on ``MIB_SIZES`` a perfect curve, ``f = 1``, has CPR 0.999 and CMD 0), as MIB
computes them; CMD applies the trapezoid rule to ``|1 - f|`` at the sizes, so where ``f``
crosses 1 between two sizes it is not the exact area between the straight segments and 1.
MIB ranks edges by signed score for CPR and by ``|score|`` for CMD (``absolute=``).

``level="node"`` ranks heads and MLPs instead (node scores from ``ck.attribution_patching``
or ``ck.activation_patching``); a circuit of ``k`` nodes keeps them and ablates every other
scored component at every position. The ablation (``ck.Ablation``; MIB's is "corrupted",
patching the paired corrupted prompt's activations) is the one of
``circuitkit.circuits.faithfulness``. All the circuits of a curve run in one batched call:
``ck.patch_edges`` for edges, the intervention engine for nodes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from circuitkit.circuits.circuit import Circuit, CircuitHead
from circuitkit.circuits.faithfulness import AblatedRun, AblatedRuns
from circuitkit.core import provenance
from circuitkit.core.components import MLP, Component, Head
from circuitkit.core.engine import check_memory_budget
from circuitkit.core.errors import CircuitkitError, ComponentError
from circuitkit.core.graph import EdgeScores, Graph, check_edge_scores, check_graph_metric
from circuitkit.core.inputs import as_tokens, check_same_shape, default_metric
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result
from circuitkit.methods.ablation import Ablation, check_ablation

#: The fractions of edges (or nodes) MIB evaluates circuits at.
MIB_SIZES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

NodeScores = Result | Sequence[Result] | Mapping[Component, float]


def faithfulness_curve(
    model: HookedTransformer,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"],
    metric: MetricLike | None = None,
    *,
    scores: EdgeScores | NodeScores,
    sizes: Sequence[float] = MIB_SIZES,
    level: Literal["edge", "node"] = "edge",
    ablation: Ablation | str = "corrupted",
    reference: Any | Int[Tensor, "n_ref pos"] | None = None,
    absolute: bool = True,
    n_samples: int = 1,
    seed: int = 0,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Result:
    """The normalised faithfulness of the top-scoring circuits of each size (MIB's curve).

    For each fraction ``x`` of ``sizes`` the circuit is the top ``int(x * n_items)`` edges
    (``level="edge"``: every edge of ``ck.Graph.of(model)``, ``scores`` an ``EdgeScores`` such
    as ``ck.edge_attribution_patching`` gives) or nodes (``level="node"``: heads and MLPs,
    ``scores`` a node ``Result`` over ("layer", "head") or MLPs over ("layer",), a list of
    them, or ``{component: score}``; components without a score are kept in every circuit),
    ranked by ``|score|`` (``absolute=True``) or by signed score (``absolute=False``: the
    items whose patching most lowers the metric first for noising scores, most raises it for
    denoising ones, as MIB's signed ranking keeps the items that most help the behaviour).
    Everything outside the circuit is ablated on ``clean`` by ``ablation`` (default
    "corrupted": each prompt's paired prompt of ``corrupted``; "mean", "resample" from
    ``reference``, default ``corrupted``; see ``ck.Ablation``), exactly, all sizes in one
    batched call. ``f = (m(C) - m(∅)) / (m(M) - m(∅))``, with means over the examples before
    the ratio (see the module docstring).

    Returns a ``Result`` with axis "size" (labels: the fractions), ``values`` the faithfulness
    ``f`` at each size and ``examples`` [size, n] each example's ``(m_i(C) - m(∅)) / (m(M) -
    m(∅))`` (their mean is ``f``; intervals from them hold ``m(M)`` and ``m(∅)`` at their
    means). ``info`` holds "cpr" and "cmd" (``cpr(curve)``, ``cmd(curve)``), "m_full",
    "m_empty" (and "..._examples" per example), "m_circuit" and "m_circuit_examples" (the raw
    metric of each circuit), "fractions", "k" (items kept), "n_items", "level", "ablation",
    "absolute", "definition".

    Example::

        scores = ck.edge_attribution_patching(model, ds, abc, metric, method="eap-ig")
        curve = ck.faithfulness_curve(model, ds, abc, metric, scores=scores)
        curve.info["cpr"], curve.info["cmd"]
        ck.plot(curve)
    """
    where = "faithfulness_curve"
    memory_budget = check_memory_budget(memory_budget, where)
    if level not in ("edge", "node"):
        raise CircuitkitError(f"{where}: level must be 'edge' or 'node', got {level!r}")
    if not isinstance(absolute, bool):
        raise CircuitkitError(f"{where}: absolute must be True or False, got {absolute!r}")
    choice = check_ablation(ablation, where, level=level)
    clean_tokens, _ = as_tokens(clean, "clean", where, model=model)
    corrupted_tokens, _ = as_tokens(corrupted, "corrupted", where, model=model)
    check_same_shape(clean_tokens, corrupted_tokens, ("clean", "corrupted"), where)
    metric = default_metric(metric, clean, where)
    check_graph_metric(metric, clean_tokens.shape[0], where)
    fractions = _check_sizes(sizes, where)

    if level == "edge":
        graph = Graph.of(model, where)
        values, sign = _edge_scores(scores, graph, where)
    else:
        components, values, sign = _node_scores(model, scores, where)
    key = values.abs() if absolute else sign * values
    order = key.argsort(descending=True, stable=True)
    n_items = len(order)
    ks = [int(fraction * n_items) for fraction in fractions]
    evaluated = sorted({0, n_items, *ks})

    runs: list[AblatedRun]
    if level == "edge":
        rows, columns = graph.valid.nonzero(as_tuple=True)
        runs = []
        for k in evaluated:
            kept = torch.zeros_like(graph.valid)
            kept[rows[order[:k]], columns[order[:k]]] = True
            runs.append(kept)
    else:
        runs = [node_circuit(model, components, order[:k].tolist()) for k in evaluated]
    setup = AblatedRuns.make(
        model, clean, reference=corrupted if reference is None else reference,
        corrupted=corrupted, metric=metric, ablation=choice, where=where,
        n_samples=n_samples, seed=seed,
    )  # fmt: skip
    examples = setup.evaluate(
        runs, reference_engine=reference_engine, memory_budget=memory_budget, progress=progress
    ).double()
    metric_of = dict(zip(evaluated, examples, strict=True))
    m_full, m_empty = float(metric_of[n_items].mean()), float(metric_of[0].mean())
    if m_full == m_empty:
        raise CircuitkitError(
            f"{where}: the full model and the empty circuit have the same mean metric "
            f"({m_full:.6g}), so m(M) - m(∅) is 0 and faithfulness is undefined; use a metric "
            "on which the ablation matters"
        )
    raw = torch.stack([metric_of[k] for k in ks])  # [size, n]
    scale = m_full - m_empty
    # + 0.0: the empty circuit's 0 is 0.0, not -0.0
    values_f = torch.tensor(
        [(float(m.mean()) - m_empty) / scale + 0.0 for m in raw], dtype=torch.float64
    )
    made = provenance.record(
        model,
        method=where,
        args={
            "sizes": fractions,
            "level": level,
            "ablation": choice.label,
            "absolute": absolute,
            "n_samples": n_samples,
            "seed": seed,
            "scores": getattr(scores, "method", None) or type(scores).__name__,
        },
        data={"clean": clean, "corrupted": corrupted, "reference": reference},
        metric=metric,
    )
    curve = Result(
        values=values_f,
        axes=("size",),
        labels={"size": [str(fraction) for fraction in fractions]},
        examples=(raw - m_empty) / scale,
        metric="faithfulness",
        method=where,
        info={
            "definition": "(m(C) - m(∅)) / (m(M) - m(∅)), m the metric's mean over the examples",
            "fractions": fractions,
            "k": ks,
            "n_items": n_items,
            "level": level,
            "ablation": choice.label,
            "absolute": absolute,
            "metric": provenance.metric_name(metric),
            "m_full": m_full,
            "m_empty": m_empty,
            "m_full_examples": metric_of[n_items],
            "m_empty_examples": metric_of[0],
            "m_circuit": raw.mean(-1),
            "m_circuit_examples": raw,
        },
        provenance=made,
    )
    curve.info["cpr"] = cpr(curve)
    curve.info["cmd"] = cmd(curve)
    return curve


def cpr(curve: Result) -> float:
    """The circuit performance ratio of a faithfulness curve: the area under ``f``.

    MIB's definition (Mueller et al. 2025, ``evaluate_area_under_curve``'s ``area_under``):
    the trapezoid rule over the curve's fractions ``x_i`` on a linear axis, not divided by the
    axis's range, ``sum_i (x_{i+1} - x_i) (f_i + f_{i+1}) / 2``. Higher is better; ``f = 1``
    everywhere gives ``x_max - x_min`` (0.999 on ``MIB_SIZES``).

    Example::

        ck.cpr(curve)      # the same as curve.info["cpr"]
    """
    x, f = _points(curve, "cpr")
    return math.fsum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(x) - 1))


def cmd(curve: Result) -> float:
    """The circuit-model difference of a faithfulness curve: the area under ``|1 - f|``.

    MIB's definition (Mueller et al. 2025, ``evaluate_area_under_curve``'s ``area_from_1``):
    the trapezoid rule applied to ``|1 - f_i|`` over the curve's fractions on a linear axis,
    not divided by the axis's range, ``sum_i (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) /
    2``. Lower is better; 0 for ``f = 1`` everywhere, ``|1 - c| (x_max - x_min)`` for a
    constant ``c``.

    Example::

        ck.cmd(curve)      # the same as curve.info["cmd"]
    """
    x, f = _points(curve, "cmd")
    return math.fsum(
        (x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(len(x) - 1)
    )


def _points(curve: Any, where: str) -> tuple[list[float], list[float]]:
    """The fractions and faithfulness values of a curve (a ``Result`` with axis "size")."""
    if not isinstance(curve, Result) or curve.axes != ("size",):
        got = curve.axes if isinstance(curve, Result) else type(curve).__name__
        raise CircuitkitError(
            f"{where}: expected a faithfulness curve, a Result with the one axis 'size' "
            f"(ck.faithfulness_curve), got {got}"
        )
    x = curve.info.get("fractions")
    if x is None:
        try:
            x = [float(label) for label in curve.labels["size"]]
        except ValueError:
            raise CircuitkitError(
                f"{where}: the curve's 'size' labels must be fractions such as '0.01', got "
                f"{curve.labels['size']}"
            ) from None
    x = [float(v) for v in x]
    if any(b <= a for a, b in zip(x, x[1:], strict=False)):
        raise CircuitkitError(f"{where}: the curve's fractions must increase, got {x}")
    return x, curve.values.double().tolist()


def _check_sizes(sizes: Sequence[float], where: str) -> list[float]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise CircuitkitError(
            f"{where}: sizes must be a non-empty list of fractions in [0, 1], such as "
            f"ck.MIB_SIZES, got {sizes!r}"
        )
    fractions = []
    for size in sizes:
        if not isinstance(size, numbers.Real) or isinstance(size, bool) or not 0 <= size <= 1:
            raise CircuitkitError(
                f"{where}: sizes are fractions of the edges (or nodes) in [0, 1], got {size!r}"
            )
        fractions.append(float(size))
    if any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
        raise CircuitkitError(f"{where}: sizes must increase, got {list(sizes)}")
    return fractions


def _edge_scores(scores: Any, graph: Graph, where: str) -> tuple[Tensor, int]:
    """Each edge's score, in the order of ``graph.valid``'s True entries, and the sign that
    makes a larger signed score a more helpful edge."""
    check_edge_scores(scores, graph, where, needed="with level='edge', scores")
    rows, columns = graph.valid.nonzero(as_tuple=True)
    # edge scores are changes of the metric when the edge is patched (noising by default)
    sign = -1 if scores.info.get("direction", "noise") == "noise" else 1
    return scores.values.detach().cpu().double()[rows, columns], sign


def _node_scores(
    model: HookedTransformer, scores: Any, where: str
) -> tuple[list[Component], Tensor, int]:
    """The scored components (heads and MLPs), their scores, and the sign that makes a larger
    signed score a more helpful component."""
    components: list[Component] = []
    values: list[float] = []
    if isinstance(scores, Mapping):
        for component, score in scores.items():
            if not (isinstance(component, (Head, MLP)) and component.pos is None) or (
                isinstance(component, Head) and component.part != "z"
            ):
                raise ComponentError(
                    f"{where}: node scores are for heads (ck.Head(l, h)) and MLPs (ck.MLP(l)) "
                    f"at every position, got {component!r}"
                )
            components.append(component)
            values.append(float(score))
        directions = {"denoise"}
    else:
        results = [scores] if isinstance(scores, Result) else scores
        if (
            isinstance(scores, EdgeScores)
            or not isinstance(results, Sequence)
            or not all(isinstance(r, Result) for r in results)
            or any(isinstance(r, EdgeScores) for r in results)
        ):
            raise CircuitkitError(
                f"{where}: with level='node', scores must be a node Result (over ('layer', "
                "'head') or MLPs over ('layer',)), a list of them, or {component: score}; got "
                f"{type(scores).__name__} (edge scores need level='edge')"
            )
        directions = set()
        for result in results:
            effect = result.effect().values.detach().cpu().double()
            layers = [int(label) for label in result.labels.get("layer", [])]
            if result.axes == ("layer", "head"):
                heads = [int(label) for label in result.labels["head"]]
                for i, layer in enumerate(layers):
                    for j, head in enumerate(heads):
                        components.append(Head(layer, head))
                        values.append(float(effect[i, j]))
            elif result.axes == ("layer",) and result.info.get("component") == "mlp":
                components += [MLP(layer) for layer in layers]
                values += effect.tolist()
            else:
                raise CircuitkitError(
                    f"{where}: node scores are results over ('layer', 'head') (component="
                    f"'head') or over ('layer',) of MLPs (component='mlp'), got axes "
                    f"{result.axes}"
                )
            directions.add(result.info.get("direction", "denoise"))
    if not components:
        raise CircuitkitError(f"{where}: scores hold no components to rank")
    if len(set(components)) != len(components):
        raise ComponentError(f"{where}: scores give some component more than one score")
    if len(directions) > 1:
        raise CircuitkitError(
            f"{where}: the node scores mix noising and denoising results; give one direction"
        )
    for component in components:
        try:
            component.validate(model)
        except ComponentError as error:
            raise ComponentError(f"{where}: {error}") from None
    sign = -1 if directions == {"noise"} else 1
    return components, torch.tensor(values, dtype=torch.float64), sign


def node_circuit(model: HookedTransformer, scored: list[Component], kept: list[int]) -> Circuit:
    """The circuit of the scored components at ``kept`` and every component without a score."""
    cfg = model.cfg
    dropped = set(scored) - {scored[i] for i in kept}
    heads = [
        CircuitHead(Head(layer, head))
        for layer in range(cfg.n_layers)
        for head in range(cfg.n_heads)
        if Head(layer, head) not in dropped
    ]
    if cfg.attn_only or not any(isinstance(c, MLP) for c in dropped):
        return Circuit(tuple(heads))
    mlps = tuple(MLP(layer) for layer in range(cfg.n_layers) if MLP(layer) not in dropped)
    return Circuit(tuple(heads), mlps=mlps)


__all__ = ["MIB_SIZES", "NodeScores", "cmd", "cpr", "faithfulness_curve"]
