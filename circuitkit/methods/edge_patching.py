"""Runs with some edges of a model's graph patched (``circuitkit.core.graph``).

**Patching an edge** ``u -> v`` changes what ``v`` reads from ``u`` and nothing else: ``v``'s
input becomes ``input - (out_u - replacement_u)``, where ``out_u`` is ``u``'s output in this
very run (it may itself differ from the base run, if edges into ``u`` were patched) and
``replacement_u`` is a given value: another run's output of ``u`` (edge patching), or its mean
over a reference distribution (mean ablation of the edge). ``patch_edges`` runs many such
edge sets on a base input, batched like the intervention engine: runs are stacked along the
batch dimension, in chunks that fit a memory budget, each chunk starting from the base run's
residual stream at the first layer its runs change. TransformerLens exposes a receiver's own
input only while ``cfg.use_split_qkv_input`` and ``cfg.use_hook_mlp_in`` are set;
``split_inputs`` sets them for each forward pass and puts them back as they were before the
metric is called, so a metric that runs the model itself sees the plain model.

Example: the faithfulness of a circuit given as a set of edges, with every other edge
mean-ablated over the ABC distribution::

    graph = ck.Graph.of(model)
    mean = ck.sender_outputs(model, abc).mean()
    outside = graph.valid & ~graph.mask(circuit_edges)
    values = ck.patch_edges(model, ds, [outside], metric, replacement=mean)   # [1, n]
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.core.components import MLP, Component, Embed, Head, Resid, input_hook_name
from circuitkit.core.engine import (
    BaseRun,
    base_run,
    bytes_per_run,
    check_memory_budget,
    chunk_groups,
    default_memory_budget,
    hooks_added,
    metric_values,
    read_logits,
    run_blocks,
    runs_per_chunk,
    warn_if_over_budget,
)
from circuitkit.core.errors import CircuitkitError, ShapeError
from circuitkit.core.graph import (
    LOGITS,
    Edge,
    Graph,
    Receiver,
    SenderOutputs,
    check_graph_metric,
    head_outputs,
    sender_deltas,
    split_inputs,
)
from circuitkit.core.inputs import as_tokens
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import HookedTransformer, Model, is_bridge
from circuitkit.core.metrics import Metric, check_metric_output, select_examples

EdgeRun = Union[Collection[Edge], Tensor]  # noqa: UP007 (a runtime alias on 3.10)


def patch_edges(
    model: HookedTransformer,
    base: Any | Int[Tensor, "n pos"],
    runs: Sequence[EdgeRun] | Tensor,
    metric: MetricLike,
    *,
    replacement: SenderOutputs,
    reference: bool = False,
    memory_budget: int | None = None,
    max_runs_per_chunk: int | None = None,
    progress: bool = True,
    desc: str = "edge patching",
) -> Float[Tensor, "n_runs n"]:
    """The metric of ``base`` under each run of patched edges.

    Each run is a collection of ``Edge`` objects, or a bool [receiver, sender] mask over
    ``Graph.of(model)`` (``runs`` may also be one bool [n_runs, receiver, sender] tensor); an
    empty run is the plain model. In a run every patched edge ``u -> v`` changes ``v``'s input
    to ``input - (out_u - replacement_u)``, with ``out_u`` the sender's output in that run;
    everything else is computed as usual. ``replacement`` holds the senders' replacement
    outputs: ``sender_outputs(model, other)`` to patch from another input (same examples and
    positions), or ``sender_outputs(model, reference).mean()`` to mean-ablate edges.

    The fast path batches runs like the intervention engine (stacked along the batch, chunks
    sized to ``memory_budget``, each chunk starting at the first layer its runs change). On a
    ``TransformerBridge`` too: there the chunks go through the bridge's blocks one by one, each
    block called with what the bridge's own forward passed it in the base run (the causal
    mask, the rotary embeddings), rather than through the bridge's forward, which computes
    every layer.
    ``memory_budget`` is a number of bytes, as for ``ck.run_interventions``; it covers, by
    estimate, what the fast path keeps for a group of examples (the base run's residual
    streams, keys and values, its senders' outputs and their deltas from ``replacement``)
    plus one chunk's activations, deltas and corrections. When one run of every example does
    not fit, the examples go in groups; when one run of one example does not, a warning says
    how much the call takes. It does not cover the model, ``replacement`` or the results.
    ``reference=True`` runs one plain ``run_with_hooks`` forward per run. The metric is called
    after each forward's hooks are removed and the flags put back, so a metric that runs the
    model itself sees the plain model. The model's configuration flags and hooks are as
    before afterwards, also after an error.

    Returns the per-example metric, shape ``[len(runs), n]``, on the CPU.

    Example::

        graph = ck.Graph.of(model)
        mean = ck.sender_outputs(model, abc).mean()
        circuit = graph.mask([ck.Edge(ck.Head(23, 0), "logits"), ck.Edge(ck.Embed(), "logits")])
        ablated = graph.valid & ~circuit              # every edge outside the circuit
        model_only, circuit_only = ck.patch_edges(model, ds, [[], ablated], metric,
                                                  replacement=mean)
    """
    where = "patch_edges"
    memory_budget = check_memory_budget(memory_budget, where)
    graph = Graph.of(model, where)
    tokens, _ = as_tokens(base, "base", where, model=model)
    tokens = tokens.to(model.cfg.device)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ShapeError(
            f"{where}: base has {tokens.shape[1]} positions but the model's context is "
            f"{model.cfg.n_ctx}"
        )
    n = tokens.shape[0]
    check_graph_metric(metric, n, where)
    if isinstance(metric, Metric):
        metric.check_positions(tokens.shape[1], where)
    masks = run_masks(graph, runs, where)
    _check_replacement(model, replacement, tokens, where)
    if not len(masks):
        return torch.zeros(0, n)
    with torch.no_grad():
        if reference:
            return _patch_edges_reference(
                model, graph, tokens, masks, metric, replacement, progress, desc
            )
        return _patch_edges_fast(
            model,
            graph,
            tokens,
            masks,
            metric,
            replacement,
            memory_budget,
            max_runs_per_chunk,
            progress,
            desc,
        )


def run_masks(graph: Graph, runs: Sequence[EdgeRun] | Tensor, where: str) -> Tensor:
    """bool [n_runs, receiver, sender] of runs given as edge collections or masks."""
    if isinstance(runs, Tensor):
        graph.check_mask(runs, where)
        if runs.ndim != 3:
            raise ShapeError(
                f"{where}: runs as one tensor need the shape [n_runs, receiver, sender], "
                f"got {tuple(runs.shape)}"
            )
        return runs.cpu()
    if isinstance(runs, (Edge, str)) or not isinstance(runs, Sequence):
        raise CircuitkitError(
            f"{where}: runs must be a list of runs, each a collection of edges or a bool "
            f"[receiver, sender] mask; got {type(runs).__name__}"
        )
    masks = []
    for run in runs:
        if isinstance(run, Tensor):
            graph.check_mask(run, where)
            if run.ndim != 2:
                raise ShapeError(
                    f"{where}: a run's mask is [receiver, sender], got {tuple(run.shape)}"
                )
            masks.append(run.cpu())
        elif isinstance(run, Edge) or not isinstance(run, Collection):
            raise CircuitkitError(
                f"{where}: each run is a collection of edges or a bool mask, got {run!r}; "
                "wrap a single edge in a list"
            )
        else:
            masks.append(graph.mask(run, where))
    shape = (0, len(graph.receivers), len(graph.senders))
    return torch.stack(masks) if masks else torch.zeros(shape, dtype=torch.bool)


def _check_replacement(
    model: HookedTransformer, replacement: Any, tokens: Tensor, where: str
) -> None:
    if not isinstance(replacement, SenderOutputs):
        raise CircuitkitError(
            f"{where}: replacement must be SenderOutputs (ck.sender_outputs(model, other), or "
            f"its .mean() for mean ablation), got {type(replacement).__name__}"
        )
    n, n_pos = tokens.shape
    n_mlp = 0 if model.cfg.attn_only else model.cfg.n_layers
    if len(replacement.z) != model.cfg.n_layers or len(replacement.mlp_out) != n_mlp:
        raise ShapeError(
            f"{where}: replacement holds {len(replacement.z)} layers of heads and "
            f"{len(replacement.mlp_out)} of MLPs, but the model has {model.cfg.n_layers} layers"
        )
    if replacement.n not in (1, n) or replacement.embed.shape[1] != n_pos:
        raise ShapeError(
            f"{where}: replacement has {replacement.n} examples of {replacement.embed.shape[1]} "
            f"positions but base has {n} of {n_pos}; it needs {n_pos} positions and {n} examples "
            "(or 1, after .mean())"
        )


def _patch_edges_fast(
    model: HookedTransformer,
    graph: Graph,
    tokens: Tensor,
    masks: Tensor,
    metric: MetricLike,
    replacement: SenderOutputs,
    memory_budget: int | None,
    max_runs_per_chunk: int | None,
    progress: bool,
    desc: str,
) -> Float[Tensor, "n_runs n"]:
    cfg = model.cfg
    n, n_pos = tokens.shape
    # A run holds every sender's delta for every example, so one run of many examples can
    # outgrow the budget by itself: then the examples are taken in groups, each run in turn.
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    inputs_per_position = (cfg.n_heads + 2 * graph.n_kv_heads + 1) * cfg.d_model * 4
    per_example = bytes_per_run(model, 1, n_pos, n_pos, full_logits=False) + itemsize * n_pos * (
        len(graph.senders) * cfg.d_model + inputs_per_position
    )
    # What a group keeps while its runs go, per example: the base run's residual streams,
    # keys and values, its senders' outputs and their deltas from the replacement.
    d_kv = graph.n_kv_heads * cfg.d_head
    d_outputs = cfg.d_model + cfg.n_layers * (
        cfg.n_heads * cfg.d_head + graph.has_mlp * cfg.d_model
    )
    kept_per_position = (cfg.n_layers + 1) * cfg.d_model + 2 * cfg.n_layers * d_kv + d_outputs
    kept_per_example = itemsize * n_pos * (kept_per_position + len(graph.senders) * cfg.d_model)
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    group = max(1, min(n, int(budget // (kept_per_example + per_example))))
    kept = kept_per_example * group
    warn_if_over_budget("patch_edges", budget, memory_budget is None, kept, per_example * group)
    size = runs_per_chunk(model, per_example * group, max(budget - kept, 0), max_runs_per_chunk)

    # A run changes nothing before its first receiver with a patched edge.
    touched = masks.any(dim=2)
    first = torch.where(touched, graph.receiver_layers, cfg.n_layers).min(dim=1).values
    starts = [(int(layer), 0) for layer in first]
    results = torch.empty(len(masks), n)
    n_groups = -(-n // group)
    with tqdm(total=len(masks) * n_groups, desc=desc, disable=not progress, leave=False) as bar:
        for begin in range(0, n, group):
            rows = torch.arange(begin, min(begin + group, n))
            results[:, rows] = _patch_edges_group(
                model,
                graph,
                tokens[rows.to(tokens.device)],
                masks,
                starts,
                select_examples(metric, rows, n) if len(rows) < n else metric,
                replacement.rows(rows.to(tokens.device)),
                size,
                bar,
            )
    return results


def _patch_edges_group(
    model: HookedTransformer,
    graph: Graph,
    tokens: Tensor,
    masks: Tensor,
    starts: list[tuple[int, int]],
    metric: MetricLike,
    replacement: SenderOutputs,
    size: int,
    bar: Any,
) -> Float[Tensor, "n_runs n"]:
    """Every run on the examples ``tokens``, in chunks of at most ``size`` runs that start at
    the same layer."""
    cfg = model.cfg
    n, n_layers = tokens.shape[0], cfg.n_layers
    recorded: dict[str, Tensor] = {}
    embed_name = Resid(0, "pre").hook_name(model)
    z_names = [Head(layer, 0).hook_name(model) for layer in range(n_layers)]
    mlp_names = [MLP(layer).hook_name(model) for layer in range(n_layers)] if graph.has_mlp else []
    record = [
        (name, lambda act, name=name: recorded.__setitem__(name, act))
        for name in [embed_name, *z_names, *mlp_names]
    ]
    bridge = is_bridge(model)
    with split_inputs(model), hooks_added(model, record):
        if bridge:
            base, block_arguments = _bridge_base_run(model, tokens)
        else:
            base = base_run(model, tokens)
    base_outputs = SenderOutputs(
        recorded[embed_name],
        tuple(recorded[name] for name in z_names),
        tuple(recorded[name] for name in mlp_names),
    )
    # senders first: a run's correction is one matrix product over a prefix of the senders
    base_deltas = sender_deltas(model, graph, base_outputs, replacement).transpose(0, 1)

    results = torch.empty(len(masks), n)
    for chunk in chunk_groups(starts, lambda start: size):
        c = len(chunk)
        start = starts[chunk[0]][0]
        chunk_masks = masks[chunk]
        weights = chunk_masks.to(device=tokens.device, dtype=cfg.dtype)
        # a fresh copy (the hooks write into it), laid out senders before examples so that a
        # prefix of the senders is one block
        deltas = base_deltas.expand(c, *base_deltas.shape).clone(
            memory_format=torch.contiguous_format
        )
        hooks = _edge_hooks(
            model, graph, chunk_masks.any(dim=(0, 2)), weights, deltas, replacement, c, n, start
        )
        with split_inputs(model), hooks_added(model, hooks):
            if bridge:
                residual = _bridge_blocks(model, base, block_arguments, c, n, start)
            else:
                residual = run_blocks(model, tokens, c, start, 0, n_layers, base)
            row = graph.logits_row
            if chunk_masks[:, row].any():
                correction = _correction(deltas, weights[:, row : row + 1])
                residual = residual - correction.reshape(residual.shape)
            logits = read_logits(model, residual, metric, c, n, 0, base)
        # with the hooks removed and the flags put back, as in the reference path: a metric
        # that runs the model itself sees the plain model
        values = metric_values(logits, metric, c, n, "patch_edges")
        results[torch.tensor(chunk)] = values.float().cpu()
        bar.update(c)
    return results


_BlockArguments = tuple[tuple[Any, ...], dict[str, Any]]


def _bridge_base_run(model: Model, tokens: Tensor) -> tuple[BaseRun, list[_BlockArguments]]:
    """The base run on a ``TransformerBridge``, through its own forward: the residual stream
    entering each block (and the final one) as a ``BaseRun``, and the arguments besides the
    residual stream that its Hugging Face model passed each block (the causal mask, the rotary
    embeddings, position ids), so that a chunk's runs can go through the blocks one by one
    from any layer, as that forward would have run them. The forward keeps no key/value cache
    (``use_cache=False``): blocks called again must not append to one."""
    n_layers = model.cfg.n_layers
    resid: dict[int, Tensor] = {}
    arguments: list[_BlockArguments] = [((), {})] * n_layers

    def block_input(layer: int, args: tuple, kwargs: dict) -> None:
        resid[layer] = args[0] if args else kwargs["hidden_states"]
        arguments[layer] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def block_output(output: Any) -> None:
        resid[n_layers] = output[0] if isinstance(output, tuple) else output

    # Plain module hooks on the blocks, not hook points: a block's input and output are the
    # residual stream itself, in no layout that the bridge's hook conversion would change.
    handles = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs, layer=layer: block_input(layer, args, kwargs),
            with_kwargs=True,
        )
        for layer, block in enumerate(model.blocks)
    ]
    handles.append(
        model.blocks[n_layers - 1].register_forward_hook(
            lambda module, args, output: block_output(output)
        )
    )
    try:
        model(tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return BaseRun(resid, {}, {}, None, None), arguments


def _bridge_blocks(
    model: Model,
    base: BaseRun,
    arguments: list[_BlockArguments],
    c: int,
    n: int,
    start: int,
) -> Float[Tensor, "c_n pos d_model"]:
    """The final residual stream of a chunk of c runs (a c * n batch) on a ``TransformerBridge``:
    the base run's residual stream before block ``start``, then each block called with the
    arguments the bridge's forward gave it in the base run (``_bridge_base_run``), those with a
    batch dimension (the causal mask, [n, 1, pos, pos]) repeated for the chunk and those shared
    by every example ([1, ...], the rotary embeddings) as they are."""

    def tiled(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
            return value.repeat(c, *[1] * (value.ndim - 1))
        if isinstance(value, tuple):
            return tuple(tiled(item) for item in value)
        return value

    residual = base.resid[start].repeat(c, 1, 1)
    for layer in range(start, model.cfg.n_layers):
        args, kwargs = arguments[layer]
        output = model.blocks[layer](
            residual, *tiled(args), **{key: tiled(value) for key, value in kwargs.items()}
        )
        residual = output[0] if isinstance(output, tuple) else output
    return residual


def _correction(deltas: Tensor, weights: Tensor) -> Tensor:
    """[c, n, pos, receiver, d_model]: for each run and receiver, the sum of the patched senders'
    deltas. ``deltas`` [c, sender, n, pos, d_model] holds at least the senders ``weights`` [c,
    receiver, sender] covers (the first ones).

    Senders that every receiver of a run patches (most of them, when a circuit is tested by
    ablating everything outside it) are summed once for all of the run's receivers; only the
    others go through the per-receiver product, gathered first when they are few."""
    c, n_receivers, n_senders = weights.shape
    flat = deltas[:, :n_senders].flatten(2)  # [c, sender, n * pos * d_model], a view
    patched = weights != 0
    shared = patched.all(dim=1)  # [c, sender]
    others = patched & ~shared[:, None]
    summed = flat.new_zeros(c, 1, flat.shape[-1])
    if shared.any():
        summed = torch.bmm(shared[:, None].to(flat.dtype), flat)
    rest = others.any(dim=1).any(dim=0)  # [sender]
    if rest.any():
        rest_weights = weights * others.to(weights.dtype)
        if 2 * int(rest.sum()) < n_senders:
            columns = rest.nonzero()[:, 0]
            summed = summed + torch.bmm(rest_weights[:, :, columns], flat[:, columns])
        else:
            summed = summed + torch.bmm(rest_weights, flat)
    summed = summed.expand(c, n_receivers, flat.shape[-1])
    return summed.view(c, n_receivers, *deltas.shape[2:]).permute(0, 2, 3, 1, 4)


def _edge_hooks(
    model: HookedTransformer,
    graph: Graph,
    touched: Tensor,
    weights: Tensor,
    deltas: Tensor,
    replacement: SenderOutputs,
    c: int,
    n: int,
    start: int,
) -> list[tuple[str, Any]]:
    """Hooks for a chunk of c runs from layer ``start`` on: senders write their deltas into
    ``deltas``; receivers with a patched edge subtract their runs' corrections."""
    hooks: list[tuple[str, Any]] = []

    def view(act: Tensor) -> Tensor:
        return act.view(c, n, *act.shape[1:])

    for layer in range(start, graph.n_layers):

        def record_heads(z: Tensor, layer: int = layer) -> None:
            z_delta = view(z) - replacement.z[layer]
            out = head_outputs(model, layer, z_delta)  # [c, n, pos, head, d_model]
            deltas[:, graph.head_columns(layer)] = out.permute(0, 3, 1, 2, 4)

        hooks.append((Head(layer, 0).hook_name(model), record_heads))
        if graph.has_mlp:

            def record_mlp(out: Tensor, layer: int = layer) -> None:
                deltas[:, graph.mlp_column(layer)] = view(out) - replacement.mlp_out[layer]

            hooks.append((MLP(layer).hook_name(model), record_mlp))

        if touched[graph.attn_rows(layer)].any():
            hooks += _attention_input_patches(model, graph, layer, weights, deltas)
        if graph.has_mlp and touched[graph.mlp_row(layer)]:
            row, n_senders = graph.mlp_row(layer), graph.senders_into_mlp(layer)

            def patch_mlp(x: Tensor, row: int = row, n_senders: int = n_senders) -> Tensor:
                correction = _correction(deltas, weights[:, row : row + 1, :n_senders])
                return x - correction.reshape(x.shape)

            hooks.append((input_hook_name(layer, "mlp"), patch_mlp))
    return hooks


def _attention_input_patches(
    model: HookedTransformer, graph: Graph, layer: int, weights: Tensor, deltas: Tensor
) -> list[tuple[str, Any]]:
    """Hooks that subtract the runs' corrections from ``layer``'s query, key and value inputs.
    All three read the same senders, so one correction is computed, at the queries (the first
    of the three hooks to run), for all of the layer's heads."""
    rows, n_senders = graph.attn_rows(layer), graph.senders_before(layer)
    h, kv = graph.n_heads, graph.n_kv_heads
    parts = {"q": slice(0, h), "k": slice(h, h + kv), "v": slice(h + kv, h + 2 * kv)}
    pending: dict[str, Tensor] = {}

    def patch(x: Tensor, part: str) -> Tensor:
        if part == "q":
            pending["correction"] = _correction(deltas, weights[:, rows, :n_senders])
        return x - pending["correction"][:, :, :, parts[part]].reshape(x.shape)

    return [
        (input_hook_name(layer, part), lambda x, part=part: patch(x, part))  # type: ignore[arg-type]
        for part in parts
    ]


def _patch_edges_reference(
    model: HookedTransformer,
    graph: Graph,
    tokens: Tensor,
    masks: Tensor,
    metric: MetricLike,
    replacement: SenderOutputs,
    progress: bool,
    desc: str,
) -> Float[Tensor, "n_runs n"]:
    """One plain forward per run: senders' outputs recorded as they are computed, and each
    patched edge subtracted from its receiver's input, one edge at a time."""
    n = tokens.shape[0]
    w_o = [model.blocks[layer].attn.W_O for layer in range(graph.n_layers)]

    def replacement_of(sender: Component) -> Tensor:
        if isinstance(sender, Embed):
            return replacement.embed
        if isinstance(sender, Head):
            return replacement.z[sender.layer][:, :, sender.head] @ w_o[sender.layer][sender.head]
        return replacement.mlp_out[sender.layer]  # type: ignore[attr-defined]

    out = []
    for mask in tqdm(masks, desc=f"{desc} (reference)", disable=not progress, leave=False):
        patched: dict[Receiver, list[Component]] = {}
        for edge in graph.edges_in(mask):
            patched.setdefault(edge.receiver, []).append(edge.sender)
        outputs: dict[Component, Tensor] = {}

        def record_embed(x: Tensor, hook: Any, outputs: dict = outputs) -> None:
            outputs[Embed()] = x

        def record_z(z: Tensor, hook: Any, layer: int, outputs: dict = outputs) -> None:
            for h in range(graph.n_heads):
                outputs[Head(layer, h)] = z[:, :, h] @ w_o[layer][h]

        def record_mlp(x: Tensor, hook: Any, layer: int, outputs: dict = outputs) -> None:
            outputs[MLP(layer)] = x

        def patch(x: Tensor, hook: Any, receivers: list, outputs: dict = outputs, patched=patched):
            x = x.clone()
            for receiver, slot in receivers:
                for sender in patched.get(receiver, []):
                    delta = outputs[sender] - replacement_of(sender)
                    if slot is None:
                        x -= delta
                    else:
                        x[:, :, slot] -= delta
            return x

        hooks: list[tuple[str, Any]] = [(Resid(0, "pre").hook_name(model), record_embed)]
        for layer in range(graph.n_layers):
            hooks.append(
                (
                    Head(layer, 0).hook_name(model),
                    lambda z, hook, layer=layer: record_z(z, hook, layer),
                )
            )
            qs = [(Head(layer, h).q, h) for h in range(graph.n_heads)]
            ks = [(Head(layer, g * graph.group).k, g) for g in range(graph.n_kv_heads)]
            vs = [(Head(layer, g * graph.group).v, g) for g in range(graph.n_kv_heads)]
            for part, receivers in (("q", qs), ("k", ks), ("v", vs)):
                hooks.append(
                    (
                        input_hook_name(layer, part),  # type: ignore[arg-type]
                        lambda x, hook, receivers=receivers: patch(x, hook, receivers),
                    )
                )
            if graph.has_mlp:
                hooks.append(
                    (
                        input_hook_name(layer, "mlp"),
                        lambda x, hook, layer=layer: patch(x, hook, [(MLP(layer), None)]),
                    )
                )
                hooks.append(
                    (
                        MLP(layer).hook_name(model),
                        lambda x, hook, layer=layer: record_mlp(x, hook, layer),
                    )
                )
        final = Resid(graph.n_layers - 1, "post").hook_name(model)
        hooks.append((final, lambda x, hook: patch(x, hook, [(LOGITS, None)])))
        with split_inputs(model):
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        values = metric(logits.float())  # on the plain model, as in the fast path
        out.append(check_metric_output(values, n, "patch_edges").float().cpu())
    return torch.stack(out)


__all__ = ["EdgeRun", "patch_edges", "run_masks"]
