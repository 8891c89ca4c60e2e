"""Attention-pattern scores: where each head looks, between named positions of a dataset.

Context. Path patching says that a head matters and along which path; its attention pattern
says what it reads. In the IOI circuit (Wang et al. 2022) the classes of heads are told apart
by where they attend:

- name movers attend from "end" to the indirect object ("IO"), and copy it to the logits;
- S-inhibition heads attend from "end" to the second mention of the subject ("S2");
- duplicate-token heads attend from "S2" to the first mention "S1" (the same token earlier);
- induction heads attend from "S2" to the token after the first mention, "S1+1";
- previous-token heads attend from each token to the one before it (at "S1+1", to "S1").

``attention_scores`` gives, for every head, the attention probability from a query word to
each of some key words, per example (the words are a dataset's ``positions``, resolved per
prompt). ``attention_head_scores`` gives the three scores that classify heads upstream of the
name movers. Both run the model once over the prompts (in batches that fit a memory budget),
with hooks that keep only the gathered probabilities, not the ``[batch, head, pos, pos]``
patterns, and stop after the last layer asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.core import provenance
from circuitkit.core.components import Head
from circuitkit.core.engine import (
    bytes_per_run,
    check_memory_budget,
    default_memory_budget,
    hooks_added,
)
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.inputs import as_tokens
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result

PositionSpec = str | int | Int[Tensor, "n"]

#: ``attention_head_scores``: what each score is, on the prompts of a dataset.
HEAD_SCORES: dict[str, str] = {
    "previous token": "mean attention from each real token after the first to the one before it",
    "duplicate token": "attention from S2 to S1 (the earlier copy of the same token)",
    "induction": "attention from S2 to S1+1 (the token after the earlier copy)",
}


def attention_scores(
    model: HookedTransformer,
    ds: Any | Int[Tensor, "n pos"],
    query: PositionSpec = "end",
    keys: Sequence[PositionSpec] | PositionSpec = ("IO", "S1", "S2"),
    heads: str | Sequence[Head] = "all",
    *,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Result:
    """The attention probability from ``query`` to each of ``keys``, per head and example.

    Positions are dataset words ("end", "IO", "S1+1", ... resolved per example from
    ``ds.positions``), ints (the same position in every example) or [n] tensors of indices.
    ``heads`` is "all" (axes "layer", "head", "key") or a list of heads (axes "head", "key").

    Returns a ``Result`` of the mean probability over examples, with per-example values in
    ``examples``.

    Example::

        scores = ck.attention_scores(model, ds, query="end", keys=["IO", "S1", "S2"])
        scores.values[23, 2]          # how much head 23.2 attends from end to IO, S1 and S2
        ck.attention_scores(model, ds, "S2", ["S1", "S1+1"], heads=[ck.Head(17, 4)])
    """
    where = "attention_scores"
    tokens, positions = as_tokens(ds, "ds", where, model=model)
    n, n_pos = tokens.shape
    key_list = [keys] if isinstance(keys, (str, int, Tensor)) else list(keys)
    if not key_list:
        raise CircuitkitError(f"{where}: keys is empty; give at least one key position")
    query_index = _resolve(query, positions, n, n_pos, where)
    key_index = torch.stack([_resolve(k, positions, n, n_pos, where) for k in key_list])
    head_list, axes, labels = _heads(model, heads, where)
    key_labels = [_label(k) for k in key_list]

    def gather(pattern: Tensor, rows: Tensor) -> Tensor:
        """[batch, head, q, k] -> [batch, head, keys]: query and key positions per example."""
        b = torch.arange(len(rows), device=pattern.device)
        q = query_index[rows].to(pattern.device)
        k = key_index[:, rows].to(pattern.device)
        return pattern[b[:, None], :, q[:, None], k.T].transpose(1, 2)

    per_layer = _run_patterns(
        model, tokens, {h.layer for h in head_list}, gather, memory_budget, progress, where
    )  # layer -> [n, n_heads, keys]
    examples = torch.stack([per_layer[h.layer][:, h.head] for h in head_list])  # [h, n, keys]
    examples = examples.permute(0, 2, 1)  # [heads, keys, n]
    if heads == "all":
        examples = examples.reshape(model.cfg.n_layers, model.cfg.n_heads, len(key_list), n)
    made = provenance.record(
        model,
        method=where,
        args={"query": query, "keys": key_list, "heads": heads},
        data=ds,
    )
    return Result.from_examples(
        examples.float().cpu(),
        (*axes, "key"),
        {**labels, "key": key_labels},
        metric="attention probability",
        method=where,
        info={"query": _label(query)},
        provenance=made,
    )


def attention_head_scores(
    model: HookedTransformer,
    ds: Any,
    *,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Result:
    """The previous-token, duplicate-token and induction score of every head, on IOI prompts.

    Scores (``HEAD_SCORES``): "previous token" is the mean attention from each real token after
    the first (from ``positions["start"] + 1`` to ``positions["end"]``) to the token before it;
    "duplicate token" the attention from S2 to S1; "induction" from S2 to S1+1. ``ds`` needs the
    position words "S1", "S1+1", "S2", "start" and "end" (an ``IOIDataset`` has them).

    Returns a ``Result`` with axes ("layer", "head", "score") and per-example values.

    Example::

        scores = ck.attention_head_scores(model, ds)
        scores.values[..., 2].flatten().topk(5)     # the most induction-like heads
    """
    where = "attention_head_scores"
    tokens, positions = as_tokens(ds, "ds", where, model=model)
    n, n_pos = tokens.shape
    words = ("S1", "S1+1", "S2", "start", "end")
    index = {w: _resolve(w, positions, n, n_pos, where) for w in words}
    steps = torch.arange(1, n_pos)
    # the query positions of the previous-token score, per example: start + 1 .. end
    counted = (steps[None, :] > index["start"][:, None]) & (steps[None, :] <= index["end"][:, None])

    def gather(pattern: Tensor, rows: Tensor) -> Tensor:
        b = torch.arange(len(rows), device=pattern.device)
        s2, s1 = index["S2"][rows].to(pattern.device), index["S1"][rows].to(pattern.device)
        after_s1 = index["S1+1"][rows].to(pattern.device)
        previous = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, pos - 1]
        mask = counted[rows].to(pattern.device)[:, None, :]
        previous = (previous * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        duplicate = pattern[b, :, s2, s1]
        induction = pattern[b, :, s2, after_s1]
        return torch.stack([previous, duplicate, induction], dim=-1)  # [batch, head, 3]

    layers = set(range(model.cfg.n_layers))
    per_layer = _run_patterns(model, tokens, layers, gather, memory_budget, progress, where)
    examples = torch.stack([per_layer[layer] for layer in sorted(layers)])  # [l, n, h, 3]
    examples = examples.permute(0, 2, 3, 1)
    made = provenance.record(model, method=where, args={}, data=ds)
    return Result.from_examples(
        examples.float().cpu(),
        ("layer", "head", "score"),
        {
            "layer": [str(x) for x in range(model.cfg.n_layers)],
            "head": [str(h) for h in range(model.cfg.n_heads)],
            "score": list(HEAD_SCORES),
        },
        metric="attention probability",
        method=where,
        info={"scores": dict(HEAD_SCORES)},
        provenance=made,
    )


def _run_patterns(
    model: HookedTransformer,
    tokens: Tensor,
    layers: set[int],
    gather: Any,
    memory_budget: int | None,
    progress: bool,
    where: str,
) -> dict[int, Float[Tensor, "n head ..."]]:
    """``gather(pattern, rows)`` at each layer of ``layers``, for every example, from forwards
    in batches that stop after the last of those layers."""
    n, n_pos = tokens.shape
    memory_budget = check_memory_budget(memory_budget, where)
    budget = memory_budget if memory_budget is not None else default_memory_budget(model)
    batch = max(1, int(budget // bytes_per_run(model, 1, n_pos, n_pos, full_logits=False)))
    names = {Head(layer, 0).pattern.hook_name(model): layer for layer in layers}
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    starts = range(0, n, batch)
    with torch.no_grad():
        for start in tqdm(starts, desc=where, disable=not progress, leave=False):
            rows = torch.arange(start, min(start + batch, n))
            hooks = [
                (name, lambda act, layer=layer, rows=rows: out[layer].append(gather(act, rows)))
                for name, layer in names.items()
            ]
            with hooks_added(model, hooks):
                model(
                    tokens[rows].to(model.cfg.device),
                    stop_at_layer=max(layers) + 1,
                    return_type=None,
                )
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def _resolve(position: PositionSpec, positions: Any, n: int, n_pos: int, where: str) -> Tensor:
    """[n] token indices of a word, an int or an index tensor, checked against the prompt."""
    if isinstance(position, str):
        if positions is None or position not in positions:
            known = sorted(positions) if positions is not None else []
            raise ComponentError(
                f"{where}: unknown position word {position!r}; "
                + (f"the dataset has {known}" if known else "pass a dataset with .positions")
            )
        index = positions[position]
    elif isinstance(position, int):
        index = torch.full((n,), position + n_pos if position < 0 else position)
    elif isinstance(position, Tensor):
        index = position
    else:
        raise CircuitkitError(
            f"{where}: a position must be a dataset word, an int or an [n] tensor, got {position!r}"
        )
    index = index.detach().long().cpu()
    if index.shape != (n,):
        raise ShapeError(
            f"{where}: position {_label(position)} has shape {tuple(index.shape)}, expected ({n},)"
        )
    if int(index.min()) < 0 or int(index.max()) >= n_pos:
        raise ComponentError(
            f"{where}: position {_label(position)} points outside the prompt (0..{n_pos - 1})"
        )
    return index


def _heads(
    model: HookedTransformer, heads: str | Sequence[Head], where: str
) -> tuple[list[Head], tuple[str, ...], dict[str, list[str]]]:
    cfg = model.cfg
    if isinstance(heads, str):
        if heads != "all":
            raise CircuitkitError(f"{where}: heads must be 'all' or a list of heads, got {heads!r}")
        return (
            [Head(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)],
            ("layer", "head"),
            {
                "layer": [str(x) for x in range(cfg.n_layers)],
                "head": [str(h) for h in range(cfg.n_heads)],
            },
        )
    head_list = list(heads)
    if not head_list or not all(isinstance(h, Head) for h in head_list):
        raise CircuitkitError(
            f"{where}: heads must be 'all' or a non-empty list of ck.Head, got {heads!r}"
        )
    for head in head_list:
        try:
            head.validate(model)
        except ComponentError as error:
            raise ComponentError(f"{where}: {error}") from None
    return head_list, ("head",), {"head": [f"{h.layer}.{h.head}" for h in head_list]}


def _label(position: PositionSpec) -> str:
    return (
        position
        if isinstance(position, str)
        else (str(position) if isinstance(position, int) else "tensor")
    )


__all__ = ["HEAD_SCORES", "attention_head_scores", "attention_scores"]
