"""The batched intervention engine: every method in circuitkit compiles to it.

An *intervention* puts a value into one component of the model: another run's activation
(``Patch``), zero (``Zero``), a given tensor such as a mean (``SetTo``), a scaled copy
(``Scale``) or added noise (``Add``). A *run* is a set of interventions applied together in one
forward pass of the *base* input; ``run_interventions`` evaluates a per-example metric for many
runs and returns it as a ``[n_runs, n]`` tensor.

Fast path (the default):

- Many runs share one forward pass, stacked along the batch dimension: a chunk of ``c`` runs on
  a base batch of ``n`` examples is a batch of ``c * n``. Chunks are sized to a memory budget.
- Nothing before the earliest layer a run touches can change, so each chunk starts there, from
  the base run's cached residual stream, instead of at the embeddings. In a causal model
  nothing at a position before the earliest position a run touches can change either, so in
  each example only the positions from the first one touched *in that example* are computed
  (examples that start at the same position go through the blocks together); attention reads
  the base run's cached keys and values for the earlier ones.
- A ``Metric`` reads one position per example, so positions after the last one it reads are
  not computed, and only the final residual stream at the read positions is normalised and
  unembedded, not the full ``[batch, pos, d_vocab]`` logits.
- The hooks apply a whole chunk's interventions at once with ``torch.where`` over masks, not
  one Python call per run.

Reference path (``reference=True``): one plain ``run_with_hooks`` forward per run, computing the
full logits and calling the metric on them. Tests compare the two.

``record_activations`` runs the same interventions but, instead of a metric, returns activations
recorded under each run (what a method needs when one run's activations feed the next, as in
path patching). Its fast path stops after the last layer it records; it has the same reference.

Either way the engine removes every hook it added (also when an exception is raised), changes
no weight or setting, and runs without gradients. Interventions of one run must not select the
same activation entry twice; the engine checks this, so the order within a run never matters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utils import apply_softcap

from circuitkit.components import Component, selection_mask
from circuitkit.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.metrics import Metric, check_metric_output

# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, eq=False)
class Value:
    """What an intervention puts into the selected entries of an activation."""


@dataclass(frozen=True, eq=False)
class Patch(Value):
    """Another run's activation: ``source`` has the activation's full shape ``[n, ...]``."""

    source: Tensor = field(repr=False)


@dataclass(frozen=True, eq=False)
class Zero(Value):
    """Zero (zero ablation)."""


@dataclass(frozen=True, eq=False)
class SetTo(Value):
    """A given tensor, broadcast to the activation's shape (a mean, a direction)."""

    value: Tensor = field(repr=False)


@dataclass(frozen=True, eq=False)
class Scale(Value):
    """The activation itself, multiplied by ``factor`` (0 ablates, 2 doubles)."""

    factor: float


@dataclass(frozen=True, eq=False)
class Add(Value):
    """The activation plus ``delta``, broadcast to its shape (noise, a steering vector)."""

    delta: Tensor = field(repr=False)


@dataclass(frozen=True)
class Intervention:
    """Put ``value`` into ``component`` (an address from ``circuitkit.components``)."""

    component: Component
    value: Value


Run = Sequence[Intervention]
MetricLike = Metric | Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Applying values


def _value_tensor(value: Value) -> Tensor | None:
    if isinstance(value, Patch):
        return value.source
    if isinstance(value, SetTo):
        return value.value
    if isinstance(value, Add):
        return value.delta
    return None


def _apply_one(act: Tensor, mask: Tensor, value: Value) -> Tensor:
    """The activation with ``value`` put into the entries ``mask`` selects (reference path)."""
    if isinstance(value, Zero):
        return act.masked_fill(mask, 0.0)
    if isinstance(value, Scale):
        return torch.where(mask, act * value.factor, act)
    if isinstance(value, Add):
        return torch.where(mask, act + value.delta.to(act), act)
    tensor = _value_tensor(value)
    return torch.where(mask, tensor.to(act), act)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass(frozen=True, eq=False)
class _Compiled:
    """One intervention resolved against a model and a base input."""

    hook: str
    mask: Tensor  # bool, broadcastable to the activation [n, ...]
    value: Value
    layer: int
    pos_dim: int  # the activation's (query) position dimension
    key_dim: int | None  # an attention pattern's key position dimension, else None
    first_pos: Tensor  # [n] the first position the mask selects in each example; n_pos if none


