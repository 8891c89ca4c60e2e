"""Automatic circuit discovery: score every edge of the model's graph, then keep the fewest
top-scoring edges that still carry the behaviour.

Context. The IOI paper found its circuit by hand, head class by head class. Edge-level
discovery (ACDC, Conmy et al. 2023; EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024) does
it automatically on the graph of ``circuitkit.core.graph``: senders (the embeddings, each head's
output, each MLP's output) feed receivers (each head's query, key and value inputs, each MLP's
input, the logits) along edges. ``discover_circuit`` does it in two steps:

1. **Score** every edge: the change of the metric when that edge alone is patched, on the
   clean input, with the corrupted one as the other run. ``method="eap-ig"`` (the default)
   estimates it for all edges at once from gradients averaged along the path between the two
   inputs' embeddings (``ck.edge_attribution_patching``, ``steps`` points), ``"eap"`` from
   the gradient at the clean run alone, and ``"path"`` measures it exactly, one patched run
   per edge under the chosen ablation (``ck.patch_edges``; costly: for small graphs).
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

Everything runs through ``ck.edge_attribution_patching`` and ``ck.patch_edges``, which leave
the model as they found it: no hook, gradient, flag or weight is changed.
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
from circuitkit.core import provenance
from circuitkit.core.components import MLP, Head
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.graph import (
    LOGITS,
    Edge,
    EdgeScores,
    Graph,
    SenderOutputs,
    check_graph_metric,
    sender_outputs,
)
from circuitkit.core.inputs import as_tokens, check_same_shape, default_metric
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result
from circuitkit.methods.ablation import template_groups
from circuitkit.methods.attribution_patching import edge_attribution_patching
from circuitkit.methods.edge_patching import patch_edges

DiscoveryMethod = Literal["eap-ig", "eap", "path"]
Ablation = Literal["mean", "corrupted"]

# Runs of single-edge patching per call of patch_edges (method="path"): bounds the masks held.
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
    ablation: Ablation = "mean",
    per_template: bool | None = None,
    normalize: bool = False,
    max_edges: int | None = None,
    grid: Sequence[int] | None = None,
    rtol: float = 0.0,
    scores: EdgeScores | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Circuit:
    """The smallest set of top-scoring edges whose circuit reaches ``target`` faithfulness.

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
    paired corrupted prompt's outputs. ``max_edges`` caps ``k``; if no circuit that small
    reaches ``target``, the top ``max_edges`` edges are returned with a warning.
    ``metric`` defaults to the logit difference of an IOI dataset. ``scores`` (an
    ``EdgeScores`` of this model's graph, from ``ck.edge_attribution_patching`` say) skips the
    scoring: the search ranks those instead (``method`` and ``steps`` are then not used).

    Cost: the scoring is one batch of forward and backward passes (``steps`` of them for
    EAP-IG); the search runs one exact circuit per size: on smollm2-135m's 70,651 edges about
    45 (33 grid sizes, about 12 bisection steps), each about twice a forward pass of the
    prompts (30 prompts: 87 s of scoring and 537 s of search on one CPU thread,
    ``benchmarks/discover_ioi.py``). A coarser ``grid`` and ``rtol`` cut the search.

    Returns a ``ck.Circuit`` named "discovered": ``edges`` are the kept edges after pruning
    (edges into nodes that reach the logits through no kept edge are dropped), largest |score|
    first; ``nodes`` the heads that send a kept edge (at every position), classed by what
    their largest-|score| kept edge feeds ("writes to logits", "writes to queries", "... keys",
    "... values", "... MLPs"), with the sum of their kept edges' scores as ``effect``;
    ``mlps`` the MLPs that send a kept edge. Its ``info`` holds:

    - "scores": the ``ck.EdgeScores``; "method", "steps", "given_scores", "ablation",
      "per_template", "target", "normalize";
    - "k" (top edges kept before pruning), "n_edges" (after), "faithfulness" (at ``k``),
      "reached" (whether it is at least ``target``), "edge_mask" (bool [receiver, sender] of
      the kept edges: ``graph.valid & ~mask`` is the run that ablates the rest);
    - "curve": a ``ck.Result`` with axis "edges" (every ``k`` evaluated, and every edge: the
      full model, 1, also beyond ``max_edges``), the faithfulness of
      each, per-example values (each example's circuit metric, normalised by the model's
      mean metric: their mean is the faithfulness), ``info["pruned_edges"]`` the circuit's
      size after pruning, ``info["f_circuit"]`` the mean metric; ``ck.plot(curve)`` draws it;
    - "f_model", "f_empty": ``F(M)`` and ``F(∅)``; "seconds" ({"scores", "search",
      "total"}); "provenance".

    Example::

        ds = ck.IOIDataset(model, n=30)
        abc = ds.corrupted("ABC")
        circuit = ck.discover_circuit(model, ds, abc, ck.metrics.logit_diff(ds), target=0.8)
        circuit.info["k"], len(circuit.edges), len(circuit)   # top edges, after pruning, heads
        ck.plot(circuit.info["curve"])                         # faithfulness against k
        ck.plot_circuit(circuit)
    """
    where = "discover_circuit"
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
    limit = graph.n_edges if max_edges is None else min(max_edges, graph.n_edges)
    sizes = _grid(grid, limit, where)
    per_template = _resolve_per_template(clean, corrupted, ablation, per_template, where)
    if scores is not None:
        mask = getattr(scores, "edge_mask", None) if isinstance(scores, EdgeScores) else None
        if not isinstance(mask, Tensor) or not torch.equal(mask.cpu(), graph.valid):
            raise CircuitkitError(
                f"{where}: scores must be the EdgeScores of this model's graph "
                f"({len(graph.receivers)} receivers x {len(graph.senders)} senders), got "
                f"{type(scores).__name__}"
                + (f" over {tuple(mask.shape)}" if isinstance(mask, Tensor) else "")
            )
        method = scores.info.get("method", "given")  # type: ignore[assignment]
        steps = scores.info.get("steps", steps)

    given = scores is not None
    start = time.perf_counter()
    replacement = _replacement(
        model, clean, corrupted, corrupted_tokens, ablation, per_template, where
    )
    if scores is None and method == "path":
        scores = _path_scores(
            model, graph, clean, clean_tokens, metric, replacement, memory_budget, progress
        )
        scores.info.update(ablation=ablation, per_template=per_template)
    elif scores is None:
        scores = edge_attribution_patching(
            model, clean, corrupted, metric, method=method, steps=steps,
            memory_budget=memory_budget, progress=progress,
        )  # fmt: skip
    scored = time.perf_counter()

    # -- the search: exact faithfulness of the top k edges ----------------------------------
    rows, columns = graph.valid.nonzero(as_tuple=True)
    order = scores.values[rows, columns].abs().argsort(descending=True, stable=True)

    def kept(k: int) -> Tensor:
        mask = torch.zeros_like(graph.valid)
        chosen = order[:k]
        mask[rows[chosen], columns[chosen]] = True
        return mask

    metric_of: dict[int, Tensor] = {}  # k -> the circuit's per-example metric

    def evaluate(ks: Sequence[int], desc: str) -> None:
        runs = torch.stack([graph.valid & ~kept(k) for k in ks])
        values = patch_edges(
            model, clean_tokens, runs, metric, replacement=replacement,
            memory_budget=memory_budget, progress=progress, desc=desc,
        )  # fmt: skip
        metric_of.update(zip(ks, values, strict=True))

    # the first run ablates nothing: the full model
    evaluate([graph.n_edges, *(k for k in sizes if k != graph.n_edges)], f"{where}: grid")
    f_model = float(metric_of[graph.n_edges].mean())
    f_empty = float(metric_of[0].mean())
    offset = f_empty if normalize else 0.0
    if f_model - offset == 0:
        what = "F(M) - F(∅)" if normalize else "the full model's mean metric F(M)"
        raise CircuitkitError(
            f"{where}: {what} is 0, so faithfulness is undefined; use a metric on which the "
            "model does the task"
        )

    def faithfulness_of(k: int) -> float:
        return (float(metric_of[k].mean()) - offset) / (f_model - offset)

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
            f"{where}: no circuit of at most {limit} edges reaches faithfulness {target}; "
            f"returning the top {limit} edges (faithfulness {faithfulness_of(limit):.3f})",
            stacklevel=2,
        )
    searched = time.perf_counter()

    # -- the circuit ------------------------------------------------------------------------
    edge_mask = prune(graph, kept(k))
    circuit_edges, nodes, mlps = _circuit_parts(graph, scores, edge_mask, order, rows, columns)
    evaluated = sorted(metric_of)
    curve_examples = torch.stack([(metric_of[x] - offset) / (f_model - offset) for x in evaluated])
    definition = "(F(C) - F(∅)) / (F(M) - F(∅))" if normalize else "F(C) / F(M)"
    args = {
        "method": method,
        "steps": steps if method == "eap-ig" else None,
        "given_scores": given,
        "target": target,
        "ablation": ablation,
        "per_template": per_template,
        "normalize": normalize,
        "max_edges": max_edges,
        "grid": sizes,
        "rtol": rtol,
        "memory_budget": memory_budget,
    }
    made = provenance.record(
        model, method=where, args=args, data={"clean": clean, "corrupted": corrupted},
        metric=metric,
    )  # fmt: skip
    curve = Result(
        values=torch.tensor([faithfulness_of(x) for x in evaluated]),
        axes=("edges",),
        labels={"edges": [str(x) for x in evaluated]},
        examples=curve_examples,
        metric="faithfulness",
        method=where,
        info={
            "definition": definition,
            "edges": evaluated,
            "pruned_edges": [int(prune(graph, kept(x)).sum()) for x in evaluated],
            "f_circuit": torch.tensor([float(metric_of[x].mean()) for x in evaluated]),
            "f_model": f_model,
            "f_empty": f_empty,
            "metric": provenance.metric_name(metric),
        },
        provenance=made,
    )
    faithfulness = faithfulness_of(k)
    return Circuit(
        tuple(nodes),
        mlps=tuple(mlps),
        edges=tuple(circuit_edges),
        name="discovered",
        info={
            "scores": scores,
            "curve": curve,
            "k": k,
            "n_edges": len(circuit_edges),
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
                "total": time.perf_counter() - start,
            },
            "provenance": made,
        },
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
