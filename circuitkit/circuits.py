"""Circuits: which heads carry a behaviour, and how much of it they carry on their own.

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

Every evaluation is a set of runs of the intervention engine: ``SetTo`` the per-template mean
of each ablated head (the values ``ck.ablate(..., per_template=True)`` uses) on the entries
outside the circuit, all heads of a run applied in one forward pass.

A ``Circuit`` can also hold *edges* (a sender and the input of a receiver it feeds, such as
``Head(5, 1) -> Head(9, 9).q``) and free-form ``info`` (the results that found it, a faithfulness
curve); the evaluations here read its heads and MLPs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitkit import provenance
from circuitkit.ablation import AblationMethod, _ablation_values, _check_method
from circuitkit.attention import attention_head_scores, attention_scores
from circuitkit.components import MLP, Component, Head, position_mask
from circuitkit.engine import Intervention, MetricLike, run_interventions
from circuitkit.errors import CircuitkitError, ComponentError
from circuitkit.graph import Edge
from circuitkit.inputs import as_tokens, default_metric
from circuitkit.path_patching import path_patching
from circuitkit.results import Result

#: The classes of heads in the IOI paper's circuit (any other label is allowed too).
IOI_CLASSES: tuple[str, ...] = (
    "name mover",
    "negative name mover",
    "backup name mover",
    "s-inhibition",
    "induction",
    "duplicate token",
    "previous token",
)


@dataclass(frozen=True)
class CircuitHead:
    """One head of a circuit at the positions where it acts.

    Attributes:
        head: the head's output, restricted to its positions: ``Head(9, 9).at("end")``
            (``Head(9, 9)`` alone acts at every position).
        role: its class, such as "name mover" (``IOI_CLASSES``), or "".
        effect: the effect that put it in the circuit (a path-patching effect), or None.

    Example::

        node = ck.CircuitHead(ck.Head(23, 2).at("end"), "name mover")
        node.label                         # '23.2@end'
        ck.Circuit(nodes=(node,), name="one head")
    """

    head: Head
    role: str = ""
    effect: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.head, Head) or self.head.part != "z":
            raise ComponentError(
                f"CircuitHead: head must be a head's output such as ck.Head(9, 9).at('end'), "
                f"got {self.head!r}"
            )

    @property
    def label(self) -> str:
        """``"9.9@end"``: layer.head, and the positions unless it acts at every one."""
        pos = self.head.pos
        return self.head.label if pos is None else f"{self.head.label}@{_pos_label(pos)}"


@dataclass(frozen=True)
class Circuit:
    """A set of heads at the positions where they act, optionally MLPs and edges.

    Attributes:
        nodes: the circuit's heads (``CircuitHead``), each with its positions and class. A head
            may appear more than once, at different positions.
        mlps: "all" (every MLP is kept, the IOI paper's choice), or the MLPs in the circuit
            (``MLP(l)``, optionally ``.at(positions)``); every other MLP is then ablated too.
        edges: paths between components (``Edge``), for circuits found edge by edge; the
            evaluations in this module read ``nodes`` and ``mlps`` only.
        name: a label for reports.
        info: details of how the circuit was found (the results behind each class, thresholds,
            a faithfulness curve); not part of equality.

    Example::

        circuit = ck.Circuit.from_classes(
            {
                "name mover": [ck.Head(23, 2).at("end"), ck.Head(23, 0).at("end")],
                "s-inhibition": [ck.Head(20, 0).at("end")],
                "induction": [ck.Head(17, 4).at("S2")],
            },
            name="IOI",
        )
        len(circuit)             # 4 heads
        circuit.heads            # (Head(17, 4), Head(20, 0), Head(23, 0), Head(23, 2))
        circuit.to_dataframe()
        ck.faithfulness(model, circuit, ds, reference=ds.corrupted("ABC"))
    """

    nodes: tuple[CircuitHead, ...] = ()
    mlps: tuple[MLP, ...] | Literal["all"] = "all"
    edges: tuple[Edge, ...] = ()
    name: str = ""
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        nodes = tuple(self.nodes)
        for node in nodes:
            if not isinstance(node, CircuitHead):
                raise ComponentError(
                    f"Circuit: nodes must be CircuitHead objects (or use Circuit.from_classes), "
                    f"got {node!r}"
                )
        seen = set()
        for node in nodes:
            key = (node.head.layer, node.head.head, repr(node.head.pos))
            if key in seen:
                raise ComponentError(f"Circuit: the head {node.label} is listed twice")
            seen.add(key)
        object.__setattr__(self, "nodes", nodes)
        if self.mlps != "all":
            mlps = tuple(self.mlps)
            if not all(isinstance(m, MLP) for m in mlps):
                raise ComponentError(
                    f"Circuit: mlps must be 'all' or a sequence of ck.MLP(layer), got {self.mlps!r}"
                )
            object.__setattr__(self, "mlps", mlps)
        edges = tuple(self.edges)
        if not all(isinstance(e, Edge) for e in edges):
            raise ComponentError(f"Circuit: edges must be Edge objects, got {self.edges!r}")
        object.__setattr__(self, "edges", edges)

    @classmethod
    def from_classes(
        cls,
        classes: Mapping[str, Iterable[Head]],
        *,
        mlps: Sequence[MLP] | Literal["all"] = "all",
        name: str = "",
        effects: Mapping[Head, float] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Circuit:
        """A circuit from ``{class: [heads at their positions]}``.

        Example::

            ck.Circuit.from_classes({"name mover": [ck.Head(23, 2).at("end")],
                                     "induction": [ck.Head(17, 4).at("S2")]})
        """
        effects = effects or {}
        nodes = [
            CircuitHead(head, role, effects.get(head))
            for role, heads in classes.items()
            for head in heads
        ]
        return cls(tuple(nodes), mlps=mlps, name=name, info=dict(info or {}))  # type: ignore[arg-type]

    # -- reading -------------------------------------------------------------------------------

    @property
    def heads(self) -> tuple[Head, ...]:
        """The distinct heads (``Head(l, h)``, without positions), by layer and head."""
        unique = {(n.head.layer, n.head.head) for n in self.nodes}
        return tuple(Head(layer, head) for layer, head in sorted(unique))

    def __len__(self) -> int:
        """The number of distinct heads."""
        return len(self.heads)

    def __contains__(self, head: object) -> bool:
        if not isinstance(head, Head):
            return False
        return any((n.head.layer, n.head.head) == (head.layer, head.head) for n in self.nodes)

    @property
    def classes(self) -> dict[str, list[Head]]:
        """``{class: [heads at their positions]}``, classes in the order they first appear."""
        out: dict[str, list[Head]] = {}
        for node in self.nodes:
            out.setdefault(node.role, []).append(node.head)
        return out

    def positions_of(self, head: Head) -> tuple:
        """The positions at which ``head`` is in the circuit (``None`` meaning every one)."""
        return tuple(
            n.head.pos for n in self.nodes if (n.head.layer, n.head.head) == (head.layer, head.head)
        )

    def without(self, heads: Iterable[Head]) -> Circuit:
        """The circuit with ``heads`` removed (at every position; edges that touch them too)."""
        drop = {(h.layer, h.head) for h in heads}
        nodes = tuple(n for n in self.nodes if (n.head.layer, n.head.head) not in drop)

        def touches(component: Component) -> bool:
            return isinstance(component, Head) and (component.layer, component.head) in drop

        edges = tuple(e for e in self.edges if not (touches(e.sender) or touches(e.receiver)))
        return dataclasses.replace(self, nodes=nodes, edges=edges)

    def validate(self, model: HookedTransformer) -> None:
        """Raise a ComponentError if a head or MLP of the circuit does not exist in ``model``."""
        for node in self.nodes:
            node.head.validate(model)
        if self.mlps != "all":
            for mlp in self.mlps:
                mlp.validate(model)

    def to_dataframe(self):
        """One row per head and position: class, layer, head, position, effect.

        Example::

            circuit.to_dataframe().groupby("class").size()
        """
        import pandas as pd

        return pd.DataFrame(
            {
                "class": [n.role for n in self.nodes],
                "layer": [n.head.layer for n in self.nodes],
                "head": [n.head.head for n in self.nodes],
                "position": [_pos_label(n.head.pos) for n in self.nodes],
                "effect": [n.effect for n in self.nodes],
            }
        )

    def __repr__(self) -> str:
        title = f"Circuit({self.name!r}, " if self.name else "Circuit("
        mlps = "all" if self.mlps == "all" else (", ".join(map(repr, self.mlps)) or "none")
        extra = f", {len(self.edges)} edges" if self.edges else ""
        lines = [f"{title}{len(self)} heads, MLPs: {mlps}{extra}"]
        width = max((len(role or "-") for role in self.classes), default=0)
        for role, heads in self.classes.items():
            labels = ", ".join(
                CircuitHead(h).label for h in sorted(heads, key=lambda h: (h.layer, h.head))
            )
            lines.append(f"  {role or '-':<{width}}  {labels}")
        return "\n".join(lines) + ")"


# ---------------------------------------------------------------------------------------------
# Evaluations


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

    def ci(self, level: float = 0.95, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """A percentile bootstrap interval for ``ratio``: the examples are resampled (the same
        draw for both runs) and the ratio of the two means recomputed, ``n_boot`` times."""
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
    MLPs are kept unless the circuit lists its MLPs. ``metric`` defaults to the logit
    difference of an IOI dataset; ``reference_engine=True`` runs the engine's plain reference.

    Returns a ``Faithfulness``: ``ratio``, ``f_circuit``, ``f_model``, ``n_heads`` and the
    ``result`` with per-example values and provenance.

    Example::

        abc = ds.corrupted("ABC")
        f = ck.faithfulness(model, circuit, ds, reference=abc, metric=ck.metrics.logit_diff(ds))
        f.ratio, f.f_circuit, f.f_model, f.ci(0.95)
    """
    where = "faithfulness"
    setup = _Setup.make(
        model, circuit, ds, reference, metric, method, per_template, n_samples, seed, where
    )
    examples = setup.evaluate(
        [None, circuit], reference_engine, memory_budget, progress, f"{where} ({setup.method})"
    )
    made = setup.provenance(where, {"circuit": circuit, "per_template": per_template})
    result = Result.from_examples(
        examples,
        ("run",),
        {"run": ["model", "circuit"]},
        metric=provenance.metric_name(setup.metric),
        method=where,
        info={"circuit": repr(circuit), **setup.info()},
        provenance=made,
    )
    f_model, f_circuit = (float(v) for v in result.values)
    return Faithfulness(
        ratio=f_circuit / f_model if f_model != 0 else math.nan,
        f_circuit=f_circuit,
        f_model=f_model,
        n_heads=len(circuit),
        result=result,
    )


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

    Returns a ``Result`` with axes ("set", "run"), run = ("circuit", "model"): the mean metric of
    each, per-example values in ``examples``; ``info["incompleteness"]`` [sets] is
    ``|F(C \\ K) - F(M \\ K)|``, ``info["sets"]`` the heads of each set.

    Example::

        result = ck.completeness(model, circuit, ds, reference=abc, n_random=5, greedy=3)
        result.to_dataframe().pivot(index="set", columns="run", values="value")
    """
    where = "completeness"
    setup = _Setup.make(model, circuit, ds, reference, metric, method, per_template, 1, seed, where)
    labelled = _head_sets(circuit, sets, where)
    generator = torch.Generator().manual_seed(seed)
    heads = list(circuit.heads)
    for i in range(n_random):
        chosen = torch.rand(len(heads), generator=generator) < 0.5
        labelled.append((f"random {i}", [h for h, c in zip(heads, chosen, strict=True) if c]))

    def pair(k: list[Head]) -> list[Circuit | _Model | None]:
        return [circuit.without(k), _Model(k)]

    desc = f"{where} ({setup.method})"
    runs = [run for _, k in labelled for run in pair(k)]
    evaluated = setup.evaluate(runs, reference_engine, memory_budget, progress, desc)
    examples = list(evaluated.view(len(labelled), 2, -1))

    chosen_k: list[Head] = []
    for step in range(greedy):
        candidates = [h for h in heads if h not in chosen_k]
        if not candidates:
            break
        runs = [run for h in candidates for run in pair([*chosen_k, h])]
        trial = setup.evaluate(runs, reference_engine, memory_budget, progress, desc)
        trial = trial.view(len(candidates), 2, -1)
        gaps = (trial[:, 0].mean(-1) - trial[:, 1].mean(-1)).abs()
        best = int(gaps.argmax())
        chosen_k.append(candidates[best])
        labelled.append((f"greedy {step + 1}", list(chosen_k)))
        examples.append(trial[best])

    stacked = torch.stack(examples)
    made = setup.provenance(
        where,
        {
            "circuit": circuit,
            "sets": [[h.label for h in k] for _, k in labelled],
            "n_random": n_random,
            "greedy": greedy,
            "seed": seed,
            "per_template": per_template,
        },
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
            **setup.info(),
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

    Returns a ``Result`` with axis "head" (labels such as "9.9 (name mover)"): the mean
    difference per head, per-example differences in ``examples``; ``info["score"]`` is
    ``|difference|``, ``info["relative"]`` the score over ``F(M)``, ``info["k"]`` each head's
    ``K``, ``info["f_without_k"]`` the values ``F(C \\ K)``.

    Example::

        result = ck.minimality(model, circuit, ds, reference=abc)
        result.info["relative"]          # fraction of F(M) each head is worth in the circuit
    """
    where = "minimality"
    setup = _Setup.make(model, circuit, ds, reference, metric, method, per_template, 1, seed, where)
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
    examples = setup.evaluate(
        runs, reference_engine, memory_budget, progress, f"{where} ({setup.method})"
    ).view(len(heads), 2, -1)
    f_model = float(setup.evaluate([None], reference_engine, memory_budget, False, where).mean())
    differences = examples[:, 1] - examples[:, 0]
    labels = [f"{h.label} ({', '.join(roles[h])})" for h in heads]
    made = setup.provenance(
        where,
        {
            "circuit": circuit,
            "k": [[h.label for h in s] for s in k_sets],
            "per_template": per_template,
        },
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
            **setup.info(),
        },
        provenance=made,
    )
    result.info["score"] = result.values.abs()
    result.info["relative"] = result.values.abs() / abs(f_model)
    return result


