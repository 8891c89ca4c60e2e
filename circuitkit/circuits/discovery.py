"""Automatic circuit discovery: score every edge of the model's graph, then keep the fewest
top-scoring edges that still carry the behaviour.

Context. The IOI paper found its circuit by hand, head class by head class. Edge-level
discovery (ACDC, Conmy et al. 2023; EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024) does
it automatically on the graph of ``circuitkit.core.graph``: senders (the embeddings, each head's
output, each MLP's output) feed receivers (each head's query, key and value inputs, each MLP's
input, the logits) along edges. ``discover_circuit`` does it in two steps:

1. **Score** every edge: the change of the metric when that edge alone is ablated, on the
   clean input. ``method="eap-ig"`` (the default) estimates it for all edges at once from
   gradients averaged along the path between the clean embeddings and the ablated ones
   (``ck.edge_attribution_patching``, ``steps`` points), ``"eap"`` from the gradient at the
   clean run alone, and ``"path"`` measures it exactly, one patched run per edge
   (``ck.patch_edges``; costly: for small graphs). The estimates use the values the
   evaluation ablates with (``scores_from="ablation"``: the per-template mean, say), so they
   estimate the very interventions the search then runs; ``scores_from="corrupted"`` uses the
   paired corrupted run instead, as the EAP papers do, whatever the evaluation's ablation.
2. **Search.** Sort the edges by |score|. The circuit of the top ``k`` edges is run with
   every other edge ablated (exactly, with ``ck.patch_edges``): each receiver reads the
   ablated value of every sender outside the circuit. Its faithfulness is evaluated for a
   geometric grid of sizes ``k`` in one batched call, then the gap between the last grid
   size below ``target`` and the first one at or above it is bisected, to the smallest ``k``
   found that reaches ``target``.

**Faithfulness** is the IOI paper's ``F(C) / F(M)``, as in ``ck.faithfulness``: the mean
metric of the circuit run over the mean metric of the full model (both with the given
metric). With ``normalize=True`` it is ``(F(C) - F(∅)) / (F(M) - F(∅))`` instead, where
``F(∅)`` is the run with every edge ablated, so the empty circuit scores 0. Either way the
circuit of every edge is the full model and scores exactly 1, so a ``target`` in (0, 1] is
always reached without ``max_edges``. The curve need not be monotone: the bisection finds a
size at which it crosses ``target`` between two grid sizes, and the curve in ``info`` shows
every size evaluated.

**Ablation.** ``ablation="mean"`` (the default) replaces a sender's output by its mean over
the corrupted prompts: per template, as the IOI paper does, when both datasets have
``templates`` (``IOIDataset`` has them; each clean prompt gets the mean over the corrupted
prompts of its own template, so positions line up with the same words), else per position
over all corrupted prompts. ``ablation="corrupted"`` replaces it by the paired corrupted
prompt's own output (interchange ablation, as in ACDC and the EAP-IG paper).

**Pruning.** An edge into a node whose output reaches the logits through no kept edge
changes nothing: every edge out of that node is ablated, so its receivers read the ablated
value whatever the node computes. Such edges are dropped from the circuit returned (the
search's ``k`` counts the top edges before pruning; the circuit's ``edges`` are those left).
In a grouped-query model the key (value) input of a group is one receiver, feeding every
query head of the group; it is kept while any head of the group is in the circuit, and the
circuit names it by the first such head.

**Nodes.** ``level="node"`` runs the same search over heads and MLPs: a node's score is the
sum of its outgoing edges' scores (the first-order change when its output is ablated for every
reader: node attribution patching), and the circuit of the top ``k`` nodes is evaluated by node
ablation, as ``ck.faithfulness`` does it: every other head and MLP replaced by its ablated
value at every position.

**Refinement.** The top ``k`` is the shortest prefix of one ranking that reaches ``target``;
many of its items may still be removable. ``refine=True`` greedily drops items while the
circuit stays at or above ``target``, each pass evaluating every single removal exactly in one
batched call, until no single removal keeps ``target``: the circuit returned is then minimal
for it (no one edge or node can go), at a cost bounded by ``refine_runs``.

Everything runs through ``ck.edge_attribution_patching``, ``ck.patch_edges`` and the
intervention engine, which leave the model as they found it: no hook, gradient, flag or weight
is changed.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.circuits.circuit import Circuit, CircuitHead
from circuitkit.circuits.curves import node_circuit
from circuitkit.circuits.faithfulness import AblatedRuns
from circuitkit.circuits.faithfulness import circuit_edges as circuit_edges_of
from circuitkit.core import provenance
from circuitkit.core.components import MLP, Component, Head
from circuitkit.core.engine import check_memory_budget
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.graph import (
    LOGITS,
    Edge,
    EdgeScores,
    Graph,
    SenderOutputs,
    check_edge_scores,
    check_graph_metric,
    sender_outputs,
)
from circuitkit.core.inputs import as_tokens, check_same_shape, default_metric
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result
from circuitkit.methods.ablation import Ablation as AblationChoice
from circuitkit.methods.ablation import template_groups
from circuitkit.methods.attribution_patching import edge_attribution_patching
from circuitkit.methods.edge_patching import patch_edges

DiscoveryMethod = Literal["eap-ig", "eap", "path"]
Ablation = Literal["mean", "corrupted"]
Level = Literal["edge", "node"]
ScoresFrom = Literal["ablation", "corrupted"]

# Runs per call of patch_edges (single-edge patching, refinement): bounds the masks held.
_PATH_RUNS_PER_CALL = 512
# What a head's strongest kept edge feeds, as its class in the circuit returned.
_ROLES = {
    "logits": "writes to logits",
    "q": "writes to queries",
    "k": "writes to keys",
    "v": "writes to values",
    "mlp": "writes to MLPs",
}


def discover_circuit(
    model: HookedTransformer,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"],
    metric: MetricLike | None = None,
    *,
    method: DiscoveryMethod = "eap-ig",
    steps: int = 5,
    target: float = 0.8,
    level: Level = "edge",
    ablation: Ablation = "mean",
    per_template: bool | None = None,
    scores_from: ScoresFrom = "ablation",
    normalize: bool = False,
    max_edges: int | None = None,
    grid: Sequence[int] | None = None,
    rtol: float = 0.0,
    refine: bool = False,
    refine_runs: int | None = None,
    scores: EdgeScores | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Circuit:
    """The smallest set of top-scoring edges (or nodes) whose circuit reaches ``target``
    faithfulness.

    Scores every edge of ``ck.Graph.of(model)`` (``method``: "eap-ig" with ``steps`` points,
    "eap", or "path" for exact single-edge patching), sorts them by |score|, and evaluates
    exactly, with every edge outside the circuit ablated, the faithfulness ``F(C) / F(M)`` of
    the top ``k`` edges for a geometric grid of ``k`` (0, 1, 2, 3, 4, 6, 8, 11, ... up to every
    edge, factor about sqrt(2); or the sizes in ``grid``, to which 0 and the largest size are
    added), then bisects to the smallest ``k`` reaching ``target`` (see the module docstring);
    with ``rtol`` > 0 the bisection stops once the gap is at most ``rtol`` times its upper end
    (``rtol=0.05``: ``k`` within 5% of the size bisecting to the edge would give, in fewer
    runs).
    ``normalize=True`` measures ``(F(C) - F(∅)) / (F(M) - F(∅))`` instead. ``ablation="mean"``
    replaces ablated senders' outputs by their mean over ``corrupted`` (per template when
    both datasets have templates; ``per_template`` forces it on or off), ``"corrupted"`` by the
    paired corrupted prompt's outputs. ``scores_from="ablation"`` (the default) scores the
    edges against those same ablated values (``ck.edge_attribution_patching(...,
    ablation=...)``), so the scores estimate the evaluation's own single-edge ablations;
    ``"corrupted"`` scores them against the paired corrupted run whatever the ablation, as the
    EAP papers do (the same when ``ablation="corrupted"``; "path" scores always use the
    ablation). ``max_edges`` caps ``k``; if no circuit that small reaches ``target``, the top
    ``max_edges`` are returned with a warning. ``metric`` defaults to the logit difference of
    an IOI dataset. ``scores`` (an ``EdgeScores`` of this model's graph, from
    ``ck.edge_attribution_patching`` say) skips the scoring: the search ranks those instead
    (``method``, ``steps`` and ``scores_from`` are then not used).

    ``level="node"`` ranks heads and MLPs instead of edges: a node's score is the sum of the
    scores of its outgoing edges (for EAP that is node attribution patching of its output,
    ``(out(ablated) - out(clean)) . d metric / d out``; for EAP-IG the same along EAP-IG's
    path), or with ``method="path"`` the exact change when that node alone is ablated; the
    circuit of the top ``k`` nodes is evaluated by node ablation, every other head and MLP
    replaced by its ablated value at every position, as ``ck.faithfulness(...,
    ablation=ck.Ablation(ablation, per_template=...))`` measures it (``max_edges`` then caps
    the number of nodes).

    ``refine=True`` then makes the circuit minimal for ``target``: in each pass every single
    removal from the circuit (its edges, least |score| first, or its nodes) is evaluated
    exactly, in one batched call; the removals that keep ``target`` are ranked by the
    faithfulness they leave, and the longest prefix of them (tried at sizes 1, 2, 4, ...,
    again in one call) whose joint removal keeps ``target`` is dropped (at edge level the
    edges left dangling go too). Passes repeat until one finds no removal that keeps
    ``target``: then no single edge (node) of the result can go. Cost bound: a pass runs at
    most ``m + log2(m) + 1`` circuits for a circuit of ``m`` items, and there are at most as
    many passes as items removed, plus one; ``refine_runs`` caps the total (a pass that would
    pass the cap tries the first items only, and the result is then not certified minimal:
    ``info["refined"]["minimal"]``).

    Cost: the scoring is one batch of forward and backward passes (``steps`` of them for
    EAP-IG); the search runs one exact circuit per size: on smollm2-135m's 70,651 edges about
    45 (33 grid sizes, about 12 bisection steps), each about twice a forward pass of the
    prompts (30 prompts: 87 s of scoring and 537 s of search on one CPU thread,
    ``benchmarks/discover_ioi.py``). A coarser ``grid`` and ``rtol`` cut the search; at node
    level (300 nodes) it is about 25 circuits, each one forward pass.

    Returns a ``ck.Circuit`` named "discovered": ``edges`` are the kept edges after pruning
    (edges into nodes that reach the logits through no kept edge are dropped), largest |score|
    first; ``nodes`` the heads that send a kept edge (at every position), classed by what
    their largest-|score| kept edge feeds ("writes to logits", "writes to queries", "... keys",
    "... values", "... MLPs"), with the sum of their kept edges' scores as ``effect``;
    ``mlps`` the MLPs that send a kept edge. At node level the circuit has no ``edges``: its
    ``nodes`` are the kept heads (class "discovered", their node score as ``effect``), its
    ``mlps`` the kept MLPs. Its ``info`` holds:

    - "scores": the ``ck.EdgeScores`` (at node level from "path": none); "node_scores" (node
      level): a ``Result`` over ("node",); "method", "steps", "given_scores", "ablation",
      "per_template", "scores_from", "level", "target", "normalize";
    - "k" (top edges or nodes kept before pruning and refinement), "n_edges" (edges after;
      at node level the edges between the kept nodes), "n_nodes" (node level), "faithfulness"
      (of the circuit returned), "reached" (whether it is at least ``target``), "edge_mask"
      (bool [receiver, sender] of the circuit's edges: ``graph.valid & ~mask`` is the
      edge-level run that ablates the rest);
    - "refined" (with ``refine``): "runs", "passes", "removed", "minimal", "k_before" (items
      before), "faithfulness_before";
    - "curve": a ``ck.Result`` with axis "edges" ("nodes" at node level; every ``k``
      evaluated, and every item: the full model, 1, also beyond ``max_edges``), the
      faithfulness of each, per-example values (each example's circuit metric, normalised by
      the model's mean metric: their mean is the faithfulness), ``info["pruned_edges"]`` the
      circuit's size after pruning (edge level), ``info["f_circuit"]`` the mean metric;
      ``ck.plot(curve)`` draws it;
    - "f_model", "f_empty": ``F(M)`` and ``F(∅)``; "seconds" ({"scores", "search", "refine",
      "total"}); "provenance".

    Example::

        ds = ck.IOIDataset(model, n=30)
        abc = ds.corrupted("ABC")
        circuit = ck.discover_circuit(model, ds, abc, ck.metrics.logit_diff(ds), target=0.8)
        circuit.info["k"], len(circuit.edges), len(circuit)   # top edges, after pruning, heads
        ck.plot(circuit.info["curve"])                         # faithfulness against k
        ck.plot_circuit(circuit)
        heads = ck.discover_circuit(model, ds, abc, level="node", refine=True)
        heads.info["n_nodes"], heads.info["refined"]["minimal"]
    """
    where = "discover_circuit"
    memory_budget = check_memory_budget(memory_budget, where)
    if isinstance(metric, str):
        raise CircuitkitError(f"{where}: metric must be a metric, got the string {metric!r}")
    if method not in ("eap-ig", "eap", "path"):
        raise CircuitkitError(f"{where}: method must be 'eap-ig', 'eap' or 'path', got {method!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise CircuitkitError(f"{where}: steps must be a positive int, got {steps!r}")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise CircuitkitError(
            f"{where}: target is a faithfulness in (0, 1] (0.8: the circuit keeps 80% of the "
            f"model's metric), got {target!r}"
        )
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not 0 <= rtol < 1:
        raise CircuitkitError(f"{where}: rtol must be a number in [0, 1), got {rtol!r}")
    if ablation not in ("mean", "corrupted"):
        raise CircuitkitError(
            f"{where}: ablation must be 'mean' (the corrupted prompts' mean) or 'corrupted' "
            f"(each prompt's corrupted twin), got {ablation!r}"
        )
    if level not in ("edge", "node"):
        raise CircuitkitError(
            f"{where}: level must be 'edge' (rank edges) or 'node' (heads and MLPs), got {level!r}"
        )
    if scores_from not in ("ablation", "corrupted"):
        raise CircuitkitError(
            f"{where}: scores_from must be 'ablation' (score against the values the evaluation "
            f"ablates with) or 'corrupted' (against the paired corrupted run), got {scores_from!r}"
        )
    if not isinstance(refine, bool):
        raise CircuitkitError(f"{where}: refine must be True or False, got {refine!r}")
    if refine_runs is not None and (
        not isinstance(refine_runs, int) or isinstance(refine_runs, bool) or refine_runs < 1
    ):
        raise CircuitkitError(
            f"{where}: refine_runs caps the circuits refinement evaluates, a positive int or "
            f"None, got {refine_runs!r}"
        )
    graph = Graph.of(model, where)
    clean_tokens, _ = as_tokens(clean, "clean", where, model=model)
    corrupted_tokens, _ = as_tokens(corrupted, "corrupted", where, model=model)
    check_same_shape(clean_tokens, corrupted_tokens, ("clean", "corrupted"), where)
    metric = default_metric(metric, clean, where)
    n = clean_tokens.shape[0]
    check_graph_metric(metric, n, where)
    if max_edges is not None and (
        not isinstance(max_edges, int) or isinstance(max_edges, bool) or max_edges < 1
    ):
        raise CircuitkitError(f"{where}: max_edges must be a positive int, got {max_edges!r}")
    components = list(graph.senders[1:])  # the nodes: every head and MLP
    n_items = graph.n_edges if level == "edge" else len(components)
    limit = n_items if max_edges is None else min(max_edges, n_items)
    sizes = _grid(grid, limit, where)
    per_template = _resolve_per_template(clean, corrupted, ablation, per_template, where)
    choice = AblationChoice(ablation, per_template=per_template)
    if scores is not None:
        check_edge_scores(scores, graph, where)
        method = scores.info.get("method", "given")  # type: ignore[assignment]
        steps = scores.info.get("steps", steps)

    given = scores is not None
    start = time.perf_counter()
    rows, columns = graph.valid.nonzero(as_tuple=True)
    if level == "edge":
        replacement = _replacement(
            model, clean, corrupted, corrupted_tokens, ablation, per_template, where
        )

        def evaluate_sets(sets: Sequence[Tensor], desc: str) -> Tensor:
            # in calls of at most _PATH_RUNS_PER_CALL runs: bounds the masks held at once
            values = []
            for begin in range(0, len(sets), _PATH_RUNS_PER_CALL):
                chunk = sets[begin : begin + _PATH_RUNS_PER_CALL]
                kept = torch.zeros(len(chunk), *graph.valid.shape, dtype=torch.bool)
                for i, chosen in enumerate(chunk):
                    kept[i, rows[chosen], columns[chosen]] = True
                values.append(
                    patch_edges(
                        model,
                        clean_tokens,
                        graph.valid & ~kept,
                        metric,
                        replacement=replacement,
                        memory_budget=memory_budget,
                        progress=progress,
                        desc=desc,
                    )  # fmt: skip
                )
            return torch.cat(values)
    else:
        setup = AblatedRuns.make(
            model, clean, reference=corrupted, corrupted=corrupted, metric=metric,
            ablation=choice, where=where,
        )  # fmt: skip

        def evaluate_sets(sets: Sequence[Tensor], desc: str) -> Tensor:
            circuits = [
                node_circuit(model, components, chosen.nonzero()[:, 0].tolist()) for chosen in sets
            ]
            return setup.evaluate(circuits, memory_budget=memory_budget, progress=progress)

    node_scores: Result | None = None
    if scores is None and method == "path" and level == "node":
        node_scores = _node_path_scores(model, clean, components, metric, evaluate_sets)
    elif scores is None and method == "path":
        scores = _path_scores(
            model, graph, clean, clean_tokens, metric, replacement, memory_budget, progress
        )
        scores.info.update(ablation=ablation, per_template=per_template)
    elif scores is None:
        scores = edge_attribution_patching(
            model, clean, corrupted, metric, method=method, steps=steps,
            ablation=choice if scores_from == "ablation" else "corrupted",
            memory_budget=memory_budget, progress=progress,
        )  # fmt: skip
    if level == "node" and node_scores is None:
        assert scores is not None
        node_scores = _node_scores_of(scores, components)
    scored = time.perf_counter()

    # -- the search: exact faithfulness of the top k items ----------------------------------
    if level == "edge":
        assert scores is not None
        item_scores = scores.values[rows, columns]
    else:
        assert node_scores is not None
        item_scores = node_scores.values
    order = item_scores.abs().argsort(descending=True, stable=True)

    def top(k: int) -> Tensor:
        chosen = torch.zeros(n_items, dtype=torch.bool)
        chosen[order[:k]] = True
        return chosen

    metric_of: dict[int, Tensor] = {}  # k -> the circuit's per-example metric

    def evaluate(ks: Sequence[int], desc: str) -> None:
        metric_of.update(zip(ks, evaluate_sets([top(k) for k in ks], desc), strict=True))

    # the first run ablates nothing: the full model
    evaluate([n_items, *(k for k in sizes if k != n_items)], f"{where}: grid")
    f_model = float(metric_of[n_items].mean())
    f_empty = float(metric_of[0].mean())
    offset = f_empty if normalize else 0.0
    if f_model - offset == 0:
        what = "F(M) - F(∅)" if normalize else "the full model's mean metric F(M)"
        raise CircuitkitError(
            f"{where}: {what} is 0, so faithfulness is undefined; use a metric on which the "
            "model does the task"
        )

    def ratio(values: Tensor) -> float:
        return (float(values.mean()) - offset) / (f_model - offset)

    def faithfulness_of(k: int) -> float:
        return ratio(metric_of[k])

    above = [k for k in sizes if faithfulness_of(k) >= target]
    if above:
        high = above[0]
        low = max((k for k in sizes if k < high), default=high)
        while high - low > max(1, rtol * high):
            middle = (low + high) // 2
            evaluate([middle], f"{where}: bisecting {low}..{high}")
            if faithfulness_of(middle) >= target:
                high = middle
            else:
                low = middle
        k = high
    else:
        k = limit
        warnings.warn(
            f"{where}: no circuit of at most {limit} {level}s reaches faithfulness {target}; "
            f"returning the top {limit} (faithfulness {faithfulness_of(limit):.3f})",
            stacklevel=2,
        )
    searched = time.perf_counter()

    # -- pruning and refinement -------------------------------------------------------------
    def pruned(chosen: Tensor) -> Tensor:
        if level == "node":
            return chosen
        mask = torch.zeros_like(graph.valid)
        mask[rows[chosen], columns[chosen]] = True
        return prune(graph, mask)[rows, columns]

    chosen = pruned(top(k))
    faithfulness = faithfulness_of(k)
    refined: dict[str, Any] | None = None
    if refine:
        chosen, faithfulness, refined = _refine(
            chosen, faithfulness, target, order, refine_runs, pruned,
            lambda sets, desc: [ratio(v) for v in evaluate_sets(sets, desc)], where,
        )  # fmt: skip
    refined_at = time.perf_counter()

    # -- the circuit ------------------------------------------------------------------------
    if level == "edge":
        assert scores is not None
        edge_mask = torch.zeros_like(graph.valid)
        edge_mask[rows[chosen], columns[chosen]] = True
        circuit_edges, nodes, mlps = _circuit_parts(graph, scores, edge_mask, order, rows, columns)
        circuit_mlps: tuple[MLP, ...] | Literal["all"] = tuple(mlps)
    else:
        assert node_scores is not None
        kept = [i for i in range(n_items) if chosen[i]]
        circuit_edges = []
        nodes = [
            CircuitHead(components[i], "discovered", float(node_scores.values[i]))  # type: ignore[arg-type]
            for i in kept
            if isinstance(components[i], Head)
        ]
        circuit_mlps = tuple(components[i] for i in kept if isinstance(components[i], MLP))  # type: ignore[misc]
        if not graph.has_mlp:
            circuit_mlps = "all"
        edge_mask = circuit_edges_of(graph, Circuit(tuple(nodes), mlps=circuit_mlps), where)
    evaluated = sorted(metric_of)
    curve_examples = torch.stack([(metric_of[x] - offset) / (f_model - offset) for x in evaluated])
    definition = "(F(C) - F(∅)) / (F(M) - F(∅))" if normalize else "F(C) / F(M)"
    args = {
        "method": method,
        "steps": steps if method == "eap-ig" else None,
        "given_scores": given,
        "target": target,
        "level": level,
        "ablation": ablation,
        "per_template": per_template,
        "scores_from": scores_from,
        "normalize": normalize,
        "max_edges": max_edges,
        "grid": sizes,
        "rtol": rtol,
        "refine": refine,
        "refine_runs": refine_runs,
        "memory_budget": memory_budget,
    }
    made = provenance.record(
        model, method=where, args=args, data={"clean": clean, "corrupted": corrupted},
        metric=metric,
    )  # fmt: skip
    axis = f"{level}s"
    curve_info: dict[str, Any] = {
        "definition": definition,
        axis: evaluated,
        "f_circuit": torch.tensor([float(metric_of[x].mean()) for x in evaluated]),
        "f_model": f_model,
        "f_empty": f_empty,
        "metric": provenance.metric_name(metric),
    }
    if level == "edge":
        curve_info["pruned_edges"] = [int(pruned(top(x)).sum()) for x in evaluated]
    curve = Result(
        values=torch.tensor([faithfulness_of(x) for x in evaluated]),
        axes=(axis,),
        labels={axis: [str(x) for x in evaluated]},
        examples=curve_examples,
        metric="faithfulness",
        method=where,
        info=curve_info,
        provenance=made,
    )
    sizes_info: dict[str, Any] = {
        "n_edges": int(edge_mask.sum()) if level == "node" else len(circuit_edges)
    }
    if level == "node":
        sizes_info["n_nodes"] = int(chosen.sum())
        sizes_info["node_scores"] = node_scores
    if refined is not None:
        sizes_info["refined"] = refined
    return Circuit(
        tuple(nodes),
        mlps=circuit_mlps,
        edges=tuple(circuit_edges),
        name="discovered",
        info={
            "scores": scores,
            "curve": curve,
            "k": k,
            **sizes_info,
            "faithfulness": faithfulness,
            "reached": faithfulness >= target,
            "definition": definition,
            "edge_mask": edge_mask,
            "f_model": f_model,
            "f_empty": f_empty,
            **args,
            "seconds": {
                "scores": scored - start,
                "search": searched - scored,
                "refine": refined_at - searched,
                "total": time.perf_counter() - start,
            },
            "provenance": made,
        },
    )


def _refine(
    chosen: Tensor,
    faithfulness: float,
    target: float,
    order: Tensor,
    max_runs: int | None,
    pruned: Any,
    faithfulness_of: Any,
    where: str,
) -> tuple[Tensor, float, dict[str, Any]]:
    """Greedy removal from the bool [item] set ``chosen`` while ``target`` is kept (see
    ``discover_circuit``): ``(chosen, its faithfulness, info)``. ``faithfulness_of(sets,
    desc)`` evaluates sets exactly; ``pruned`` drops what no longer matters after a removal."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    before, size_before = faithfulness, int(chosen.sum())
    runs = passes = 0
    minimal = False
    while max_runs is None or runs < max_runs:
        members = chosen.nonzero()[:, 0]
        members = members[rank[members].argsort(descending=True)]  # least |score| first
        if len(members) == 0:
            minimal = True
            break
        complete = max_runs is None or runs + len(members) <= max_runs
        if not complete:
            members = members[: max_runs - runs]
        passes += 1
        singles = []
        for item in members.tolist():
            without = chosen.clone()
            without[item] = False
            singles.append(without)
        values = faithfulness_of(singles, f"{where}: refining, pass {passes}")
        runs += len(singles)
        keeps = [(value, i) for i, value in enumerate(values) if value >= target]
        if not keeps:
            minimal = complete
            break
        # the removals that keep the target, the most harmless first; drop the longest prefix
        # that keeps it together (one removal alone does)
        keeps.sort(key=lambda pair: -pair[0])
        ranked = [int(members[i]) for _, i in keeps]
        counts = [c for c in _doubling(len(ranked)) if c > 1]
        if max_runs is not None:
            counts = counts[: max(0, max_runs - runs)]
        trials = []
        for count in counts:
            without = chosen.clone()
            without[ranked[:count]] = False
            trials.append(without)
        tried = faithfulness_of(trials, f"{where}: refining, pass {passes}") if trials else []
        runs += len(trials)
        best, best_value = 1, keeps[0][0]
        for count, value in zip(counts, tried, strict=True):
            if value >= target:
                best, best_value = count, value
        chosen = chosen.clone()
        chosen[ranked[:best]] = False
        chosen = pruned(chosen)
        faithfulness = best_value
    info = {
        "runs": runs,
        "passes": passes,
        "removed": size_before - int(chosen.sum()),
        "minimal": minimal,
        "k_before": size_before,
        "faithfulness_before": before,
    }
    return chosen, faithfulness, info


def _doubling(m: int) -> list[int]:
    """1, 2, 4, ... below ``m``, and ``m``."""
    counts, c = [], 1
    while c < m:
        counts.append(c)
        c *= 2
    return [*counts, m]


def _node_scores_of(scores: EdgeScores, components: Sequence[Component]) -> Result:
    """Each node's score: the sum of its outgoing edges' scores (every sender but the
    embeddings), with per-example values."""
    examples = None if scores.examples is None else scores.examples[:, 1:].sum(0)
    return Result(
        values=scores.values[:, 1:].sum(0),
        axes=("node",),
        labels={"node": [repr(c) for c in components]},
        examples=examples,
        metric=scores.metric,
        method="discover_circuit",
        info={"from": "edge scores", **{k: scores.info.get(k) for k in ("method", "ablation")}},
    )


def _node_path_scores(
    model: HookedTransformer,
    clean: Any,
    components: Sequence[Component],
    metric: MetricLike,
    evaluate_sets: Any,
) -> Result:
    """Exact node scores: the change of the metric when each node alone is ablated, all in one
    batched call."""
    everything = torch.ones(len(components), dtype=torch.bool)
    sets = [everything]
    for i in range(len(components)):
        without = everything.clone()
        without[i] = False
        sets.append(without)
    values = evaluate_sets(sets, "discover_circuit: exact node scores")
    examples = (values[1:] - values[0]).float()
    return Result(
        values=examples.mean(-1),
        axes=("node",),
        labels={"node": [repr(c) for c in components]},
        examples=examples,
        metric=provenance.metric_name(metric),
        method="discover_circuit",
        info={"from": "path", "method": "path", "base_examples": values[0]},
    )


def prune(graph: Graph, kept: Tensor) -> Tensor:
    """The kept edges (bool [receiver, sender]) whose receiver's node reaches the logits
    through kept edges; the others change nothing when every edge outside ``kept`` is
    ablated.

    A receiver is useful if it is the logits, or if the node it is an input of (a query's
    head, every head of a key or value input's group, an MLP) sends a kept edge into a useful
    receiver. Computed as a fixed point: usefulness only grows, so the loop ends.

    Example::

        graph = ck.Graph.of(model)
        circuit_mask = prune(graph, graph.mask(edges))
    """
    feeds = _receiver_feeds(graph)
    useful = torch.zeros(len(graph.receivers), dtype=torch.bool)
    useful[graph.logits_row] = True
    while True:
        sends = (kept & useful[:, None]).any(0)  # [sender]
        grown = (feeds & sends[None, :]).any(1)
        grown[graph.logits_row] = True
        if torch.equal(grown, useful):
            return kept & useful[:, None]
        useful = grown


def _receiver_feeds(graph: Graph) -> Tensor:
    """bool [receiver, sender]: True where the receiver is an input of the sender's node."""
    feeds = torch.zeros(len(graph.receivers), len(graph.senders), dtype=torch.bool)
    h, kv, group = graph.n_heads, graph.n_kv_heads, graph.group
    for layer in range(graph.n_layers):
        attn, heads = graph.attn_rows(layer).start, graph.head_columns(layer).start
        for head in range(h):
            feeds[attn + head, heads + head] = True  # its query
            kv_row = attn + h + head // group
            feeds[kv_row, heads + head] = True  # its group's key input
            feeds[kv_row + kv, heads + head] = True  # its group's value input
        if graph.has_mlp:
            feeds[graph.mlp_row(layer), graph.mlp_column(layer)] = True
    return feeds


def _grid(grid: Sequence[int] | None, limit: int, where: str) -> list[int]:
    """The sizes evaluated in one batch: 0, about sqrt(2)-spaced sizes (or ``grid``), and
    ``limit``, sorted and without repeats."""
    if grid is None:
        sizes = {0, limit}
        i = 0
        while round(2 ** (i / 2)) < limit:
            sizes.add(round(2 ** (i / 2)))
            i += 1
        return sorted(sizes)
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise CircuitkitError(
            f"{where}: grid must be a non-empty list of edge counts, got {grid!r}"
        )
    for size in grid:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
            raise CircuitkitError(
                f"{where}: grid sizes must be ints in 0..{limit} (the number of edges, or "
                f"max_edges), got {size!r}"
            )
    return sorted({0, limit, *grid})


def _resolve_per_template(
    clean: Any, corrupted: Any, ablation: str, per_template: bool | None, where: str
) -> bool:
    has_templates = all(
        isinstance(getattr(data, "templates", None), Tensor) for data in (clean, corrupted)
    )
    if per_template is None:
        return ablation == "mean" and has_templates
    if per_template and ablation != "mean":
        raise CircuitkitError(
            f"{where}: per_template is for ablation='mean'; ablation={ablation!r} replaces each "
            "prompt's senders by its own corrupted twin's"
        )
    return bool(per_template)


def _replacement(
    model: HookedTransformer,
    clean: Any,
    corrupted: Any,
    corrupted_tokens: Tensor,
    ablation: str,
    per_template: bool,
    where: str,
) -> SenderOutputs:
    """What an ablated sender outputs: the corrupted prompts' mean (per position, or per
    template: one row per clean prompt), or each corrupted prompt's own outputs."""
    # the groups first, so that a dataset without templates fails before any forward pass
    n = corrupted_tokens.shape[0]
    groups = template_groups(clean, corrupted, n, where) if per_template else None
    outputs = sender_outputs(model, corrupted_tokens)
    if ablation == "corrupted":
        return outputs
    if groups is None:
        return outputs.mean()

    def means(x: Tensor) -> Tensor:
        per_group = torch.stack([x[m.to(x.device)].mean(0) for m in groups.members])
        return per_group[groups.of_example.to(x.device)]

    return SenderOutputs(
        means(outputs.embed),
        tuple(means(z) for z in outputs.z),
        tuple(means(out) for out in outputs.mlp_out),
    )


def _path_scores(
    model: HookedTransformer,
    graph: Graph,
    clean: Any,
    tokens: Tensor,
    metric: MetricLike,
    replacement: SenderOutputs,
    memory_budget: int | None,
    progress: bool,
) -> EdgeScores:
    """Exact scores: the change of the metric when each edge alone is ablated, one run per
    edge, ``_PATH_RUNS_PER_CALL`` runs per call of ``patch_edges``."""
    where = "discover_circuit"
    n = tokens.shape[0]
    kwargs: dict[str, Any] = dict(replacement=replacement, memory_budget=memory_budget)
    base = patch_edges(model, tokens, [[]], metric, progress=False, **kwargs)[0]
    pairs = graph.valid.nonzero()
    examples = torch.zeros(len(graph.receivers), len(graph.senders), n)
    starts = range(0, len(pairs), _PATH_RUNS_PER_CALL)
    for begin in tqdm(starts, desc=f"{where}: exact edge scores", disable=not progress):
        chunk = pairs[begin : begin + _PATH_RUNS_PER_CALL]
        masks = torch.zeros(len(chunk), *graph.valid.shape, dtype=torch.bool)
        masks[torch.arange(len(chunk)), chunk[:, 0], chunk[:, 1]] = True
        values = patch_edges(model, tokens, masks, metric, progress=False, **kwargs)
        examples[chunk[:, 0], chunk[:, 1]] = values - base
    made = provenance.record(
        model, method=where, args={"method": "path", "memory_budget": memory_budget},
        data={"clean": clean}, metric=metric,
    )  # fmt: skip
    return EdgeScores.of_graph(
        graph,
        examples,
        metric=provenance.metric_name(metric),
        method=where,
        info={"method": "path", "base": float(base.mean()), "base_examples": base},
        provenance=made,
    )


def _circuit_parts(
    graph: Graph,
    scores: EdgeScores,
    edge_mask: Tensor,
    order: Tensor,
    rows: Tensor,
    columns: Tensor,
) -> tuple[list[Edge], list[CircuitHead], list[MLP]]:
    """The circuit's edges (largest |score| first), its heads with their classes and effects,
    and its MLPs, from the pruned mask."""
    sends = edge_mask.any(0)
    group = graph.group
    edges: list[Edge] = []
    outgoing: dict[int, list[tuple[float, str]]] = {}  # sender column -> (score, kind)
    for index in order.tolist():
        row, column = int(rows[index]), int(columns[index])
        if not edge_mask[row, column]:
            continue
        receiver = graph.receivers[row]
        kind = "logits" if receiver == LOGITS else "mlp" if isinstance(receiver, MLP) else None
        if isinstance(receiver, Head):
            kind = receiver.part
            if receiver.part in ("k", "v"):  # named by the first head of its group in the circuit
                first = receiver.head
                heads = graph.head_columns(receiver.layer).start
                members = range(first, first + group)
                named = next((h for h in members if sends[heads + h]), first)
                receiver = replace(receiver, head=named)
        score = float(scores.values[row, column])
        edges.append(Edge(graph.senders[column], receiver))
        outgoing.setdefault(column, []).append((score, str(kind)))
    nodes: list[CircuitHead] = []
    mlps: list[MLP] = []
    for column in sorted(outgoing):
        sender = graph.senders[column]
        out = outgoing[column]
        if isinstance(sender, Head):
            strongest = max(out, key=lambda item: abs(item[0]))[1]
            effect = math.fsum(score for score, _ in out)
            nodes.append(CircuitHead(Head(sender.layer, sender.head), _ROLES[strongest], effect))
        elif isinstance(sender, MLP):
            mlps.append(MLP(sender.layer))
    return edges, nodes, mlps


__all__ = ["discover_circuit", "prune"]
