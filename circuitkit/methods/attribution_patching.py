"""Attribution patching: a first-order estimate of every patch at once, from gradients.

Context. Activation patching runs one forward pass per patch. Attribution patching (Nanda
2023; Syed et al. 2023) replaces each of those runs with the first term of its Taylor series
around the base run: if patching an activation ``a`` from its base value to the other run's
value changes the metric by ``m(a_other) - m(a_base)``, the estimate is

    (a_other - a_base) . d metric / d a        (the gradient taken in the base run)

summed over the entries the patch selects. One forward pass with a backward pass on the base
input, and one forward pass on the other input, give the estimate for every component and
position at once. The estimate is exact where the metric is linear in the activation and
degrades where the model is far from linear between the two runs (attention patterns that
switch, saturated nonlinearities, a large metric change); so it is a map of where to look, to
be checked with exact patching.

Directions, as in ``ck.activation_patching``: ``direction="denoise"`` (the default there and
here) takes the corrupted run as the base and estimates restoring clean activations
(``delta = clean - corrupted``, gradient at the corrupted run); ``"noise"`` takes the clean run
as the base and estimates inserting corrupted ones (``delta = corrupted - clean``, gradient at
the clean run). ``attribution_patching`` returns the metric the patched run is estimated to
have, ``base metric + estimate`` per example, so its ``Result`` has the same axes, labels and
meaning as ``activation_patching``'s and the two plot side by side; ``info["attribution"]``
holds the estimate itself (``values - info["base"]``).

Edge attribution patching (EAP; Syed et al. 2023) scores every edge of the model's graph
(``circuitkit.core.graph``) the same way: the edge from sender ``u`` to receiver ``v`` gets

    (out_u(other) - out_u(base)) . d metric / d (input of v)

from one forward and backward pass that keeps the gradient at every receiver's own input.
EAP-IG (Hanna et al. 2024) averages that gradient over ``steps`` points on the straight line
between the two inputs' embeddings, instead of taking it at the base alone: the residual stream
entering block 0 (token plus positional embeddings; the token embeddings alone with rotary
positions) is set to ``other + k / steps * (base - other)`` for ``k = 1 .. steps``, so the last
point is the base run and ``steps=1`` is plain EAP. The senders' outputs in the difference are
always those of the two real runs. Edge scores are estimated changes of the metric (not
metric values), default ``direction="noise"`` as in path patching and the EAP papers.

The other run need not be a run. A circuit is usually evaluated with the edges outside it
*ablated* (``ck.Ablation``: their senders' mean over the corrupted prompts, per template as in
the IOI paper, or a resampled prompt's output), not patched from each prompt's corrupted twin;
scores that estimate the same intervention rank the edges for that evaluation. With
``ablation="mean-template"`` (or "mean", "resample", "zero", a ``ck.Ablation``) the "other"
outputs ``out_u(other)`` are those ablated values, and EAP-IG's path runs from the ablated
embeddings (the mean embeddings, say) to the clean ones. ``ablation="corrupted"`` (the
default) is the paired corrupted run, as in the EAP papers.

Both leave the model as they found it: no parameter gets a gradient (``torch.autograd.grad``
is asked for the activations' gradients only), no ``requires_grad`` flag or training mode is
changed, the configuration flags that split the receivers' inputs are put back, and every hook
is removed, also when an exception is raised. Examples are processed in batches that fit a
memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.core import provenance
from circuitkit.core.components import (
    MLP,
    Component,
    Embed,
    Head,
    PosEmbed,
    Resid,
    input_hook_name,
    selection_mask,
)
from circuitkit.core.engine import (
    bytes_per_run,
    check_memory_budget,
    default_memory_budget,
    final_residual,
    hooks_added,
    unembed_residual,
)
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.graph import (
    LOGITS,
    EdgeScores,
    Graph,
    SenderOutputs,
    check_graph_metric,
    sender_deltas,
    sender_outputs,
    split_inputs,
)
from circuitkit.core.inputs import as_tokens, check_same_shape, default_metric
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import HookedTransformer, bridge_hooks
from circuitkit.core.metrics import Metric, check_metric_output, select_examples
from circuitkit.core.results import Result
from circuitkit.methods.ablation import Ablation, ablated_outputs, check_ablation
from circuitkit.methods.activation_patching import sweep_cells

Direction = Literal["denoise", "noise"]
EdgeMethod = Literal["eap", "eap-ig"]


def attribution_patching(
    model: HookedTransformer,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"],
    metric: MetricLike | None = None,
    component: str | Sequence[Component] = "resid_pre",
    *,
    direction: Direction = "denoise",
    per_position: bool = False,
    positions: Sequence[int | str] | None = None,
    layers: Sequence[int] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> Result:
    """Estimate every patch of a sweep from one forward and backward pass.

    ``component``, ``per_position``, ``positions`` and ``layers`` are as in
    ``ck.activation_patching``
    (kinds "resid_pre", "resid_mid", "resid_post", "attn", "mlp", "head", "q", "k", "v",
    "pattern", or a list of components; per position, or at some positions given as ints or
    dataset words), and so are the axes and labels of the result. ``direction="denoise"`` (the
    default, as there) estimates restoring clean activations in the corrupted run;
    ``"noise"`` inserting corrupted activations in the clean run. ``reference=True`` runs the
    plainly written version: one forward and backward pass per patch, differentiating the
    metric along that patch's direction.

    Returns a ``Result`` whose values estimate the metric of each patched run, averaged over
    examples: the base run's metric plus ``(a_other - a_base) . d metric / d a`` summed over
    the patched entries. ``examples`` holds the per-example estimates; ``info["base"]`` the base
    metric's mean (``info["base_examples"]`` per example) and ``info["attribution"]`` the
    estimated change, ``values - info["base"]``.

    Example::

        ds = ck.IOIDataset(model, n=50)
        abc = ds.corrupted("ABC")
        fast = ck.attribution_patching(model, ds, abc, ck.metrics.logit_diff(ds), "head")
        exact = ck.activation_patching(model, ds, abc, "head")
        ck.plot(fast), ck.plot(exact)       # same axes, same meaning
    """
    where = "attribution_patching"
    memory_budget = check_memory_budget(memory_budget, where)
    if isinstance(metric, (str, list, tuple)):
        raise CircuitkitError(
            f"{where}: the metric comes before the component, "
            f"attribution_patching(model, clean, corrupted, metric, component); got "
            f"metric={metric!r}"
        )
    if direction not in ("denoise", "noise"):
        raise CircuitkitError(f"{where}: direction must be 'denoise' or 'noise', got {direction!r}")
    clean_tokens, clean_positions = as_tokens(clean, "clean", where, model=model)
    corrupted_tokens, corrupted_positions = as_tokens(corrupted, "corrupted", where, model=model)
    check_same_shape(clean_tokens, corrupted_tokens, ("clean", "corrupted"), where)
    metric = default_metric(metric, clean, where)
    check_graph_metric(metric, clean_tokens.shape[0], where)
    word_positions = clean_positions if clean_positions is not None else corrupted_positions
    _, cells, axes, labels = sweep_cells(
        model, component, clean_tokens, per_position, positions, where, layers=layers
    )
    if direction == "denoise":
        base, other = corrupted_tokens, clean_tokens
    else:
        base, other = clean_tokens, corrupted_tokens
    base, other = base.to(model.cfg.device), other.to(model.cfg.device)

    desc = f"{where} ({direction})"
    if reference:
        attribution, base_values = _node_reference(
            model, base, other, cells, metric, word_positions, progress, desc
        )
    else:
        attribution, base_values = _node_attribution(
            model, base, other, cells, metric, word_positions, memory_budget, progress, desc
        )
    shape = [len(labels[a]) for a in axes]
    estimates = (base_values + attribution).reshape(*shape, attribution.shape[-1])
    made = provenance.record(
        model,
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
        },
        data={"clean": clean, "corrupted": corrupted},
        metric=metric,
    )
    return Result(
        values=estimates.mean(-1),
        axes=axes,
        labels=labels,
        examples=estimates if keep_examples else None,
        metric=provenance.metric_name(metric),
        method=where,
        info={
            "direction": direction,
            "component": component if isinstance(component, str) else [repr(c) for c in component],
            "base": float(base_values.mean()),
            "base_examples": base_values,
            "baseline": float(base_values.mean()),
            "baseline_examples": base_values,
            "attribution": attribution.reshape(*shape, -1).mean(-1),
        },
        provenance=made,
    )


def edge_attribution_patching(
    model: HookedTransformer,
    clean: Any | Int[Tensor, "n pos"],
    corrupted: Any | Int[Tensor, "n pos"],
    metric: MetricLike | None = None,
    *,
    method: EdgeMethod = "eap",
    steps: int = 5,
    direction: Direction = "noise",
    ablation: Ablation | str = "corrupted",
    ablation_reference: Any | Int[Tensor, "n_ref pos"] | None = None,
    seed: int = 0,
    reference: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge of the model's graph by edge attribution patching (EAP) or EAP-IG.

    The score of the edge ``u -> v`` estimates how much the metric changes when ``v`` reads
    ``u``'s output from the other run instead of the base run's, all else equal:
    ``(out_u(other) - out_u(base)) . g_v``, summed over positions, where ``g_v`` is the gradient
    of the metric with respect to ``v``'s own input (its query, key or value input, its MLP
    input, or the final residual stream for the logits). ``method="eap"`` takes ``g_v`` in the
    base run; ``"eap-ig"`` averages it over ``steps`` runs whose embeddings lie on the line from
    the other input's to the base input's (the last one the base run). ``direction="noise"``
    (the default) has the clean input as the base and the corrupted one as the other;
    ``"denoise"`` the reverse. ``reference=True`` runs the plainly written version: per edge and
    step, one forward and backward pass that differentiates the metric along that edge alone.

    ``ablation`` says what the other outputs are when noising: "corrupted" (the default) the
    paired corrupted prompt's; "mean" the mean over ``ablation_reference`` (default
    ``corrupted``), "mean-template" that mean within each prompt's template, "resample" a
    reference prompt drawn per example (seeded with ``seed``), "zero", or a ``ck.Ablation``
    (its value and ``per_template``): the values a circuit's faithfulness is then measured
    with, so the scores estimate that evaluation's single-edge ablations (module docstring).

    Returns ``EdgeScores``, a ``Result`` with axes ("receiver", "sender") and the per-example
    scores, 0 where there is no edge; ``info["base"]`` is the base run's metric,
    ``info["ablation"]`` the other outputs' name ("corrupted", "mean-template", ...).

    Example::

        scores = ck.edge_attribution_patching(model, ds, abc, ck.metrics.logit_diff(ds),
                                              method="eap-ig", steps=5)
        scores.top_edges(10)
        scores.to_dataframe().sort_values("value").head()
        # scored against the per-template mean of the ABC prompts, as ck.faithfulness ablates
        ck.edge_attribution_patching(model, ds, abc, ablation="mean-template").top_edges(10)
    """
    where = "edge_attribution_patching"
    memory_budget = check_memory_budget(memory_budget, where)
    if isinstance(metric, str):
        raise CircuitkitError(f"{where}: metric must be a metric, got the string {metric!r}")
    if method not in ("eap", "eap-ig"):
        raise CircuitkitError(f"{where}: method must be 'eap' or 'eap-ig', got {method!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise CircuitkitError(f"{where}: steps must be a positive int, got {steps!r}")
    if direction not in ("denoise", "noise"):
        raise CircuitkitError(f"{where}: direction must be 'denoise' or 'noise', got {direction!r}")
    choice = check_ablation(ablation, where)
    if choice.value != "corrupted" and direction != "noise":
        raise CircuitkitError(
            f"{where}: ablation={choice.name!r} replaces the clean run's senders by ablated "
            "values, which is noising; use direction='noise' (or ablation='corrupted')"
        )
    graph = Graph.of(model, where)
    clean_tokens, _ = as_tokens(clean, "clean", where, model=model)
    corrupted_tokens, _ = as_tokens(corrupted, "corrupted", where, model=model)
    check_same_shape(clean_tokens, corrupted_tokens, ("clean", "corrupted"), where)
    metric = default_metric(metric, clean, where)
    check_graph_metric(metric, clean_tokens.shape[0], where)
    if direction == "noise":
        base, other = clean_tokens, corrupted_tokens
    else:
        base, other = corrupted_tokens, clean_tokens
    base, other = base.to(model.cfg.device), other.to(model.cfg.device)
    n_steps = steps if method == "eap-ig" else 1
    if choice.value == "corrupted":
        other_outputs = sender_outputs(model, other)
    else:
        (other_outputs,) = ablated_outputs(
            model, clean, clean_tokens, choice,
            reference=corrupted if ablation_reference is None else ablation_reference,
            corrupted=corrupted, n_samples=1, seed=seed, where=where,
        )  # fmt: skip

    desc = f"{where} ({method})"
    if reference:
        scores, base_values = _edge_reference(
            model, graph, base, other_outputs, metric, n_steps, None, progress, desc
        )
    else:
        scores, base_values = _edge_attribution(
            model, graph, base, other_outputs, metric, n_steps, memory_budget, progress, desc
        )
    made = provenance.record(
        model,
        method=where,
        args={
            "method": method,
            "steps": n_steps,
            "direction": direction,
            "ablation": choice.name,
            "seed": seed,
            "reference": reference,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
        },
        data={"clean": clean, "corrupted": corrupted, "ablation_reference": ablation_reference},
        metric=metric,
    )
    examples = scores.permute(1, 2, 0)
    result = EdgeScores.of_graph(
        graph,
        examples,
        metric=provenance.metric_name(metric),
        method=where,
        info={
            "method": method,
            "steps": n_steps,
            "direction": direction,
            "ablation": choice.name,
            "base": float(base_values.mean()),
            "base_examples": base_values,
        },
        provenance=made,
    )
    if not keep_examples:
        result.examples = None
    return result


# ---------------------------------------------------------------------------------------------
# Shared: batches of examples, and the metric on some of them


def _batches(n: int, per_example: int, memory_budget: int | None, model: HookedTransformer):
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    size = max(1, min(n, int(budget // max(1, per_example))))
    return [torch.arange(start, min(start + size, n)) for start in range(0, n, size)]


def _gradients(output: Tensor, inputs: list[Tensor]) -> tuple[Tensor, ...]:
    """The gradients of ``output`` by ``inputs`` only (no parameter's ``.grad`` is touched);
    zeros for an input the output does not depend on (an attention pattern held fixed makes
    queries and keys irrelevant, say)."""
    return torch.autograd.grad(output, inputs, allow_unused=True, materialize_grads=True)


def _metric_of_batch(
    model: HookedTransformer,
    residual: Float[Tensor, "batch pos d_model"],
    metric: MetricLike,
    n_steps: int,
    where: str,
) -> Float[Tensor, "n_steps b"]:
    """The metric from the final residual stream of a batch of ``b`` examples stacked ``n_steps``
    times (step-major); ``metric`` is made for those ``b`` examples (``select_examples``)."""
    b = residual.shape[0] // n_steps
    if isinstance(metric, Metric):
        read = metric.positions.to(residual.device).repeat(n_steps)
        resid_at = residual[torch.arange(n_steps * b, device=residual.device), read]
        logits_at = unembed_residual(model, resid_at[:, None, :])[:, 0].view(n_steps, b, -1)
        values = metric.at(logits_at)
        check_metric_output(values.reshape(-1), n_steps * b, where)
        return values
    logits = unembed_residual(model, residual).view(n_steps, b, *residual.shape[1:2], -1)
    return torch.stack([check_metric_output(metric(step), b, where) for step in logits])


# ---------------------------------------------------------------------------------------------
# Nodes


def _node_attribution(
    model: HookedTransformer,
    base: Tensor,
    other: Tensor,
    cells: list[Component],
    metric: MetricLike,
    positions: Any,
    memory_budget: int | None,
    progress: bool,
    desc: str,
) -> tuple[Float[Tensor, "cell n"], Float[Tensor, "n"]]:
    """``(attribution [cell, n], base metric [n])`` from one forward and backward pass."""
    n, n_pos = base.shape
    names = list(dict.fromkeys(cell.hook_name(model) for cell in cells))
    # the leading activation dims a cell's selection spans; the others are summed at once
    kept_dims = {cell.hook_name(model): cell.mask_ndim() for cell in cells}
    stop = max(1, max(cell.layer for cell in cells) + 1)
    with torch.no_grad():
        _, other_cache = model.run_with_cache(
            other, names_filter=lambda name: name in names, stop_at_layer=stop
        )

    # the embeddings are made leaves, so every later activation has a gradient even where the
    # parameters do not require one
    leaves = {name for name in (Embed().hook_name(model), PosEmbed().hook_name(model))}
    leaves &= set(model.hook_dict)
    per_example = 3 * bytes_per_run(
        model, 1, n_pos, n_pos, full_logits=not isinstance(metric, Metric)
    )
    contributions: dict[str, Tensor] = {}
    base_values = torch.empty(n)
    batches = _batches(n, per_example, memory_budget, model)
    for rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        acts: dict[str, Tensor] = {}

        def keep(act: Tensor, name: str, acts: dict = acts) -> Tensor:
            if name in leaves or not act.requires_grad:
                act = act.detach().requires_grad_(True)
            if name in names:
                acts[name] = act
            return act

        hooks = [(name, lambda act, name=name: keep(act, name)) for name in leaves | set(names)]
        with torch.enable_grad(), hooks_added(model, hooks):
            residual = final_residual(model, base[rows])
            batch_metric = select_examples(metric, rows, n) if len(rows) < n else metric
            values = _metric_of_batch(model, residual, batch_metric, 1, "attribution_patching")[0]
            grads = _gradients(values.sum(), [acts[name] for name in names])
        base_values[rows] = values.detach().float().cpu()
        for name, grad in zip(names, grads, strict=True):
            device_rows = rows.to(grad.device)
            product = (other_cache[name][device_rows] - acts[name].detach()) * grad
            if product.ndim > kept_dims[name]:  # (an empty dim tuple would sum them all)
                product = product.sum(dim=tuple(range(kept_dims[name], product.ndim)))
            if name not in contributions:
                contributions[name] = product.new_zeros(n, *product.shape[1:])
            contributions[name][device_rows] = product

    attribution = torch.empty(len(cells), n)
    for i, cell in enumerate(cells):
        contribution = contributions[cell.hook_name(model)]
        mask = selection_mask(cell, model, contribution.shape, positions, contribution.device)
        attribution[i] = (contribution * mask).flatten(1).sum(1).float().cpu()
    return attribution, base_values


def _node_reference(
    model: HookedTransformer,
    base: Tensor,
    other: Tensor,
    cells: list[Component],
    metric: MetricLike,
    positions: Any,
    progress: bool,
    desc: str,
) -> tuple[Float[Tensor, "cell n"], Float[Tensor, "n"]]:
    """Per cell, one plain forward with the activation moved by ``eps * (a_other - a_base)`` on
    the selected entries, and the derivative of each example's metric by its ``eps`` at 0."""
    n = base.shape[0]
    names = {cell.hook_name(model) for cell in cells}
    with torch.no_grad():
        _, other_cache = model.run_with_cache(other, names_filter=lambda name: name in names)
    out = []
    base_values = torch.empty(n)
    for cell in tqdm(cells, desc=f"{desc} (reference)", disable=not progress, leave=False):
        name = cell.hook_name(model)
        eps = torch.zeros(n, dtype=model.cfg.dtype, device=base.device, requires_grad=True)

        def nudge(
            act: Tensor, hook: Any, cell: Component = cell, name: str = name, eps: Tensor = eps
        ) -> Tensor:
            mask = selection_mask(cell, model, act.shape, positions, act.device)
            direction = (other_cache[name] - act.detach()) * mask
            return act + eps.view(-1, *[1] * (act.ndim - 1)) * direction

        with torch.enable_grad():
            logits = model.run_with_hooks(base, fwd_hooks=bridge_hooks(model, [(name, nudge)]))
            values = check_metric_output(metric(logits), n, "attribution_patching")
            (derivative,) = _gradients(values.sum(), [eps])
        out.append(derivative.float().cpu())
        base_values = values.detach().float().cpu()
    return torch.stack(out), base_values


# ---------------------------------------------------------------------------------------------
# Edges


def _edge_attribution(
    model: HookedTransformer,
    graph: Graph,
    base: Tensor,
    other_outputs: SenderOutputs,
    metric: MetricLike,
    n_steps: int,
    memory_budget: int | None,
    progress: bool,
    desc: str,
) -> tuple[Float[Tensor, "n receiver sender"], Float[Tensor, "n"]]:
    """``(scores [n, receiver, sender], base metric [n])``: per batch of examples, one forward
    and backward pass of ``n_steps`` interpolated runs stacked along the batch. ``other_outputs``
    has one row per example, or one for all (a mean)."""
    cfg = model.cfg
    n, n_pos = base.shape
    n_layers, d_model = cfg.n_layers, cfg.d_model
    embed_name = Resid(0, "pre").hook_name(model)
    z_names = [Head(layer, 0).hook_name(model) for layer in range(n_layers)]
    mlp_names = [MLP(layer).hook_name(model) for layer in range(n_layers)] if graph.has_mlp else []
    input_names = [
        input_hook_name(layer, part)  # type: ignore[arg-type]
        for layer in range(n_layers)
        for part in (("q", "k", "v", "mlp") if graph.has_mlp else ("q", "k", "v"))
    ]
    # weight of the other input's embeddings at each step; the last step is the base run
    other_weight = 1 - torch.arange(1, n_steps + 1, dtype=cfg.dtype, device=base.device) / n_steps

    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    inputs = n_layers * (cfg.n_heads + 2 * graph.n_kv_heads + 1) * d_model * 6
    per_step = 3 * bytes_per_run(model, 1, n_pos, n_pos, not isinstance(metric, Metric))
    per_example = n_steps * (per_step + itemsize * n_pos * inputs)
    per_example += itemsize * n_pos * d_model * (len(graph.senders) + len(graph.receivers)) * 2
    scores = torch.zeros(n, len(graph.receivers), len(graph.senders))
    base_values = torch.empty(n)

    with split_inputs(model):
        for rows in tqdm(
            _batches(n, per_example, memory_budget, model),
            desc=desc,
            disable=not progress,
            leave=False,
        ):
            b = len(rows)
            device_rows = rows.to(base.device)
            other_rows = _expanded(other_outputs.rows(device_rows), b)
            other_embed = other_rows.embed
            received: dict[str, Tensor] = {}
            recorded: dict[str, Tensor] = {}

            def interpolate(
                x: Tensor, other_embed: Tensor = other_embed, b: int = b, recorded: dict = recorded
            ) -> Tensor:
                x = x.detach().view(n_steps, b, *x.shape[1:])
                recorded[embed_name] = x[-1]
                mixed = x + other_weight.view(-1, 1, 1, 1) * (other_embed - x)
                return mixed.reshape(n_steps * b, *x.shape[2:]).requires_grad_(True)

            def record(act: Tensor, name: str, b: int = b, recorded: dict = recorded) -> None:
                recorded[name] = act.detach().view(n_steps, b, *act.shape[1:])[-1]

            def receive(act: Tensor, name: str, received: dict = received) -> Tensor:
                # The receiver reads its input through a tensor of its own, so the gradient at
                # it is the receiver's alone. A bridge's hook_mlp_in passes the residual stream
                # itself on to the MLP's norm, and the block adds that same tensor to the MLP's
                # output: the gradient at it would also hold the skip connection's.
                received[name] = act.view_as(act)
                return received[name]

            hooks: list[tuple[str, Any]] = [(embed_name, interpolate)]
            hooks += [(name, lambda act, name=name: record(act, name)) for name in z_names]
            hooks += [(name, lambda act, name=name: record(act, name)) for name in mlp_names]
            hooks += [(name, lambda act, name=name: receive(act, name)) for name in input_names]
            with torch.enable_grad(), hooks_added(model, hooks):
                residual = final_residual(model, base[device_rows].repeat(n_steps, 1))
                batch_metric = select_examples(metric, rows, n) if b < n else metric
                values = _metric_of_batch(
                    model, residual, batch_metric, n_steps, "edge_attribution_patching"
                )
                grads = _gradients(
                    values.sum(), [received[name] for name in input_names] + [residual]
                )
            base_values[rows] = values[-1].detach().float().cpu()

            base_outputs = SenderOutputs(
                recorded[embed_name],
                tuple(recorded[name] for name in z_names),
                tuple(recorded[name] for name in mlp_names),
            )
            gradient = dict(zip([*input_names, LOGITS], grads, strict=True))
            with torch.no_grad():
                scores[rows] = _edge_scores(
                    model, graph, other_rows, base_outputs, gradient, n_steps
                ).cpu()
    return scores, base_values


def _expanded(outputs: SenderOutputs, b: int) -> SenderOutputs:
    """``outputs`` with ``b`` rows: a mean's one row repeated (as a view), others as they are."""
    if outputs.n == b:
        return outputs
    return SenderOutputs(
        outputs.embed.expand(b, *outputs.embed.shape[1:]),
        tuple(z.expand(b, *z.shape[1:]) for z in outputs.z),
        tuple(out.expand(b, *out.shape[1:]) for out in outputs.mlp_out),
    )


def _edge_scores(
    model: HookedTransformer,
    graph: Graph,
    other_outputs: SenderOutputs,
    base_outputs: SenderOutputs,
    gradient: dict[str, Tensor],
    n_steps: int,
) -> Float[Tensor, "b receiver sender"]:
    """``(out_u(other) - out_u(base)) . g_v`` for every edge of a batch, with ``g_v`` the
    receivers' gradients (by hook name, ``LOGITS`` for the final residual stream) averaged over
    the ``n_steps`` runs stacked along their batch. All pairs are one batched matrix product;
    pairs that are not edges are set to 0."""
    b = other_outputs.n
    # other minus base: [b, sender, pos, d_model]
    deltas = sender_deltas(model, graph, other_outputs, base_outputs)
    mean = {name: g.view(n_steps, b, *g.shape[1:]).mean(0) for name, g in gradient.items()}
    received = deltas.new_empty(b, len(graph.receivers), *deltas.shape[2:])
    for layer in range(graph.n_layers):
        heads = [mean[input_hook_name(layer, part)] for part in ("q", "k", "v")]
        received[:, graph.attn_rows(layer)] = torch.cat(heads, dim=2).transpose(1, 2)
        if graph.has_mlp:
            received[:, graph.mlp_row(layer)] = mean[input_hook_name(layer, "mlp")]
    received[:, graph.logits_row] = mean[LOGITS]
    scores = torch.bmm(received.flatten(2), deltas.flatten(2).transpose(1, 2))
    return scores.float() * graph.valid.to(scores.device)


def _edge_reference(
    model: HookedTransformer,
    graph: Graph,
    base: Tensor,
    other: Tensor | SenderOutputs,
    metric: MetricLike,
    n_steps: int,
    edges: Sequence[tuple[int, int]] | None,
    progress: bool,
    desc: str,
) -> tuple[Float[Tensor, "n receiver sender"], Float[Tensor, "n"]]:
    """Per edge and step, one plain forward in which the receiver's input is moved by ``eps *
    (out_u(other) - out_u(base))`` and the embeddings are interpolated, and the derivative of
    each example's metric by its ``eps`` at 0, averaged over the steps. ``edges`` are (row,
    column) pairs of ``graph.valid`` (default: every edge). ``other`` is the other input's tokens
    or the other outputs themselves (ablated values: one row per example, or one for all)."""
    n = base.shape[0]
    base_outputs = sender_outputs(model, base)
    other_outputs = other if isinstance(other, SenderOutputs) else sender_outputs(model, other)
    w_o = [model.blocks[layer].attn.W_O for layer in range(graph.n_layers)]

    @torch.no_grad()
    def difference(sender: Component) -> Tensor:
        if isinstance(sender, Embed):
            return other_outputs.embed - base_outputs.embed
        if isinstance(sender, Head):
            layer, h = sender.layer, sender.head
            z = other_outputs.z[layer][:, :, h] - base_outputs.z[layer][:, :, h]
            return z @ w_o[layer][h]
        return other_outputs.mlp_out[sender.layer] - base_outputs.mlp_out[sender.layer]  # type: ignore[attr-defined]

    def hook_and_slot(receiver: Any) -> tuple[str, int | None]:
        if receiver == LOGITS:
            return Resid(graph.n_layers - 1, "post").hook_name(model), None
        if isinstance(receiver, MLP):
            return input_hook_name(receiver.layer, "mlp"), None
        slot = receiver.head if receiver.part == "q" else receiver.head // graph.group
        return input_hook_name(receiver.layer, receiver.part), slot

    pairs = edges if edges is not None else [tuple(e) for e in graph.valid.nonzero().tolist()]
    scores = torch.zeros(n, len(graph.receivers), len(graph.senders))
    with torch.no_grad():
        base_values = check_metric_output(metric(model(base)), n, "edge_attribution_patching")
    embed_name = Resid(0, "pre").hook_name(model)
    with split_inputs(model):
        for row, column in tqdm(pairs, desc=f"{desc} (reference)", disable=not progress):
            name, slot = hook_and_slot(graph.receivers[row])
            delta = difference(graph.senders[column])
            total = torch.zeros(n)
            for k in range(1, n_steps + 1):
                weight = 1 - k / n_steps
                eps = torch.zeros(n, dtype=model.cfg.dtype, device=delta.device, requires_grad=True)

                def embed(x: Tensor, hook: Any, weight: float = weight) -> Tensor:
                    return base_outputs.embed + weight * (other_outputs.embed - base_outputs.embed)

                def nudge(x: Tensor, hook: Any, slot=slot, delta=delta, eps=eps) -> Tensor:
                    x = x.clone()
                    if slot is None:
                        return x + eps.view(-1, 1, 1) * delta
                    x[:, :, slot] = x[:, :, slot] + eps.view(-1, 1, 1) * delta
                    return x

                with torch.enable_grad():
                    logits = model.run_with_hooks(
                        base, fwd_hooks=[(embed_name, embed), (name, nudge)]
                    )
                    values = check_metric_output(metric(logits), n, "edge_attribution_patching")
                    (derivative,) = _gradients(values.sum(), [eps])
                total += derivative.float().cpu()
            scores[:, row, column] = total / n_steps
    return scores, base_values.float().cpu()


__all__ = ["attribution_patching", "edge_attribution_patching"]
