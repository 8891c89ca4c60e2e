"""Path patching: how much of a component's effect travels along its direct paths to a receiver?

Context. Activation patching says that a component matters, not how: a head may change the
output itself, or by changing what a later head reads. Path patching (Wang et al. 2022, the
IOI paper) measures one route. A *sender* (a head's output, or an MLP's) is corrupted, and
its change is allowed to reach the *receivers* only along *direct paths*: through the residual
stream and through MLPs, which are recomputed, but not through any other attention head.
Receivers are the logits (the final residual stream) or some heads' query, key or value inputs.

With a *clean* and a *corrupted* input (``direction="noise"``, the paper's setting):

1. Run the clean input with the sender's output replaced by its corrupted value, and every other
   head's output held at its clean value, so no other head passes the change on. MLPs are
   recomputed. Record the receivers' inputs (their ``hook_q`` / ``hook_k`` / ``hook_v``
   activations, or the final residual stream).
2. Run the clean input again with only the receivers' inputs replaced by what step 1 recorded,
   and read the metric.

If the metric drops, the behaviour needs the sender's effect along those paths. For the logits
receiver, step 2 is step 1's final residual stream unchanged, so the effect is read in step 1.
``direction="denoise"`` swaps the roles: the corrupted input is the base, the sender takes its
clean value and the other heads are held at their corrupted values.

A receiver's input is computed before the receiver's layer runs, so a sender in the same layer
as a receiver, or a later one, has no path to it: its value is the base run's metric. In a
grouped-query model a key or value receiver ``Head(l, h).k`` is the key/value head that query
head ``h`` shares with its group (``h // (n_heads // n_key_value_heads)``), so path patching to
it changes the keys (values) of every query head in the group.

Every experiment goes through the batched intervention engine. Holding every head after the
sender at its base value is the same as holding each of those layers' attention output
(``hook_attn_out``, what the heads add to the residual stream), so step 1 patches one
activation per layer; all senders of a sweep run in a few batched passes that start at the
sender's layer and stop at the receivers' layer. With every head held, nothing moves from one
position to another in step 1, so a sender's change reaches a receiver only at the positions
the receiver reads (for the logits, the positions the metric reads): step 1 patches and holds
only those positions, and the engine computes each example from the first of them on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.core import provenance
from circuitkit.core.components import (
    MLP,
    Attn,
    Component,
    Head,
    Resid,
    all_components,
    position_mask,
    selection_mask,
)
from circuitkit.core.engine import default_memory_budget, record_activations, run_interventions
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.inputs import as_tokens, check_same_shape, default_metric
from circuitkit.core.interventions import Intervention, MetricLike, Patch
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.metrics import Metric, check_metric_output
from circuitkit.core.results import Result

Direction = Literal["noise", "denoise"]
Senders = str | Component | Sequence[Component | Sequence[Component]] | frozenset | set
Receivers = str | Component | Sequence[Component] | frozenset | set

_WHERE = "path_patching"


def path_patching(
    model: HookedTransformer,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"],
    senders: Senders = "heads",
    receivers: Receivers = "logits",
    metric: MetricLike | None = None,
    *,
    direction: Direction = "noise",
    layers: Sequence[int] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> Result:
    """Patch each sender along its direct paths to the receivers, and read the metric.

    ``senders``: "heads" (every head's output, each its own experiment; axes "layer", "head"),
    "mlps" (every MLP's output; axis "layer"), one component (``ck.Head(9, 9)``, ``ck.MLP(3)``,
    either restricted to positions such as ``ck.Head(9, 9).at("S2")``), a set of components
    patched together in one experiment, or a list whose elements are components or sets of
    them, each its own experiment (axis "sender"). ``layers`` restricts a "heads" or "mlps"
    sweep to the senders of some layers (``range(14, 23)``), which saves the time of the others;
    the "layer" axis is labelled with the layers' own numbers.

    ``receivers``: "logits" (the final residual stream, what goes into the final norm), or the
    query / key / value inputs of heads, patched together: ``ck.Head(9, 9).q`` or a list such
    as ``[ck.Head(9, 6).q.at("end"), ck.Head(9, 9).q.at("end")]``. Receivers take every
    position unless restricted with ``.at``; for the logits at some positions only, give
    ``ck.Resid(n_layers - 1, "post").at("end")``. Receivers that select the same entries (two
    query heads of one group as key receivers) are patched once.

    Step 1 runs the base input with the senders' outputs from the other input, every other
    head's output held at its base value and MLPs recomputed, and records the receivers'
    inputs; step 2 runs the base input with only the receivers' inputs replaced by those
    recordings. ``direction="noise"`` (the default, as in the IOI paper) has the clean input as
    the base and corrupted senders; "denoise" the reverse. A sender of a sweep that is in the
    receivers' layer or later has no path to them and gets the base run's value; a sender
    named explicitly without a path is an error. ``reference=True`` runs the plainly written
    version: two ``run_with_hooks`` forwards per experiment.

    Returns a ``Result`` of the metric averaged over examples, per experiment; its
    ``examples`` keeps the per-example values (unless ``keep_examples=False``) and its
    ``provenance`` records how it was made. ``info["baseline"]`` (and ``"baseline_examples"``)
    is the unpatched base run's metric: ``result.effect()`` is each experiment's change from it,
    what ``result.top()`` ranks.

    Example::

        ds = ck.IOIDataset(model, n=50)
        metric = ck.metrics.logit_diff(ds)
        direct = ck.path_patching(model, ds, ds.corrupted("ABC"), "heads", "logits", metric)
        to_queries = ck.path_patching(model, ds, ds.corrupted("ABC"), "heads",
                                      [ck.Head(23, 0).q.at("end"), ck.Head(23, 2).q.at("end")])
        ck.plot(to_queries)
    """
    if direction not in ("noise", "denoise"):
        raise CircuitkitError(
            f"{_WHERE}: direction must be 'noise' or 'denoise', got {direction!r}"
        )
    clean_tokens, clean_positions = as_tokens(clean, "clean", _WHERE, model=model)
    corrupted_tokens, corrupted_positions = as_tokens(corrupted, "corrupted", _WHERE, model=model)
    check_same_shape(clean_tokens, corrupted_tokens, ("clean", "corrupted"), _WHERE)
    metric = default_metric(metric, clean, _WHERE)
    if isinstance(metric, Metric) and metric.n != clean_tokens.shape[0]:
        raise ShapeError(
            f"{_WHERE}: the metric {metric.name!r} is made for {metric.n} examples but clean and "
            f"corrupted have {clean_tokens.shape[0]}"
        )
    positions = clean_positions if clean_positions is not None else corrupted_positions

    experiments, axes, labels, sweep = _sender_experiments(model, senders, layers)
    receiver_list = _receiver_list(model, receivers)
    reach = max(_receiving_layer(model, r) for r in receiver_list)
    if not sweep:
        for group, label in zip(experiments, labels["sender"], strict=True):
            if min(c.layer for c in group) >= reach:
                raise ComponentError(
                    f"{_WHERE}: the sender {label} has no path to the receivers "
                    f"{[repr(r) for r in receiver_list]}: a receiver's input is computed before "
                    "its layer runs, so senders must be in an earlier layer"
                )
    if direction == "noise":
        base, source = clean_tokens, corrupted_tokens
    else:
        base, source = corrupted_tokens, clean_tokens
    base, source = base.to(model.cfg.device), source.to(model.cfg.device)

    desc = f"{_WHERE} ({direction})"
    with torch.no_grad():
        if reference:
            examples = _path_patching_reference(
                model, base, source, experiments, receiver_list, metric, positions, progress, desc
            )
            # the unpatched base run, which every patch's effect is measured from
            baseline = run_interventions(
                model, base, [[]], metric, positions=positions, reference=True, progress=False
            )[0]
        else:
            examples, baseline = _path_patching_fast(
                model,
                base,
                source,
                experiments,
                receiver_list,
                metric,
                positions,
                memory_budget,
                progress,
                desc,
            )
    shape = [len(labels[a]) for a in axes]
    made = provenance.record(
        model,
        method=_WHERE,
        args={
            "senders": senders,
            "receivers": receivers,
            "direction": direction,
            "layers": layers,
            "reference": reference,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
        },
        data={"clean": clean, "corrupted": corrupted},
        metric=metric,
    )
    return Result.from_examples(
        examples.reshape(*shape, examples.shape[-1]),
        axes,
        labels,
        keep_examples=keep_examples,
        provenance=made,
        metric=provenance.metric_name(metric),
        method=_WHERE,
        info={
            "direction": direction,
            "senders": senders if isinstance(senders, str) else labels["sender"],
            "receivers": [repr(r) for r in receiver_list],
            "baseline": float(baseline.mean()),
            "baseline_examples": baseline,
        },
    )


# ---------------------------------------------------------------------------------------------
# Senders and receivers


def _sender_experiments(
    model: HookedTransformer, senders: Senders, layers: Sequence[int] | None
) -> tuple[list[tuple[Component, ...]], tuple[str, ...], dict[str, list[str]], bool]:
    """``(experiments, axes, labels, sweep)``: each experiment is the senders patched together."""
    if layers is not None and not isinstance(senders, str):
        raise ComponentError(
            f"{_WHERE}: layers= restricts a sweep such as senders='heads'; with a list of "
            "senders, list only the ones to patch"
        )
    if isinstance(senders, str):
        kinds = {"heads": "head", "mlps": "mlp"}
        if senders not in kinds:
            raise ComponentError(
                f"{_WHERE}: senders must be 'heads', 'mlps', a component, a set of components "
                f"or a list of them, got {senders!r}"
            )
        try:
            comps, axes, labels = all_components(model, kinds[senders], layers)
        except ComponentError as error:
            raise ComponentError(f"{_WHERE}: senders={senders!r}: {error}") from None
        return [(c,) for c in comps], axes, labels, True
    if isinstance(senders, Component):
        groups = [_sender_group(model, [senders])]
    elif isinstance(senders, (set, frozenset)):
        groups = [_sender_group(model, senders)]
    elif isinstance(senders, Sequence) and senders:
        groups = [
            _sender_group(model, [s] if isinstance(s, Component) else s)  # type: ignore[list-item]
            for s in senders
        ]
    else:
        raise ComponentError(
            f"{_WHERE}: senders must be 'heads', 'mlps', a component, a set of components or a "
            f"non-empty list of them, got {senders!r}"
        )
    labels = [" + ".join(repr(c) for c in group) for group in groups]
    return groups, ("sender",), {"sender": labels}, False


def _sender_group(model: HookedTransformer, group: Any) -> tuple[Component, ...]:
    if isinstance(group, (set, frozenset)):
        group = sorted(group, key=lambda c: (c.layer, repr(c)))
    if not isinstance(group, (list, tuple)) or not group:
        raise ComponentError(
            f"{_WHERE}: each sender must be a component or a non-empty set of components, "
            f"got {group!r}"
        )
    for comp in group:
        if not (isinstance(comp, Head) and comp.part == "z") and not isinstance(comp, MLP):
            raise ComponentError(
                f"{_WHERE}: a sender must be a head's output ck.Head(l, h) or an MLP's output "
                f"ck.MLP(l), got {comp!r}"
            )
        _validate(model, comp, "sender")
    if len(set(map(repr, group))) < len(group):
        raise ComponentError(f"{_WHERE}: the sender group {list(group)} names a component twice")
    return tuple(group)


def _receiver_list(model: HookedTransformer, receivers: Receivers) -> list[Component]:
    last = model.cfg.n_layers - 1
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ComponentError(
                f"{_WHERE}: receivers must be 'logits' or heads' inputs such as "
                f"[ck.Head(9, 9).q], got {receivers!r}"
            )
        return [Resid(last, "post")]
    if isinstance(receivers, Component):
        comps = [receivers]
    elif isinstance(receivers, (set, frozenset)):
        comps = sorted(receivers, key=lambda c: (c.layer, repr(c)))
    elif isinstance(receivers, Sequence) and receivers:
        comps = list(receivers)
    else:
        raise ComponentError(
            f"{_WHERE}: receivers must be 'logits', a component or a non-empty list of them, "
            f"got {receivers!r}"
        )
    unique: dict[tuple, Component] = {}
    for comp in comps:
        is_input = isinstance(comp, Head) and comp.part in ("q", "k", "v")
        is_final = isinstance(comp, Resid) and comp.where == "post" and comp.layer == last
        if not (is_input or is_final):
            raise ComponentError(
                f"{_WHERE}: a receiver must be a head's query, key or value input "
                f"(ck.Head(l, h).q / .k / .v) or the final residual stream "
                f"ck.Resid({last}, 'post'), got {comp!r}"
            )
        _validate(model, comp, "receiver")
        # two query heads of a group name the same key/value head: patch it once
        key = (comp.hook_name(model), comp.unit(model), repr(getattr(comp, "pos", None)))
        unique.setdefault(key, comp)
    return list(unique.values())


def _validate(model: HookedTransformer, comp: Component, role: str) -> None:
    try:
        comp.validate(model)
    except ComponentError as error:
        raise ComponentError(f"{_WHERE}: {role} {error}") from None


def _receiving_layer(model: HookedTransformer, receiver: Component) -> int:
    """Senders before this layer can reach the receiver: its own layer for a head's input,
    past the last layer for the final residual stream."""
    return model.cfg.n_layers if isinstance(receiver, Resid) else receiver.layer


# ---------------------------------------------------------------------------------------------
# Fast path: through the engine, all experiments batched


def _path_patching_fast(
    model: HookedTransformer,
    base: Tensor,
    source: Tensor,
    experiments: list[tuple[Component, ...]],
    receivers: list[Component],
    metric: MetricLike,
    positions: Any,
    memory_budget: int | None,
    progress: bool,
    desc: str,
) -> tuple[Float[Tensor, "experiment n"], Float[Tensor, " n"]]:
    """``(examples, baseline)``: each experiment's metric per example, and the unpatched base
    run's, which one of the batched calls computes beside the patched runs."""
    n_layers = model.cfg.n_layers
    n = base.shape[0]
    reach = max(_receiving_layer(model, r) for r in receivers)
    has_path = [min(c.layer for c in group) < reach for group in experiments]
    with_path = [i for i, yes in enumerate(has_path) if yes]
    without_path = [i for i, yes in enumerate(has_path) if not yes]

    examples = torch.empty(len(experiments), n)
    if not with_path:  # every recorded input is the base run's: the base run's metric
        baseline = run_interventions(model, base, [[]], metric, positions=positions, progress=False)
        examples[:] = baseline
        return examples, baseline[0]

    groups = [experiments[i] for i in with_path]
    held_layers = range(min(c.layer for g in groups for c in g) + 1, min(reach, n_layers))
    base_cache = _cache(
        model,
        base,
        [Attn(layer) for layer in held_layers]
        + [c.z for g in groups for c in _later_heads(g)]
        + receivers,
    )
    source_cache = _cache(model, source, [c for g in groups for c in g])
    # With every head held, nothing moves between positions: a sender's change at a position
    # reaches the receivers only if they read that position. So step 1 patches and holds only
    # the receivers' positions, and the engine computes each example from the first of them.
    positions = _with_receiver_positions(model, base, receivers, metric, positions)
    step1 = [
        _step1_run(model, group, base_cache, source_cache, reach, positions) for group in groups
    ]

    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    if receivers == [Resid(n_layers - 1, "post")]:
        # Step 2 would put back step 1's whole final residual stream: read the metric in step 1.
        # The first run is the unpatched base run.
        values = run_interventions(
            model,
            base,
            [[], *step1],
            metric,
            positions=positions,
            memory_budget=budget,
            progress=progress,
            desc=desc,
        )
        examples[with_path] = values[1:]
        examples[without_path] = values[0]  # their recorded inputs are the base run's
        return examples, values[0]

    # Step 1 keeps every experiment's receiver activations until step 2 has used them; bound
    # that memory by taking the experiments in chunks (half the budget each for the
    # recordings and for the engine's forward passes).
    received = positions[_RECEIVED]
    index = torch.arange(received.shape[1], device=received.device)
    last_received = torch.where(received, index, 0).max(dim=1).values
    recorded_bytes = sum(
        base_cache[name].numel() * base_cache[name].element_size()
        for name in {r.hook_name(model) for r in receivers}
    )
    half = max(1, budget // 2)
    chunk_size = max(1, int(half // recorded_bytes))
    baseline = None
    with tqdm(total=len(groups), desc=desc, disable=not progress, leave=False) as bar:
        for begin in range(0, len(groups), chunk_size):
            chunk = range(begin, min(begin + chunk_size, len(groups)))
            recorded = record_activations(
                model,
                base,
                [step1[k] for k in chunk],
                receivers,
                positions=positions,
                memory_budget=half,
                last_positions=last_received,
                progress=False,
            )
            step2 = []
            for k in range(len(chunk)):
                # one view per recorded activation, so receivers at one hook share a patch value
                views = {id(acts): acts[k] for acts in recorded}
                step2.append(
                    [
                        Intervention(r, Patch(views[id(acts)]))
                        for r, acts in zip(receivers, recorded, strict=True)
                    ]
                )
            if baseline is None:
                step2.insert(0, [])  # the unpatched base run, once, in the first chunk
            values = run_interventions(
                model,
                base,
                step2,
                metric,
                positions=positions,
                memory_budget=half,
                progress=False,
            )
            if baseline is None:
                baseline, values = values[0], values[1:]
            examples[[with_path[k] for k in chunk]] = values
            bar.update(len(chunk))
    examples[without_path] = baseline  # their recorded inputs are the base run's
    return examples, baseline


# Position words that step 1 adds to the dataset's: the positions the receivers read, and each
# sender's positions among them ([n, pos] bool masks).
_RECEIVED = "<received>"


def _with_receiver_positions(
    model: HookedTransformer,
    base: Tensor,
    receivers: list[Component],
    metric: MetricLike,
    positions: Any,
) -> dict[str, Tensor]:
    """The dataset's position words plus ``_RECEIVED``: the positions the receivers read in each
    example (for the logits, the metric's read positions when it is a ``Metric``)."""
    n, n_pos = base.shape
    received = torch.zeros(n, n_pos, dtype=torch.bool, device=base.device)
    for receiver in receivers:
        if receiver == Resid(model.cfg.n_layers - 1, "post") and isinstance(metric, Metric):
            received[torch.arange(n), metric.positions.to(base.device)] = True
        else:
            received |= position_mask(receiver, n, n_pos, positions, base.device)
    return {**(positions or {}), _RECEIVED: received}


def _at_received(component: Component, positions: dict[str, Tensor]) -> Component:
    """``component`` restricted to its own positions among the received ones."""
    word = f"{_RECEIVED} {component.pos!r}"  # type: ignore[attr-defined]
    if word not in positions:
        n, n_pos = positions[_RECEIVED].shape
        own = position_mask(component, n, n_pos, positions, positions[_RECEIVED].device)
        positions[word] = own & positions[_RECEIVED]
    return component.at(word)


def _cache(model: HookedTransformer, tokens: Tensor, components: list[Component]) -> Any:
    """The activations of ``components`` in a run that stops after the last layer needed."""
    names = {c.hook_name(model) for c in components}
    _, cache = model.run_with_cache(
        tokens,
        names_filter=lambda name: name in names,
        stop_at_layer=max(c.layer for c in components) + 1,
    )
    return cache


def _later_heads(group: tuple[Component, ...]) -> list[Head]:
    """The group's sender heads after its first layer: their layers are held per head."""
    first = min(c.layer for c in group)
    return [c for c in group if isinstance(c, Head) and c.layer > first]


def _step1_run(
    model: HookedTransformer,
    group: tuple[Component, ...],
    base_cache: Any,
    source_cache: Any,
    reach: int,
    positions: Any,
) -> list[Intervention]:
    """Step 1 for one experiment: the senders take the source's values and every other head
    after the first sender, up to the receivers, keeps its base value."""
    first = min(c.layer for c in group)
    later = _later_heads(group)
    run = [
        Intervention(_at_received(c, positions), Patch(source_cache[c.hook_name(model)]))
        for c in group
        if c not in later
    ]
    # Heads in the first sender's layer read an unchanged residual stream: nothing to hold.
    for layer in range(first + 1, min(reach, model.cfg.n_layers)):
        in_layer = [c for c in later if c.layer == layer]
        if not in_layer:
            attn = Attn(layer, pos=_RECEIVED)
            run.append(Intervention(attn, Patch(base_cache[attn.hook_name(model)])))
            continue
        # A sender head in this layer: every head's output is its base value except the
        # sender's selected entries, which take the source's.
        z_name = in_layer[0].hook_name(model)
        held = base_cache[z_name]
        for comp in in_layer:
            mask = selection_mask(comp, model, held.shape, positions, held.device)
            held = torch.where(mask, source_cache[z_name], held)
        run += [
            Intervention(Head(layer, h, pos=_RECEIVED), Patch(held))
            for h in range(model.cfg.n_heads)
        ]
    return run


# ---------------------------------------------------------------------------------------------
# Reference path: two plain forwards with hooks per experiment


def _path_patching_reference(
    model: HookedTransformer,
    base: Tensor,
    source: Tensor,
    experiments: list[tuple[Component, ...]],
    receivers: list[Component],
    metric: MetricLike,
    positions: Any,
    progress: bool,
    desc: str,
) -> Float[Tensor, "experiment n"]:
    z_names = [Head(layer, 0).hook_name(model) for layer in range(model.cfg.n_layers)]
    sender_names = {c.hook_name(model) for group in experiments for c in group}
    receiver_names = list(dict.fromkeys(r.hook_name(model) for r in receivers))
    _, base_cache = model.run_with_cache(base, names_filter=lambda name: name in z_names)
    _, source_cache = model.run_with_cache(source, names_filter=lambda name: name in sender_names)

    def put(act: Tensor, comps: list[Component], values: Tensor) -> Tensor:
        for comp in comps:
            mask = selection_mask(comp, model, act.shape, positions, act.device)
            act = torch.where(mask, values, act)
        return act

    out = []
    for group in tqdm(experiments, desc=f"{desc} (reference)", disable=not progress, leave=False):
        # Step 1: every head's output is its base value, except the senders' entries, which
        # take the source's; MLPs are recomputed, and MLP senders take the source's values.
        # Each hook is told the name it was added under: on a TransformerBridge ``hook.name``
        # is the hook point's own name (``attn.o.hook_in`` for ``attn.hook_z``).
        def hold_heads(z: Tensor, hook: Any, group: tuple = group, *, name: str) -> Tensor:
            senders_here = [c for c in group if c.hook_name(model) == name]
            if not senders_here:
                return base_cache[name]
            return put(base_cache[name], senders_here, source_cache[name])

        def patch_mlp(mlp_out: Tensor, hook: Any, group: tuple = group, *, name: str) -> Tensor:
            senders_here = [c for c in group if c.hook_name(model) == name]
            return put(mlp_out, senders_here, source_cache[name])

        recorded: dict[str, Tensor] = {}

        def record(act: Tensor, hook: Any, recorded: dict = recorded, *, name: str) -> None:
            recorded[name] = act.clone()

        mlp_names = {c.hook_name(model) for c in group if isinstance(c, MLP)}
        model.run_with_hooks(
            base,
            fwd_hooks=[(name, partial(hold_heads, name=name)) for name in z_names]
            + [(name, partial(patch_mlp, name=name)) for name in mlp_names]
            + [(name, partial(record, name=name)) for name in receiver_names],
            return_type=None,
        )

        # Step 2: only the receivers' inputs are replaced, by what step 1 recorded.
        def patch_receivers(
            act: Tensor, hook: Any, recorded: dict = recorded, *, name: str
        ) -> Tensor:
            receivers_here = [r for r in receivers if r.hook_name(model) == name]
            return put(act, receivers_here, recorded[name])

        logits = model.run_with_hooks(
            base, fwd_hooks=[(name, partial(patch_receivers, name=name)) for name in receiver_names]
        )
        out.append(check_metric_output(metric(logits), base.shape[0], _WHERE).float().cpu())
    return torch.stack(out)