def run_interventions(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"],
    runs: Sequence[Run | Intervention],
    metric: MetricLike,
    *,
    positions: Mapping[str, Tensor] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    max_runs_per_chunk: int | None = None,
    progress: bool = True,
    desc: str = "interventions",
) -> Float[Tensor, "n_runs n"]:
    """The metric of the base input ``tokens`` under each run of interventions.

    Each element of ``runs`` is an ``Intervention`` or a sequence of them applied together;
    an empty sequence is the unpatched base run. ``positions`` (a dataset's dict of [n] index
    tensors) resolves position words such as "end". ``memory_budget`` caps the bytes of
    activations one chunk may use (default: 2 GiB on CPU, half the free memory on a GPU);
    ``max_runs_per_chunk`` caps the runs per forward pass. ``reference=True`` runs the slow,
    plainly written path: one ``run_with_hooks`` forward per run.

    Returns the per-example metric, shape ``[len(runs), n]``, on the CPU.

    Example::

        z9 = clean_cache["blocks.9.attn.hook_z"]
        values = run_interventions(model, corrupted_tokens,
                                   [Intervention(Head(9, 9), Patch(z9))], metric)
    """
    where = "run_interventions"
    runs_list = _check_runs(model, runs, where)
    tokens = _check_tokens(model, tokens, where)
    n = tokens.shape[0]
    _check_metric_object(metric, n)
    if not runs_list:
        return torch.zeros(0, n)

    with torch.no_grad():
        compiled = _compile(model, tokens, runs_list, positions)
        if reference:
            return _run_reference(model, tokens, compiled, metric, progress, desc)
        return _run_fast(
            model, tokens, compiled, metric, memory_budget, max_runs_per_chunk, progress, desc
        )


def record_activations(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"],
    runs: Sequence[Run | Intervention],
    record: Sequence[Component],
    *,
    positions: Mapping[str, Tensor] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    max_runs_per_chunk: int | None = None,
    last_positions: Int[Tensor, "n"] | None = None,
    progress: bool = True,
    desc: str = "recording",
) -> list[Float[Tensor, "n_runs n ..."]]:
    """The activations of ``record`` in the base input ``tokens`` under each run of interventions.

    Runs are given as to ``run_interventions`` and evaluated the same way, but instead of a
    metric each run keeps, for every component of ``record``, the whole activation at that
    component's hook (its head, neuron and position selection play no part: the full ``[n,
    ...]`` activation, the shape a ``Patch`` takes), as it is after the run's interventions.
    The fast path starts each chunk at its first intervention or first recorded layer and
    stops after the last recorded layer; in each example it computes only the positions from
    the first one the run touches there (earlier positions keep the base run's activations).
    ``reference=True`` runs one plain ``run_with_hooks`` forward per run.

    ``last_positions`` ([n], optional) says that only positions up to ``last_positions[i]`` of
    example ``i`` will be read: later positions then hold the base run's activations instead of
    the run's, and the fast path does not compute them (in a causal model they cannot change
    the earlier ones).

    Returns one tensor per component of ``record``, shape ``[len(runs), n, ...]``, on the
    model's device; components at the same hook share one tensor.

    Example::

        z9 = corrupted_cache["blocks.9.attn.hook_z"]
        [q10] = record_activations(model, clean_tokens,
                                   [Intervention(Head(9, 9), Patch(z9))], [Head(10, 7).q])
        q10.shape    # [1, n, pos, n_heads, d_head]
    """
    where = "record_activations"
    runs_list = _check_runs(model, runs, where)
    tokens = _check_tokens(model, tokens, where)
    record = list(record) if not isinstance(record, Component) else [record]
    if not record or not all(isinstance(c, Component) for c in record):
        raise CircuitkitError(
            f"{where}: record must be a non-empty list of components, got {record!r}"
        )
    for component in record:
        component.validate(model)
    layers = {c.hook_name(model): (c.layer, c.pos_dim, c.key_pos_dim) for c in record}
    last = _check_last_positions(last_positions, tokens, where)

    with torch.no_grad():
        shapes = _activation_shapes(model, tokens, record)
        if not runs_list:
            acts = {
                name: torch.empty(0, *shapes[name], dtype=model.cfg.dtype, device=tokens.device)
                for name in layers
            }
        else:
            compiled = _compile(model, tokens, runs_list, positions)
            if reference:
                acts = _record_reference(model, tokens, compiled, layers, last, progress, desc)
            else:
                acts = _record_fast(
                    model,
                    tokens,
                    compiled,
                    layers,
                    shapes,
                    last,
                    memory_budget,
                    max_runs_per_chunk,
                    progress,
                    desc,
                )
    return [acts[c.hook_name(model)] for c in record]


