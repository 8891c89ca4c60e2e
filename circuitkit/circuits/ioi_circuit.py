"""The IOI circuit of a model, traced back from the logits by path patching.

``find_ioi_circuit`` follows the IOI paper (Wang et al. 2022): four rounds of path patching,
each from every head to the inputs of the heads found in the round before (the logits, the name
movers' queries, the s-inhibition heads' values, the induction heads' keys), with attention
patterns to name each head's class. It returns a ``Circuit`` whose faithfulness
``circuitkit.circuits.faithfulness`` measures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkit.circuits.circuit import Circuit, CircuitHead
from circuitkit.core import provenance
from circuitkit.core.components import Head, check_layers
from circuitkit.core.engine import check_memory_budget, run_interventions
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.graph import Edge
from circuitkit.core.inputs import as_tokens, default_metric
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result
from circuitkit.methods.attention_scores import attention_head_scores, attention_scores
from circuitkit.methods.path_patching import path_patching


def find_ioi_circuit(
    model: HookedTransformer,
    ds: Any,
    *,
    reference: Any,
    metric: MetricLike | None = None,
    relative_threshold: float = 0.05,
    z_threshold: float = 2.0,
    max_per_class: int = 6,
    min_attention: float = 0.1,
    layers: Sequence[int] | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Circuit:
    """The IOI circuit of ``model``, traced back from the logits as in the IOI paper.

    Four rounds of path patching (``ck.path_patching``, noising: ``ds`` is the clean input and
    ``reference``, the ABC corruption, the corrupted one), each from every head to the inputs
    of the heads found in the round before, and attention patterns to name the classes:

    1. heads -> logits. Heads that attend from "end" to IO more than to S1 and S2 together are
       **name movers** if noising them lowers the logit difference and **negative name
       movers** if it raises it; other heads with a large direct effect are "other direct"
       (noising lowers it) or "other negative direct" (noising raises it).
    2. heads -> the queries at "end" of the heads of round 1 that carry the answer (name movers
       and other direct heads whose noising lowers the logit difference): **s-inhibition**
       heads attend from "end" to S2; others are "other query".
    3. heads -> the values at "S2" of the s-inhibition heads: **induction** heads attend from
       S2 to S1+1, **duplicate token** heads from S2 to S1 (whichever is larger); "other S2".
    4. heads -> the keys at "S1+1" of the induction heads: **previous token** heads (their
       previous-token score, ``ck.attention_head_scores``); "other S1+1".

    A head is chosen in a round when its effect (the mean over examples of the change of the
    metric, per example against the unpatched run) is at least ``relative_threshold`` times the
    round's largest |effect|, is significant (|effect| / standard error of the per-example
    changes >= ``z_threshold``, 2 being about the 5% level) and, in rounds 2 to 4, lowers the
    metric (the heads that make the heads downstream work); at most ``max_per_class`` per
    class, the largest first. An attention signature needs a probability of at least
    ``min_attention``. Each head is put in the circuit at the position where it acts ("end",
    "end", "S2", "S1+1"); a head already in the circuit at that position is not added twice.
    MLPs are kept ("all"). ``layers`` restricts the senders of every round to the heads of some
    layers (all by default; ``info["layers"]``): a quicker search that finds no head elsewhere.

    Cost: every round patches every head before its receivers, so this takes hundreds of
    forward passes' worth of compute; on smollm2-135m with 40 prompts about 7 minutes on a
    2-core CPU (``benchmarks/ioi_circuit.py``). A few dozen prompts are enough to find the
    heads; measure faithfulness on more.

    Returns a ``Circuit`` named "IOI" whose heads carry their class and effect; its ``info``
    holds the four path-patching results ("direct", "queries", "s2", "s1+1"), the attention
    scores ("attention": end -> IO, S1, S2; "head_scores"), the unpatched metric ("base", and per
    example "base_examples"), the thresholds and the seconds each round took. Its ``edges`` are
    the paths the rounds found: from each chosen head to the receivers of its round (the logits,
    or the queries, values or keys of the heads chosen the round before), for ``ck.plot_circuit``.

    Example::

        ds = ck.IOIDataset(model, n=40)
        abc = ds.corrupted("ABC")
        circuit = ck.find_ioi_circuit(model, ds, reference=abc)
        print(circuit)
        ck.faithfulness(model, circuit, ds, reference=abc)
    """
    where = "find_ioi_circuit"
    memory_budget = check_memory_budget(memory_budget, where)
    if layers is not None:
        check_layers(model, layers, where)
    for name, value in (
        ("relative_threshold", relative_threshold),
        ("min_attention", min_attention),
    ):
        if not 0 <= value <= 1:
            raise CircuitkitError(f"{where}: {name} must lie in [0, 1], got {value!r}")
    if not (z_threshold >= 0 and math.isfinite(z_threshold)) or max_per_class < 1:
        raise CircuitkitError(
            f"{where}: z_threshold must be a finite number >= 0 and max_per_class >= 1, got "
            f"{z_threshold!r} "
            f"and {max_per_class!r}"
        )
    tokens, positions = as_tokens(ds, "ds", where, model=model)
    missing = {"IO", "S1", "S1+1", "S2", "start", "end"} - set(positions or {})
    if missing:
        raise CircuitkitError(
            f"{where}: ds needs the IOI position words; it lacks {sorted(missing)}"
        )
    metric = default_metric(metric, ds, where)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    base = run_interventions(
        model, tokens, [[]], metric, positions=positions, memory_budget=memory_budget,
        progress=False,
    )[0]  # fmt: skip
    attention_result = attention_scores(
        model, ds, "end", ["IO", "S1", "S2"], memory_budget=memory_budget, progress=False
    )
    attention = attention_result.values  # [layer, head, key]
    scores = attention_head_scores(model, ds, memory_budget=memory_budget, progress=False)
    seconds["attention"] = time.perf_counter() - clock

    def direct_role(head: Head, effect: float) -> str:
        to_io, to_s1, to_s2 = attention[head.layer, head.head].tolist()
        if to_io >= min_attention and to_io > to_s1 + to_s2:
            return "name mover" if effect < 0 else "negative name mover"
        return "other direct" if effect < 0 else "other negative direct"

    def query_role(head: Head, effect: float) -> str:
        to_s2 = float(attention[head.layer, head.head, 2])
        return "s-inhibition" if to_s2 >= min_attention else "other query"

    def s2_role(head: Head, effect: float) -> str:
        _, duplicate, induction = scores.values[head.layer, head.head].tolist()
        if max(duplicate, induction) < min_attention:
            return "other S2"
        return "induction" if induction > duplicate else "duplicate token"

    def s11_role(head: Head, effect: float) -> str:
        previous = float(scores.values[head.layer, head.head, 0])
        return "previous token" if previous >= min_attention else "other S1+1"

    def choose(step: str, receivers: Any, sign: int, position: str, role_of: Any) -> None:
        if not receivers:
            return
        clock = time.perf_counter()
        result = path_patching(
            model, ds, reference, "heads", receivers, metric, layers=layers,
            memory_budget=memory_budget, progress=progress,
        )  # fmt: skip
        seconds[step] = time.perf_counter() - clock
        results[step] = result
        changes = cast(Tensor, result.examples) - base.to(result.values)
        changes = _on_every_layer(changes, result.labels["layer"], model.cfg.n_layers)
        count: dict[str, int] = {}
        for head, effect in _significant(changes, sign, relative_threshold, z_threshold):
            # the receivers the head can reach: the logits, or heads of later layers (a head
            # of a receiver's own layer or later has no path to it, whatever rounding says)
            reached = (
                [receivers]
                if isinstance(receivers, str)
                else [r.at(None) for r in receivers if r.layer > head.layer]
            )
            role = role_of(head, effect)
            placed = Head(head.layer, head.head, pos=position)
            if not reached or count.get(role, 0) >= max_per_class:
                continue
            # the paths the round found, from the head to each receiver it was patched into
            edges.extend(Edge(Head(head.layer, head.head), receiver) for receiver in reached)
            if any(n.head == placed for n in chosen):
                continue
            count[role] = count.get(role, 0) + 1
            chosen.append(CircuitHead(placed, role, effect))

    def heads_of(*roles: str) -> list[Head]:
        return [Head(n.head.layer, n.head.head) for n in chosen if n.role in roles]

    chosen: list[CircuitHead] = []
    edges: list[Edge] = []
    results: dict[str, Result] = {}
    # 1. heads -> logits; 2. -> the queries of the heads that carry the answer; 3. -> the values
    # at S2 of the s-inhibition heads; 4. -> the keys at S1+1 of the induction heads.
    choose("direct", "logits", 0, "end", direct_role)
    carriers = heads_of("name mover", "other direct")
    choose("queries", [h.q.at("end") for h in carriers], -1, "end", query_role)
    inhibitors = heads_of("s-inhibition")
    choose("s2", [h.v.at("S2") for h in inhibitors], -1, "S2", s2_role)
    inductions = heads_of("induction")
    choose("s1+1", [h.k.at("S1+1") for h in inductions], -1, "S1+1", s11_role)

    return Circuit(
        tuple(chosen),
        edges=tuple(dict.fromkeys(edges)),
        name="IOI",
        info={
            **results,
            "attention": attention_result,
            "head_scores": scores,
            "base": float(base.mean()),
            "base_examples": base,
            "thresholds": {
                "relative_threshold": relative_threshold,
                "z_threshold": z_threshold,
                "max_per_class": max_per_class,
                "min_attention": min_attention,
            },
            "layers": None if layers is None else list(layers),
            "seconds": seconds,
            "n": int(tokens.shape[0]),
            "provenance": provenance.record(
                model,
                method=where,
                args={
                    "relative_threshold": relative_threshold,
                    "z_threshold": z_threshold,
                    "max_per_class": max_per_class,
                    "min_attention": min_attention,
                    "layers": layers,
                },
                data={"ds": ds, "reference": reference},
                metric=metric,
            ),
        },
    )


def _on_every_layer(
    changes: Float[Tensor, "swept head n"], layers: Sequence[str], n_layers: int
) -> Float[Tensor, "layer head n"]:
    """A sweep's rows, labelled with their ``layers``, on the rows of every layer; the layers
    not swept show no change."""
    full = changes.new_zeros(n_layers, *changes.shape[1:])
    full[[int(layer) for layer in layers]] = changes
    return full


def _significant(
    changes: Float[Tensor, "layer head n"], sign: int, relative: float, z_threshold: float
) -> list[tuple[Head, float]]:
    """Heads whose mean change is at least ``relative`` times the largest |mean change|, with
    |mean| / standard error >= ``z_threshold``, and of sign ``sign`` (either if 0); the
    largest first."""
    n = changes.shape[-1]
    effect = changes.mean(-1)
    sem = changes.std(-1) / math.sqrt(n) if n > 1 else torch.zeros_like(effect)
    z = effect.abs() / sem.clamp(min=1e-12)
    size = effect.abs() if sign == 0 else (effect * sign).clamp(min=0)
    keep = (size >= relative * effect.abs().max()) & (size > 0) & (z >= z_threshold)
    order = size.flatten().argsort(descending=True).tolist()
    n_heads = changes.shape[1]
    return [
        (Head(i // n_heads, i % n_heads), float(effect.flatten()[i]))
        for i in order
        if keep.flatten()[i]
    ]


__all__ = ["find_ioi_circuit"]
