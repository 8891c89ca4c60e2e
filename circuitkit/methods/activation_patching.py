"""Activation patching: is a component sufficient, or necessary, for a behaviour?

Context. Two inputs differ in the one thing the behaviour depends on: a *clean* prompt ("When
Mary and John went to the store, John gave a drink to" -> " Mary") and a *corrupted* one that
removes the information (the same template with three other names). A metric, such as the
logit difference between the right and the wrong name, tells them apart.

- **Denoising** (``direction="denoise"``, the default) runs the corrupted input and restores one
  component's clean activation. If the metric comes back, the component carries enough of the
  clean information to restore the behaviour: it is *sufficient*.
- **Noising** (``direction="noise"``) runs the clean input and inserts one component's corrupted
  activation. If the metric drops, the behaviour *needs* that component.

A sweep patches every component of one kind (each layer's residual stream, each head, each
head at each position, ...) in turn. Every patch goes through the batched intervention engine,
so a sweep runs many patches per forward pass and starts each one at the patched layer.
``ck.metrics.normalized`` turns a result into the fraction of the clean-corrupted gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from jaxtyping import Int
from torch import Tensor

from circuitkit.core import provenance
from circuitkit.core.components import Component, Head, all_components, check_component
from circuitkit.core.distributed import run_interventions as distributed_run_interventions
from circuitkit.core.engine import run_interventions
from circuitkit.core.errors import CircuitkitError, ComponentError
from circuitkit.core.inputs import (
    as_index_list,
    as_tokens,
    check_same_shape,
    default_metric,
    token_labels,
)
from circuitkit.core.interventions import Intervention, MetricLike, Patch
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result

Direction = Literal["denoise", "noise"]


def activation_patching(
    model: HookedTransformer,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"],
    component: str | Sequence[Component] = "resid_pre",
    metric: MetricLike | None = None,
    *,
    direction: Direction = "denoise",
    per_position: bool = False,
    positions: Sequence[int | str] | None = None,
    layers: Sequence[int] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    distributed: bool = False,
    progress: bool = True,
) -> Result:
    """Patch each component of a kind, one at a time, and read the metric.

    ``component`` is a kind: "resid_pre", "resid_mid", "resid_post", "attn", "mlp", "head" (each
    head's output z), "q", "k", "v", "pattern"; or a list of components (axis "component").
    With ``per_position=True`` each component is also patched at each position separately
    (axis "pos"); ``positions`` restricts that axis to some positions, given as ints or as
    dataset words ("S2", "end"; resolved per example). ``layers`` restricts a kind's sweep to
    some layers (``range(20, 30)``: the last ten of smollm2-135m), which saves the time of the
    others.

    ``clean`` and ``corrupted`` are datasets (with ``.tokens`` and ``.positions``) or token
    tensors of the same shape; ``metric`` is per example (``ck.metrics.logit_diff(ds)``) and
    defaults to the logit difference of an IOI dataset. In grouped-query models "k" and "v"
    sweep the key/value heads (axis "kv_head").

    Returns a ``Result`` of the metric averaged over examples, per patch; its ``examples``
    keeps the per-example values (for standard errors, intervals and comparisons; pass
    ``keep_examples=False`` to drop them where memory matters), and its ``provenance`` records
    the arguments, data, metric and model (with a fingerprint of its weights).
    ``info["baseline"]`` (and ``"baseline_examples"``) is the unpatched base run's metric, so
    ``result.effect()`` and ``result.top()`` give each patch's change from it.

    ``distributed=True`` shares the patches out among the processes of torch.distributed's
    default process group (one per GPU, started with ``torchrun``; see
    ``circuitkit.core.distributed``); every process returns the whole result.

    Example::

        ds = ck.IOIDataset(model, n=50)
        result = ck.activation_patching(model, ds, ds.corrupted("ABC"), "head",
                                        per_position=True, positions=["S1", "S2", "end"])
        ck.plot(result)
    """
    where = "activation_patching"
    if direction not in ("denoise", "noise"):
        raise CircuitkitError(f"{where}: direction must be 'denoise' or 'noise', got {direction!r}")
    clean_tokens, clean_positions = as_tokens(clean, "clean", where, model=model)
    corrupted_tokens, corrupted_positions = as_tokens(corrupted, "corrupted", where, model=model)
    check_same_shape(clean_tokens, corrupted_tokens, ("clean", "corrupted"), where)
    metric = default_metric(metric, clean, where)
    word_positions = clean_positions if clean_positions is not None else corrupted_positions

    components, cells, axes, labels = sweep_cells(
        model, component, clean_tokens, per_position, positions, where, layers=layers
    )
    if direction == "denoise":
        base, source = corrupted_tokens, clean_tokens
    else:
        base, source = clean_tokens, corrupted_tokens

    hooks = {comp.hook_name(model) for comp in components}
    _, cache = model.run_with_cache(
        source.to(model.cfg.device), names_filter=lambda name: name in hooks
    )
    # the first run patches nothing: the baseline every cell's effect is measured from
    runs = [[]] + [Intervention(cell, Patch(cache[cell.hook_name(model)])) for cell in cells]
    run = distributed_run_interventions if distributed else run_interventions
    # on a GPU the provenance record (its weight fingerprint) is made while the patches run
    examples, made = provenance.record_alongside(
        model,
        lambda: run(
            model,
            base,
            runs,
            metric,
            positions=word_positions,
            reference=reference,
            memory_budget=memory_budget,
            progress=progress,
            desc=f"{where} ({direction})",
        ),
        method=where,
        args={
            "component": component,
            "direction": direction,
            "per_position": per_position,
            "positions": positions,
            "layers": layers,
            "reference": reference,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
            "distributed": distributed,
        },
        data={"clean": clean, "corrupted": corrupted},
        metric=metric,
    )
    baseline, examples = examples[0], examples[1:]
    shape = [len(labels[a]) for a in axes]
    examples = examples.reshape(*shape, examples.shape[-1])
    return Result(
        values=examples.mean(-1),
        axes=axes,
        labels=labels,
        examples=examples if keep_examples else None,
        metric=provenance.metric_name(metric),
        method=where,
        info={
            "direction": direction,
            "component": _describe(component),
            "baseline": float(baseline.mean()),
            "baseline_examples": baseline,
        },
        provenance=made,
    )


def sweep_cells(
    model: HookedTransformer,
    component: str | Sequence[Component],
    tokens: Tensor,
    per_position: bool,
    positions: Sequence[int | str] | None,
    where: str,
    *,
    layers: Sequence[int] | None = None,
) -> tuple[list[Component], list[Component], tuple[str, ...], dict[str, list[str]]]:
    """``(components, cells, axes, labels)`` of a sweep: the components of ``component`` (in
    ``layers`` only, if given), and one cell per component and position (each component at
    each of ``positions``, or at every position with ``per_position``, or whole), in
    row-major order of ``axes``."""
    components, axes, labels = _components(model, component, where, layers)
    for comp in components:
        check_component(comp, model, where)
    pos_items: list[int | str | None] = [None]
    if per_position or positions is not None:
        n_pos = tokens.shape[1]
        pos_items = as_index_list(positions, where) if positions is not None else list(range(n_pos))
        for p in pos_items:
            if isinstance(p, int) and not -n_pos <= p < n_pos:
                raise ComponentError(
                    f"{where}: position {p} is outside the prompt, which has positions "
                    f"0..{n_pos - 1}"
                )
        all_labels = token_labels(model, tokens)
        labels["pos"] = [all_labels[p] if isinstance(p, int) else p for p in pos_items]
        axes = (*axes, "pos")
    cells = [comp if p is None else comp.at(p) for comp in components for p in pos_items]
    return components, cells, axes, labels


def _components(
    model: HookedTransformer,
    component: str | Sequence[Component],
    where: str,
    layers: Sequence[int] | None,
) -> tuple[list[Component], tuple[str, ...], dict[str, list[str]]]:
    if isinstance(component, str):
        comps, axes, labels = all_components(model, component, layers, where)
        n_kv = model.cfg.n_key_value_heads
        if component in ("k", "v") and n_kv is not None and n_kv != model.cfg.n_heads:
            group = model.cfg.n_heads // n_kv
            kv = [c for c in comps if isinstance(c, Head) and c.head % group == 0]
            return (
                kv,
                ("layer", "kv_head"),
                {"layer": labels["layer"], "kv_head": [str(g) for g in range(n_kv)]},
            )
        return comps, axes, labels
    if layers is not None:
        raise CircuitkitError(
            f"{where}: layers= restricts a kind such as 'head'; with a list of "
            "components, list only the ones to patch"
        )
    comps = list(component)
    if not comps or not all(isinstance(c, Component) for c in comps):
        raise CircuitkitError(
            f"{where}: component must be a kind such as 'head' or a non-empty list of "
            f"components, got {component!r}"
        )
    return comps, ("component",), {"component": [repr(c) for c in comps]}


def _describe(component: str | Sequence[Component]) -> str | list[str]:
    return component if isinstance(component, str) else [repr(c) for c in component]