def _check_last_positions(last: Tensor | None, tokens: Tensor, where: str) -> Tensor:
    """[n] the last position to record in each example (the last one when not given)."""
    n, n_pos = tokens.shape
    if last is None:
        return torch.full((n,), n_pos - 1, device=tokens.device)
    if not isinstance(last, Tensor) or last.shape != (n,) or last.is_floating_point():
        shape = tuple(last.shape) if isinstance(last, Tensor) else type(last).__name__
        raise ShapeError(
            f"{where}: last_positions must be an integer [n] tensor with n = {n}, got {shape}"
        )
    if int(last.min()) < 0 or int(last.max()) >= n_pos:
        raise ShapeError(
            f"{where}: last_positions must lie in 0..{n_pos - 1}, got values from "
            f"{int(last.min())} to {int(last.max())}"
        )
    return last.to(tokens.device).long()


def _base_after(act: Tensor, base_act: Tensor, last: Tensor, pos_dim: int, start: int) -> Tensor:
    """``act`` ([runs, n, ...], holding positions ``start`` onwards) with the base run's
    activation ``base_act`` (the same entries, [n, ...]) at every position after ``last[i]``."""
    n_pos = act.shape[1 + pos_dim]
    index = torch.arange(start, start + n_pos, device=act.device)
    after = index[None, :] > last[:, None]  # [n, n_pos]
    trailing = [1] * (act.ndim - 2 - pos_dim)
    after = after.view(after.shape[0], *[1] * (pos_dim - 1), n_pos, *trailing)
    return torch.where(after, base_act, act)


def _check_runs(
    model: HookedTransformer, runs: Sequence[Run | Intervention], where: str
) -> list[tuple[Intervention, ...]]:
    runs_list = [(r,) if isinstance(r, Intervention) else tuple(r) for r in runs]
    for run in runs_list:
        for intervention in run:
            if not isinstance(intervention, Intervention):
                raise CircuitkitError(
                    f"{where}: each run must hold Intervention objects, got "
                    f"{type(intervention).__name__}"
                )
            intervention.component.validate(model)
    return runs_list