# ---------------------------------------------------------------------------------------------
# Finding the IOI circuit


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
    for name, value in (
        ("relative_threshold", relative_threshold),
        ("min_attention", min_attention),
    ):
        if not 0 <= value <= 1:
            raise CircuitkitError(f"{where}: {name} must lie in [0, 1], got {value!r}")
    if z_threshold < 0 or max_per_class < 1:
        raise CircuitkitError(
            f"{where}: z_threshold must be >= 0 and max_per_class >= 1, got {z_threshold!r} "
            f"and {max_per_class!r}"
        )
    tokens, positions = as_tokens(ds, "ds", where)
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


# ---------------------------------------------------------------------------------------------
# Building the runs


@dataclass(frozen=True)
class _Model:
    """The full model with the heads ``removed`` ablated at every position (``M \\ K``)."""

    removed: Sequence[Head]


@dataclass
class _Setup:
    """Everything the evaluations of one circuit on one dataset share."""

    model: HookedTransformer
    tokens: Tensor
    positions: dict[str, Tensor]
    metric: MetricLike
    method: str
    draws: list[dict[str, Any]]  # one {hook name: value} per draw
    data: dict[str, Any]
    where: str

    @classmethod
    def make(
        cls,
        model: HookedTransformer,
        circuit: Circuit,
        ds: Any,
        reference: Any,
        metric: MetricLike | None,
        method: AblationMethod | str,
        per_template: bool,
        n_samples: int,
        seed: int,
        where: str,
    ) -> _Setup:
        if not isinstance(circuit, Circuit):
            raise CircuitkitError(f"{where}: circuit must be a ck.Circuit, got {circuit!r}")
        try:
            circuit.validate(model)
        except ComponentError as error:
            raise ComponentError(f"{where}: {error}") from None
        method = _check_method(method, where)
        tokens, positions = as_tokens(ds, "ds", where)
        metric = default_metric(metric, ds, where)
        n, n_pos = tokens.shape
        positions = dict(positions or {})
        for node in circuit.nodes:  # resolve every position now, so bad words fail early
            position_mask(node.head, n, n_pos, positions)
        cfg = model.cfg
        ablatable: list[Component] = [Head(layer, 0) for layer in range(cfg.n_layers)]
        if circuit.mlps != "all":
            ablatable += [MLP(layer) for layer in range(cfg.n_layers)]
        draws = _ablation_values(
            model, ds, tokens, ablatable, method, reference, per_template, n_samples, seed, where
        )
        return cls(
            model, tokens, positions, metric, method.value, draws,
            {"ds": ds, "reference": reference}, where,
        )  # fmt: skip

    def evaluate(
        self,
        runs: Sequence[Circuit | _Model | None],
        reference_engine: bool,
        memory_budget: int | None,
        progress: bool,
        desc: str,
    ) -> Float[Tensor, "runs n"]:
        """The metric of each run, averaged over the ablation draws: a circuit, a model with
        some heads removed, or None (the full model)."""
        engine_runs = [self._interventions(run, draw) for draw in self.draws for run in runs]
        examples = run_interventions(
            self.model,
            self.tokens,
            engine_runs,
            self.metric,
            positions=self.positions,
            reference=reference_engine,
            memory_budget=memory_budget,
            progress=progress,
            desc=desc,
        )
        return examples.view(len(self.draws), len(runs), -1).mean(0)

    def _interventions(
        self, run: Circuit | _Model | None, draw: dict[str, Any]
    ) -> list[Intervention]:
        if run is None:
            return []
        cfg = self.model.cfg
        if isinstance(run, _Model):
            return [
                Intervention(h, draw[h.hook_name(self.model)])
                for h in sorted(set(run.removed), key=lambda h: (h.layer, h.head))
            ]
        out = []
        for layer in range(cfg.n_layers):
            for index in range(cfg.n_heads):
                head = Head(layer, index)
                out += self._outside(head, run.positions_of(head), draw)
        if run.mlps != "all":
            for layer in range(cfg.n_layers):
                mlp = MLP(layer)
                kept = tuple(m.pos for m in run.mlps if m.layer == layer)
                out += self._outside(mlp, kept, draw)
        return out

    def _outside(
        self, component: Head | MLP, kept: tuple, draw: dict[str, Any]
    ) -> list[Intervention]:
        """The ablation of ``component`` at every position outside ``kept`` (none if kept at
        every position)."""
        value = draw[component.hook_name(self.model)]
        if not kept:
            return [Intervention(component, value)]
        if any(pos is None or pos == "all" for pos in kept):
            return []
        word = f"<outside {component!r} at {sorted(map(repr, kept))}>"
        if word not in self.positions:
            n, n_pos = self.tokens.shape
            inside = torch.zeros(n, n_pos, dtype=torch.bool)
            for pos in kept:
                inside |= position_mask(component.at(pos), n, n_pos, self.positions)
            self.positions[word] = ~inside
        return [Intervention(component.at(word), value)]

    def provenance(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        return provenance.record(
            self.model,
            method=method,
            args={**args, "method": self.method, "n_samples": len(self.draws)},
            data=self.data,
            metric=self.metric,
        )

    def info(self) -> dict[str, Any]:
        return {"ablation": self.method, "n_samples": len(self.draws)}


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


def _pos_label(pos: Any) -> str:
    if pos is None:
        return "all"
    if isinstance(pos, slice):
        return f"{pos.start or ''}:{pos.stop or ''}"
    return str(pos)


__all__ = [
    "IOI_CLASSES",
    "Circuit",
    "CircuitHead",
    "Faithfulness",
    "completeness",
    "faithfulness",
    "find_ioi_circuit",
    "minimality",
]
