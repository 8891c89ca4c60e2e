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
  nothing at a position before the earliest position a run touches can change either, so only
  the positions from there on are computed; attention reads the base run's cached keys and
  values for the earlier ones.
- A ``Metric`` reads one position per example, so only the final residual stream at those
  positions is normalised and unembedded, not the full ``[batch, pos, d_vocab]`` logits, and
  the last block computes its queries, attention output and MLP at those positions alone.
- A ``Metric`` that reads a few vocabulary entries there (a logit difference reads two) is
  found to, on the base run, as positions are for plain callables below: where its gradient
  with respect to the logits is not zero, confirmed by exactly the same values with every
  other entry random and then NaN. Each run then unembeds those entries alone (the
  unembedding's columns of every entry any example reads) and the metric gets them in a logits
  tensor that holds NaN everywhere else; a metric that reads the whole vocabulary (a softmax)
  gets all of it.
- A plain callable metric is probed once, on the base run, for the positions it reads: those
  where its gradient with respect to the logits is not zero. The probe is then confirmed: the
  metric must give exactly its values on the base logits when every other position holds NaN,
  and again when they hold random values. If so, each run unembeds those positions alone and
  the callable gets them in a logits tensor that holds NaN everywhere else; if not (a metric
  that cannot be differentiated, reads every position, or reads positions its gradient does
  not show), it gets the full logits and a warning says what that costs. The probe assumes
  that which positions a metric reads depends on the examples, not on the logits' values.
- A run whose first layer changes only activations that stay at their positions (a head's
  output at one position, say) changes that layer's output at that position alone: the layer
  is computed there alone, and its later positions are the base run's.
- Blocks run fused where ``circuitkit.core.blocks`` can compute them (fewer passes over memory,
  the same hook points); others run TransformerLens's forward.
- The hooks apply a whole chunk's interventions at once with ``torch.where`` over masks, not
  one Python call per run.
- The metric is called after the chunk's hooks are removed, as in the reference path: a metric
  that runs the model itself sees the plain model.
- On a GPU the loop over chunks only queues work: masks and run indices reach the device in
  one copy each, results stay there until the end, and the metric's values are checked once.
  Metrics are computed in float32 whatever the model's dtype. TF32 matrix products are used
  only inside ``tf32()``.

Reference path (``reference=True``): one plain ``run_with_hooks`` forward per run, computing the
full logits and calling the metric on them. Tests compare the two.

On a TransformerLens 4 ``TransformerBridge`` the runs are still stacked along the batch in
chunks, with one hook per hook point applying a chunk's interventions at once, but each chunk is
one whole forward of TransformerLens's own: a bridge runs its transformers model's blocks, which
compute every layer even when asked to start later and take no cached keys and values, so
nothing before a run's first patch can be skipped.

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
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.core import blocks
from circuitkit.core.components import Component, Resid, check_component, selection_mask
from circuitkit.core.errors import CircuitkitError, ComponentError, MetricError, ShapeError
from circuitkit.core.inputs import check_token_ids
from circuitkit.core.interventions import (
    Add,
    Intervention,
    MetricLike,
    Patch,
    Run,
    Scale,
    SetTo,
    Value,
    Zero,
    apply_value,
    narrowed,
    value_tensor,
)
from circuitkit.core.lens import (
    HookedTransformer,
    Model,
    TransformerLensKeyValueCacheEntry,
    apply_softcap,
    bridge_hooks,
    is_bridge,
)
from circuitkit.core.metrics import Metric, check_metric_output


@dataclass(frozen=True, eq=False)
class _Compiled:
    """One intervention resolved against a model and a base input."""

    hook: str
    mask: Tensor  # bool, broadcastable to the activation [n, ...]
    value: Value
    layer: int
    pos_dim: int  # the activation's (query) position dimension
    first_pos: int  # the first position the mask selects in any example; n_pos if none
    last_pos: int = -1  # the last position the mask selects in any example; -1 if none
    stays: bool = False  # the component's ``stays_at_its_positions``


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
    where: str | None = None,
) -> Float[Tensor, "n_runs n"]:
    """The metric of the base input ``tokens`` under each run of interventions.

    Each element of ``runs`` is an ``Intervention`` or a sequence of them applied together;
    an empty sequence is the unpatched base run. ``positions`` (a dataset's dict of [n] index
    tensors) resolves position words such as "end". ``max_runs_per_chunk`` caps the runs per
    forward pass. ``reference=True`` runs the slow, plainly written path: one
    ``run_with_hooks`` forward per run.

    ``memory_budget`` is a number of bytes (a positive int, or a float with no fractional
    part such as ``1e9``; default: 2 GiB on CPU, half the free memory on a GPU). It covers
    what the fast path keeps on the model's device for the whole call (the base run's cached
    residual streams, keys and values, the unembedding laid out for it, the tensors the runs
    put in, such as a ``Patch``'s source activations, each once, and for a plain callable
    metric the logits tensor it is given) plus the activations of one chunk's forward pass,
    by estimate; chunks are sized to what is left. It does not cover the model, the inputs,
    the returned results, or the one base forward and metric probe made before the chunks.
    When even one run does not fit, the runs go one per forward pass and a warning says how
    much that takes. A call whose results alone would not fit in the memory available is
    refused before any work.

    The metric is first evaluated on the unpatched base run, so a metric of the wrong shape
    fails before any patched run. A plain callable is then probed for the positions of the
    logits it reads (see the module's docstring), so it costs no more than a ``Metric`` when
    it reads a few; when it reads every one, a warning says so.

    ``where`` names the function the user called in error messages (a method passes its own
    name); it defaults to ``desc`` when that is given, else "run_interventions". ``desc``
    labels the progress bar.

    Returns the per-example metric, shape ``[len(runs), n]``, on the CPU.

    Example::

        z23 = clean_cache["blocks.23.attn.hook_z"]
        values = run_interventions(model, corrupted_tokens,
                                   [Intervention(Head(23, 2), Patch(z23))], metric)
    """
    if where is None:
        where = desc if desc != "interventions" else "run_interventions"
    memory_budget = check_memory_budget(memory_budget, where)
    tokens = _check_tokens(model, tokens, where)
    n = tokens.shape[0]
    runs = runs if isinstance(runs, Sized) else list(runs)
    # float32 results [n_runs, n], on the device and then on the CPU
    results_bytes = 4 * len(runs) * n
    _check_fits(model, len(runs), results_bytes, results_bytes, "their results", where)
    runs_list = _check_runs(model, runs, where)
    _check_metric_object(metric, n, where)
    if isinstance(metric, Metric):
        metric.check_positions(tokens.shape[1], where)
    if not runs_list:
        return torch.zeros(0, n)

    with torch.no_grad():
        if reference or is_bridge(model):
            # the metric's shape, checked on the plain model before one forward per run
            check_metric_values(metric(model(tokens).float()), n, where)
            compiled = _compile(model, tokens, runs_list, positions, where)
            if reference:
                return _run_reference(model, tokens, compiled, metric, progress, desc, where)
            budget = memory_budget if memory_budget is not None else default_memory_budget(model)
            return _run_bridge(
                model, tokens, compiled, metric, budget, max_runs_per_chunk, progress, desc, where
            )
        # resolved before the base run, whose cached activations the budget holds too
        budget = memory_budget if memory_budget is not None else default_memory_budget(model)
        # the base run is needed anyway; the metric on it fails before any chunk is computed
        base = base_run(model, tokens)
        if isinstance(metric, Metric):
            final = base.resid[model.cfg.n_layers]
            logits = read_logits(model, final, metric, 1, n, 0, base)
            values = metric_values(logits, metric, 1, n, where)
            metric = _column_metric(model, metric, logits[0].float(), values[0], base)
        else:
            metric = _probed_metric(model, metric, base, n, where)
        compiled = _compile(model, tokens, runs_list, positions, where)
        return _run_fast(
            model,
            tokens,
            compiled,
            metric,
            budget,
            max_runs_per_chunk,
            progress,
            desc,
            base=base,
            where=where,
            default_budget=memory_budget is None,
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
    The fast path starts each chunk at its first intervention or first recorded layer, and at
    the first position its interventions touch (earlier positions keep the base run's
    activations), and stops after the last recorded layer. ``reference=True`` runs one plain
    ``run_with_hooks`` forward per run.

    ``last_positions`` ([n], optional) says that only positions up to ``last_positions[i]`` of
    example ``i`` will be read: later positions then hold the base run's activations instead of
    the run's (in a causal model they cannot change the earlier ones).

    ``memory_budget`` is given as to ``run_interventions`` and covers, in the fast path, the
    base run's cached residual streams, keys and values and the tensors the runs put in, plus
    one chunk's activations and recordings, by estimate; it does not cover the model, the
    inputs, or the returned tensors, which are checked against the memory available before
    any work. When even one run does not fit, the runs go one per forward pass and a warning
    says how much that takes.

    Returns one tensor per component of ``record``, shape ``[len(runs), n, ...]``, on the
    model's device; components at the same hook share one tensor.

    Example::

        z23 = corrupted_cache["blocks.23.attn.hook_z"]
        [q10] = record_activations(model, clean_tokens,
                                   [Intervention(Head(23, 2), Patch(z23))], [Head(24, 4).q])
        q10.shape    # [1, n, pos, n_heads, d_head]
    """
    where = "record_activations"
    memory_budget = check_memory_budget(memory_budget, where)
    tokens = _check_tokens(model, tokens, where)
    runs = runs if isinstance(runs, Sized) else list(runs)
    record = list(record) if not isinstance(record, Component) else [record]
    if not record or not all(isinstance(c, Component) for c in record):
        raise CircuitkitError(
            f"{where}: record must be a non-empty list of components, got {record!r}"
        )
    for component in record:
        check_component(component, model, where)
    layers = {c.hook_name(model): (c.layer, c.pos_dim) for c in record}
    last = _check_last_positions(last_positions, tokens, where)

    with torch.no_grad():
        shapes = _activation_shapes(model, tokens, record)
        itemsize = torch.empty((), dtype=model.cfg.dtype).element_size()
        recorded_bytes = len(runs) * itemsize * sum(math.prod(shapes[name]) for name in layers)
        _check_fits(model, len(runs), recorded_bytes, 0, "the recorded activations", where)
        runs_list = _check_runs(model, runs, where)
        if not runs_list:
            acts = {
                name: torch.empty(0, *shapes[name], dtype=model.cfg.dtype, device=tokens.device)
                for name in layers
            }
        else:
            compiled = _compile(model, tokens, runs_list, positions, where)
            if reference:
                acts = _record_reference(model, tokens, compiled, layers, progress, desc)
            else:
                record_runs = _record_bridge if is_bridge(model) else _record_fast
                acts = record_runs(
                    model,
                    tokens,
                    compiled,
                    layers,
                    shapes,
                    memory_budget,
                    max_runs_per_chunk,
                    progress,
                    desc,
                )
            acts = _base_after_last(model, tokens, acts, layers, last)
    return [acts[c.hook_name(model)] for c in record]


def check_memory_budget(budget: object, where: str) -> int | None:
    """``budget`` as an int number of bytes (None stays None), or a CircuitkitError.

    A positive int is taken as it is, and so is a float with no fractional part (``1e9``,
    ``2.0**30``): that is how large numbers are often written. Anything else (a string such as
    "1GB", a negative number, zero, NaN, 1.5) is refused."""
    if budget is None:
        return None
    whole = isinstance(budget, numbers.Integral) or (
        isinstance(budget, float) and math.isfinite(budget) and budget.is_integer()
    )
    if isinstance(budget, bool) or not whole or budget < 1:  # type: ignore[operator]
        raise CircuitkitError(
            f"{where}: memory_budget must be a positive whole number of bytes (an int, or a "
            f"float such as 1e9), got {type(budget).__name__} {budget!r}; for 2 GiB pass "
            "2 * 1024**3"
        )
    return int(budget)  # type: ignore[call-overload]


# Host memory one run takes while a call compiles and runs it, beyond its results: its
# resolved interventions, its place in the chunk lists, the hooks' groups. Measured at about
# 0.7 KiB for a run of one intervention; a generous round figure.
_HOST_BYTES_PER_RUN = 2048


def _check_fits(
    model: HookedTransformer,
    n_runs: int,
    device_bytes: int,
    host_bytes: int,
    what: str,
    where: str,
) -> None:
    """Refuse, before any work, a call whose ``n_runs`` runs would not fit in memory:
    ``device_bytes`` for ``what`` on the model's device, ``host_bytes`` for them on the CPU,
    and ``_HOST_BYTES_PER_RUN`` each on the CPU."""
    host_bytes += n_runs * _HOST_BYTES_PER_RUN
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    needs = []
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        needs.append((device_bytes, free + cached, f"GPU memory ({device})"))
    else:
        host_bytes += device_bytes
    needs.append((host_bytes, _available_host_memory(), "CPU memory"))
    for need, available, kind in needs:
        if available is not None and need > available:
            raise CircuitkitError(
                f"{where}: {n_runs:,} runs need about {format_bytes(need)} of {kind} for "
                f"{what}, but {format_bytes(available)} is available; split the runs into "
                "several calls"
            )


def _available_host_memory() -> int | None:
    """Bytes of CPU memory available to new allocations (Linux's MemAvailable), or None where
    that is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def format_bytes(size: float) -> str:
    """``size`` bytes as a short text: "512 B", "3.2 MiB", "1.5 GiB".

    Example::

        format_bytes(3 * 1024**3)    # '3.0 GiB'
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    exponent = 0
    while abs(size) >= 1024 and exponent < len(units) - 1:
        size /= 1024
        exponent += 1
    return f"{size:.0f} B" if exponent == 0 else f"{size:.1f} {units[exponent]}"


def _check_last_positions(last: Tensor | None, tokens: Tensor, where: str) -> Tensor | None:
    """[n] the last position to record in each example, on the tokens' device, or None."""
    if last is None:
        return None
    n, n_pos = tokens.shape
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


def _base_after_last(
    model: HookedTransformer,
    tokens: Tensor,
    acts: dict[str, Tensor],
    record: Mapping[str, tuple[int, int]],
    last: Tensor | None,
) -> dict[str, Tensor]:
    """``acts`` with the base run's activations at every position after ``last[i]``."""
    if last is None:
        return acts
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in record)
    out = {}
    for name, act in acts.items():
        pos_dim = record[name][1]
        n_pos = act.shape[1 + pos_dim]
        index = torch.arange(n_pos, device=act.device)
        after = index[None, :] > last[:, None]  # [n, n_pos]
        trailing = [1] * (act.ndim - 2 - pos_dim)
        after = after.view(after.shape[0], *[1] * (pos_dim - 1), n_pos, *trailing)
        out[name] = torch.where(after, cache[name].to(act.dtype), act)
    return out


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
            check_component(intervention.component, model, where)
    return runs_list


def _check_tokens(model: HookedTransformer, tokens: Tensor, where: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ShapeError(f"{where}: tokens must be an integer [n, pos] tensor, got {shape}")
    tokens = check_token_ids(tokens, where, d_vocab=model.cfg.d_vocab)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ShapeError(
            f"{where}: tokens have {tokens.shape[1]} positions but the model's context "
            f"is {model.cfg.n_ctx}"
        )
    return tokens.to(model.cfg.device)


def _check_metric_object(metric: MetricLike, n: int, where: str) -> None:
    if isinstance(metric, Metric):
        if metric.n != n:
            raise ShapeError(
                f"{where}: the metric {metric.name!r} was made for {metric.n} examples "
                f"but the base input has {n}"
            )
    elif not callable(metric):
        raise CircuitkitError(
            f"{where}: metric must be a callable from logits [n, pos, d_vocab] to [n] values, "
            f"got {metric!r}"
        )


def check_metric_values(values: Tensor, n: int, where: str) -> Tensor:
    """``values`` if it is an [n] tensor (one value per example), else a ``MetricError`` that
    says what the metric returned; it does not read the values, so on a GPU it does not wait.

    Example::

        check_metric_values(metric(logits), n, "activation_patching")
    """
    if isinstance(values, Tensor) and values.shape == (n,):
        return values
    if isinstance(values, Tensor):
        got = f"a tensor of shape {tuple(values.shape)}"
        if values.ndim == 0:
            got += " (one number for the whole batch: leave out the mean or sum over examples)"
    else:
        got = type(values).__name__
    raise MetricError(
        f"{where}: the metric must return one value per example, shape ({n},), but it returned "
        f"{got}"
    )


def _compile(
    model: HookedTransformer,
    tokens: Tensor,
    runs: list[tuple[Intervention, ...]],
    positions: Mapping[str, Tensor] | None,
    where: str,
) -> list[list[_Compiled]]:
    """Resolve every intervention to (hook, mask, value) and check shapes and overlaps.

    Masks are built and checked on the CPU, where reading them costs no wait for the GPU, and
    copied to the model's device together; components that select the same entries share one
    mask, and value tensors are converted to the model's dtype and device once.
    """
    shapes = _activation_shapes(model, tokens, [i.component for run in runs for i in run])
    if positions is not None:
        positions = {word: index.cpu() for word, index in positions.items()}
    cpu_masks: dict[object, tuple[Tensor, int, int]] = {}
    resolved: list[list[tuple[str, object, Intervention]]] = []
    for run in runs:
        items = []
        for intervention in run:
            comp = intervention.component
            hook = comp.hook_name(model)
            key = _mask_key(comp, model, shapes[hook])
            if key not in cpu_masks:
                mask = selection_mask(comp, model, shapes[hook], positions, "cpu", where)
                first, last = _position_range(mask, comp.pos_dim)
                cpu_masks[key] = (mask, first, last)
            _check_value(intervention, shapes[hook])
            items.append((hook, key, intervention))
        masks_of_run = [cpu_masks[key][0] for _, key, _ in items]
        _check_no_overlap(run, masks_of_run, [h for h, _, _ in items], where)
        resolved.append(items)

    masks = _to_device({key: mask for key, (mask, _, _) in cpu_masks.items()}, tokens.device)
    values = _ValueCache(model.cfg.dtype, tokens.device)
    return [
        [
            _Compiled(
                hook,
                masks[key],
                values(intervention.value),
                intervention.component.layer,
                intervention.component.pos_dim,
                *cpu_masks[key][1:],
                # a block computing one position would cut a pattern's key axis too: whole rows
                intervention.component.stays_at_its_positions
                and intervention.component.pos_dim == 1,
            )
            for hook, key, intervention in items
        ]
        for items in resolved
    ]


def _activation_shapes(
    model: HookedTransformer, tokens: Tensor, components: Sequence[Component]
) -> dict[str, torch.Size]:
    """The shape of the activation of every component, from one base forward that stops after
    the last layer touched."""
    names = {c.hook_name(model) for c in components}
    shapes: dict[str, torch.Size] = {}
    if not names:  # only unpatched runs
        return shapes
    stop = max(c.layer for c in components) + 1
    with hooks_added(model, [(name, _shape_hook(shapes, name)) for name in names]):
        model(tokens, stop_at_layer=max(stop, 1))
    return shapes


def _shape_hook(shapes: dict[str, torch.Size], name: str) -> Callable[[Tensor], None]:
    def hook(act: Tensor) -> None:
        shapes[name] = act.shape

    return hook


def _position_range(mask: Tensor, pos_dim: int) -> tuple[int, int]:
    """The first and last positions a selection mask selects in any example; (its length, -1)
    if none."""
    n_pos = mask.shape[pos_dim]
    selected = mask.movedim(pos_dim, 0).reshape(n_pos, -1).any(dim=1).nonzero()
    return (int(selected[0]), int(selected[-1])) if len(selected) else (n_pos, -1)


def _mask_key(component: Component, model: HookedTransformer, shape: torch.Size) -> object:
    """What a component's selection mask depends on: components with equal keys (the same head
    and position in different layers, say) select the same entries."""
    pos = getattr(component, "pos", None)
    if isinstance(pos, (slice, list)):  # unhashable (a slice before Python 3.12)
        pos = repr(pos)
    return (component.pos_dim, component.unit(model), pos, tuple(shape))


def _to_device(masks: dict[object, Tensor], device: torch.device) -> dict[object, Tensor]:
    """The CPU tensors of ``masks`` on ``device``, in one copy that does not wait for the GPU."""
    if device.type == "cpu" or not masks:
        return masks
    flat = torch.cat([mask.reshape(-1) for mask in masks.values()])
    flat = _pinned(flat).to(device, non_blocking=True)
    out, begin = {}, 0
    for key, mask in masks.items():
        out[key] = flat[begin : begin + mask.numel()].view(mask.shape)
        begin += mask.numel()
    return out


def _pinned(tensor: Tensor) -> Tensor:
    # A copy from page-locked memory is queued without waiting for the GPU to finish its work.
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def _index_tensor(indices: Sequence[int], device: torch.device) -> Tensor:
    """``indices`` as a long tensor on ``device``, copied without waiting for the GPU."""
    tensor = torch.tensor(indices, dtype=torch.long)
    if device.type == "cpu":
        return tensor
    return _pinned(tensor).to(device, non_blocking=True)


class _ValueCache:
    """Values with their tensors in the model's dtype and on its device, converted once per
    tensor, so runs that shared a value tensor still share one."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.tensors: dict[int, tuple[Tensor, Tensor]] = {}

    def tensor(self, tensor: Tensor) -> Tensor:
        if tensor.dtype == self.dtype and tensor.device == self.device:
            return tensor
        if id(tensor) not in self.tensors:  # keep the original alive so its id stays unique
            self.tensors[id(tensor)] = (tensor, tensor.to(self.device, self.dtype))
        return self.tensors[id(tensor)][1]

    def __call__(self, value: Value) -> Value:
        tensor = value_tensor(value)
        if tensor is None or self.tensor(tensor) is tensor:
            return value
        kind = type(value)  # Patch, SetTo or Add: each holds its one tensor
        return kind(self.tensor(tensor))


def _check_value(intervention: Intervention, act_shape: torch.Size) -> None:
    value = intervention.value
    if isinstance(value, Scale):
        if not isinstance(value.factor, (int, float)):
            raise CircuitkitError(
                f"{intervention.component!r}: Scale.factor must be a number, got {value.factor!r}"
            )
        return
    tensor = value_tensor(value)
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


def _check_no_overlap(
    run: tuple[Intervention, ...], run_masks: list[Tensor], hooks: list[str], where: str
) -> None:
    by_hook: dict[str, list[int]] = {}
    for index, hook in enumerate(hooks):
        by_hook.setdefault(hook, []).append(index)
    for indices in by_hook.values():
        if len(indices) < 2:
            continue
        masks = [run_masks[i] for i in indices]
        shape = torch.broadcast_shapes(*(m.shape for m in masks))
        total = sum(m.expand(shape).to(torch.int16) for m in masks)
        if int(total.max()) > 1:  # type: ignore[union-attr]
            names = ", ".join(repr(run[i].component) for i in indices)
            raise ComponentError(
                f"{where}: interventions in one run select the same activation entries "
                f"({names}); give each entry at most one value per run"
            )


def _run_reference(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    metric: MetricLike,
    progress: bool,
    desc: str,
    where: str = "run_interventions",
) -> Tensor:
    n = tokens.shape[0]
    out = []
    for items in tqdm(compiled, desc=f"{desc} (reference)", disable=not progress, leave=False):
        fwd_hooks = [(item.hook, _reference_hook(item)) for item in items]
        logits = model.run_with_hooks(tokens, fwd_hooks=bridge_hooks(model, fwd_hooks))
        values = metric(logits.float())  # the metric in float32 whatever the model's dtype
        check_metric_values(values, n, where)
        out.append(check_metric_output(values, n, where).float().cpu())
    return torch.stack(out)


def _reference_hook(item: _Compiled) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        return apply_value(act, item.mask, item.value)

    return hook


def _record_reference(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    record: Mapping[str, tuple[int, int]],
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    recorded: dict[str, list[Tensor]] = {name: [] for name in record}
    for items in tqdm(compiled, desc=f"{desc} (reference)", disable=not progress, leave=False):
        fwd_hooks = [(item.hook, _reference_hook(item)) for item in items]
        # added after the interventions, so they see the activations the interventions made
        fwd_hooks += [(name, _store_hook(recorded[name])) for name in record]
        model.run_with_hooks(tokens, fwd_hooks=bridge_hooks(model, fwd_hooks), return_type=None)
    return {name: torch.stack(acts) for name, acts in recorded.items()}


def _store_hook(into: list[Tensor]) -> Callable:
    def hook(act: Tensor, hook) -> None:
        into.append(act.clone())

    return hook


def _run_bridge(
    model: Model,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    metric: MetricLike,
    memory_budget: int,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
    where: str,
) -> Tensor:
    """The runs on a ``TransformerBridge``: chunks of runs stacked along the batch, each chunk
    one forward of TransformerLens's own, with one hook per hook point applying all of the
    chunk's interventions at once (``_chunk_hooks``).

    A bridge runs its Hugging Face model's blocks, which take no cached keys and values and
    compute every layer even when asked to start later (``start_at_layer``), so every run
    starts at the embeddings and computes every position; unpatched runs are not computed."""
    n, n_pos = tokens.shape
    results = torch.empty(len(compiled), n, device=tokens.device)
    touched = [r for r, items in enumerate(compiled) if any(i.first_pos < n_pos for i in items)]
    if len(touched) < len(compiled):
        base_logits = _bridge_read(model(tokens), metric, 1, n)
        base_values = metric_values(base_logits, metric, 1, n, where)[0]
        results[:] = base_values.float()
    per_run = bytes_per_run(model, n, n_pos, n_pos, full_logits=True)
    size = runs_per_chunk(model, per_run, memory_budget, max_runs_per_chunk)
    with tqdm(total=len(touched), desc=desc, disable=not progress, leave=False) as bar:
        for begin in range(0, len(touched), size):
            chunk = touched[begin : begin + size]
            c = len(chunk)
            hooks = _chunk_hooks([compiled[r] for r in chunk], c, n, 0)
            with hooks_added(model, hooks.items()):
                logits = model(_tile(tokens, c))
            # with the hooks removed, as in the reference path
            values = metric_values(_bridge_read(logits, metric, c, n), metric, c, n, where)
            results[torch.tensor(chunk, device=results.device)] = values.float()
            bar.update(c)
    return _check_finite(results.cpu(), where)


def _bridge_read(logits: Tensor, metric: MetricLike, c: int, n: int) -> Tensor:
    """A chunk's logits [c * n, pos, d_vocab] as ``metric_values`` takes them: [c, n, d_vocab]
    at a ``Metric``'s positions, else the full [c, n, pos, d_vocab]."""
    logits = logits.view(c, n, *logits.shape[1:])
    if isinstance(metric, Metric):
        rows = torch.arange(n, device=logits.device)
        return logits[:, rows, metric.positions.to(logits.device)]
    return logits


def _record_bridge(
    model: Model,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    record: Mapping[str, tuple[int, int]],
    shapes: Mapping[str, torch.Size],
    memory_budget: int | None,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    """``record_activations`` on a ``TransformerBridge``: chunks of runs stacked along the batch
    through TransformerLens's own forward (as ``_run_bridge``), stopping after the last
    recorded layer."""
    n, n_pos = tokens.shape
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    stop = max(layer for layer, _ in record.values()) + 1
    itemsize = torch.empty((), dtype=model.cfg.dtype).element_size()
    recorded_per_run = itemsize * sum(math.prod(shapes[name]) for name in record)
    per_run = bytes_per_run(model, n, n_pos, n_pos, full_logits=False) + recorded_per_run
    size = runs_per_chunk(model, per_run, budget, max_runs_per_chunk)
    recorded: dict[str, list[Tensor]] = {name: [] for name in record}
    with tqdm(total=len(compiled), desc=desc, disable=not progress, leave=False) as bar:
        for begin in range(0, len(compiled), size):
            chunk = compiled[begin : begin + size]
            c = len(chunk)

            def store(act: Tensor, name: str, c: int = c) -> None:
                recorded[name].append(act.reshape(c, n, *act.shape[1:]).clone())

            hooks = [
                *_chunk_hooks(chunk, c, n, 0).items(),
                # added after the interventions, so they see the activations the interventions made
                *[(name, lambda act, name=name: store(act, name)) for name in record],
            ]
            with hooks_added(model, hooks):
                model(_tile(tokens, c), stop_at_layer=stop)
            bar.update(c)
    return {name: torch.cat(acts) for name, acts in recorded.items()}


def _run_fast(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    metric: MetricLike | _ProbedMetric,
    memory_budget: int | None,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
    *,
    base: BaseRun | None = None,
    where: str = "run_interventions",
    default_budget: bool = False,
) -> Tensor:
    n, n_pos = tokens.shape
    device = tokens.device
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    base = base_run(model, tokens) if base is None else base
    starts = [_start_of(model, items, n_pos, base.reuses_prefix) for items in compiled]
    if isinstance(metric, Metric):  # read positions on the device once, not once per chunk
        metric = dataclasses.replace(metric, positions=metric.positions.to(device))
    # a metric that reads one position per example: the last block computes only those
    one_read = None
    if isinstance(metric, (Metric, _ColumnMetric)):
        one_read = metric.positions
    elif isinstance(metric, _ProbedMetric) and metric.positions.shape[1] == 1:
        one_read = metric.positions[:, 0]
    # the budget holds what the call keeps throughout; chunks get what is left
    kept = kept_bytes(base) + values_bytes(compiled)
    if isinstance(metric, _ProbedMetric):
        kept += metric.buffer.numel() * metric.buffer.element_size()
    # the largest run computes every position from the earliest one any run starts at
    earliest = min(pos for _, pos, _ in starts)
    largest = bytes_per_run(model, n, n_pos - earliest, n_pos, one_read is None)
    warn_if_over_budget(where, budget, default_budget, kept, largest)

    def chunk_size(key: tuple[int, int, bool]) -> int:
        per_run = bytes_per_run(model, n, n_pos - key[0], n_pos, one_read is None)
        return runs_per_chunk(model, per_run, max(budget - kept, 0), max_runs_per_chunk)

    # Chunks go position by position, so those that start at one position share the earlier
    # positions' keys and values (``_prefix``). Runs whose interventions all sit in the block
    # they start at share a chunk with the other such runs at their position, whatever their
    # layer (``merged_chunks``): fewer, larger forward passes. The loop queues work on the
    # device and never waits for it: the chunks' run indices go to the device in one copy, and
    # results stay there until the end.
    single = [
        _in_one_block(model, items, start) for items, start in zip(compiled, starts, strict=True)
    ]
    chunks = list(merged_chunks(starts, single, chunk_size))
    order = _index_tensor([r for chunk in chunks for group in chunk for r in group], device)
    results = torch.empty(len(compiled), n, device=device)
    done = 0
    with (
        tqdm(total=len(compiled), desc=desc, disable=not progress, leave=False) as bar,
        _attention_kernels(model, n_pos),
    ):
        for chunk in chunks:
            c = sum(len(group) for group in chunk)
            pos = starts[chunk[0][0]][1]
            # the last block need compute only the positions the metric reads
            read = None if one_read is None else (one_read - pos).clamp(min=0)
            if len(chunk) == 1 and not single[chunk[0][0]]:
                [group] = chunk
                layer, pos, alone = starts[group[0]]
                hooks = _chunk_hooks(
                    [compiled[r] for r in group], c, n, pos, alone_in=layer if alone else None
                )
                with hooks_added(model, hooks.items()):
                    residual = run_blocks(
                        model,
                        tokens,
                        c,
                        layer,
                        pos,
                        model.cfg.n_layers,
                        base,
                        first_alone=alone,
                        read=None if read is None else read.repeat(c),
                    )
                    logits = read_logits(
                        model, residual, metric, c, n, pos, base, at_read=read is not None
                    )
            else:
                residual = _run_merged(model, tokens, compiled, chunk, starts, base, read)
                logits = read_logits(
                    model, residual, metric, c, n, pos, base, at_read=read is not None
                )
            # with the hooks removed, as in the reference path: a metric that runs the model
            # itself sees the plain model
            values = metric_values(logits, metric, c, n, where)
            results[order[done : done + c]] = values.float()
            done += c
            bar.update(c)
    return _check_finite(results.cpu(), where)


def _in_one_block(
    model: HookedTransformer, items: list[_Compiled], start: tuple[int, int, bool]
) -> bool:
    """Whether every intervention of a run sits on a hook point of the block it starts at: the
    blocks after it then run the run as they run any other (``_run_merged``)."""
    layer = start[0]
    if not 0 <= layer < model.cfg.n_layers:
        return False
    inside = f"blocks.{layer}."
    return all(item.layer == layer and item.hook.startswith(inside) for item in items)


def merged_chunks(
    starts: list[tuple[int, int, bool]],
    single: list[bool],
    chunk_size: Callable[[tuple], int],
) -> Iterator[list[list[int]]]:
    """Run indices in chunks, each a list of groups of one start ``(layer, pos, alone)``.

    Runs whose interventions sit in one block (``single``) go together with the other such
    runs at their position, in layer order, up to ``chunk_size`` runs (which reads the
    position, the first item of the tuple it is given, alone); every other run goes in a
    chunk of one group, of runs that start at the same layer and position, as
    ``chunk_groups`` makes them."""
    by_pos = [(pos, layer, alone) for layer, pos, alone in starts]
    merge = sorted((r for r in range(len(starts)) if single[r]), key=lambda r: by_pos[r])
    rest = [r for r in range(len(starts)) if not single[r]]
    for chunk in chunk_groups([by_pos[r] for r in rest], chunk_size):
        yield [[rest[i] for i in chunk]]
    # chunks of one position each; the sort in chunk_groups is stable, so layer order stays
    for chunk in chunk_groups([by_pos[r][:1] for r in merge], chunk_size):
        groups: list[list[int]] = []
        for r in (merge[i] for i in chunk):
            if groups and starts[groups[-1][0]] == starts[r]:
                groups[-1].append(r)
            else:
                groups.append([r])
        yield groups


def _run_merged(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    chunk: list[list[int]],
    starts: list[tuple[int, int, bool]],
    base: BaseRun,
    read: Tensor | None,
) -> Tensor:
    """The final residual stream of a chunk of ``merged_chunks`` (its groups' runs in order),
    as ``run_blocks`` gives it.

    Block by block: the runs that started at earlier layers go through the block together
    with the groups that start at it and compute the same positions, whose interventions act
    on their own rows alone; a group that computes its first block's first position alone
    goes through it by itself. In the last block, where the runs passing through compute only
    the read positions, every group that starts there goes by itself too. ``read`` ([n]
    indices into the positions from the chunk's position on) as for ``run_blocks``, per
    example."""
    n = tokens.shape[0]
    pos = starts[chunk[0][0]][1]
    last = model.cfg.n_layers - 1
    merged: Tensor | None = None
    c_merged = 0
    group = 0

    def through(layer: int, c: int, hooks: dict[str, Callable], **kwargs) -> Tensor:
        """Block ``layer`` for c runs, with ``hooks`` on it; at the read positions alone in the
        last block."""
        at = None if read is None or layer < last else read
        with hooks_added(model, hooks.items()):
            return run_blocks(
                model,
                tokens,
                c,
                layer,
                pos,
                layer + 1,
                base,
                read=None if at is None else at.repeat(c),
                **kwargs,
            )

    for layer in range(starts[chunk[0][0]][0], last + 1):
        here = []
        while group < len(chunk) and starts[chunk[group][0]][0] == layer:
            here.append(chunk[group])
            group += 1
        joined = [runs for runs in here if not starts[runs[0]][2]]
        # groups come in the order of their starts, those computing every position first
        at_read = read is not None and layer == last
        if merged is None or at_read or here[: len(joined)] != joined:
            joined = []
        apart = here[len(joined) :]
        parts = []
        if merged is not None:
            items = [[] for _ in range(c_merged)] + [compiled[r] for g in joined for r in g]
            c = len(items)
            residual = merged
            if joined:
                entering = _tile(base.resid[layer][:, pos:], c - c_merged)
                residual = torch.cat([merged, entering])
            merged = through(layer, c, _chunk_hooks(items, c, n, pos), residual=residual)
            parts.append(merged)
            c_merged = c
        for runs in apart:
            c = len(runs)
            alone = starts[runs[0]][2]
            hooks = _chunk_hooks(
                [compiled[r] for r in runs], c, n, pos, alone_in=layer if alone else None
            )
            parts.append(through(layer, c, hooks, first_alone=alone))
            c_merged += c
        merged = parts[0] if len(parts) == 1 else torch.cat(parts)
    assert merged is not None
    return merged


@contextmanager
def _attention_kernels(model: HookedTransformer, n_pos: int) -> Iterator[None]:
    """The attention kernels for the engine's batches: many short prompts.

    Measured on an H200 for a chunk of 1,200 rows, 8 queries and 15 keys: in float32 the plain
    kernels ("math") take 0.29 ms and the memory-efficient one 0.51 ms; in bfloat16 the
    memory-efficient one 0.23 ms and cuDNN's, which PyTorch would pick, 0.79 ms. On a CPU the
    flash kernel is the faster one in float32 too: 33 ms against 76 ms for the plain kernels at
    960 rows, 12 heads, 8 queries and 15 keys (2 cores), 1.4-4.5x at other such shapes."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # PyTorch before 2.3: its own choice
        yield
        return
    on_gpu = next(model.parameters()).device.type == "cuda"
    if on_gpu and model.cfg.dtype == torch.float32 and n_pos <= 64:
        backends = [SDPBackend.MATH]
    else:
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        yield


def _check_finite(results: Float[Tensor, "n_runs n"], where: str) -> Tensor:
    """``results``, after checking at once what each chunk's metric returned."""
    finite = torch.isfinite(results).all(dim=1)
    if not finite.all():
        run = int((~finite).nonzero()[0])
        raise MetricError(
            f"{where}: the metric returned NaN or infinite values: {results[run]} (run {run})"
        )
    return results


def _start_of(
    model: HookedTransformer, items: list[_Compiled], n_pos: int, reuses_prefix: bool
) -> tuple[int, int, bool]:
    """``(layer, position, alone)``: where a run must be recomputed from.

    Nothing before the earliest layer a run touches changes, and, the model being causal,
    nothing at a position before the earliest position it touches. A run that selects
    nothing (or no run at all) starts after the last layer: it is the base run.

    ``alone`` is true when, in its first layer, the run only changes activations that stay at
    their positions (``Component.stays_at_its_positions``: a head's output, say) at the one
    first position: that layer's output then changes at that position alone, and the layer
    is computed there alone.
    """
    n_layers = model.cfg.n_layers
    pos = min((item.first_pos for item in items), default=n_pos)
    if pos >= n_pos:
        return n_layers, 0, False
    layer = min(item.layer for item in items)
    if not reuses_prefix:
        return layer, 0, False
    alone = layer >= 0 and all(
        item.stays and item.first_pos == item.last_pos == pos
        for item in items
        if item.layer == layer
    )
    return layer, pos, alone


def _record_fast(
    model: HookedTransformer,
    tokens: Tensor,
    compiled: list[list[_Compiled]],
    record: Mapping[str, tuple[int, int]],
    shapes: Mapping[str, torch.Size],
    memory_budget: int | None,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    n, n_pos = tokens.shape
    # A chunk must reach the first recorded layer and need not go past the last one. It
    # starts at the first position its runs touch (the earlier ones are the base run's).
    layers = [layer for layer, _ in record.values()]
    first, stop = min(layers), max(layers) + 1
    # resolved before the base run, whose cached activations the budget holds too
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    base = base_run(model, tokens)

    def start(items: list[_Compiled]) -> tuple[int, int]:
        layer = min([item.layer for item in items] + [first])
        pos = min((item.first_pos for item in items), default=n_pos)
        if not base.reuses_prefix or layer < 0 or pos >= n_pos:
            return layer, 0
        return layer, pos

    starts = [start(items) for items in compiled]
    itemsize = torch.empty((), dtype=model.cfg.dtype).element_size()
    recorded_per_run = itemsize * sum(math.prod(shapes[name]) for name in record)
    per_run = bytes_per_run(model, n, n_pos, n_pos, full_logits=False) + recorded_per_run
    kept = kept_bytes(base) + values_bytes(compiled)
    warn_if_over_budget("record_activations", budget, memory_budget is None, kept, per_run)
    size = runs_per_chunk(model, per_run, max(budget - kept, 0), max_runs_per_chunk)

    chunks = list(chunk_groups(starts, lambda start: size))
    order = _index_tensor([r for chunk in chunks for r in chunk], tokens.device)
    recorded: dict[str, Tensor] = {}
    if any(pos > 0 for _, pos in starts):  # earlier positions hold the base run's activations
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in record)
        for name in record:
            recorded[name] = _tile(cache[name], len(compiled)).view(len(compiled), *shapes[name])
    done = 0
    with (
        tqdm(total=len(compiled), desc=desc, disable=not progress, leave=False) as bar,
        _attention_kernels(model, n_pos),
    ):
        for chunk in chunks:
            c = len(chunk)
            rows = order[done : done + c]
            done += c
            layer, pos = starts[chunk[0]]

            def store(act: Tensor, name: str, rows: Tensor = rows, c: int = c) -> None:
                if name not in recorded:
                    recorded[name] = act.new_empty(len(compiled), n, *act.shape[1:])
                view = act.view(c, n, *act.shape[1:])
                pos_dim = record[name][1]
                at = n_pos - view.shape[1 + pos_dim]  # the positions computed: ``pos`` on
                where = [slice(None)] * (view.ndim - 2)
                where[pos_dim - 1] = slice(at, n_pos)
                recorded[name][(rows, slice(None), *where)] = view

            hooks = [
                *_chunk_hooks([compiled[r] for r in chunk], c, n, pos).items(),
                # added after the interventions, so they see the activations the interventions made
                *[(name, lambda act, name=name: store(act, name)) for name in record],
            ]
            with hooks_added(model, hooks):
                run_blocks(model, tokens, c, layer, pos, stop, base)
            bar.update(c)
    return recorded


@dataclass
class BaseRun:
    """What the patched runs reuse from the unpatched base run.

    ``resid[l]`` is the residual stream entering block ``l`` (``resid[n_layers]`` the final
    one); ``keys[l]`` and ``values[l]`` are block ``l``'s attention keys and values (before
    rotary), which positions before a run's first patched position share with the base run.
    """

    resid: dict[int, Tensor]
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    shortformer_pos_embed: Tensor | None
    attention_mask: Tensor | None
    # each fused block's weights, laid out once per call (see ``circuitkit.core.blocks``); None for
    # blocks that run TransformerLens's forward
    block_weights: dict[int, blocks.BlockWeights | None] = field(default_factory=dict)
    # the earlier positions' keys and values of each prompt, by (layer, pos)
    prefixes: dict[tuple[int, int], blocks.Past] = field(default_factory=dict)
    masks: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    # the unembedding laid out for aligned matrix products (see ``unembed_residual``)
    unembed: tuple[Tensor, Tensor] | None = None

    @property
    def reuses_prefix(self) -> bool:
        # With an explicit attention mask (left padding) positions are not plain indices;
        # such runs recompute every position.
        return self.attention_mask is None


def base_run(model: HookedTransformer, tokens: Tensor) -> BaseRun:
    """One forward of the base input, keeping each block's input, keys and values."""
    residual, _, shortformer, attention_mask = model.input_to_embed(tokens)
    base = BaseRun({}, {}, {}, shortformer, attention_mask)
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


def kept_bytes(base: BaseRun) -> int:
    """Bytes of the base run's cached activations (and of the unembedding laid out for it)
    that a call keeps until it ends."""
    tensors = [*base.resid.values(), *base.keys.values(), *base.values.values()]
    tensors += [t for t in (base.shortformer_pos_embed, base.attention_mask) if t is not None]
    tensors += list(base.unembed or ())
    return sum(t.numel() * t.element_size() for t in tensors)


def values_bytes(compiled: list[list[_Compiled]]) -> int:
    """Bytes of the tensors the runs put in (a ``Patch``'s source activations, a mean for
    ``SetTo``, ...) as the call holds them on the device, each storage once."""
    storages: dict[int, int] = {}
    for items in compiled:
        for item in items:
            tensor = value_tensor(item.value)
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def warn_if_over_budget(where: str, budget: int, default: bool, kept: int, per_run: int) -> None:
    """Warn when the memory budget cannot hold what the call keeps (``kept`` bytes) plus one run
    (``per_run``). Called once per call from ``_run_fast`` or ``_record_fast``, so the warning
    points at the line that called ``run_interventions`` or ``record_activations``."""
    if kept + per_run <= budget:
        return
    given = "the default memory budget" if default else "memory_budget"
    warnings.warn(
        f"{where}: {given} of {format_bytes(budget)} cannot be met: the base run's cached "
        f"activations and the runs' values take {format_bytes(kept)} and one run "
        f"{format_bytes(per_run)} more; "
        f"computing one run per forward pass (about {format_bytes(kept + per_run)})",
        UserWarning,
        stacklevel=4,
    )


def runs_per_chunk(
    model: HookedTransformer, per_run: int, memory_budget: int | None, max_runs: int | None
) -> int:
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    size = max(1, int(budget // per_run))
    return size if max_runs is None else max(1, min(size, max_runs))


def chunk_groups(starts: list[tuple], chunk_size: Callable[[tuple], int]) -> Iterator[list[int]]:
    """Run indices in chunks of one start and at most ``chunk_size(start)`` runs each."""
    # Runs that start at the same layer and position go together, so no chunk starts earlier
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
def hooks_added(
    model: HookedTransformer, hooks: Iterable[tuple[str, Callable[[Tensor], Tensor | None]]]
) -> Iterator[None]:
    """Forward hooks ``fn(activation) -> replacement or None`` on hook points, in the order
    given, removed on exit (also when an exception is raised).

    On a ``TransformerBridge`` they go through its own ``hooks`` context: a bridge's hook point
    may hold an activation in another layout (``hook_z`` is ``attn.o.hook_in``, whose output is
    [batch, pos, d_model]) that only its hook conversion turns into TransformerLens's."""
    if is_bridge(model):
        fwd_hooks = [(name, lambda act, hook, fn=fn: fn(act)) for name, fn in hooks]
        with model.hooks(fwd_hooks=bridge_hooks(model, fwd_hooks)):
            yield
        return
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


def run_blocks(
    model: HookedTransformer,
    tokens: Tensor,
    c: int,
    start: int,
    pos: int,
    stop: int,
    base: BaseRun,
    *,
    first_alone: bool = False,
    read: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """The residual stream after block ``stop - 1`` for a chunk of c runs (a c * n batch), at
    positions ``pos`` onwards; with ``read`` ([c * n] indices into those positions), at the
    read positions alone ([c * n, 1, d_model]).

    It starts from the base run's residual stream before block ``start`` (from the embeddings
    when ``start`` is negative), or from ``residual`` ([c * n, positions from ``pos``,
    d_model]) when given; the blocks read the base run's keys and values for the positions
    before ``pos``. With ``first_alone`` block ``start`` computes position ``pos``
    alone, and the later positions of its output are the base run's. Blocks that
    ``circuitkit.core.blocks`` can compute (and whose skipped hook points carry no hook) run
    fused; the others run TransformerLens's forward. A last block with no hook at all then
    computes only what the read positions need.
    """
    attention_mask = None if base.attention_mask is None else _tile(base.attention_mask, c)
    # positions computed in the first block: one with first_alone, else all from pos on
    end = pos + 1 if first_alone else None
    if start < 0:
        residual, _, shortformer, attention_mask = model.input_to_embed(_tile(tokens, c))
        residual = residual[:, pos:]
        start = 0
    else:
        if residual is None:
            residual = _tile(base.resid[start][:, pos:end], c)
        shortformer = base.shortformer_pos_embed
        shortformer = None if shortformer is None else _tile(shortformer, c)
    if shortformer is not None:
        shortformer = shortformer[:, pos:]
    fuse = _FUSED_BLOCKS and attention_mask is None and shortformer is None
    for layer in range(start, stop):
        alone = first_alone and layer == start
        block = model.blocks[layer]
        weights = _weights(base, block, layer) if fuse else None
        if weights is not None and blocks.skipped_hooks_free(block):
            at_read = read is not None and layer == stop - 1 and not alone
            at_read = at_read and blocks.hooks_free(block)
            past = _prefix(base, block, layer, pos) if pos > 0 else None
            if at_read:
                mask = blocks.read_mask(read, pos, pos + residual.shape[1])
            else:
                mask = _causal_mask(base, residual.shape[1], pos, residual.device)
            residual = blocks.block_forward(
                block, residual, past, weights, mask=mask, read=read if at_read else None
            )
            if at_read:
                return residual
        else:
            entry = None
            if pos > 0:
                entry = TransformerLensKeyValueCacheEntry(
                    _tile(base.keys[layer][:, :pos], c),
                    _tile(base.values[layer][:, :pos], c),
                    frozen=True,
                )
            positional = shortformer
            if alone and shortformer is not None:
                positional = shortformer[:, :1]
            residual = block(
                residual,
                shortformer_pos_embed=positional,
                past_kv_cache_entry=entry,
                attention_mask=attention_mask,
            )
        if alone:  # the later positions of this block's output are the base run's
            later = _tile(base.resid[layer + 1][:, pos + 1 :], c)
            residual = torch.cat([residual, later], dim=1)
    if read is not None:
        residual = residual[torch.arange(len(read), device=read.device), read][:, None]
    return residual


# Off only to measure what fusing the blocks gains (benchmarks/bench_gpu.py).
_FUSED_BLOCKS = True


def _prefix(base: BaseRun, block: torch.nn.Module, layer: int, pos: int) -> blocks.Past:
    """The base run's keys and values before ``pos`` in block ``layer``, once per prompt.

    Chunks come position by position, so each is made once for all the chunks that start at
    ``pos``, and those of the previous position are let go."""
    key = (layer, pos)
    if key not in base.prefixes:
        if base.prefixes and next(iter(base.prefixes))[1] != pos:
            base.prefixes.clear()
        keys, values = base.keys[layer][:, :pos], base.values[layer][:, :pos]
        base.prefixes[key] = blocks.past(block, keys, values)
    return base.prefixes[key]


def _causal_mask(base: BaseRun, n_query: int, pos: int, device: torch.device) -> Tensor | None:
    """Which keys each of ``n_query`` queries after ``pos`` earlier positions sees; None when
    there are no earlier positions (plainly causal)."""
    if pos == 0:
        return None
    if (n_query, pos) not in base.masks:
        base.masks[n_query, pos] = blocks.causal_mask(n_query, pos, device)
    return base.masks[n_query, pos]


def _weights(base: BaseRun, block: torch.nn.Module, layer: int) -> blocks.BlockWeights | None:
    """The block's weights laid out for ``circuitkit.core.blocks``, once per call; None when the
    block is not one it computes."""
    if layer not in base.block_weights:
        fusable = blocks.fusable(block)
        base.block_weights[layer] = blocks.block_weights(block) if fusable else None
    return base.block_weights[layer]


def read_metric(
    model: HookedTransformer,
    residual: Tensor,
    metric: MetricLike,
    c: int,
    n: int,
    pos: int,
    base: BaseRun,
    *,
    at_read: bool = False,
    where: str = "run_interventions",
) -> Tensor:
    """The metric [c, n] of a chunk from its final residual stream [c * n, pos..., d_model],
    which holds the positions from ``pos`` on; earlier ones are the base run's. With
    ``at_read`` (a ``Metric`` only) the residual stream holds the read positions alone.
    ``where`` names the calling function in the error a metric of the wrong shape raises.

    It is ``read_logits`` then ``metric_values``; a caller with hooks on the model calls the
    first with them and the second without."""
    logits = read_logits(model, residual, metric, c, n, pos, base, at_read=at_read)
    return metric_values(logits, metric, c, n, where)


def read_logits(
    model: HookedTransformer,
    residual: Tensor,
    metric: MetricLike | _ProbedMetric,
    c: int,
    n: int,
    pos: int,
    base: BaseRun,
    *,
    at_read: bool = False,
) -> Tensor:
    """The logits the metric reads in a chunk, from its final residual stream as for
    ``read_metric``: ``[c, n, d_vocab]`` at a ``Metric``'s positions, ``[c, n, k]`` at the k
    vocabulary entries of each example a ``_ColumnMetric`` reads there, ``[c, n, k, d_vocab]``
    at the k positions a probed callable reads, else the full ``[c, n, n_pos, d_vocab]``."""
    final = base.resid[model.cfg.n_layers]
    if isinstance(metric, (Metric, _ProbedMetric, _ColumnMetric)):
        read = metric.positions.to(residual.device)
        read = (read[:, None] if read.ndim == 1 else read).repeat(c, 1)  # [c * n, k]
        rows = torch.arange(c * n, device=residual.device)[:, None]
        # an example whose read position comes before ``pos`` is unchanged by the run
        patched = residual if at_read else residual[rows, (read - pos).clamp(min=0)]
        unchanged = final[rows % n, read]
        read_resid = torch.where((read >= pos)[..., None], patched, unchanged)
        if isinstance(metric, _ColumnMetric):
            return metric.logits(model, read_resid[:, 0].view(c, n, -1))
        if isinstance(metric, _ProbedMetric):
            return metric.logits(model, read_resid.view(c, n, *read_resid.shape[1:]), base)
        logits = unembed_residual(model, read_resid, base)
        return logits.view(c, n, *logits.shape[1:])[:, :, 0]
    residual = torch.cat([_tile(final[:, :pos], c), residual], dim=1)
    return unembed_residual(model, residual).view(c, n, *residual.shape[1:2], -1)


def metric_values(
    logits: Tensor,
    metric: MetricLike | _ProbedMetric,
    c: int,
    n: int,
    where: str = "run_interventions",
) -> Tensor:
    """The metric [c, n] of a chunk's logits from ``read_logits``, computed in float32 whatever
    the model's dtype; the values are checked for their shape here and for being finite at the
    end of the call."""
    if isinstance(metric, _ProbedMetric):
        return metric.at(logits.float())
    if isinstance(metric, (Metric, _ColumnMetric)):
        values = metric.at(logits.float())
        if not isinstance(values, Tensor) or values.numel() != c * n:
            if c == 1 or not isinstance(values, Tensor) or values.ndim == 0:
                check_metric_values(values, n, where)  # raises, saying what the metric returned
            raise MetricError(
                f"{where}: the metric {metric.name!r} must map logits [..., n, d_vocab] to "
                f"[..., n]; on logits [{c}, {n}, d_vocab] it returned {tuple(values.shape)}"
            )
        return values
    return torch.stack([check_metric_values(metric(logits[k].float()), n, where) for k in range(c)])


@dataclass(eq=False)
class _ColumnMetric:
    """A ``Metric`` confirmed to read only ``columns`` ([n, k]) of the vocabulary at its
    positions (``_column_metric``): a logit difference reads two of 50,257.

    ``logits`` computes the logits of those entries alone, ``[c, n, k]``: one matrix product of
    the final norm's output with the unembedding's columns of every entry any example reads
    (``weight``, ``bias``; ``inverse`` says which of them is each example's), in place of the
    whole vocabulary's (a tenth of a GPT-2-small forward pass per run). ``at`` writes them into
    ``buffer``, which holds NaN at every other entry, and calls the metric on it."""

    metric: Metric
    columns: Int[Tensor, "n k"]
    inverse: Int[Tensor, "n k"]
    weight: Float[Tensor, "u d_model"]
    bias: Float[Tensor, " u"]
    d_vocab: int
    buffer: Tensor | None = None  # [c, n, d_vocab], float32, grown to the largest chunk

    @property
    def name(self) -> str:
        return self.metric.name

    @property
    def positions(self) -> Int[Tensor, " n"]:
        return self.metric.positions

    def logits(
        self, model: HookedTransformer, final: Float[Tensor, "c n d_model"]
    ) -> Float[Tensor, "c n k"]:
        return _entry_logits(model, final, self.weight, self.bias, self.inverse)

    def at(self, logits_at: Float[Tensor, "c n k"]) -> Float[Tensor, "c n"]:
        c, n, k = logits_at.shape
        if self.buffer is None or self.buffer.shape[0] < c:
            # NaN off the columns; every chunk writes the same entries, so it stays so
            size = (c, n, self.d_vocab)
            self.buffer = torch.full(size, math.nan, device=logits_at.device)
        buffer = self.buffer[:c]
        buffer.scatter_(-1, self.columns.expand(c, n, k), logits_at)
        return self.metric.at(buffer)


def _column_metric(
    model: HookedTransformer,
    metric: Metric,
    logits_at: Float[Tensor, "n d_vocab"],
    values: Float[Tensor, " n"],
    base: BaseRun,
) -> Metric | _ColumnMetric:
    """``metric`` as a ``_ColumnMetric`` when it is confirmed, on the base run's logits at its
    positions (``logits_at``, where it gave ``values``), to read a few vocabulary entries of
    each example; else ``metric`` itself, which then gets the logits of the whole vocabulary.

    The entries are found and confirmed as ``_probed_metric`` finds and confirms positions:
    where the metric's gradient is not zero, then exactly ``values`` with every other entry
    random and again NaN."""
    unembed = model.unembed
    if any(blocks.is_hooked(point) for point in (unembed.hook_in, unembed.hook_out)):
        return metric  # a hook there sees the whole unembedding
    d_vocab = logits_at.shape[-1]

    def on_entries(logits: Float[Tensor, "n d_vocab 1"]) -> Tensor:
        return metric.at(logits[..., 0])

    # the vocabulary as the axis the position probe searches
    reads = _gradient_reads(on_entries, logits_at[:, :, None])
    if reads is None:
        return metric
    entries = _read_entries(reads[..., 0], d_vocab)
    if entries is None:
        return metric
    columns, unique, inverse = entries
    rows = torch.arange(len(columns), device=columns.device)[:, None]
    buffer = _confirmed_buffer(on_entries, logits_at[:, :, None], (rows, columns), values)
    if buffer is None:
        return metric
    base.unembed = None  # the whole unembedding, laid out for the base run, is not needed
    weight = unembed.W_U.T[unique].contiguous()
    # read positions on the device once, not once per chunk
    metric = dataclasses.replace(metric, positions=metric.positions.to(logits_at.device))
    return _ColumnMetric(metric, columns, inverse, weight, unembed.b_U[unique], d_vocab)


@dataclass(frozen=True, eq=False)
class _ProbedMetric:
    """A plain callable metric that reads only ``positions`` of the logits (``_probed_metric``),
    and, where ``columns`` is given, only those vocabulary entries at each of them.

    ``logits`` computes a chunk's logits at what the metric reads: ``[c, n, k, d_vocab]``, or
    with ``columns`` ([n, k, m]) the m entries at each read position alone, ``[c, n, k, m]``:
    one matrix product with the unembedding's columns of every entry any example reads
    (``weight``, ``bias``; ``inverse`` says which of them is each read entry). ``at`` writes
    each run's logits into ``buffer``, which holds NaN everywhere else, and calls the metric on
    it: what the probe confirmed gives the same values as the full logits."""

    fn: Callable[[Tensor], Tensor]
    positions: Int[Tensor, "n k"]
    buffer: Float[Tensor, "n pos d_vocab"]
    where: str
    columns: Int[Tensor, "n k m"] | None = None
    inverse: Int[Tensor, "n k m"] | None = None
    weight: Float[Tensor, "u d_model"] | None = None
    bias: Float[Tensor, " u"] | None = None

    def logits(
        self, model: HookedTransformer, final: Float[Tensor, "c n k d_model"], base: BaseRun
    ) -> Tensor:
        if self.columns is None:
            return unembed_residual(model, final, base)
        return _entry_logits(model, final, self.weight, self.bias, self.inverse)

    def at(self, logits_at: Tensor) -> Float[Tensor, "c n"]:
        n = self.positions.shape[0]
        rows = torch.arange(n, device=self.positions.device)[:, None]
        index: tuple[Tensor, ...] = (rows, self.positions)
        if self.columns is not None:
            index = (rows[..., None], self.positions[..., None], self.columns)
        values = []
        for run_logits in logits_at:
            self.buffer[index] = run_logits
            value = check_metric_values(self.fn(self.buffer), n, self.where)
            # a copy: the metric may return a view of ``buffer``, which the next run overwrites
            values.append(value.to(torch.float32, copy=True))
        return torch.stack(values)


def _probed_metric(
    model: HookedTransformer,
    metric: Callable[[Tensor], Tensor],
    base: BaseRun,
    n: int,
    where: str,
) -> Callable[[Tensor], Tensor] | _ProbedMetric:
    """``metric`` as a ``_ProbedMetric`` when it is confirmed to read only some positions of the
    logits, or only some vocabulary entries at every position; else ``metric`` itself, after a
    warning of what full logits cost.

    The candidate positions are those where the metric's gradient with respect to the base
    run's logits is not zero (in any example: each keeps its own, padded to the largest count
    by repeating one), and the candidate entries those where it is not zero at each read
    position. Each is confirmed when the metric gives exactly its values on the base logits
    with every other position (entry) set to random values, and again set to NaN. Entries are
    kept when they are a sixteenth of the vocabulary or fewer; a metric that reads every
    position must read a few entries, or it gets the full logits."""
    logits = unembed_residual(model, base.resid[model.cfg.n_layers], base).float()
    n_pos = logits.shape[1]
    # the metric's shape is checked first, before any patched run; a copy, so that a metric
    # that changes its input leaves these logits as they are
    values = check_metric_values(metric(logits.clone()), n, where)
    reads = _gradient_reads(metric, logits)
    if reads is None:
        reason = "cannot be differentiated, so which positions of the logits it reads is unknown"
    else:
        at_position = reads.any(dim=-1)
        counts = at_position.sum(dim=1)
        k = max(1, int(counts.max()))
        # each example's read positions in order, then its first one again as padding
        order = torch.argsort((~at_position).to(torch.int8), dim=1, stable=True)[:, :k]
        first = torch.where(counts > 0, order[:, 0], n_pos - 1)
        padding = torch.arange(k, device=order.device)[None, :] >= counts[:, None]
        positions = torch.where(padding, first[:, None], order)
        rows = torch.arange(n, device=logits.device)[:, None]
        probed = _probed_entries(model, metric, logits, reads, positions, values, where)
        if probed is not None:
            base.unembed = None  # the whole unembedding, laid out for the base run, is not needed
            return probed
        if k == n_pos and n_pos > 1:
            reason = "reads every position of the logits"
        else:
            buffer = _confirmed_buffer(metric, logits, (rows, positions), values)
            if buffer is not None:
                return _ProbedMetric(metric, positions, buffer, where)
            reason = "reads positions of the logits where its gradient is zero"
    base.unembed = None  # the full logits are unembedded as the reference path does
    warnings.warn(
        f"{where}: the metric {reason}; computing full logits (about "
        f"{_full_logits_cost(model, n_pos):.1f}x slower); pass a ck.metrics.Metric to read "
        "only some",
        UserWarning,
        stacklevel=3,
    )
    return metric


def _probed_entries(
    model: HookedTransformer,
    metric: Callable[[Tensor], Tensor],
    logits: Float[Tensor, "n pos d_vocab"],
    reads: Bool[Tensor, "n pos d_vocab"],
    positions: Int[Tensor, "n k"],
    values: Tensor,
    where: str,
) -> _ProbedMetric | None:
    """The metric as a ``_ProbedMetric`` that reads only the vocabulary entries where its
    gradient is not zero at its read ``positions``, if that is confirmed and worth it."""
    unembed = model.unembed
    if any(blocks.is_hooked(point) for point in (unembed.hook_in, unembed.hook_out)):
        return None  # a hook there sees the whole unembedding
    rows = torch.arange(len(positions), device=positions.device)[:, None]
    entries = _read_entries(reads[rows, positions], logits.shape[-1])
    if entries is None:
        return None
    columns, unique, inverse = entries
    index = (rows[..., None], positions[..., None], columns)
    buffer = _confirmed_buffer(metric, logits, index, values)
    if buffer is None:
        return None
    weight = unembed.W_U.T[unique].contiguous()
    return _ProbedMetric(
        metric, positions, buffer, where, columns, inverse, weight, unembed.b_U[unique]
    )


def _read_entries(
    reads: Bool[Tensor, "... d_vocab"], d_vocab: int
) -> tuple[Int[Tensor, "... m"], Int[Tensor, " u"], Int[Tensor, "... m"]] | None:
    """The vocabulary entries read at each leading index (``columns``: its entries in order,
    then its first one again as padding to the largest count), the distinct entries over all
    (``unique``) and each read entry's index among them (``inverse``); None when more than a
    sixteenth of the vocabulary is read over all (as many as that cost about the whole
    unembedding)."""
    counts = reads.sum(dim=-1)
    m = max(1, int(counts.max()))
    order = torch.argsort((~reads).to(torch.int8), dim=-1, stable=True)[..., :m]
    padding = torch.arange(m, device=order.device) >= counts[..., None]
    columns = torch.where(padding, order[..., :1], order)
    unique, inverse = torch.unique(columns, return_inverse=True)
    if len(unique) > d_vocab // 16:
        return None
    return columns, unique, inverse


def _entry_logits(
    model: HookedTransformer,
    final: Float[Tensor, "*lead d_model"],
    weight: Float[Tensor, "u d_model"],
    bias: Float[Tensor, " u"],
    inverse: Int[Tensor, "..."],
) -> Tensor:
    """The logits of a few vocabulary entries from a final residual stream: the final norm,
    one matrix product with the unembedding's columns of the entries (``weight``, ``bias``),
    then each read entry picked by ``inverse``, broadcast over the leading runs."""
    if model.cfg.normalization_type is not None:
        final = model.ln_final(final)
    logits = torch.nn.functional.linear(final, weight, bias)  # [*lead, u]
    lead = final.shape[: final.ndim - inverse.ndim + 1]
    logits = logits.gather(-1, inverse.expand(*lead, *inverse.shape[1:]))
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _gradient_reads(
    metric: Callable[[Tensor], Tensor], logits: Float[Tensor, "n pos d_vocab"]
) -> Bool[Tensor, "n pos d_vocab"] | None:
    """Where the metric's gradient with respect to ``logits`` is not zero; None when the
    metric's values have no gradient or computing it fails."""
    n = logits.shape[0]
    generator = torch.Generator(device=logits.device).manual_seed(0)
    # random positive weights per example, so that examples' gradients cannot cancel where
    # one example's value reads another's logits
    weights = torch.rand(n, generator=generator, device=logits.device) + 0.5
    leaf = logits.detach().requires_grad_()
    try:
        with torch.enable_grad():
            values = metric(leaf.clone())
            if not isinstance(values, Tensor) or not values.requires_grad:
                return None
            weighted = (values.float() * weights.to(values.device)).sum()
            (grad,) = torch.autograd.grad(weighted, leaf, allow_unused=True)
    except Exception:  # a metric that works only without autograd (numpy, in-place ops)
        return None
    return None if grad is None else grad.ne(0)


def _confirmed_buffer(
    metric: Callable[[Tensor], Tensor],
    logits: Float[Tensor, "n pos d_vocab"],
    index: tuple[Tensor, ...],
    values: Tensor,
) -> Tensor | None:
    """Logits shaped as ``logits`` that hold NaN except at ``index`` (zero there), if the
    metric gives exactly ``values`` on ``logits`` kept at ``index`` alone, the rest set to
    random values and then to NaN; None if it does not."""
    kept = logits[index]
    buffer = torch.empty_like(logits)
    generator = torch.Generator(device=logits.device).manual_seed(0)
    scale = 10 * float(logits.std()) + 1  # random logits larger than the real ones
    for fill in ("random", "nan"):
        if fill == "random":
            buffer.normal_(0.0, scale, generator=generator)
        else:
            buffer.fill_(math.nan)
        buffer[index] = kept
        try:
            got = metric(buffer)
        except Exception:  # a metric that checks its input is finite, say
            return None
        if not isinstance(got, Tensor) or got.shape != values.shape:
            return None
        if got.device != values.device or not torch.equal(got, values):
            return None
    buffer.fill_(math.nan)
    buffer[index] = 0.0
    return buffer


def _full_logits_cost(model: HookedTransformer, n_pos: int) -> float:
    """About how many times the work of a sweep with one read position per example the same
    sweep takes with full logits: multiply-adds per run, a run computing half the blocks."""
    cfg = model.cfg
    d_mlp = 0 if cfg.attn_only else (cfg.d_mlp or 4 * cfg.d_model)
    block = 4 * cfg.d_model * cfg.n_heads * cfg.d_head + (3 if cfg.gated_mlp else 2) * (
        cfg.d_model * d_mlp
    )
    unembed = cfg.d_model * cfg.d_vocab
    blocks_work = n_pos * cfg.n_layers / 2 * block
    return (blocks_work + n_pos * unembed) / (blocks_work + unembed)


def final_residual(model: Model, tokens: Tensor) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after the last block (what the final norm reads), with gradients
    when they are on.

    A HookedTransformer stops there (``stop_at_layer=n_layers``); a ``TransformerBridge``
    given ``stop_at_layer=n_layers`` runs to the logits, so its last block's output is read
    from its hook point instead.

    Example::

        logits = unembed_residual(model, final_residual(model, tokens))
    """
    if not is_bridge(model):
        return model(tokens, stop_at_layer=model.cfg.n_layers)
    found: list[Tensor] = []
    last = Resid(model.cfg.n_layers - 1, "post").hook_name(model)
    with hooks_added(model, [(last, found.append)]):
        model(tokens)
    return found[0]


def unembed_residual(
    model: HookedTransformer, residual: Tensor, base: BaseRun | None = None
) -> Tensor:
    """The logits of a final residual stream. With ``base`` (and no hook on the unembedding) the
    unembedding's weight is laid out once per call, its vocabulary padded to a multiple of 8: a
    vocabulary of odd size (GPT-2's 50,257) otherwise gets slow unaligned matrix kernels."""
    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    unembed = model.unembed
    if base is None or any(
        blocks.is_hooked(point) for point in (unembed.hook_in, unembed.hook_out)
    ):
        logits = unembed(residual)
    else:
        if base.unembed is None:
            vocab = unembed.W_U.shape[1]
            padding = -vocab % 8
            weight = torch.nn.functional.pad(unembed.W_U.T, (0, 0, 0, padding))
            base.unembed = weight.contiguous(), torch.nn.functional.pad(unembed.b_U, (0, padding))
        weight, bias = base.unembed
        logits = torch.nn.functional.linear(residual, weight, bias)[..., : unembed.W_U.shape[1]]
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _chunk_hooks(
    chunk: list[list[_Compiled]], c: int, n: int, pos: int, *, alone_in: int | None = None
) -> dict[str, Callable]:
    """One function per hook that applies all of the chunk's interventions on it at once.

    The activation has c * n rows; it is viewed as [c, n, ...] so run k's interventions land on
    block k. Interventions with the same value tensor (the usual sweep: every run patches from
    the same cache) share one ``torch.where``; runs with their own values are stacked. Inside
    the blocks only positions ``pos`` onwards are computed, so masks and values are cut to
    them (to position ``pos`` alone in layer ``alone_in``); the embeddings are computed whole.
    """
    by_hook: dict[str, list[tuple[int, _Compiled]]] = {}
    cuts: dict[tuple, Tensor] = {}
    for k, items in enumerate(chunk):
        for item in items:
            if item.layer == alone_in:
                item = _from_position(item, pos, cuts, length=1)
            elif item.layer >= 0 and pos > 0:
                item = _from_position(item, pos, cuts)
            by_hook.setdefault(item.hook, []).append((k, item))
    return {hook: _make_hook_fn(entries, c, n) for hook, entries in by_hook.items()}


def _from_position(
    item: _Compiled,
    pos: int,
    cuts: dict[tuple, Tensor] | None = None,
    *,
    length: int | None = None,
) -> _Compiled:
    """``item`` acting on an activation that holds only positions ``pos`` onwards (``length``
    of them when given).

    ``cuts`` keeps the cut of each tensor, so items that shared a value tensor share its cut
    too (and ``_make_hook_fn`` still applies them together)."""

    def cut(tensor: Tensor, ndim: int) -> Tensor:
        # ``tensor`` broadcasts to an activation of ``ndim`` dims, aligned on the right
        dim = item.pos_dim - (ndim - tensor.ndim)
        if dim < 0 or tensor.shape[dim] == 1:
            return tensor
        key = (id(tensor), dim, length)
        if cuts is None or key not in cuts:
            size = tensor.shape[dim] - pos if length is None else length
            narrowed = tensor.narrow(dim, pos, size)
            if cuts is None:
                return narrowed
            cuts[key] = narrowed
        return cuts[key]

    ndim = max(item.mask.ndim, item.pos_dim + 1)
    value = item.value
    if isinstance(value, Patch):
        value = narrowed(value, cut(value.source, value.source.ndim))
    elif isinstance(value, (SetTo, Add)):
        value = narrowed(value, cut(value_tensor(value), ndim))
    mask = cut(item.mask, item.mask.ndim)
    # built directly: dataclasses.replace costs more than the rest of a chunk's set-up per item
    return _Compiled(
        item.hook, mask, value, item.layer, item.pos_dim, item.first_pos, item.last_pos, item.stays
    )


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
            key = (type(value).__name__, id(value_tensor(value)))
        groups.setdefault(key, []).append((k, item))

    ops = []
    for group in groups.values():
        by_run: dict[int, list[Tensor]] = {}
        for k, item in group:
            by_run.setdefault(k, []).append(item.mask)
        runs = sorted(by_run)
        shapes = {item.mask.shape for _, item in group}  # usually one: a sweep's masks agree
        shape = shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)
        # one stacked [runs, ...] mask per group; a run with several entries here ORs them
        mask = torch.stack([_union(by_run[k]).expand(shape) for k in runs])
        device = mask.device
        index = None if len(runs) == c else _index_tensor(runs, device)
        ops.append((group[0][1].value, mask, index))

    def fn(act: Tensor) -> Tensor:
        out = act.reshape(c, n, *act.shape[1:])
        copied = False
        for value, mask, index in ops:
            rows = out if index is None else out[index]
            if isinstance(value, Zero):
                rows = rows.masked_fill(mask, 0.0)
            elif isinstance(value, Scale):
                rows = torch.where(mask, rows * value.factor, rows)
            elif isinstance(value, Add):
                rows = torch.where(mask, rows + value.delta.to(rows), rows)
            else:
                rows = torch.where(mask, value_tensor(value).to(rows), rows)
            if index is None:
                out, copied = rows, True
            else:
                if not copied:  # the activation itself stays as the model made it
                    out, copied = out.clone(), True
                out[index] = rows
        return out.view(act.shape)

    return fn


def _union(masks: list[Tensor]) -> Tensor:
    union = masks[0]
    for mask in masks[1:]:
        union = union | mask
    return union


def bytes_per_run(
    model: HookedTransformer, n: int, n_query: int, n_pos: int, full_logits: bool
) -> int:
    """A generous estimate of the activation memory one run adds to a chunk's forward pass,
    computing ``n_query`` of the prompt's ``n_pos`` positions."""
    cfg = model.cfg
    d_mlp = 0 if cfg.attn_only else (cfg.d_mlp or 4 * cfg.d_model)
    per_position = (
        8 * cfg.d_model + 6 * cfg.n_heads * cfg.d_head + 4 * d_mlp + 3 * cfg.n_heads * n_pos
    )
    # the earlier positions' keys and values, kept for every layer (``_prefix``)
    cached_keys_values = 2 * (n_pos - n_query) * cfg.n_heads * cfg.d_head * cfg.n_layers
    outputs = (n_pos if full_logits else 1) * cfg.d_vocab * 2
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    return n * itemsize * (n_query * per_position + cached_keys_values + outputs)


def default_memory_budget(model: HookedTransformer) -> int:
    """Bytes of activations one chunk may use by default: half the memory of the model's GPU
    that is free now (free on the device, or held by PyTorch's allocator and unused), or 2 GiB
    on the CPU."""
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + cached) * 0.5)
    return 2 * 1024**3


@contextmanager
def tf32() -> Iterator[None]:
    """Let float32 matrix products use TF32 inside the block; the previous setting comes back.

    On NVIDIA GPUs from Ampere on, TF32 runs float32 matrix products on the tensor cores with
    10-bit mantissas: several times faster, with relative errors near 1e-3 instead of 1e-6.
    circuitkit never turns it on by itself.

    Example::

        with ck.tf32():
            result = ck.activation_patching(model, ds, abc, "head", per_position=True)
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
