"""Faithfulness, completeness and minimality: how much of a behaviour a circuit carries.

Context. A *circuit* (Wang et al. 2022, the IOI paper) is a set of attention heads, each at the
positions where it acts (name movers at "end", induction heads at "S2", ...), together with the
MLPs, which the paper keeps whole. To test it, every head outside the circuit, and every
circuit head at the positions where it is not in the circuit, is *mean-ablated*: its output
``z`` is replaced by its mean over a reference distribution (for IOI the ABC corruption, whose
prompts carry no information about which name is the answer), taken per template so that
positions line up with the same words. Write ``F(C)`` for the average metric (the logit
difference) of that run and ``F(M)`` for the full model's.

- **Faithfulness** is ``F(C) / F(M)``: how much of the behaviour the circuit recovers on its
  own. The paper's GPT-2 small circuit (26 heads) has a logit difference of about 3.1 against
  the model's 3.56, about 87%.
- **Completeness** compares the circuit and the model with the same heads ``K`` of the circuit
  removed (mean-ablated) from both: a complete circuit has ``F(C \\ K)`` close to ``F(M \\ K)``
  for every ``K``, so no part of the behaviour runs outside it. The paper tries ``K`` = the
  empty set, each class of heads, random subsets and sets found by a greedy search that
  maximises the gap ``|F(C \\ K) - F(M \\ K)|`` (the *incompleteness*).
- **Minimality** asks of each head ``v`` whether it matters inside the circuit:
  ``|F(C \\ (K + {v})) - F(C \\ K)|``, with ``K`` chosen per head so that other heads do not hide
  ``v``'s effect (the paper chooses ``K`` by hand, mostly the other heads of ``v``'s class).

MLPs: the paper keeps every MLP, and so does a ``Circuit`` by default (``mlps="all"``). A circuit
that lists its MLPs (``mlps=(MLP(0), MLP(3).at("S2"))``) has every other MLP, and its MLPs at
other positions, mean-ablated as heads are.

Ablation choices. What "removing" a component means changes the number a lot (Miller,
Chughtai and Saunders 2024, "Transformer Circuit Faithfulness Metrics are not Robust", list
the ways ablation experiments differ). An ``Ablation`` fixes three of them:

- the **value** that replaces an ablated output: "zero"; "mean" over the reference prompts
  (``per_template=True``: over the reference prompts of the same template, the IOI paper's
  choice and the default here); "resample", the output on a reference prompt drawn at random
  for each example (seeded, within the template with ``per_template``); "corrupted", the
  output on each prompt's own corrupted twin (interchange ablation, as in ACDC and MIB);
- the **level**: "node" replaces a component's output for every reader (the engine's
  ``SetTo`` or ``Zero`` on ``hook_z`` and ``hook_mlp_out``); "edge" ablates only
  the edges outside the circuit (``ck.patch_edges`` with the ablation values as the
  replacement): each receiver reads the ablated value of every sender whose edge into it is
  not in the circuit. For a circuit given by its heads and MLPs, its edges are those between
  its nodes (the embeddings count as a node of every circuit), and edge-level ablation gives
  what node-level ablation at every position gives; they differ for a circuit with ``edges``,
  whose other edges between its own nodes are ablated;
- the **positions**: "circuit" keeps a head given at some positions (``Head(9, 9).at("end")``)
  there only and ablates it at the others; "all" keeps every head of the circuit at every
  position. Everything outside the circuit is ablated at every position either way; an edge
  is patched at every position, so edge-level ablation is "all".

``faithfulness_table`` runs one circuit under several choices and lists, per choice, the
faithfulness ``F(C) / F(M)``, the normalised faithfulness ``(F(C) - F(∅)) / (F(M) - F(∅))``
(``F(∅)``: every head and MLP ablated at node level, every edge at edge level), with their
bootstrap intervals.

Both levels use the same values: what every sender of the model's graph outputs when ablated
(``ablated_outputs``). Every evaluation is a set of runs of the intervention engine (node
level; the node-level choices of a table share one call) or of ``ck.patch_edges`` (edge level,
one call per ablation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.circuits.circuit import Circuit
from circuitkit.core import provenance
from circuitkit.core.components import MLP, Embed, Head, position_mask
from circuitkit.core.engine import check_memory_budget, run_interventions
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.graph import LOGITS, Graph, SenderOutputs
from circuitkit.core.inputs import as_tokens, default_metric
from circuitkit.core.interventions import Intervention, MetricLike, SetTo, Value, Zero
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result, bootstrap_interval, check_interval
from circuitkit.methods.ablation import (
    Ablation,
    AblationMethod,
    ablated_outputs,
    check_ablation,
    check_method,
)
from circuitkit.methods.edge_patching import patch_edges

#: The ablations ``faithfulness_table`` compares by default: the IOI paper's first, then each
#: other value at node level, the IOI paper's with circuit heads kept at every position, and
#: two at edge level (the last is MIB's).
DEFAULT_CHOICES: tuple[Ablation, ...] = (
    Ablation("mean", per_template=True),
    Ablation("mean"),
    Ablation("zero"),
    Ablation("resample"),
    Ablation("corrupted"),
    Ablation("mean", per_template=True, positions="all"),
    Ablation("mean", per_template=True, level="edge"),
    Ablation("corrupted", level="edge"),
)


# ---------------------------------------------------------------------------------------------
# Runs under one ablation


@dataclass(frozen=True)
class _Model:
    """The full model with the heads ``removed`` ablated at every position (``M \\ K``)."""

    removed: Sequence[Head]


@dataclass(frozen=True)
class _Empty:
    """Everything ablated: every head and MLP (node level), every edge (edge level)."""


_EMPTY = _Empty()

# A run of AblatedRuns.evaluate: None (the full model), a circuit, the model with some heads
# removed, everything ablated, or (edge level) a bool [receiver, sender] mask of kept edges.
AblatedRun = Circuit | _Model | _Empty | Tensor | None


@dataclass
class AblatedRuns:
    """Runs of one model on one dataset under one ablation, and what they share.

    ``evaluate`` (or ``evaluate_together`` for several ablations) takes runs: None (the full
    model), a ``Circuit`` (everything outside it ablated) or, at edge level, a bool [receiver,
    sender] mask of the edges kept (every other edge ablated); it returns the metric of each,
    per example, averaged over the ablation's draws.

    Example::

        runs = AblatedRuns.make(model, ds, reference=abc, corrupted=abc, metric=metric,
                                ablation=ck.Ablation("zero"), where="my_method")
        model_metric, circuit_metric = runs.evaluate([None, circuit])   # [2, n]
    """

    model: HookedTransformer
    tokens: Tensor
    positions: dict[str, Tensor]
    metric: MetricLike
    ablation: Ablation
    draws: list[SenderOutputs]
    graph: Graph | None  # edge level only
    where: str

    @classmethod
    def make(
        cls,
        model: HookedTransformer,
        ds: Any | Int[Tensor, "n pos"],
        *,
        reference: Any,
        corrupted: Any,
        metric: MetricLike | None,
        ablation: Ablation,
        where: str,
        n_samples: int = 1,
        seed: int = 0,
        memo: dict[int, SenderOutputs] | None = None,
    ) -> AblatedRuns:
        """The ablation's values for ``ds`` (``ablated_outputs``): from ``reference`` (mean,
        resample), ``corrupted`` (corrupted) or none (zero)."""
        tokens, positions = as_tokens(ds, "ds", where, model=model)
        metric = default_metric(metric, ds, where)
        graph = Graph.of(model, where) if ablation.level == "edge" else None
        draws = ablated_outputs(
            model, ds, tokens, ablation, reference=reference, corrupted=corrupted,
            n_samples=n_samples, seed=seed, where=where, memo=memo,
        )  # fmt: skip
        return cls(model, tokens, dict(positions or {}), metric, ablation, draws, graph, where)

    def evaluate(
        self,
        runs: Sequence[AblatedRun],
        *,
        reference_engine: bool = False,
        memory_budget: int | None = None,
        progress: bool = True,
    ) -> Float[Tensor, "runs n"]:
        """The metric of each run, per example, averaged over the ablation's draws;
        ``reference_engine=True`` runs the plain reference paths (one forward per run)."""
        (values,) = evaluate_together(
            [self], runs, reference_engine=reference_engine, memory_budget=memory_budget,
            progress=progress,
        )  # fmt: skip
        return values

    def interventions(self, run: AblatedRun, draw: SenderOutputs) -> list[Intervention]:
        """A run at node level: every head (and MLP) outside it set to the draw's value."""
        if run is None:
            return []
        cfg = self.model.cfg
        if isinstance(run, _Model):
            return [
                Intervention(h, self._value(h, draw))
                for h in sorted(set(run.removed), key=lambda h: (h.layer, h.head))
            ]
        if isinstance(run, _Empty):
            run = Circuit(mlps=())
        if not isinstance(run, Circuit):
            raise CircuitkitError(
                f"{self.where}: node-level runs are circuits, not edge masks; use level='edge'"
            )
        out = []
        for layer in range(cfg.n_layers):
            for index in range(cfg.n_heads):
                head = Head(layer, index)
                out += self._outside(head, run.positions_of(head), draw)
        if run.mlps != "all" and not cfg.attn_only:
            for layer in range(cfg.n_layers):
                mlp = MLP(layer)
                kept = tuple(m.pos for m in run.mlps if m.layer == layer)
                out += self._outside(mlp, kept, draw)
        return out

    def _value(self, component: Head | MLP, draw: SenderOutputs) -> Value:
        if self.ablation.value == "zero":
            return Zero()
        if isinstance(component, Head):
            return SetTo(draw.z[component.layer])
        return SetTo(draw.mlp_out[component.layer])

    def _outside(
        self, component: Head | MLP, kept: tuple, draw: SenderOutputs
    ) -> list[Intervention]:
        """The ablation of ``component`` at every position outside ``kept`` (none if kept at
        every position, or anywhere when the ablation keeps circuit nodes at every position)."""
        value = self._value(component, draw)
        if not kept:
            return [Intervention(component, value)]
        if self.ablation.positions == "all" or any(pos is None or pos == "all" for pos in kept):
            return []
        word = f"<outside {component!r} at {sorted(map(repr, kept))}>"
        if word not in self.positions:
            n, n_pos = self.tokens.shape
            inside = torch.zeros(n, n_pos, dtype=torch.bool)
            for pos in kept:
                inside |= position_mask(component.at(pos), n, n_pos, self.positions)
            self.positions[word] = ~inside
        return [Intervention(component.at(word), value)]

    def ablated_edges(self, run: AblatedRun) -> Tensor:
        """bool [receiver, sender]: the edges the run ablates."""
        graph = self.graph
        assert graph is not None
        valid = graph.valid
        if run is None:
            return torch.zeros_like(valid)
        if isinstance(run, _Empty):
            return valid.clone()
        if isinstance(run, Tensor):
            graph.check_mask(run, self.where)
            return valid & ~run.cpu()
        if isinstance(run, _Model):
            removed = torch.zeros(len(graph.senders), dtype=torch.bool)
            for head in run.removed:
                removed[graph.sender_index(Head(head.layer, head.head), self.where)] = True
            return valid & removed[None, :]
        return valid & ~circuit_edges(graph, run, self.where)


