"""Total, direct and indirect effects of one input against another, layer by layer.

Context. Causal mediation analysis asks how much of an input's effect on an output passes
through one internal state (a *mediator*). Change the input from a *base* to a *source* and the
output changes by the **total effect**; set one mediator to the value it takes under the source
input while the rest of the model sees the base input, and the output changes by that
mediator's **indirect effect**; hold the mediator at its base value while the input is the
source, and what is left is the **direct effect** (everything that does not pass through it).

**Total, direct and indirect effects** (``causal_effects``) take two inputs of the same length,
base and source, instead of noise, and report for every layer and position, and for the
residual stream, MLP and attention outputs, the effect of restoring a source activation into the
base run (indirect), the effect left when the base activation is inserted into the source run
(direct), and the effect kept when the base activations are inserted everywhere except there.

Every sweep compiles to the batched intervention engine (``circuitkit.core.engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from circuitkit.core import provenance
from circuitkit.core.components import (
    Component,
)
from circuitkit.core.engine import run_interventions
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.inputs import as_tokens, check_same_shape, token_labels
from circuitkit.core.interventions import Intervention, Patch
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.metrics import Metric
from circuitkit.core.results import Result
from circuitkit.methods.tracing_inputs import (
    KINDS,
    Kind,
    as_input_ids,
    cache_of,
    check_kind,
    check_token_ids,
    check_window,
    checked_layers,
    checked_targets,
    ends_in_space,
    kind_component,
    prob_metric,
    window_layers,
)


@dataclass(frozen=True, eq=False)
class CausalEffects:
    """The result of ``causal_effects``; every effect is a change of the measure from the base
    run's value, averaged over examples (each ``Result`` keeps the per-example values).

    Attributes:
        total: the measure on the source input minus on the base input.
        base_value: the measure on the base input; ``source_value`` on the source input.
        indirect: per kind, a ``Result`` over ``("layer", "pos")`` (or ``("layer",)``): the base
            run with the source activation restored there, minus the base run (restoration).
        direct: per kind: the source run with the base activation inserted there, minus the
            base run. ``total - direct`` is the drop the insertion causes (corruption).
        window_only: for "mlp" and "attn": the source run with the base activations inserted
            at every layer and position of the kind *except* there, minus the base run; how
            much of the total effect those activations keep on their own.
        measure: "prob" or "logit_diff".
        total_by_example: the total effect of each example, ``[n]``.

    Example::

        effects = ck.causal_effects(model, "The capital of France is",
                                    "The capital of Japan is", " Tokyo")
        effects.total, effects.base_value, effects.source_value
        ck.plot(effects.direct["mlp"])
    """

    total: float
    base_value: float
    source_value: float
    indirect: dict[str, Result]
    direct: dict[str, Result]
    window_only: dict[str, Result]
    measure: str
    total_by_example: Tensor = field(repr=False)


def causal_effects(
    model: HookedTransformer,
    base: Any | str | Int[Tensor, "n pos"],
    source: Any | str | Int[Tensor, "n pos"],
    target: str | int | Sequence[str | int] | Int[Tensor, "n"],
    *,
    foil: str | int | Sequence[str | int] | Int[Tensor, "n"] | None = None,
    measure: Literal["prob", "logit_diff"] = "prob",
    kinds: Sequence[Kind] = KINDS,
    window: int = 1,
    per_position: bool = True,
    layers: Sequence[int] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> CausalEffects:
    """Total, indirect and direct effects of changing the input from ``base`` to ``source``.

    The measure is the target token's probability at the last position (``measure="prob"``),
    or the logit of ``target`` minus that of ``foil`` (``measure="logit_diff"``). For each
    kind ("resid": the residual stream after each block, ``Resid(l, "post")``; "mlp", "attn":
    each layer's MLP or attention output), each layer ``l`` and, with ``per_position=True``,
    each position ``p`` (otherwise all positions at once), the activations of a window of
    ``window`` layers around ``l`` (ROME's centred window; 1 is the layer alone) are

    - restored from the source run into the base run: the **indirect** effect;
    - inserted from the base run into the source run: the **direct** effect (what changes
      without them), and ``total - direct`` the drop they cause;
    - for "mlp" and "attn", kept from the source run while the base activations go everywhere
      else (every other layer of the kind, and the window's layers at the other positions):
      **window_only**, whether those activations alone carry the effect.

    ``base`` and ``source`` are strings, token tensors or datasets with the same ``[n, pos]``
    shape; ``target`` (and ``foil``) one token or one per example (as for ``causal_trace``, a
    word without its leading space gets a ``TokenizationWarning``). ``layers`` restricts the
    layer axis (the windows and "everywhere else" still span the whole model). All runs go
    through the engine. Returns a ``CausalEffects``; its ``Result`` objects keep per-example
    values unless ``keep_examples=False`` and share one ``provenance`` record.

    Example::

        effects = ck.causal_effects(model, "The capital of France is",
                                    "The capital of Japan is", " Tokyo")
        effects.total                              # p(Tokyo | Japan) - p(Tokyo | France)
        ck.plot(effects.indirect["mlp"])
    """
    where = "causal_effects"
    base_tokens = _effect_tokens(model, base, "base", where)
    source_tokens = _effect_tokens(model, source, "source", where)
    check_same_shape(base_tokens, source_tokens, ("base", "source"), where)
    n, n_pos = base_tokens.shape
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds:
        raise CircuitkitError(f"{where}: kinds is empty; choose from {KINDS}")
    for kind in kinds:
        check_kind(model, kind, where)
    window = check_window(window, where)
    layer_list = checked_layers(model, layers, where)
    # a target read after both prompts: no warning when either ends in a space
    after_space = ends_in_space(model, base_tokens) or ends_in_space(model, source_tokens)
    target_ids = checked_targets(model, target, n, "target", where, after_space=after_space)
    metric = _effect_metric(model, measure, target_ids, foil, n, n_pos, where, after_space)
    engine_kwargs = dict(
        reference=reference, memory_budget=memory_budget, progress=progress, where=where
    )

    n_layers = model.cfg.n_layers
    pos_items: list[int | None] = list(range(n_pos)) if per_position else [None]
    axes: tuple[str, ...] = ("layer", "pos") if per_position else ("layer",)
    labels = {"layer": [str(x) for x in layer_list]}
    if per_position:
        labels["pos"] = token_labels(model, base_tokens)

    comps = [kind_component(kind, layer) for kind in kinds for layer in range(n_layers)]
    with torch.no_grad():
        base_cache = cache_of(model, base_tokens, comps)
        source_cache = cache_of(model, source_tokens, comps)
        base_values = metric(model(base_tokens)).float().cpu()
        source_values = metric(model(source_tokens)).float().cpu()

    def patch(comp: Component, cache: dict[str, Tensor], pos: Any) -> Intervention:
        comp = comp if pos is None else comp.at(pos)
        return Intervention(comp, Patch(cache[comp.hook_name(model)]))

    made = provenance.record(
        model,
        method=where,
        args={
            "target": target,
            "foil": foil,
            "measure": measure,
            "kinds": kinds,
            "window": window,
            "per_position": per_position,
            "layers": layers,
            "reference": reference,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
        },
        data={"base": base, "source": source},
        metric=metric,
    )

    def effects(tokens: Tensor, runs: list[list[Intervention]], effect: str, kind: str) -> Result:
        values = run_interventions(
            model, tokens, runs, metric, desc=f"{where} ({kind}, {effect})", **engine_kwargs
        )
        shape = [len(labels[a]) for a in axes]
        return Result.from_examples(
            (values - base_values).reshape(*shape, n),
            axes,
            labels,
            keep_examples=keep_examples,
            provenance=made,
            metric=f"change in {metric.name}",
            method=where,
            info={"kind": kind, "effect": effect, "window": window, "measure": measure},
        )

    indirect, direct, window_only = {}, {}, {}
    for kind in kinds:
        windows = [window_layers(layer, window, n_layers) for layer in layer_list]
        restore, insert, everywhere_else = [], [], []
        for w in windows:
            inside = [kind_component(kind, k) for k in w]
            outside = [kind_component(kind, k) for k in range(n_layers) if k not in w]
            for p in pos_items:
                restore.append([patch(c, source_cache, p) for c in inside])
                insert.append([patch(c, base_cache, p) for c in inside])
                run = [patch(c, base_cache, None) for c in outside]
                others = tuple(q for q in range(n_pos) if q != p)
                if p is not None and others:
                    run += [patch(c, base_cache, others) for c in inside]
                everywhere_else.append(run)
        indirect[kind] = effects(base_tokens, restore, "indirect", kind)
        direct[kind] = effects(source_tokens, insert, "direct", kind)
        if kind != "resid":
            window_only[kind] = effects(source_tokens, everywhere_else, "window_only", kind)

    total_by_example = source_values - base_values
    return CausalEffects(
        total=float(total_by_example.mean()),
        base_value=float(base_values.mean()),
        source_value=float(source_values.mean()),
        indirect=indirect,
        direct=direct,
        window_only=window_only,
        measure=measure,
        total_by_example=total_by_example,
    )


def _effect_tokens(model: HookedTransformer, data: Any, name: str, where: str) -> Tensor:
    if isinstance(data, str):
        tokens, _ = as_input_ids(model, data, where)
        return tokens
    tokens, _ = as_tokens(data, name, where, model=model)
    check_token_ids(model, tokens, name, where)
    return tokens.to(model.cfg.device)


def _effect_metric(
    model: HookedTransformer,
    measure: str,
    target_ids: Tensor,
    foil: Any,
    n: int,
    n_pos: int,
    where: str,
    after_space: bool,
) -> Metric:
    read = torch.full((n,), n_pos - 1)
    if measure == "prob":
        if foil is not None:
            raise CircuitkitError(f"{where}: foil is only used with measure='logit_diff'")
        return prob_metric(target_ids, read)
    if measure != "logit_diff":
        raise CircuitkitError(f"{where}: measure must be 'prob' or 'logit_diff', got {measure!r}")
    if foil is None:
        raise CircuitkitError(f"{where}: measure='logit_diff' needs foil=, the token to compare")
    foil_ids = checked_targets(model, foil, n, "foil", where, after_space=after_space)

    def fn(logits_at: Tensor) -> Tensor:
        def pick(ids: Tensor) -> Tensor:
            index = ids.to(logits_at.device).expand(logits_at.shape[:-1]).unsqueeze(-1)
            return logits_at.float().gather(-1, index).squeeze(-1)

        return pick(target_ids) - pick(foil_ids)

    return Metric("logit_diff", read, fn)


__all__ = ["CausalEffects", "causal_effects"]
