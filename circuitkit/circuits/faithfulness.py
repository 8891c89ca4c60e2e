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

Every evaluation is a set of runs of the intervention engine: ``SetTo`` the per-template mean
of each ablated head (the values ``ck.ablate(..., per_template=True)`` uses) on the entries
outside the circuit, all heads of a run applied in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitkit.circuits.circuit import Circuit
from circuitkit.core import provenance
from circuitkit.core.components import MLP, Component, Head, position_mask
from circuitkit.core.engine import run_interventions
from circuitkit.core.errors import CircuitkitError, ComponentError
from circuitkit.core.inputs import as_tokens, default_metric
from circuitkit.core.interventions import Intervention, MetricLike
from circuitkit.core.results import Result
from circuitkit.methods.ablation import AblationMethod, ablation_values, check_method


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
        method = check_method(method, where)
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
        draws = ablation_values(
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


__all__ = ["Faithfulness", "faithfulness", "HeadSets", "completeness", "minimality"]
