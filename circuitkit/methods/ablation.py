"""Ablation: remove a component's contribution and see what the behaviour loses.

Context. To ask whether a model *needs* a component, run the model with that component's
activation replaced by an uninformative value and read the metric. What counts as
uninformative is the method:

- **zero** (``"zero"``): the activation is set to zero. Simple, but zero may be far outside
  anything the component ever outputs, so later layers see an input they never saw in
  training and the effect can be overstated.
- **mean** (``"mean"``): the activation is set to its mean over a *reference* distribution,
  such as the ABC corruption of an IOI dataset (three unrelated names, same templates). The
  mean is taken per position by default; with ``per_template=True`` the prompts of one
  template share the mean over the reference prompts of that template, as in the IOI paper
  (Wang et al., 2022), so positions line up with the same words.
- **resample** (``"resample"``): each example gets the activation of a reference example
  drawn at random (seeded; with ``per_template=True`` from the same template), as in causal
  scrubbing. With ``n_samples > 1`` the metric is averaged over several draws.

A set of components is ablated together in one run (``ck.ablate``); ``keep=`` ablates every
component of some kinds except a few, the usual "everything but the circuit" test. A sweep
(``ck.ablation_sweep``) ablates each component of a kind in turn. Everything compiles to the
intervention engine: ``Zero`` for zero ablation, ``SetTo`` with the mean for mean ablation and
``Patch`` with the drawn reference examples' activations for resampling. The unablated run is
part of every call, so a result always carries its baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.core import provenance
from circuitkit.core.components import Component, Neuron, all_components
from circuitkit.core.engine import run_interventions
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.graph import SenderOutputs, sender_outputs
from circuitkit.core.inputs import as_index_list, as_tokens, default_metric, token_labels
from circuitkit.core.interventions import Intervention, MetricLike, Patch, SetTo, Value, Zero
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result


class AblationMethod(str, Enum):
    """How an ablated activation is replaced: by zero, a reference mean, or a resampled
    reference example's activation. The plain strings "zero", "mean", "resample" work too.

    Example::

        ck.ablate(model, ds, "head", ck.AblationMethod.MEAN, reference=ds.corrupted("ABC"))
    """

    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"


# Bool selection masks the engine builds per component, in bytes, that one engine call may hold
# (a neuron's mask spans [n, pos, d_mlp], so a sweep over a layer's neurons is split).
_MASK_BUDGET = 256 * 1024**2


def ablate(
    model: HookedTransformer,
    ds: Any | Int[Tensor, "n pos"],
    components: str | Component | Sequence[Component | str],
    method: AblationMethod | str = "mean",
    *,
    reference: Any | Int[Tensor, "n_ref pos"] | None = None,
    metric: MetricLike | None = None,
    keep: Sequence[Component] | None = None,
    per_template: bool = False,
    n_samples: int = 1,
    seed: int = 0,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> Result:
    """Ablate a set of components together and read the metric, beside the unablated run.

    ``components`` is a component (``ck.Head(9, 9)``, ``ck.MLP(3).at("end")``, ...), a list of
    them, a kind such as "head", "mlp", "attn" (every component of that kind), or a list mixing
    both. ``keep`` removes components from that set: ``ablate(model, ds, "head", keep=circuit)``
    ablates every head except the circuit's. All of them are ablated in one run.

    ``method`` is "zero", "mean" or "resample" (or an ``AblationMethod``). Mean and resample
    need ``reference``, a dataset or token tensor with the same number of positions as ``ds``
    (any number of examples); zero ablation ignores it. ``per_template=True`` takes means, or
    draws examples, within the template of each example (both need ``.templates``).
    ``n_samples`` resampling draws are averaged, from a generator seeded with ``seed``.
    ``reference_engine=True`` runs the engine's slow, plainly written reference mode.

    Returns a ``Result`` with axis "run" = ("unablated", "ablated"): ``values`` the mean metric
    of each, ``examples`` [2, n] the per-example values (dropped with ``keep_examples=False``),
    ``provenance`` how it was made.

    Example::

        abc = ds.corrupted("ABC")
        result = ck.ablate(model, ds, [ck.Head(23, 2), ck.Head(23, 0)], method="mean",
                           reference=abc, metric=ck.metrics.logit_diff(ds))
        result.values            # tensor([unablated mean, ablated mean])
    """
    where = "ablate"
    method = check_method(method, where)
    tokens, positions = as_tokens(ds, "ds", where, model=model)
    metric = default_metric(metric, ds, where)
    chosen = _expand(model, components, keep, where)
    draws = ablation_values(
        model, ds, tokens, chosen, method, reference, per_template, n_samples, seed, where
    )
    runs = [[], *([Intervention(c, draw[c.hook_name(model)]) for c in chosen] for draw in draws)]
    examples = run_interventions(
        model,
        tokens,
        runs,
        metric,
        positions=positions,
        reference=reference_engine,
        memory_budget=memory_budget,
        progress=progress,
        desc=f"{where} ({method.value})",
    )
    examples = torch.stack([examples[0], examples[1:].mean(0)])
    made = provenance.record(
        model,
        method=where,
        args={
            "components": components,
            "method": method.value,
            "keep": keep,
            "per_template": per_template,
            "n_samples": n_samples,
            "seed": seed,
            "reference_engine": reference_engine,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
        },
        data={"ds": ds, "reference": reference},
        metric=metric,
    )
    return Result.from_examples(
        examples,
        ("run",),
        {"run": ["unablated", "ablated"]},
        keep_examples=keep_examples,
        metric=_metric_name(metric),
        method=where,
        info={
            "ablation": method.value,
            "components": [repr(c) for c in chosen],
            "per_template": per_template,
            "n_samples": n_samples if method is AblationMethod.RESAMPLE else 1,
            "seed": seed,
        },
        provenance=made,
    )


def ablation_sweep(
    model: HookedTransformer,
    ds: Any | Int[Tensor, "n pos"],
    component: str | Sequence[Component] = "head",
    method: AblationMethod | str = "mean",
    *,
    reference: Any | Int[Tensor, "n_ref pos"] | None = None,
    metric: MetricLike | None = None,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | None = None,
    per_template: bool = False,
    n_samples: int = 1,
    seed: int = 0,
    reference_engine: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> Result:
    """Ablate each component of a kind, one at a time, and read the metric.

    ``component`` is a kind: "head" (axes ("layer", "head")), "attn", "mlp", "resid_pre",
    "resid_mid", "resid_post" (axis "layer"), "q", "k", "v", "pattern", or "neuron" with
    ``layer=`` (axis "neuron": every neuron of that layer); or a list of components (axis
    "component"). ``layers`` restricts a kind's sweep to some layers (axis "layer" labelled
    with them), e.g. ``range(20, 30)``. ``positions`` also ablates each component at each of
    those positions separately (ints or dataset words such as "S2"; axis "pos").

    ``method``, ``reference``, ``per_template``, ``n_samples``, ``seed`` and
    ``reference_engine`` are as in ``ck.ablate``. Every ablation goes through the batched
    engine, many per forward pass, in chunks that fit ``memory_budget``.

    Returns a ``Result`` of the ablated metric's mean per component, with the per-example
    values in ``examples`` (unless ``keep_examples=False``); ``info["unablated"]`` is the
    unablated mean and ``info["unablated_examples"]`` its per-example values.

    Example::

        result = ck.ablation_sweep(model, ds, "head", method="mean", reference=abc)
        (result.values - result.info["unablated"]).abs()   # what each head's loss costs
        ck.plot(result)
    """
    where = "ablation_sweep"
    method = check_method(method, where)
    tokens, word_positions = as_tokens(ds, "ds", where, model=model)
    metric = default_metric(metric, ds, where)
    components, axes, labels = _sweep_components(model, component, layer, layers, where)
    _validate(model, components, where)
    pos_items: list[int | str | None] = [None]
    if positions is not None:
        pos_items = as_index_list(positions, where)
        n_pos = tokens.shape[1]
        for p in pos_items:
            if isinstance(p, int) and not -n_pos <= p < n_pos:
                raise ComponentError(
                    f"{where}: position {p} is outside the prompt, which has positions "
                    f"0..{n_pos - 1}"
                )
        all_labels = token_labels(model, tokens)
        labels["pos"] = [all_labels[p] if isinstance(p, int) else p for p in pos_items]
        axes = (*axes, "pos")
    cells = [c if p is None else c.at(p) for c in components for p in pos_items]

    draws = ablation_values(
        model, ds, tokens, cells, method, reference, per_template, n_samples, seed, where
    )
    runs = [[Intervention(c, draw[c.hook_name(model)])] for draw in draws for c in cells]
    examples = _run_in_parts(
        model,
        tokens,
        [[], *runs],
        metric,
        positions=word_positions,
        reference=reference_engine,
        memory_budget=memory_budget,
        progress=progress,
        desc=f"{where} ({method.value})",
        mask_bytes=_mask_bytes(model, tokens.shape, cells[0]),
    )
    unablated = examples[0]
    ablated = examples[1:].reshape(len(draws), len(cells), -1).mean(0)
    shape = [len(labels[a]) for a in axes]
    made = provenance.record(
        model,
        method=where,
        args={
            "component": component,
            "method": method.value,
            "layer": layer,
            "layers": layers,
            "positions": positions,
            "per_template": per_template,
            "n_samples": n_samples,
            "seed": seed,
            "reference_engine": reference_engine,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
        },
        data={"ds": ds, "reference": reference},
        metric=metric,
    )
    return Result.from_examples(
        ablated.reshape(*shape, ablated.shape[-1]),
        axes,
        labels,
        keep_examples=keep_examples,
        provenance=made,
        metric=_metric_name(metric),
        method=where,
        info={
            "ablation": method.value,
            "component": component if isinstance(component, str) else "list",
            "unablated": float(unablated.mean()),
            "unablated_examples": unablated,
            "baseline": float(unablated.mean()),
            "baseline_examples": unablated,
            "per_template": per_template,
            "n_samples": len(draws),
            "seed": seed,
        },
    )


# ---------------------------------------------------------------------------------------------
# Which components


def check_method(method: AblationMethod | str, where: str) -> AblationMethod:
    try:
        return AblationMethod(method)
    except ValueError:
        raise CircuitkitError(
            f"{where}: unknown method {method!r}; expected one of "
            f"{[m.value for m in AblationMethod]}"
        ) from None


def _expand(
    model: HookedTransformer,
    components: str | Component | Sequence[Component | str],
    keep: Sequence[Component] | None,
    where: str,
) -> list[Component]:
    """The components to ablate: kinds expanded, ``keep`` removed, each checked."""
    items = [components] if isinstance(components, (str, Component)) else list(components)
    chosen: list[Component] = []
    for item in items:
        if isinstance(item, str):
            if item == "neuron":
                raise ComponentError(
                    f"{where}: 'neuron' is not a kind one can ablate whole; list the neurons "
                    "(ck.Neuron(layer, i)) or ablate the layer's MLP (ck.MLP(layer))"
                )
            chosen.extend(all_components(model, item, where=where)[0])
        elif isinstance(item, Component):
            chosen.append(item)
        else:
            raise CircuitkitError(
                f"{where}: components must be components such as ck.Head(9, 9) or kinds such "
                f"as 'head', got {item!r}"
            )
    for kept in keep or []:
        if kept not in chosen:
            raise ComponentError(
                f"{where}: keep has {kept!r}, which is not among the ablated components"
            )
    kept_set = list(keep or [])
    chosen = [c for c in chosen if c not in kept_set]
    if not chosen:
        raise ComponentError(f"{where}: nothing to ablate: the set of components is empty")
    _validate(model, chosen, where)
    return chosen


def _validate(model: HookedTransformer, components: Sequence[Component], where: str) -> None:
    for comp in components:
        try:
            comp.validate(model)
        except ComponentError as error:
            raise ComponentError(f"{where}: {error}") from None


def _sweep_components(
    model: HookedTransformer,
    component: str | Sequence[Component],
    layer: int | None,
    layers: Sequence[int] | None,
    where: str,
) -> tuple[list[Component], tuple[str, ...], dict[str, list[str]]]:
    if layers is not None and (component == "neuron" or not isinstance(component, str)):
        raise CircuitkitError(
            f"{where}: layers= restricts a kind such as 'head'; for neurons give layer=, and "
            "with a list of components list only the ones to ablate"
        )
    if component == "neuron":
        if layer is None:
            raise ComponentError(f"{where}: a neuron sweep needs layer=..., the layer to sweep")
        if model.cfg.attn_only:
            raise ComponentError(f"{where}: this model is attention-only and has no neurons")
        _validate(model, [Neuron(layer, 0)], where)
        d_mlp = model.cfg.d_mlp
        return (
            [Neuron(layer, i) for i in range(d_mlp)],
            ("neuron",),
            {"neuron": [str(i) for i in range(d_mlp)]},
        )
    if layer is not None:
        raise CircuitkitError(f"{where}: layer= is only for component='neuron', got {component!r}")
    if isinstance(component, str):
        return all_components(model, component, layers, where)
    comps = list(component)
    if not comps or not all(isinstance(c, Component) for c in comps):
        raise CircuitkitError(
            f"{where}: component must be a kind such as 'head' or a non-empty list of "
            f"components, got {component!r}"
        )
    return comps, ("component",), {"component": [repr(c) for c in comps]}


# ---------------------------------------------------------------------------------------------
# What goes in their place


def ablation_values(
    model: HookedTransformer,
    ds: Any,
    tokens: Tensor,
    components: Sequence[Component],
    method: AblationMethod,
    reference: Any,
    per_template: bool,
    n_samples: int,
    seed: int,
    where: str,
) -> list[dict[str, Value]]:
    """One ``{hook name: value}`` per draw (one draw except when resampling)."""
    hooks = sorted({c.hook_name(model) for c in components})
    if not isinstance(n_samples, int) or n_samples < 1:
        raise CircuitkitError(f"{where}: n_samples must be a positive int, got {n_samples!r}")
    if method is AblationMethod.ZERO:
        if per_template:
            raise CircuitkitError(f"{where}: per_template is for mean and resample ablation")
        zero = Zero()
        return [dict.fromkeys(hooks, zero)]
    ref_tokens = _reference_tokens(model, tokens, reference, method.value, where)
    groups = template_groups(ds, reference, tokens.shape[0], where) if per_template else None
    acts = _reference_activations(model, ref_tokens, components, hooks)

    if method is AblationMethod.MEAN:
        values: dict[str, Value] = {}
        for hook, act in acts.items():
            if groups is None:
                values[hook] = SetTo(act.mean(0, keepdim=True))
            else:
                means = torch.stack([act[members].mean(0) for members in groups.members])
                values[hook] = SetTo(means[groups.of_example])
        return [values]

    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_samples):
        if groups is None:
            index = torch.randint(0, ref_tokens.shape[0], (tokens.shape[0],), generator=generator)
        else:
            index = groups.draw(generator)
        index = index.to(next(iter(acts.values())).device)
        draws.append({hook: Patch(act[index]) for hook, act in acts.items()})
    return draws


@dataclass(frozen=True, eq=False)
class _TemplateGroups:
    """Reference examples grouped by template, and each base example's group.

    Attributes:
        members: per group (one per template of the base), the indices of its reference
            examples.
        of_example: [n] the group of each base example.
    """

    members: list[Tensor]
    of_example: Tensor

    def draw(self, generator: torch.Generator) -> Tensor:
        """[n]: for each base example, a random reference example of its template."""
        sizes = torch.tensor([len(m) for m in self.members])[self.of_example]
        offsets = (torch.rand(len(self.of_example), generator=generator) * sizes).long()
        return torch.stack(
            [self.members[g][o] for g, o in zip(self.of_example, offsets, strict=True)]
        )


def template_groups(ds: Any, reference: Any, n: int, where: str) -> _TemplateGroups:
    base_templates = getattr(ds, "templates", None)
    ref_templates = getattr(reference, "templates", None)
    if not isinstance(base_templates, Tensor) or not isinstance(ref_templates, Tensor):
        raise CircuitkitError(
            f"{where}: per_template=True needs datasets with .templates for both ds and "
            f"reference (such as IOIDataset), got {type(ds).__name__} and "
            f"{type(reference).__name__}"
        )
    base_templates = base_templates.cpu()
    ref_templates = ref_templates.cpu()
    used = sorted(set(base_templates.tolist()))
    members = []
    for t in used:
        chosen = (ref_templates == t).nonzero()[:, 0]
        if chosen.numel() == 0:
            raise CircuitkitError(
                f"{where}: template {t} occurs in ds but not in reference, so it has no "
                "reference examples to take a mean or draw from"
            )
        members.append(chosen)
    group_of = {t: g for g, t in enumerate(used)}
    return _TemplateGroups(members, torch.tensor([group_of[t] for t in base_templates.tolist()]))


def _reference_activations(
    model: HookedTransformer, ref_tokens: Tensor, components: Sequence[Component], hooks: list[str]
) -> dict[str, Tensor]:
    """The reference run's activations at ``hooks``, from a forward that stops after the last
    layer they are in."""
    wanted = set(hooks)
    stop = max(c.layer for c in components) + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(
            ref_tokens.to(model.cfg.device),
            names_filter=lambda name: name in wanted,
            stop_at_layer=max(stop, 1),
        )
    return {hook: cache[hook] for hook in hooks}


# ---------------------------------------------------------------------------------------------
# Running


def _mask_bytes(model: HookedTransformer, shape: torch.Size, component: Component) -> int:
    """Bytes of the bool selection mask the engine builds for one run of ``component``."""
    n, n_pos = shape
    if isinstance(component, Neuron):
        return n * n_pos * model.cfg.d_mlp
    if component.has_unit:
        return n * n_pos * model.cfg.n_heads
    return n * n_pos


def _run_in_parts(
    model: HookedTransformer,
    tokens: Tensor,
    runs: list,
    metric: MetricLike,
    *,
    mask_bytes: int,
    progress: bool,
    desc: str,
    **engine_args: Any,
) -> Tensor:
    """``run_interventions`` over ``runs``, split so that one call's masks fit _MASK_BUDGET."""
    per_call = max(1, _MASK_BUDGET // max(1, mask_bytes))
    if per_call >= len(runs):
        return run_interventions(
            model, tokens, runs, metric, progress=progress, desc=desc, **engine_args
        )
    parts = []
    for start in tqdm(range(0, len(runs), per_call), desc=desc, disable=not progress, leave=False):
        part = runs[start : start + per_call]
        parts.append(run_interventions(model, tokens, part, metric, progress=False, **engine_args))
    return torch.cat(parts)


def _metric_name(metric: MetricLike) -> str:
    return getattr(metric, "name", getattr(metric, "__name__", "metric"))


# ---------------------------------------------------------------------------------------------
# Ablation choices: what replaces a removed component's output


AblationValue = Literal["zero", "mean", "resample", "corrupted"]
AblationLevel = Literal["node", "edge"]
AblationPositions = Literal["circuit", "all"]

_VALUES = ("zero", "mean", "resample", "corrupted")
# Short names of ablations, as the functions here accept them: (value, per_template).
_NAMES = {
    "zero": ("zero", False),
    "mean": ("mean", False),
    "mean-template": ("mean", True),
    "resample": ("resample", False),
    "resample-template": ("resample", True),
    "corrupted": ("corrupted", False),
}


@dataclass(frozen=True)
class Ablation:
    """How the parts of a model outside a circuit are removed (see the module docstring).

    Attributes:
        value: what replaces an ablated output: "zero"; "mean" (over the reference prompts);
            "resample" (the output on a reference prompt drawn at random for each example,
            seeded); "corrupted" (the output on each prompt's paired corrupted prompt).
        per_template: take means, or draw prompts, within each prompt's template (mean and
            resample only; both datasets need ``.templates``, as ``IOIDataset`` has).
        level: "node" (an ablated component's output is replaced for every reader) or
            "edge" (only the edges outside the circuit are ablated, ``ck.patch_edges``).
        positions: "circuit" (a circuit head given at some positions is kept there only) or
            "all" (kept at every position); by default "circuit" at node level. Edges are
            patched at every position, so at edge level it is "all".

    Example::

        ck.Ablation("mean", per_template=True)      # the IOI paper's (faithfulness's default)
        ck.Ablation("corrupted", level="edge")      # MIB's
        ck.Ablation("mean", per_template=True, positions="all").label
        # 'mean-template, node, all positions'
    """

    value: AblationValue = "mean"
    per_template: bool = False
    level: AblationLevel = "node"
    positions: AblationPositions | None = None

    def __post_init__(self) -> None:
        where = "Ablation"
        if self.value not in _VALUES:
            raise CircuitkitError(f"{where}: value must be one of {_VALUES}, got {self.value!r}")
        if not isinstance(self.per_template, bool):
            raise CircuitkitError(
                f"{where}: per_template must be True or False, got {self.per_template!r}"
            )
        if self.per_template and self.value not in ("mean", "resample"):
            raise CircuitkitError(
                f"{where}: per_template is for mean and resample ablation, not {self.value!r}"
            )
        if self.level not in ("node", "edge"):
            raise CircuitkitError(f"{where}: level must be 'node' or 'edge', got {self.level!r}")
        positions = self.positions
        if positions is None:
            positions = "circuit" if self.level == "node" else "all"
        if positions not in ("circuit", "all"):
            raise CircuitkitError(
                f"{where}: positions must be 'circuit' or 'all', got {self.positions!r}"
            )
        if self.level == "edge" and positions != "all":
            raise CircuitkitError(
                f"{where}: an edge is patched at every position, so level='edge' needs "
                f"positions='all', got {positions!r}"
            )
        object.__setattr__(self, "positions", positions)

    @property
    def name(self) -> str:
        """The value's short name: "zero", "mean", "mean-template", "resample", ..."""
        return f"{self.value}-template" if self.per_template else self.value

    @property
    def label(self) -> str:
        """One line for tables and legends: ``'mean-template, node, circuit positions'``."""
        if self.level == "edge":
            return f"{self.name}, edge"
        return f"{self.name}, node, {self.positions} positions"


def check_ablation(
    ablation: Ablation | str, where: str, *, level: AblationLevel | None = None
) -> Ablation:
    """``ablation`` as an ``Ablation``: itself, or one from a short name ("zero", "mean",
    "mean-template", "resample", "resample-template", "corrupted") at ``level`` (default
    "node"). With ``level`` given, an ``Ablation`` at another level is an error."""
    if isinstance(ablation, Ablation):
        if level is not None and ablation.level != level:
            raise CircuitkitError(
                f"{where}: the ablation is at level {ablation.level!r} but level={level!r}; "
                f"give ck.Ablation(..., level={level!r}) or a short name such as 'mean'"
            )
        return ablation
    if isinstance(ablation, str) and ablation in _NAMES:
        value, per_template = _NAMES[ablation]
        return Ablation(value, per_template=per_template, level=level or "node")  # type: ignore[arg-type]
    raise CircuitkitError(
        f"{where}: ablation must be a ck.Ablation or one of {list(_NAMES)}, got {ablation!r}"
    )


# ---------------------------------------------------------------------------------------------
# What replaces an ablated output


def ablated_outputs(
    model: HookedTransformer,
    ds: Any,
    tokens: Int[Tensor, "n pos"],
    ablation: Ablation,
    *,
    reference: Any,
    corrupted: Any,
    n_samples: int,
    seed: int,
    where: str,
    memo: dict[int, SenderOutputs] | None = None,
) -> list[SenderOutputs]:
    """What every sender of the model's graph outputs when ablated, one ``SenderOutputs`` per
    draw (several only when resampling): zeros; the mean over ``reference`` (one example, or
    one row per example of ``ds``: the mean over the reference prompts of its template); a
    reference prompt drawn for each example (seeded, as ``ck.ablate`` draws them); or the
    paired ``corrupted`` prompts' outputs. Node-level ablation puts these values into the
    heads' ``z`` and the MLPs' outputs; edge-level ablation hands them to ``ck.patch_edges``.
    ``memo`` keeps the senders' outputs on each input already run, by ``id`` of the input."""
    n, n_pos = tokens.shape
    cfg = model.cfg
    memo = {} if memo is None else memo

    def outputs_on(data: Any, tokens: Tensor) -> SenderOutputs:
        if id(data) not in memo:
            memo[id(data)] = sender_outputs(model, tokens)
        return memo[id(data)]

    if ablation.value == "zero":
        zeros = torch.zeros(1, n_pos, cfg.d_model, dtype=cfg.dtype, device=cfg.device)
        z = torch.zeros(1, n_pos, cfg.n_heads, cfg.d_head, dtype=cfg.dtype, device=cfg.device)
        n_mlps = 0 if cfg.attn_only else cfg.n_layers
        return [SenderOutputs(zeros, (z,) * cfg.n_layers, (zeros,) * n_mlps)]
    if ablation.value == "corrupted":
        return [outputs_on(corrupted, _paired_tokens(model, tokens, corrupted, where))]
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise CircuitkitError(f"{where}: n_samples must be a positive int, got {n_samples!r}")
    ref_tokens = _reference_tokens(model, tokens, reference, ablation.value, where)
    # the groups first, so that a dataset without templates fails before any forward pass
    groups = template_groups(ds, reference, n, where) if ablation.per_template else None
    outputs = outputs_on(reference, ref_tokens)
    if ablation.value == "mean":
        if groups is None:
            return [outputs.mean()]

        def means(x: Tensor) -> Tensor:
            per_group = torch.stack([x[m.to(x.device)].mean(0) for m in groups.members])
            return per_group[groups.of_example.to(x.device)]

        return [
            SenderOutputs(
                means(outputs.embed),
                tuple(means(z) for z in outputs.z),
                tuple(means(out) for out in outputs.mlp_out),
            )
        ]
    # resample, with the draws of ck.ablate: a generator seeded with seed, one index per example
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_samples):
        if groups is None:
            index = torch.randint(0, ref_tokens.shape[0], (n,), generator=generator)
        else:
            index = groups.draw(generator)
        index = index.to(outputs.embed.device)
        draws.append(
            SenderOutputs(
                outputs.embed[index],
                tuple(z[index] for z in outputs.z),
                tuple(out[index] for out in outputs.mlp_out),
            )
        )
    return draws