def evaluate_together(
    setups: Sequence[AblatedRuns],
    runs: Sequence[AblatedRun],
    *,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> list[Float[Tensor, "runs n"]]:
    """``setup.evaluate(runs)`` for each setup (the same model, tokens and metric, several
    ablations), in fewer calls: the node-level ones in one call of the intervention engine,
    which shares the base run and fills its chunks across them; each edge-level one in one
    call of ``ck.patch_edges`` per draw."""
    out: list[Tensor | None] = [None] * len(setups)
    node = [i for i, setup in enumerate(setups) if setup.graph is None]
    for i, setup in enumerate(setups):
        if setup.graph is None:
            continue
        masks = torch.stack([setup.ablated_edges(run) for run in runs])
        values = [
            patch_edges(
                setup.model,
                setup.tokens,
                masks,
                setup.metric,
                replacement=draw,
                reference=reference_engine,
                memory_budget=memory_budget,
                progress=progress,
                desc=f"{setup.where} ({setup.ablation.label})",
            )
            for draw in setup.draws
        ]
        out[i] = torch.stack(values).mean(0)
    if node:
        first = setups[node[0]]
        engine_runs, positions = [], {}
        for i in node:
            setup = setups[i]
            engine_runs += [setup.interventions(run, draw) for draw in setup.draws for run in runs]
            positions.update(setup.positions)  # a word names the same positions in every setup
        examples = run_interventions(
            first.model,
            first.tokens,
            engine_runs,
            first.metric,
            positions=positions,
            reference=reference_engine,
            memory_budget=memory_budget,
            progress=progress,
            desc=f"{first.where} ({', '.join(setups[i].ablation.label for i in node)})",
            where=first.where,
        )
        start = 0
        for i in node:
            count = len(setups[i].draws) * len(runs)
            part = examples[start : start + count]
            out[i] = part.view(len(setups[i].draws), len(runs), -1).mean(0)
            start += count
    return out  # type: ignore[return-value]


def circuit_edges(graph: Graph, circuit: Circuit, where: str = "circuit_edges") -> Tensor:
    """bool [receiver, sender]: the edges of ``circuit`` in ``graph``: its ``edges`` if it lists
    them, else every edge between its nodes (the embeddings, its heads, its MLPs, and the
    logits; positions are not part of an edge)."""
    if circuit.edges:
        return graph.mask(circuit.edges, where)
    senders = torch.zeros(len(graph.senders), dtype=torch.bool)
    receivers = torch.zeros(len(graph.receivers), dtype=torch.bool)
    senders[graph.sender_index(Embed(), where)] = True
    receivers[graph.receiver_index(LOGITS, where)] = True
    for head in circuit.heads:
        senders[graph.sender_index(head, where)] = True
        for part in (head.q, head.k, head.v):
            receivers[graph.receiver_index(part, where)] = True
    if graph.has_mlp:
        mlps = (
            [MLP(layer) for layer in range(graph.n_layers)]
            if circuit.mlps == "all"
            else [MLP(m.layer) for m in circuit.mlps]
        )
        for mlp in mlps:
            senders[graph.sender_index(mlp, where)] = True
            receivers[graph.receiver_index(mlp, where)] = True
    return graph.valid & receivers[:, None] & senders[None, :]


def _choice(
    ablation: Ablation | str | None,
    method: AblationMethod | str,
    per_template: bool,
    where: str,
) -> Ablation:
    """The ablation of a call: ``ablation`` if given, else ``method`` and ``per_template``."""
    if ablation is not None:
        if method != "mean" or per_template is not True:
            raise CircuitkitError(
                f"{where}: give the ablation either as ablation=... or as method= and "
                f"per_template=, not both (got ablation={ablation!r}, method={method!r}, "
                f"per_template={per_template!r})"
            )
        return check_ablation(ablation, where)
    method = check_method(method, where)
    if per_template and method is AblationMethod.ZERO:
        raise CircuitkitError(f"{where}: per_template is for mean and resample ablation")
    return Ablation(method.value, per_template=bool(per_template))


def _circuit_runs(
    model: HookedTransformer,
    circuit: Circuit,
    ds: Any,
    *,
    reference: Any,
    corrupted: Any,
    metric: MetricLike | None,
    ablation: Ablation,
    n_samples: int,
    seed: int,
    where: str,
    memo: dict[int, SenderOutputs] | None = None,
) -> AblatedRuns:
    """``AblatedRuns`` for ``circuit`` on ``ds``, after checking the circuit against the model
    and resolving its positions (so a bad word fails before any forward pass)."""
    if not isinstance(circuit, Circuit):
        raise CircuitkitError(f"{where}: circuit must be a ck.Circuit, got {circuit!r}")
    try:
        circuit.validate(model)
    except ComponentError as error:
        raise ComponentError(f"{where}: {error}") from None
    tokens, positions = as_tokens(ds, "ds", where, model=model)
    n, n_pos = tokens.shape
    for node in circuit.nodes:
        position_mask(node.head, n, n_pos, positions)
    return AblatedRuns.make(
        model, ds, reference=reference, corrupted=corrupted, metric=metric, ablation=ablation,
        where=where, n_samples=n_samples, seed=seed, memo=memo,
    )  # fmt: skip


def _provenance(runs: AblatedRuns, args: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    choice = runs.ablation
    return provenance.record(
        runs.model,
        method=runs.where,
        args={
            **args,
            "ablation": choice.label,
            "method": choice.value,
            "per_template": choice.per_template,
            "n_samples": len(runs.draws),
        },
        data=data,
        metric=runs.metric,
    )


def _info(runs: AblatedRuns) -> dict[str, Any]:
    choice = runs.ablation
    return {
        "ablation": choice.label,
        "value": choice.value,
        "per_template": choice.per_template,
        "level": choice.level,
        "positions": choice.positions,
        "n_samples": len(runs.draws),
    }


# ---------------------------------------------------------------------------------------------
# Faithfulness


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """How much of the behaviour a circuit recovers: ``F(C) / F(M)``.

    Attributes:
        ratio: ``f_circuit / f_model``.
        f_circuit: the mean metric with everything outside the circuit ablated, ``F(C)``.
        f_model: the mean metric of the full model, ``F(M)``.
        n_heads: the number of distinct heads in the circuit.
        result: the runs behind it: axis "run" = ("model", "circuit"), per-example values in
            ``examples`` and ``provenance``.
        ablation: how everything outside the circuit was removed.

    Example::

        f = ck.faithfulness(model, circuit, ds, reference=ds.corrupted("ABC"))
        f.ratio, f.f_circuit, f.f_model
        f.result.ci()                      # bootstrap intervals of F(M) and F(C)
    """

    ratio: float
    f_circuit: float
    f_model: float
    n_heads: int
    result: Result
    ablation: Ablation = field(default=Ablation("mean", per_template=True))

    def ci(self, level: float = 0.95, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """A percentile bootstrap interval for ``ratio``: the examples are resampled (the same
        draw for both runs) and the ratio of the two means recomputed, ``n_boot`` times."""
        check_interval(level, n_boot, seed, "Faithfulness.ci")
        examples = self.result.examples
        if examples is None or examples.shape[-1] < 2:
            raise CircuitkitError("Faithfulness.ci: needs the per-example values of >= 2 examples")
        n = examples.shape[-1]
        generator = torch.Generator().manual_seed(seed)
        draws = torch.randint(0, n, (n_boot, n), generator=generator)
        means = examples.double()[:, draws].mean(-1)  # [2, n_boot]
        ratios = means[1] / means[0]
        low, high = torch.quantile(
            ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2]).double()
        )
        return float(low), float(high)

    def __repr__(self) -> str:
        n = self.result.n_examples
        return (
            f"Faithfulness({100 * self.ratio:.1f}%: F(C) = {self.f_circuit:.3f}, "
            f"F(M) = {self.f_model:.3f}, {self.n_heads} heads, n={n})"
        )


def faithfulness(
    model: HookedTransformer,
    circuit: Circuit,
    ds: Any | Int[Tensor, "n pos"],
    *,
    reference: Any | Int[Tensor, "n_ref pos"],
    metric: MetricLike | None = None,
    method: AblationMethod | str = "mean",
    per_template: bool = True,
    ablation: Ablation | str | None = None,
    n_samples: int = 1,
    seed: int = 0,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Faithfulness:
    """``F(C) / F(M)``: the metric with everything outside ``circuit`` ablated, over the model's.

    Every head outside the circuit, and every circuit head at the positions where it is not in
    the circuit, is replaced by its mean over ``reference`` (per template of ``ds`` when
    ``per_template``, as in the IOI paper; ``method="resample"`` or "zero" as in ``ck.ablate``).
    MLPs are kept unless the circuit lists its MLPs. ``ablation`` (a ``ck.Ablation`` or a
    short name such as "corrupted"; instead of ``method`` and ``per_template``) picks any
    other choice of the module docstring; "corrupted" patches each prompt of ``ds`` with the
    prompt of ``reference`` in the same place, so ``reference`` then needs ``ds``'s shape.
    ``metric`` defaults to the logit difference of an IOI dataset; ``reference_engine=True``
    runs the plain reference path (one forward per run).

    Returns a ``Faithfulness``: ``ratio``, ``f_circuit``, ``f_model``, ``n_heads``, the
    ``ablation`` used and the ``result`` with per-example values and provenance.

    Example::

        abc = ds.corrupted("ABC")
        f = ck.faithfulness(model, circuit, ds, reference=abc, metric=ck.metrics.logit_diff(ds))
        f.ratio, f.f_circuit, f.f_model, f.ci(0.95)
        ck.faithfulness(model, circuit, ds, reference=abc, ablation="corrupted").ratio
    """
    where = "faithfulness"
    memory_budget = check_memory_budget(memory_budget, where)
    choice = _choice(ablation, method, per_template, where)
    runs = _circuit_runs(
        model, circuit, ds, reference=reference, corrupted=reference, metric=metric,
        ablation=choice, n_samples=n_samples, seed=seed, where=where,
    )  # fmt: skip
    examples = runs.evaluate(
        [None, circuit],
        reference_engine=reference_engine,
        memory_budget=memory_budget,
        progress=progress,
    )
    made = _provenance(runs, {"circuit": circuit, "seed": seed}, {"ds": ds, "reference": reference})
    result = Result.from_examples(
        examples,
        ("run",),
        {"run": ["model", "circuit"]},
        metric=provenance.metric_name(runs.metric),
        method=where,
        info={"circuit": repr(circuit), **_info(runs)},
        provenance=made,
    )
    f_model, f_circuit = (float(v) for v in result.values)
    return Faithfulness(
        ratio=f_circuit / f_model if f_model != 0 else math.nan,
        f_circuit=f_circuit,
        f_model=f_model,
        n_heads=len(circuit),
        result=result,
        ablation=choice,
    )


def faithfulness_table(
    model: HookedTransformer,
    circuit: Circuit,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"] | None = None,
    *,
    reference: Any | Int[Tensor, "n_ref pos"],
    metric: MetricLike | None = None,
    choices: Sequence[Ablation | str] = DEFAULT_CHOICES,
    n_samples: int = 1,
    seed: int = 0,
    ci: float = 0.95,
    n_boot: int = 2000,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
):
    """The faithfulness of ``circuit`` under each ablation of ``choices``, one row each.

    Each choice (a ``ck.Ablation`` or a short name, see the module docstring) gets three runs
    on ``clean``: the full model ``F(M)``, the circuit ``F(C)`` and everything ablated
    ``F(∅)`` (every head and MLP at node level, every edge at edge level). Means and draws
    come from ``reference``; "corrupted" patches each clean prompt with its paired prompt of
    ``corrupted`` (default: ``reference``, which then needs ``clean``'s shape); resampling
    averages ``n_samples`` draws seeded with ``seed``.

    Returns a pandas DataFrame, one row per choice: ``ablation`` (its label), ``value``,
    ``per_template``, ``level``, ``positions``; ``faithfulness`` = ``F(C) / F(M)`` and
    ``normalized`` = ``(F(C) - F(∅)) / (F(M) - F(∅))`` (ratios of means over the examples),
    each with the ``ci``-level percentile bootstrap interval of the ratio (``ci_low``,
    ``ci_high``; ``normalized_ci_low``, ``normalized_ci_high``; ``ratio_interval``, paired
    over examples, ``n_boot`` draws from ``seed``); ``f_circuit``, ``f_model``, ``f_empty``;
    and ``n``, the number of examples.

    Example::

        abc = ds.corrupted("ABC")
        table = ck.faithfulness_table(model, circuit, ds, abc, reference=abc,
                                      metric=ck.metrics.logit_diff(ds))
        table[["ablation", "faithfulness", "ci_low", "ci_high", "normalized"]]
    """
    import pandas as pd

    where = "faithfulness_table"
    memory_budget = check_memory_budget(memory_budget, where)
    check_interval(ci, n_boot, seed, where, level_name="ci")
    if isinstance(choices, (str, Ablation)) or not isinstance(choices, Sequence) or not choices:
        raise CircuitkitError(
            f"{where}: choices must be a non-empty list of ablations (ck.Ablation or short "
            f"names such as 'mean-template'), got {choices!r}"
        )
    parsed = [check_ablation(choice, where) for choice in choices]
    paired = corrupted if corrupted is not None else reference
    memo: dict[int, SenderOutputs] = {}  # each input's senders' outputs, run once for all
    setups = [
        _circuit_runs(
            model,
            circuit,
            clean,
            reference=reference,
            corrupted=paired,
            metric=metric,
            ablation=choice,
            n_samples=n_samples,
            seed=seed,
            where=where,
            memo=memo,
        )  # fmt: skip
        for choice in parsed
    ]
    evaluated = evaluate_together(
        setups,
        [None, circuit, _EMPTY],
        reference_engine=reference_engine,
        memory_budget=memory_budget,
        progress=progress,
    )
    rows = []
    for choice, examples in zip(parsed, evaluated, strict=True):
        model_run, circuit_run, empty_run = examples.double()
        f_model, f_circuit, f_empty = (float(x.mean()) for x in (model_run, circuit_run, empty_run))
        low, high = ratio_interval(circuit_run, model_run, ci, n_boot=n_boot, seed=seed)
        normalized_low, normalized_high = ratio_interval(
            circuit_run - empty_run, model_run - empty_run, ci, n_boot=n_boot, seed=seed
        )
        rows.append(
            {
                "ablation": choice.label,
                "value": choice.name,
                "per_template": choice.per_template,
                "level": choice.level,
                "positions": choice.positions,
                "faithfulness": f_circuit / f_model if f_model != 0 else math.nan,
                "ci_low": low,
                "ci_high": high,
                "normalized": (
                    (f_circuit - f_empty) / (f_model - f_empty) if f_model != f_empty else math.nan
                ),
                "normalized_ci_low": normalized_low,
                "normalized_ci_high": normalized_high,
                "f_circuit": f_circuit,
                "f_model": f_model,
                "f_empty": f_empty,
                "n": int(model_run.shape[0]),
            }
        )
    return pd.DataFrame(rows)


def ratio_interval(
    numerator: Float[Tensor, "n"],
    denominator: Float[Tensor, "n"],
    level: float = 0.95,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``mean(numerator) / mean(denominator)``, paired.

    A resampled ratio ``mean(a*) / mean(b*)`` (with ``mean(b*) > 0``) is at most ``r`` exactly
    when ``mean(a* - r b*)`` is at most 0, so the ratio's ``q``-quantile is the ``r`` at which
    the ``q``-quantile of the resampled means of ``a - r b`` crosses 0; those quantiles are
    ``bootstrap_interval``'s, with its draws (the same resampled indices as ``Result.ci``), and
    the crossing is found by bisection, to within the gap between adjacent resampled ratios.
    NaN with fewer than 2 examples, or when some resampled mean of the denominator is 0 or of
    the other sign than the full sample's (a ratio whose denominator can reach 0 has no useful
    interval).

    Example::

        low, high = ratio_interval(circuit_metric, model_metric, 0.95)   # F(C) / F(M)
    """
    check_interval(level, n_boot, seed, "ratio_interval")
    a = numerator.detach().to("cpu", torch.float64).flatten()
    b = denominator.detach().to("cpu", torch.float64).flatten()
    if a.shape != b.shape:
        raise ShapeError(
            f"ratio_interval: numerator has {a.numel()} values but denominator {b.numel()}; "
            "they are paired, one per example"
        )
    if a.numel() < 2:
        return math.nan, math.nan
    if float(b.mean()) < 0:  # the same ratio, with a positive denominator
        a, b = -a, -b
    # the smallest resampled mean of b (the quantile next to 0) must be positive
    smallest, _ = bootstrap_interval(b[None], 1 - 1e-12, n_boot=n_boot, seed=seed)
    if float(smallest[0]) <= 0:
        return math.nan, math.nan
    ratio = float(a.mean() / b.mean())

    def crossings(r: Tensor) -> Tensor:
        """[2, k]: the lower and the upper quantile of the resampled means of ``a - r b``, for
        the first and the second half of ``r`` (both decrease as r grows)."""
        low, high = bootstrap_interval(
            a[None] - r[:, None] * b[None], level, n_boot=n_boot, seed=seed
        )
        half = len(r) // 2
        return torch.stack([low[:half], high[half:]])

    # brackets [lo, hi] of the two crossings: the interval's low end, then its high end
    step = max(abs(ratio), 1.0)
    lo = torch.full((2,), ratio - step, dtype=torch.float64)
    hi = torch.full((2,), ratio + step, dtype=torch.float64)
    for _ in range(200):
        g = crossings(torch.cat([torch.stack([lo[0], hi[0]]), torch.stack([lo[1], hi[1]])]))
        if bool((g[:, 0] >= 0).all() and (g[:, 1] <= 0).all()):
            break
        lo = torch.where(g[:, 0] < 0, lo - step, lo)
        hi = torch.where(g[:, 1] > 0, hi + step, hi)
        step *= 2
    else:
        return math.nan, math.nan
    rows = torch.arange(2)
    for _ in range(30):  # each step shrinks the brackets 16-fold
        if float((hi - lo).max()) <= 1e-7 * max(1.0, abs(ratio)):
            break
        grid = torch.stack([torch.linspace(float(x), float(y), 17, dtype=torch.float64)
                            for x, y in zip(lo, hi, strict=True)])  # fmt: skip
        above = (crossings(grid.flatten()) > 0).sum(1)  # the first points of each grid
        lo, hi = grid[rows, (above - 1).clamp(0, 16)], grid[rows, above.clamp(0, 16)]
    return float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2


HeadSets = Sequence[Iterable[Head]] | Mapping[str, Iterable[Head]]


def completeness(
    model: HookedTransformer,
    circuit: Circuit,
    ds: Any | Int[Tensor, "n pos"],
    *,
    reference: Any | Int[Tensor, "n_ref pos"],
    metric: MetricLike | None = None,
    sets: HeadSets | None = None,
    n_random: int = 0,
    greedy: int = 0,
    method: AblationMethod | str = "mean",
    per_template: bool = True,
    ablation: Ablation | str | None = None,
    seed: int = 0,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Result:
    """``F(C \\ K)`` beside ``F(M \\ K)`` for sets ``K`` of the circuit's heads.

    Removing ``K`` from the model mean-ablates its heads at every position; removing it from the
    circuit does the same on top of the circuit's own ablations (see ``ck.faithfulness``). The
    sets: ``sets`` (a list of head sets, or ``{label: heads}``; by default the empty set and
    each class of the circuit), plus ``n_random`` random subsets (each head of the circuit in
    or out with probability 1/2, from a generator seeded with ``seed``), plus, with
    ``greedy=k``, the sets of a greedy search that adds, ``k`` times, the head that most
    increases the incompleteness ``|F(C \\ K) - F(M \\ K)|`` (2 runs per candidate head).
    ``ablation`` (a ``ck.Ablation`` or a short name, instead of ``method`` and
    ``per_template``) removes with any choice of ``ck.faithfulness``; "corrupted" pairs each
    prompt with the prompt of ``reference`` in the same place.

    Returns a ``Result`` with axes ("set", "run"), run = ("circuit", "model"): the mean metric of
    each, per-example values in ``examples``; ``info["incompleteness"]`` [sets] is
    ``|F(C \\ K) - F(M \\ K)|``, ``info["sets"]`` the heads of each set.

    Example::

        result = ck.completeness(model, circuit, ds, reference=abc, n_random=5, greedy=3)
        result.to_dataframe().pivot(index="set", columns="run", values="value")
    """
    where = "completeness"
    memory_budget = check_memory_budget(memory_budget, where)
    setup = _circuit_runs(
        model, circuit, ds, reference=reference, corrupted=reference, metric=metric,
        ablation=_choice(ablation, method, per_template, where), n_samples=1, seed=seed,
        where=where,
    )  # fmt: skip
    engine = dict(reference_engine=reference_engine, memory_budget=memory_budget)
    labelled = _head_sets(circuit, sets, where)
    generator = torch.Generator().manual_seed(seed)
    heads = list(circuit.heads)
    for i in range(n_random):
        chosen = torch.rand(len(heads), generator=generator) < 0.5
        labelled.append((f"random {i}", [h for h, c in zip(heads, chosen, strict=True) if c]))

    def pair(k: list[Head]) -> list[AblatedRun]:
        return [circuit.without(k), _Model(k)]

    runs = [run for _, k in labelled for run in pair(k)]
    evaluated = setup.evaluate(runs, progress=progress, **engine)
    examples = list(evaluated.view(len(labelled), 2, -1))

    chosen_k: list[Head] = []
    for step in range(greedy):
        candidates = [h for h in heads if h not in chosen_k]
        if not candidates:
            break
        runs = [run for h in candidates for run in pair([*chosen_k, h])]
        trial = setup.evaluate(runs, progress=progress, **engine)
        trial = trial.view(len(candidates), 2, -1)
        gaps = (trial[:, 0].mean(-1) - trial[:, 1].mean(-1)).abs()
        best = int(gaps.argmax())
        chosen_k.append(candidates[best])
        labelled.append((f"greedy {step + 1}", list(chosen_k)))
        examples.append(trial[best])

    stacked = torch.stack(examples)
    made = _provenance(
        setup,
        {
            "circuit": circuit,
            "sets": [[h.label for h in k] for _, k in labelled],
            "n_random": n_random,
            "greedy": greedy,
            "seed": seed,
        },
        {"ds": ds, "reference": reference},
    )
    result = Result.from_examples(
        stacked,
        ("set", "run"),
        {"set": [label for label, _ in labelled], "run": ["circuit", "model"]},
        metric=provenance.metric_name(setup.metric),
        method=where,
        info={
            "circuit": repr(circuit),
            "sets": [[h.label for h in k] for _, k in labelled],
            **_info(setup),
        },
        provenance=made,
    )
    result.info["incompleteness"] = (result.values[:, 0] - result.values[:, 1]).abs()
    return result


def minimality(
    model: HookedTransformer,
    circuit: Circuit,
    ds: Any | Int[Tensor, "n pos"],
    *,
    reference: Any | Int[Tensor, "n_ref pos"],
    metric: MetricLike | None = None,
    k: Literal["class", "empty"] | Mapping[Head, Iterable[Head]] = "class",
    method: AblationMethod | str = "mean",
    per_template: bool = True,
    ablation: Ablation | str | None = None,
    seed: int = 0,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Result:
    """For each head ``v`` of the circuit, ``F(C \\ (K + {v})) - F(C \\ K)``.

    The minimality score of ``v`` is the absolute value of this: how much the circuit loses
    without ``v``. ``K`` hides the heads that would otherwise make up for ``v``: ``k="class"``
    (the default) takes the other heads of ``v``'s class, close to the paper's hand-chosen
    sets; ``k="empty"`` removes ``v`` alone; a mapping ``{head: heads}`` gives ``K`` per head.
    ``ablation`` (a ``ck.Ablation`` or a short name, instead of ``method`` and
    ``per_template``) removes with any choice of ``ck.faithfulness``.

    Returns a ``Result`` with axis "head" (labels such as "9.9 (name mover)"): the mean
    difference per head, per-example differences in ``examples``; ``info["score"]`` is
    ``|difference|``, ``info["relative"]`` the score over ``F(M)``, ``info["k"]`` each head's
    ``K``, ``info["f_without_k"]`` the values ``F(C \\ K)``.

    Example::

        result = ck.minimality(model, circuit, ds, reference=abc)
        result.info["relative"]          # fraction of F(M) each head is worth in the circuit
    """
    where = "minimality"
    memory_budget = check_memory_budget(memory_budget, where)
    setup = _circuit_runs(
        model, circuit, ds, reference=reference, corrupted=reference, metric=metric,
        ablation=_choice(ablation, method, per_template, where), n_samples=1, seed=seed,
        where=where,
    )  # fmt: skip
    engine = dict(reference_engine=reference_engine, memory_budget=memory_budget)
    heads = list(circuit.heads)
    if not heads:
        raise CircuitkitError(f"{where}: the circuit has no heads")
    roles = {
        h: [n.role for n in circuit.nodes if (n.head.layer, n.head.head) == (h.layer, h.head)]
        for h in heads
    }
    k_sets: list[list[Head]] = []
    for head in heads:
        if k == "class":
            same = {(n.head.layer, n.head.head) for n in circuit.nodes if n.role in roles[head]}
            k_sets.append([h for h in heads if (h.layer, h.head) in same and h != head])
        elif k == "empty":
            k_sets.append([])
        elif isinstance(k, Mapping):
            given = [Head(h.layer, h.head) for h in k.get(head, ())]
            for h in given:
                if h not in circuit or h == head:
                    raise ComponentError(
                        f"{where}: K for {head.label} has {h.label}, which is "
                        + ("the head itself" if h == head else "not in the circuit")
                    )
            k_sets.append(given)
        else:
            raise CircuitkitError(
                f"{where}: k must be 'class', 'empty' or a mapping head -> heads, got {k!r}"
            )
    runs = [
        run
        for head, k_set in zip(heads, k_sets, strict=True)
        for run in (circuit.without(k_set), circuit.without([*k_set, head]))
    ]
    examples = setup.evaluate(runs, progress=progress, **engine).view(len(heads), 2, -1)
    f_model = float(setup.evaluate([None], progress=False, **engine).mean())
    differences = examples[:, 1] - examples[:, 0]
    labels = [f"{h.label} ({', '.join(roles[h])})" for h in heads]
    made = _provenance(
        setup,
        {"circuit": circuit, "k": [[h.label for h in s] for s in k_sets]},
        {"ds": ds, "reference": reference},
    )
    result = Result.from_examples(
        differences,
        ("head",),
        {"head": labels},
        metric=provenance.metric_name(setup.metric),
        method=where,
        info={
            "circuit": repr(circuit),
            "k": [[h.label for h in s] for s in k_sets],
            "f_without_k": examples[:, 0].mean(-1),
            "f_model": f_model,
            **_info(setup),
        },
        provenance=made,
    )
    result.info["score"] = result.values.abs()
    result.info["relative"] = result.values.abs() / abs(f_model)
    return result


def _head_sets(circuit: Circuit, sets: HeadSets | None, where: str) -> list[tuple[str, list[Head]]]:
    """``(label, heads)`` for each set ``K``: the default is the empty set and each class."""
    if sets is None:
        out: list[tuple[str, list[Head]]] = [("empty", [])]
        for role, heads in circuit.classes.items():
            out.append(
                (
                    role or "-",
                    sorted({Head(h.layer, h.head) for h in heads}, key=lambda h: (h.layer, h.head)),
                )
            )
        return out
    items = list(sets.items()) if isinstance(sets, Mapping) else list(enumerate(sets))
    out = []
    for label, given in items:
        chosen = [Head(h.layer, h.head) for h in given]
        for h in chosen:
            if h not in circuit:
                raise ComponentError(
                    f"{where}: the set {label!r} has {h.label}, which is not in the circuit"
                )
        name = (
            str(label)
            if isinstance(label, str)
            else ("empty" if not chosen else " ".join(h.label for h in chosen))
        )
        out.append((name, chosen))
    return out


__all__ = [
    "DEFAULT_CHOICES",
    "AblatedRun",
    "AblatedRuns",
    "Faithfulness",
    "HeadSets",
    "circuit_edges",
    "completeness",
    "evaluate_together",
    "faithfulness",
    "faithfulness_table",
    "minimality",
    "ratio_interval",
]