def _check_tokens(model: HookedTransformer, tokens: Tensor, where: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ShapeError(f"{where}: tokens must be an integer [n, pos] tensor, got {shape}")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ShapeError(
            f"{where}: tokens have {tokens.shape[1]} positions but the model's context "
            f"is {model.cfg.n_ctx}"
        )
    return tokens.to(model.cfg.device).long()


def _check_metric_object(metric: MetricLike, n: int) -> None:
    if isinstance(metric, Metric):
        if metric.n != n:
            raise ShapeError(
                f"run_interventions: the metric {metric.name!r} was made for {metric.n} examples "
                f"but the base input has {n}"
            )
    elif not callable(metric):
        raise CircuitkitError(f"run_interventions: metric must be callable, got {metric!r}")


def _compile(
    model: HookedTransformer,
    tokens: Tensor,
    runs: list[tuple[Intervention, ...]],
    positions: Mapping[str, Tensor] | None,
) -> list[list[_Compiled]]:
    """Resolve every intervention to (hook, mask, value) and check shapes and overlaps."""
    shapes = _activation_shapes(model, tokens, [i.component for run in runs for i in run])
    mask_cache: dict[object, tuple[Tensor, Tensor]] = {}
    compiled: list[list[_Compiled]] = []
    for run in runs:
        items = []
        for intervention in run:
            comp = intervention.component
            hook = comp.hook_name(model)
            key = _component_key(comp)
            if key not in mask_cache:
                shape = shapes[hook]
                mask = selection_mask(comp, model, shape, positions, tokens.device)
                mask_cache[key] = (mask, _first_positions(mask, comp.pos_dim, shape[0]))
            _check_value(intervention, shapes[hook])
            mask, first_pos = mask_cache[key]
            items.append(
                _Compiled(
                    hook,
                    mask,
                    intervention.value,
                    comp.layer,
                    comp.pos_dim,
                    comp.key_pos_dim,
                    first_pos,
                )
            )
        _check_no_overlap(run, items)
        compiled.append(items)
    return compiled


def _activation_shapes(
    model: HookedTransformer, tokens: Tensor, components: Sequence[Component]
) -> dict[str, torch.Size]:
    """The shape of the activation of every component, from one base forward that stops after
    the last layer touched."""
    names = {c.hook_name(model) for c in components}
    shapes: dict[str, torch.Size] = {}
    if not names:  # only unpatched runs
        return shapes
    handles = [
        model.hook_dict[name].register_forward_hook(
            lambda module, inputs, output, name=name: shapes.__setitem__(name, output.shape)
        )
        for name in names
    ]
    stop = max(c.layer for c in components) + 1
    try:
        model(tokens, stop_at_layer=max(stop, 1))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _first_positions(mask: Tensor, pos_dim: int, n: int) -> Tensor:
    """[n] the first position a selection mask selects in each example (its length if none)."""
    n_pos = mask.shape[pos_dim]
    by_position = mask.movedim(pos_dim, 1)
    selected = by_position.reshape(*by_position.shape[:2], -1).any(dim=2)  # [n or 1, n_pos]
    index = torch.arange(n_pos, device=mask.device).expand_as(selected)
    first = torch.where(selected, index, n_pos).min(dim=1).values
    return first.expand(n).cpu()


def _component_key(component: Component) -> object:
    if isinstance(getattr(component, "pos", None), slice):  # unhashable before Python 3.12
        return (type(component), repr(component))
    return component


def _check_value(intervention: Intervention, act_shape: torch.Size) -> None:
    value = intervention.value
    if isinstance(value, Scale):
        if not isinstance(value.factor, (int, float)):
            raise CircuitkitError(
                f"{intervention.component!r}: Scale.factor must be a number, got {value.factor!r}"
            )
        return
    tensor = _value_tensor(value)
    if tensor is None:
        return
    if isinstance(value, Patch):
        if tuple(tensor.shape) != tuple(act_shape):
            raise ShapeError(
                f"{intervention.component!r}: the patched activation has shape "
                f"{tuple(tensor.shape)}, expected {tuple(act_shape)} (the base run's shape)"
            )
        return
    try:
        torch.broadcast_shapes(tensor.shape, act_shape)
    except RuntimeError:
        raise ShapeError(
            f"{intervention.component!r}: a value of shape {tuple(tensor.shape)} does not "
            f"broadcast to the activation's shape {tuple(act_shape)}"
        ) from None


def _check_no_overlap(run: tuple[Intervention, ...], items: list[_Compiled]) -> None:
    by_hook: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_hook.setdefault(item.hook, []).append(index)
    for indices in by_hook.values():
        if len(indices) < 2:
            continue
        masks = [items[i].mask for i in indices]
        shape = torch.broadcast_shapes(*(m.shape for m in masks))
        total = sum(m.expand(shape).to(torch.int16) for m in masks)
        if int(total.max()) > 1:  # type: ignore[union-attr]
            names = ", ".join(repr(run[i].component) for i in indices)
            raise ComponentError(
                f"run_interventions: interventions in one run select the same activation entries "
                f"({names}); give each entry at most one value per run"
            )


# ---------------------------------------------------------------------------------------------
# Reference path: one plain forward with hooks per run


def _run_reference(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    metric: MetricLike,
    progress: bool,
    desc: str,
) -> Tensor:
    n = tokens.shape[0]
    out = []
    for items in tqdm(compiled, desc=f"{desc} (reference)", disable=not progress, leave=False):
        fwd_hooks = [(item.hook, _reference_hook(item)) for item in items]
        logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
        values = metric(logits)
        out.append(check_metric_output(values, n, "run_interventions").float().cpu())
    return torch.stack(out)


def _reference_hook(item: _Compiled) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        return _apply_one(act, item.mask, item.value)

    return hook


def _record_reference(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    record: Mapping[str, tuple[int, int, int | None]],
    last: Tensor,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    recorded: dict[str, list[Tensor]] = {name: [] for name in record}
    for items in tqdm(compiled, desc=f"{desc} (reference)", disable=not progress, leave=False):
        fwd_hooks = [(item.hook, _reference_hook(item)) for item in items]
        # added after the interventions, so they see the activations the interventions made
        fwd_hooks += [(name, _store_hook(recorded[name])) for name in record]
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None)
    _, base_cache = model.run_with_cache(tokens, names_filter=lambda name: name in record)
    return {
        name: _base_after(torch.stack(acts), base_cache[name], last, record[name][1], 0)
        for name, acts in recorded.items()
    }


def _store_hook(into: list[Tensor]) -> Callable:
    def hook(act: Tensor, hook) -> None:
        into.append(act.clone())

    return hook


# ---------------------------------------------------------------------------------------------
# Fast path: many runs per forward, starting at the first layer and position touched


Start = tuple[int, tuple[int, ...]]  # (layer, first position per example)


def _run_fast(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    metric: MetricLike,
    memory_budget: int | None,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
) -> Tensor:
    n, n_pos = tokens.shape
    base = _base_run(model, tokens, [])
    starts = [_start_of(model, items, n, n_pos, base.reuses_prefix) for items in compiled]
    full_logits = not isinstance(metric, Metric)
    read = metric.positions.to(tokens.device) if isinstance(metric, Metric) else None
    final = base.resid[model.cfg.n_layers]

    def chunk_size(start: Start) -> int:
        per_run = _bytes_per_run(model, n, n_pos - min(start[1]), n_pos, full_logits)
        return _chunk_size(model, per_run, memory_budget, max_runs_per_chunk)

    results = torch.empty(len(compiled), n)
    with tqdm(total=len(compiled), desc=desc, disable=not progress, leave=False) as bar:
        for chunk in _chunks(starts, chunk_size):
            c = len(chunk)
            layer, firsts = starts[chunk[0]]
            chunk_items = [compiled[r] for r in chunk]
            # What the metric reads, [c, n, ...]: the base run's, overwritten where a run
            # changes it. A Metric reads one position per example; a callable all of them.
            if read is None:
                out = _tile(final, c).view(c, *final.shape).clone()
            else:
                out = _tile(final[torch.arange(n, device=final.device), read], c).view(c, n, -1)
            for pos, stop, rows in _example_groups(firsts, read, n_pos, base.reuses_prefix):
                hooks = _chunk_hooks(chunk_items, c, n, rows, pos, stop, n_pos)
                with _hooks_added(model, hooks.items()):
                    residual = _run_blocks(
                        model, tokens, c, layer, pos, stop, model.cfg.n_layers, base, rows
                    )
                residual = residual.view(c, len(rows), stop - pos, -1)
                if read is None:
                    out[:, rows, pos:stop] = residual
                else:
                    out[:, rows] = residual[:, torch.arange(len(rows)), read[rows] - pos]
            values = _read_metric(model, out, metric, c, n)
            results[torch.tensor(chunk)] = values.float().cpu()
            bar.update(c)
    return results


def _start_of(
    model: HookedTransformer, items: list[_Compiled], n: int, n_pos: int, reuses_prefix: bool
) -> Start:
    """``(layer, first positions)`` from which a run must be recomputed.

    Nothing before the earliest layer a run touches changes, and, the model being causal,
    nothing in an example at a position before the earliest position the run touches there.
    A run that selects nothing (or no run at all) starts after the last layer: it is the base
    run. Without prefix reuse every example starts at position 0.
    """
    n_layers = model.cfg.n_layers
    if not items:
        return n_layers, (n_pos,) * n
    firsts = torch.stack([item.first_pos for item in items]).min(dim=0).values
    if bool((firsts >= n_pos).all()):
        return n_layers, (n_pos,) * n
    layer = min(item.layer for item in items)
    return layer, tuple(firsts.tolist()) if reuses_prefix else (0,) * n


def _example_groups(
    firsts: tuple[int, ...], read: Tensor | None, n_pos: int, reuses_prefix: bool
) -> Iterator[tuple[int, int, Tensor]]:
    """``(pos, stop, rows)``: the examples ``rows`` that start at ``pos``, computed up to ``stop``.

    Examples are grouped by their first changed position. A metric that reads one position
    per example (``read``) needs nothing after the last one it reads in the group, and
    nothing from an example whose read position comes before its first change.
    """
    first = torch.tensor(firsts, device=read.device if read is not None else None)
    if not reuses_prefix:
        yield 0, n_pos, torch.arange(len(firsts), device=first.device)
        return
    for pos in sorted(set(firsts)):
        if pos >= n_pos:
            continue
        rows = (first == pos).nonzero()[:, 0]
        stop = n_pos
        if read is not None:
            rows = rows[read[rows] >= pos]
            if len(rows) == 0:
                continue
            stop = int(read[rows].max()) + 1
        yield pos, stop, rows


def _record_fast(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    record: Mapping[str, tuple[int, int, int | None]],
    shapes: Mapping[str, torch.Size],
    last: Tensor,
    memory_budget: int | None,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    n, n_pos = tokens.shape
    # A chunk must reach the first recorded layer and need not go past the last one. In each
    # example, positions before the first one a run touches keep the base run's activations.
    layers = [layer for layer, _, _ in record.values()]
    first, stop = min(layers), max(layers) + 1
    base = _base_run(model, tokens, list(record))
    starts = []
    for items in compiled:
        layer, firsts = _start_of(model, items, n, n_pos, base.reuses_prefix)
        starts.append((min(layer, first), firsts))
    itemsize = torch.empty((), dtype=model.cfg.dtype).element_size()
    recorded_per_run = itemsize * sum(math.prod(shapes[name]) for name in record)

    def chunk_size(start: Start) -> int:
        per_run = _bytes_per_run(model, n, n_pos - min(start[1]), n_pos, full_logits=False)
        return _chunk_size(model, per_run + recorded_per_run, memory_budget, max_runs_per_chunk)

    recorded = {
        name: act.unsqueeze(0).repeat(len(compiled), *[1] * act.ndim)
        for name, act in base.recorded.items()
    }
    with tqdm(total=len(compiled), desc=desc, disable=not progress, leave=False) as bar:
        for chunk in _chunks(starts, chunk_size):
            c = len(chunk)
            layer, firsts = starts[chunk[0]]
            runs = torch.tensor(chunk, device=tokens.device)
            chunk_items = [compiled[r] for r in chunk]
            for pos, stop_pos, rows in _example_groups(firsts, last, n_pos, base.reuses_prefix):
                store = _storer(recorded, record, base.recorded, runs, rows, pos, last)
                hooks = [
                    *_chunk_hooks(chunk_items, c, n, rows, pos, stop_pos, n_pos).items(),
                    # after the interventions, so they see the activations the interventions made
                    *[
                        (name, lambda act, name=name, store=store: store(act, name))
                        for name in record
                    ],
                ]
                with _hooks_added(model, hooks):
                    _run_blocks(model, tokens, c, layer, pos, stop_pos, stop, base, rows)
            bar.update(c)
    return recorded


def _storer(
    recorded: dict[str, Tensor],
    record: Mapping[str, tuple[int, int, int | None]],
    base_recorded: Mapping[str, Tensor],
    runs: Tensor,
    rows: Tensor,
    pos: int,
    last: Tensor,
) -> Callable[[Tensor, str], None]:
    """A function that writes a chunk's activation at one hook into ``recorded``: runs
    ``runs``, examples ``rows``, the positions computed from ``pos`` on, except those after
    ``last``, which keep the base run's."""

    def store(act: Tensor, name: str) -> None:
        layer, pos_dim, key_dim = record[name]
        at = pos if layer >= 0 else 0  # the embeddings are computed at every position
        view = act.view(len(runs), len(rows), *act.shape[1:])
        stop = at + view.shape[1 + pos_dim]
        where: list[slice] = [slice(None)] * (view.ndim - 2)
        where[pos_dim - 1] = slice(at, stop)
        if key_dim is not None:  # keys run up to the last computed query position
            where[key_dim - 1] = slice(0, view.shape[1 + key_dim])
        base_index: tuple[Tensor | slice, ...] = (rows, *where)
        index: tuple[Tensor | slice, ...] = (runs[:, None], rows[None, :], *where)
        view = _base_after(view, base_recorded[name][base_index], last[rows], pos_dim, at)
        recorded[name][index] = view

    return store


@dataclass
class _BaseRun:
    """What the patched runs reuse from the unpatched base run.

    ``resid[l]`` is the residual stream entering block ``l`` (``resid[n_layers]`` the final
    one); ``keys[l]`` and ``values[l]`` are block ``l``'s attention keys and values (before
    rotary), which positions before a run's first patched position share with the base run;
    ``recorded`` the base run's activations at hooks asked for by name.
    """

    resid: dict[int, Tensor]
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    shortformer_pos_embed: Tensor | None
    attention_mask: Tensor | None
    recorded: dict[str, Tensor]

    @property
    def reuses_prefix(self) -> bool:
        # With an explicit attention mask (left padding) positions are not plain indices;
        # such runs recompute every position.
        return self.attention_mask is None


def _base_run(model: HookedTransformer, tokens: Tensor, record: Sequence[str]) -> _BaseRun:
    """One forward of the base input, keeping each block's input, keys and values, and the
    activations at the hooks ``record``."""
    recorded: dict[str, Tensor] = {}
    hooks = [(name, lambda act, name=name: recorded.__setitem__(name, act)) for name in record]
    with _hooks_added(model, hooks):
        residual, _, shortformer, attention_mask = model.input_to_embed(tokens)
        base = _BaseRun({}, {}, {}, shortformer, attention_mask, recorded)
        for layer, block in enumerate(model.blocks):
            base.resid[layer] = residual
            entry = None
            if base.reuses_prefix:
                entry = TransformerLensKeyValueCacheEntry.init_cache_entry(
                    model.cfg, residual.device, tokens.shape[0]
                )
            residual = block(
                residual,
                shortformer_pos_embed=shortformer,
                past_kv_cache_entry=entry,
                attention_mask=attention_mask,
            )
            if entry is not None:
                base.keys[layer], base.values[layer] = entry.past_keys, entry.past_values
        base.resid[model.cfg.n_layers] = residual
    return base


def _chunk_size(
    model: HookedTransformer, per_run: int, memory_budget: int | None, max_runs: int | None
) -> int:
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    size = max(1, int(budget // per_run))
    return size if max_runs is None else max(1, min(size, max_runs))


def _chunks(starts: list[Start], chunk_size: Callable[[Start], int]) -> Iterator[list[int]]:
    """Run indices in chunks of one start and at most ``chunk_size(start)`` runs each."""
    # Runs that start at the same layer and positions go together, so no chunk starts earlier
    # than it must.
    order = sorted(range(len(starts)), key=lambda r: starts[r])
    i = 0
    while i < len(order):
        start = starts[order[i]]
        size = chunk_size(start)
        j = i + 1
        while j < len(order) and j - i < size and starts[order[j]] == start:
            j += 1
        yield order[i:j]
        i = j


@contextmanager
def _hooks_added(
    model: HookedTransformer, hooks: Iterable[tuple[str, Callable[[Tensor], Tensor | None]]]
) -> Iterator[None]:
    """Forward hooks ``fn(activation) -> replacement or None`` on hook points, in the order
    given, removed on exit (also when an exception is raised)."""
    handles = []
    try:
        for name, fn in hooks:
            handles.append(
                model.hook_dict[name].register_forward_hook(
                    lambda module, inputs, output, fn=fn: fn(output)
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tile(x: Tensor, c: int) -> Tensor:
    return x.repeat(c, *([1] * (x.ndim - 1)))


def _run_blocks(
    model: HookedTransformer,
    tokens: Tensor,
    c: int,
    start: int,
    pos: int,
    stop_pos: int,
    stop: int,
    base: _BaseRun,
    rows: Tensor,
) -> Tensor:
    """The residual stream after block ``stop - 1`` for a chunk of c runs on the examples
    ``rows`` (a c * len(rows) batch), at positions ``pos`` to ``stop_pos``.

    It starts from the base run's residual stream before block ``start`` (from the embeddings
    when ``start`` is negative); the blocks read the base run's keys and values for the
    positions before ``pos``. Positions after ``stop_pos`` cannot change earlier ones.
    """
    attention_mask = base.attention_mask
    attention_mask = None if attention_mask is None else _tile(attention_mask[rows], c)
    if start < 0:
        residual, _, shortformer, attention_mask = model.input_to_embed(_tile(tokens[rows], c))
        residual = residual[:, pos:stop_pos]
        start = 0
    else:
        residual = _tile(base.resid[start][rows, pos:stop_pos], c)
        shortformer = base.shortformer_pos_embed
        shortformer = None if shortformer is None else _tile(shortformer[rows], c)
    if shortformer is not None:
        shortformer = shortformer[:, pos:stop_pos]
    for layer in range(start, stop):
        entry = None
        if pos > 0:
            entry = TransformerLensKeyValueCacheEntry(
                _tile(base.keys[layer][rows, :pos], c),
                _tile(base.values[layer][rows, :pos], c),
                frozen=True,
            )
        residual = model.blocks[layer](
            residual,
            shortformer_pos_embed=shortformer,
            past_kv_cache_entry=entry,
            attention_mask=attention_mask,
        )
    return residual


def _read_metric(
    model: HookedTransformer, out: Tensor, metric: MetricLike, c: int, n: int
) -> Tensor:
    """The metric [c, n] of a chunk from its final residual stream: [c, n, d_model] at the
    metric's read positions for a ``Metric``, [c, n, pos, d_model] for a plain callable."""
    if isinstance(metric, Metric):
        logits = _unembed(model, out.view(c * n, 1, -1))[:, 0]
        values = metric.at(logits.view(c, n, -1))
        check_metric_output(values.reshape(-1), c * n, "run_interventions")
        return values
    logits = _unembed(model, out.view(c * n, *out.shape[2:])).view(c, n, *out.shape[2:3], -1)
    return torch.stack(
        [check_metric_output(metric(logits[k]), n, "run_interventions") for k in range(c)]
    )


def _unembed(model: HookedTransformer, residual: Tensor) -> Tensor:
    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    logits = model.unembed(residual)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _chunk_hooks(
    chunk: list[list[_Compiled]], c: int, n: int, rows: Tensor, pos: int, stop: int, n_pos: int
) -> dict[str, Callable]:
    """One function per hook that applies all of the chunk's interventions on it at once.

    The activation has c * len(rows) rows; it is viewed as [c, len(rows), ...] so run k's
    interventions land on block k. Interventions with the same value object (the usual sweep:
    every run patches from the same cache) share one ``torch.where``; runs with their own
    values are stacked. Only the examples ``rows`` are computed, and inside the blocks only
    positions ``pos`` to ``stop``, so masks and values are cut to them; the embeddings are
    computed at every position.
    """
    every_row = len(rows) == n and bool((rows == torch.arange(n, device=rows.device)).all())
    cut = _Cut(None if every_row else rows, n, pos, stop, n_pos)
    by_hook: dict[str, list[tuple[int, _Compiled]]] = {}
    for k, items in enumerate(chunk):
        for item in items:
            by_hook.setdefault(item.hook, []).append((k, cut(item)))
    return {hook: _make_hook_fn(entries, c, len(rows)) for hook, entries in by_hook.items()}


class _Cut:
    """Interventions cut to some examples and positions; tensors shared by several
    interventions (one cache, one mask) are cut once and stay shared."""

    def __init__(self, rows: Tensor | None, n: int, pos: int, stop: int, n_pos: int) -> None:
        self.rows, self.n, self.pos, self.stop, self.n_pos = rows, n, pos, stop, n_pos
        self.done: dict[tuple, Tensor] = {}

    def __call__(self, item: _Compiled) -> _Compiled:
        value = item.value
        if isinstance(value, Patch):
            value = Patch(self.tensor(item, value.source))
        elif isinstance(value, SetTo):
            value = SetTo(self.tensor(item, value.value))
        elif isinstance(value, Add):
            value = Add(self.tensor(item, value.delta))
        return dataclasses.replace(item, mask=self.tensor(item, item.mask), value=value)

    def tensor(self, item: _Compiled, tensor: Tensor) -> Tensor:
        # ``tensor`` broadcasts to the activation (as many dims as the mask), aligned right
        lead = item.mask.ndim - tensor.ndim
        key = (id(tensor), lead, item.layer >= 0, item.pos_dim, item.key_dim)
        if key in self.done:
            return self.done[key]
        out = tensor
        if self.rows is not None and lead == 0 and out.shape[0] == self.n:
            out = out[self.rows.to(out.device)]
        if item.layer >= 0:  # inside the blocks: only positions pos..stop exist
            dim = item.pos_dim - lead
            if dim >= 0 and out.shape[dim] != 1:
                out = out.narrow(dim, self.pos, self.stop - self.pos)
            if item.key_dim is not None:  # keys run up to the last computed query position
                dim = item.key_dim - lead
                if dim >= 0 and out.shape[dim] != 1:
                    out = out.narrow(dim, 0, self.stop)
        self.done[key] = out
        return out


def _make_hook_fn(entries: list[tuple[int, _Compiled]], c: int, n: int) -> Callable:
    # Group the entries by what they put in: one group per value tensor (zeros and each
    # scaling factor form groups too). A group acts only on the rows of the runs that use it.
    groups: dict[tuple, list[tuple[int, _Compiled]]] = {}
    for k, item in entries:
        value = item.value
        if isinstance(value, Scale):
            key: tuple = ("scale", float(value.factor))
        elif isinstance(value, Zero):
            key = ("zero",)
        else:
            key = (type(value).__name__, id(_value_tensor(value)))
        groups.setdefault(key, []).append((k, item))

    ops = []
    for group in groups.values():
        runs = sorted({k for k, _ in group})
        shape = torch.broadcast_shapes(*(item.mask.shape for _, item in group))
        device = group[0][1].mask.device
        mask = torch.zeros(len(runs), *shape, dtype=torch.bool, device=device)
        row = {k: r for r, k in enumerate(runs)}
        for k, item in group:
            mask[row[k]] |= item.mask.expand(shape)
        index = None if len(runs) == c else torch.tensor(runs, device=device)
        ops.append((group[0][1].value, mask, index))

    def fn(act: Tensor) -> Tensor:
        out = act.reshape(c, n, *act.shape[1:]).clone()
        for value, mask, index in ops:
            rows = out if index is None else out[index]
            if isinstance(value, Zero):
                rows = rows.masked_fill(mask, 0.0)
            elif isinstance(value, Scale):
                rows = torch.where(mask, rows * value.factor, rows)
            elif isinstance(value, Add):
                rows = torch.where(mask, rows + value.delta.to(rows), rows)
            else:
                rows = torch.where(mask, _value_tensor(value).to(rows), rows)
            if index is None:
                out = rows
            else:
                out[index] = rows
        return out.view(act.shape)

    return fn


def _bytes_per_run(
    model: HookedTransformer, n: int, n_query: int, n_pos: int, full_logits: bool
) -> int:
    """A generous estimate of the activation memory one run adds to a chunk's forward pass,
    computing ``n_query`` of the prompt's ``n_pos`` positions."""
    cfg = model.cfg
    d_mlp = 0 if cfg.attn_only else (cfg.d_mlp or 4 * cfg.d_model)
    per_position = (
        8 * cfg.d_model + 6 * cfg.n_heads * cfg.d_head + 4 * d_mlp + 3 * cfg.n_heads * n_pos
    )
    cached_keys_values = 2 * (n_pos - n_query) * cfg.n_heads * cfg.d_head
    outputs = (n_pos if full_logits else 1) * cfg.d_vocab * 2
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    return n * itemsize * (n_query * per_position + cached_keys_values + outputs)


def default_memory_budget(model: HookedTransformer) -> int:
    """Bytes of activations one chunk may use by default: half the free memory of the model's
    GPU, or 2 GiB on the CPU."""
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 * 1024**3