def _paired_tokens(model: HookedTransformer, tokens: Tensor, corrupted: Any, where: str) -> Tensor:
    if corrupted is None:
        raise CircuitkitError(
            f"{where}: corrupted ablation needs the paired corrupted prompts (for IOI, "
            "ds.corrupted('ABC')), one per clean prompt"
        )
    paired, _ = as_tokens(corrupted, "corrupted", where, model=model)
    if paired.shape != tokens.shape:
        raise ShapeError(
            f"{where}: corrupted ablation patches each prompt's own corrupted prompt, so the "
            f"corrupted prompts need the clean prompts' shape {tuple(tokens.shape)}, got "
            f"{tuple(paired.shape)}"
        )
    return paired


def _reference_tokens(
    model: HookedTransformer, tokens: Tensor, reference: Any, value: str, where: str
) -> Tensor:
    """The tokens of ``reference``, whose activations replace the ablated ones (``value``:
    "mean" or "resample"), checked to have the positions of ``tokens``."""
    if reference is None:
        raise CircuitkitError(
            f"{where}: {value} ablation needs reference=..., the dataset or tokens "
            "whose activations replace the ablated ones (for IOI, ds.corrupted('ABC'))"
        )
    ref_tokens, _ = as_tokens(reference, "reference", where, model=model)
    if ref_tokens.shape[1] != tokens.shape[1]:
        raise ShapeError(
            f"{where}: reference has {ref_tokens.shape[1]} positions but ds has "
            f"{tokens.shape[1]}; both need the same number of positions (any number of examples)"
        )
    return ref_tokens
