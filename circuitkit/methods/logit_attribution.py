"""Direct logit attribution and the logit lens: reading the residual stream off in logits.

Context. The final residual stream at a position is a sum: the embeddings, plus what every
attention head and every MLP layer wrote into it (heads write ``z @ W_O``, each attention
layer adds its bias ``b_O``, each MLP writes its output). The logits are that sum passed
through the final normalisation and the unembedding. The final normalisation divides by a
scale that depends on the whole sum, but for one forward pass that scale is a fixed number
per example and position, so with the scale *frozen* at its value in the run everything
after it is linear, and the logit difference splits exactly into one term per writer:

    logit_diff = sum_c  (centre(x_c) / scale) . (w * u)   +   b . u   +   b_U[IO] - b_U[S]

where ``x_c`` is component ``c``'s write at the read position, ``scale`` the final norm's
cached scale (``ln_final.hook_scale``), ``centre`` subtracts the mean over ``d_model`` for
LayerNorm (not for RMSNorm), ``w`` and ``b`` the final norm's weight and bias (the models here
are not weight-processed, so they are applied explicitly), and ``u = W_U[:, IO] - W_U[:, S]``
the *logit-difference direction*. The term of ``c`` is its **direct** effect: what it adds to
the logit difference through the residual stream alone, not through later layers. This is
TransformerLens's ``cache.apply_ln_to_stack`` followed by a projection onto ``u``, with the
final norm's weight and bias applied as well.

``direct_logit_attribution`` returns these terms by layer, by head, by neuron or for every
component in order; ``info["bias"]`` holds the two constant terms and ``info["total"]`` the
logit difference of the run, so that for ``by="layer"`` and ``by="component"`` the rows plus
the bias add up to the total.

The **logit lens** reads the logit difference off the residual stream part-way through the
model, as if the remaining layers were skipped: the accumulated residual stream after each
layer is passed through the final norm with *its own* statistics (recomputed, not the final
run's cached scale, as TransformerLens's ``accumulated_resid(apply_ln=True)``) and unembedded.
The last entry is the model's logit difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.core import provenance
from circuitkit.core.components import MLP, Attn, Embed, Head, Neuron, PosEmbed, Resid
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.lens import ActivationCache, HookedTransformer, get_act_name
from circuitkit.core.results import Result

AttributionBy = Literal["layer", "head", "neuron", "component"]
_BY = ("layer", "head", "neuron", "component")

Answers = tuple[Int[Tensor, "n"], Int[Tensor, "n"]] | Int[Tensor, "n"]


def direct_logit_attribution(
    model: HookedTransformer,
    cache: ActivationCache | Mapping[str, Tensor],
    ds: Any | None = None,
    by: AttributionBy = "layer",
    *,
    answers: Answers | None = None,
    direction: Float[Tensor, "d_model"] | Float[Tensor, "n d_model"] | None = None,
    position: str | int | Int[Tensor, "n"] | None = None,
    layers: Sequence[int] | None = None,
    keep_examples: bool = True,
) -> Result:
    """The direct effect of each component on the logit difference, per example.

    Each component's write into the final residual stream, at the read position, is passed
    through the final normalisation with its scale frozen at the value cached in the run and
    projected onto the unembedding direction ``W_U[:, IO] - W_U[:, S]`` (see the module's
    docstring for the formula).

    ``by`` chooses the components: "layer" (axis "component": the embeddings, then each
    layer's attention output and MLP output, labelled "embed", "pos_embed", "attn 0",
    "mlp 0", ...), "head" (axes ("layer", "head"): each head's ``z @ W_O``, without the
    attention bias), "neuron" (axes ("layer", "neuron") for ``layers``, default all: each
    neuron's activation times its row of ``W_out``) or "component" (axis "component":
    everything that writes into the residual stream, in the order it writes: "embed",
    "pos_embed", then per layer "head 0.0", ..., "attn bias 0", "mlp 0").

    What is attributed: by default the logit difference IO - S of the dataset ``ds``;
    ``answers=(correct, incorrect)`` ([n] token ids each) the logit difference of those tokens,
    ``answers=tokens`` ([n]) the logit of one token per example; ``direction`` ([d_model] or
    [n, d_model], in the space the unembedding reads, after the final norm) any direction, with
    no unembedding bias. ``position`` is a dataset word ("end", the default when ``ds`` has
    positions), an int, or an [n] tensor of token indices; the default without a dataset is the
    last position.

    ``cache`` is an ``ActivationCache`` from ``model.run_with_cache(tokens)`` (or a dict of
    the same names; ``required_hooks(model, by)`` lists the ones needed). The model must not
    soft-cap its logits, which would make them non-linear in the residual stream.

    Returns a ``Result`` of the mean attribution per component, with per-example values in
    ``examples`` (dropped with ``keep_examples=False``) and its ``provenance``; ``info["bias"]``
    [n] is the final norm's bias and the unembedding bias along the direction, ``info["total"]``
    [n] the logit difference of the cached run. For "layer" and "component" the rows plus
    ``info["bias"]`` sum to ``info["total"]``.

    Example::

        logits, cache = model.run_with_cache(ds.tokens)
        heads = ck.direct_logit_attribution(model, cache, ds, by="head")
        heads.top(10)            # the heads that write most to the logit difference
        ck.plot(heads)
    """
    where = "direct_logit_attribution"
    if by not in _BY:
        raise CircuitkitError(f"{where}: by must be one of {_BY}, got {by!r}")
    if layers is not None and by != "neuron":
        raise CircuitkitError(f"{where}: layers= is only for by='neuron', got by={by!r}")
    _check_no_softcap(model, where)
    cfg = model.cfg
    resid_final = _cached(cache, Resid(cfg.n_layers - 1, "post").hook_name(model), where, by)
    n, n_pos = resid_final.shape[:2]
    read = _read_positions(ds, position, n, n_pos, where)
    device = resid_final.device
    rows = torch.arange(n, device=device)
    read = read.to(device)

    def at_read(name: str) -> Tensor:
        act = _cached(cache, name, where, by)
        if act.shape[:2] != (n, n_pos):
            raise ShapeError(
                f"{where}: the cached {name!r} has shape {tuple(act.shape)}, expected "
                f"[{n}, {n_pos}, ...] like the final residual stream"
            )
        return act[rows, read].float()

    with torch.no_grad():
        u, offset, metric_name = _direction(model, ds, answers, direction, n, device, where)
        w, b, centre = _final_norm(model, device)
        read_vector = w * u  # [n, d_model]: the final norm's weight folded into the direction
        if centre:
            read_vector = read_vector - read_vector.mean(-1, keepdim=True)
        scale = _final_scale(model, cache, rows, read, where, by)  # [n, 1]

        def project(x: Tensor) -> Tensor:
            """The direct effect of writes ``x`` [..., n, d_model] -> [..., n]."""
            return (x * read_vector).sum(-1) / scale[:, 0]

        if by == "head":
            values = torch.stack(
                [
                    _head_attributions(model, at_read, layer, read_vector, scale)
                    for layer in range(cfg.n_layers)
                ]
            )  # [layer, head, n]
            axes: tuple[str, ...] = ("layer", "head")
            labels = {
                "layer": [str(layer) for layer in range(cfg.n_layers)],
                "head": [str(h) for h in range(cfg.n_heads)],
            }
        elif by == "neuron":
            chosen = _check_layers(model, layers, where)
            w_out_v = [
                model.blocks[layer].mlp.W_out.detach().float().to(device) @ read_vector.T
                for layer in chosen
            ]  # each [d_mlp, n]
            values = torch.stack(
                [
                    at_read(Neuron(layer, 0).hook_name(model)).T * w_v / scale[:, 0]
                    for layer, w_v in zip(chosen, w_out_v, strict=True)
                ]
            )  # [layer, neuron, n]
            axes = ("layer", "neuron")
            labels = {
                "layer": [str(layer) for layer in chosen],
                "neuron": [str(i) for i in range(cfg.d_mlp)],
            }
        else:
            label_list, parts = [], []
            for label, writes in _writers(model, by, at_read, read_vector, scale, project):
                label_list.append(label)
                parts.append(writes)
            values = torch.stack(parts)  # [component, n]
            axes = ("component",)
            labels = {"component": label_list}

        bias = (b * u).sum(-1) + offset
        total = _model_readout(model, resid_final[rows, read].float(), u, offset)
    made = provenance.record(
        model,
        method=where,
        args={
            "by": by,
            "answers": answers,
            "direction": direction,
            "position": position,
            "layers": layers,
            "keep_examples": keep_examples,
        },
        data=ds,
        metric=metric_name,
    )
    return Result.from_examples(
        values.cpu(),
        axes,
        labels,
        keep_examples=keep_examples,
        provenance=made,
        metric=metric_name,
        method=where,
        info={
            "by": by,
            "position": _describe_position(position, ds),
            "bias": bias.cpu(),
            "total": total.cpu(),
        },
    )


def logit_lens(
    model: HookedTransformer,
    cache: ActivationCache | Mapping[str, Tensor],
    ds: Any | None = None,
    *,
    answers: Answers | None = None,
    direction: Float[Tensor, "d_model"] | Float[Tensor, "n d_model"] | None = None,
    position: str | int | Int[Tensor, "n"] | None = None,
    keep_examples: bool = True,
) -> Result:
    """The logit difference read off the residual stream after each layer (the logit lens).

    The accumulated residual stream at the read position, after the embeddings (label
    "embed") and after each block ``l`` (label ``"l"``), goes through the model's own final
    norm, with statistics recomputed for that stream (as TransformerLens's
    ``cache.accumulated_resid(apply_ln=True)``; not the final run's cached scale), and the
    unembedding. The last entry is therefore the model's own logit difference.

    ``answers``, ``direction`` and ``position`` are as in ``direct_logit_attribution``.
    Returns a ``Result`` with axis "layer" (``n_layers + 1`` entries), per-example values
    (unless ``keep_examples=False``) and provenance.

    Example::

        _, cache = model.run_with_cache(ds.tokens)
        lens = ck.logit_lens(model, cache, ds)
        lens.values              # logit difference after the embeddings and after each layer
    """
    where = "logit_lens"
    _check_no_softcap(model, where)
    cfg = model.cfg
    names = [Resid(0, "pre").hook_name(model)] + [
        Resid(layer, "post").hook_name(model) for layer in range(cfg.n_layers)
    ]
    streams = [_cached(cache, name, where, "logit_lens") for name in names]
    n, n_pos = streams[-1].shape[:2]
    read = _read_positions(ds, position, n, n_pos, where).to(streams[-1].device)
    rows = torch.arange(n, device=read.device)
    with torch.no_grad():
        u, offset, metric_name = _direction(model, ds, answers, direction, n, read.device, where)
        values = torch.stack(
            [_model_readout(model, stream[rows, read].float(), u, offset) for stream in streams]
        )
    made = provenance.record(
        model,
        method=where,
        args={
            "answers": answers,
            "direction": direction,
            "position": position,
            "keep_examples": keep_examples,
        },
        data=ds,
        metric=metric_name,
    )
    return Result.from_examples(
        values.cpu(),
        ("layer",),
        {"layer": ["embed"] + [str(layer) for layer in range(cfg.n_layers)]},
        keep_examples=keep_examples,
        provenance=made,
        metric=metric_name,
        method=where,
        info={"position": _describe_position(position, ds), "apply_ln": "recomputed per layer"},
    )


def required_hooks(
    model: HookedTransformer, by: AttributionBy | Literal["logit_lens"] = "layer"
) -> set[str]:
    """The activation names a cache needs for ``direct_logit_attribution(by=...)`` or
    ``logit_lens`` (``by="logit_lens"``): a ``names_filter`` that keeps a cache small.

    Example::

        needed = required_hooks(model, "head") | required_hooks(model, "logit_lens")
        _, cache = model.run_with_cache(ds.tokens, names_filter=lambda name: name in needed)
    """
    cfg = model.cfg
    layers = range(cfg.n_layers)
    final = Resid(cfg.n_layers - 1, "post").hook_name(model)
    if by == "logit_lens":
        return {Resid(0, "pre").hook_name(model)} | {
            Resid(layer, "post").hook_name(model) for layer in layers
        }
    if by not in _BY:
        raise CircuitkitError(
            f"required_hooks: by must be one of {(*_BY, 'logit_lens')}, got {by!r}"
        )
    names = {final}
    if cfg.normalization_type is not None:
        names.add(get_act_name("scale"))
    if by == "head":
        names |= {Head(layer, 0).hook_name(model) for layer in layers}
    elif by == "neuron":
        names |= {Neuron(layer, 0).hook_name(model) for layer in layers}
    else:
        names |= {Embed().hook_name(model)}
        if _has_pos_embed(model):
            names.add(PosEmbed().hook_name(model))
        if by == "component":
            names |= {Head(layer, 0).hook_name(model) for layer in layers}
        else:
            names |= {Attn(layer).hook_name(model) for layer in layers}
        if not cfg.attn_only:
            names |= {MLP(layer).hook_name(model) for layer in layers}
    return names


# ---------------------------------------------------------------------------------------------
# Pieces


def _writers(
    model: HookedTransformer,
    by: str,
    at_read: Callable[[str], Tensor],
    read_vector: Tensor,
    scale: Tensor,
    project: Callable[[Tensor], Tensor],
) -> Iterator[tuple[str, Tensor]]:
    """``(label, attribution [n])`` for each writer into the residual stream, in order."""
    cfg = model.cfg
    yield "embed", project(at_read(Embed().hook_name(model)))
    if _has_pos_embed(model):
        yield "pos_embed", project(at_read(PosEmbed().hook_name(model)))
    for layer in range(cfg.n_layers):
        if by == "layer":
            yield f"attn {layer}", project(at_read(Attn(layer).hook_name(model)))
        else:
            heads = _head_attributions(model, at_read, layer, read_vector, scale)
            for h in range(cfg.n_heads):
                yield f"head {layer}.{h}", heads[h]
            b_o = model.blocks[layer].attn.b_O.detach().float().to(read_vector.device)
            yield f"attn bias {layer}", project(b_o.expand_as(read_vector))
        if not cfg.attn_only:
            yield f"mlp {layer}", project(at_read(MLP(layer).hook_name(model)))


def _head_attributions(
    model: HookedTransformer,
    at_read: Callable[[str], Tensor],
    layer: int,
    read_vector: Tensor,
    scale: Tensor,
) -> Tensor:
    """[head, n]: each head's ``z @ W_O`` at the read position, projected."""
    z = at_read(Head(layer, 0).hook_name(model))  # [n, head, d_head]
    w_o = model.blocks[layer].attn.W_O.detach().float().to(z.device)  # [head, d_head, d_model]
    w_o_v = torch.einsum("hdm,nm->nhd", w_o, read_vector)
    return (z * w_o_v).sum(-1).T / scale[:, 0]


def _direction(
    model: HookedTransformer,
    ds: Any,
    answers: Answers | None,
    direction: Tensor | None,
    n: int,
    device: torch.device,
    where: str,
) -> tuple[Tensor, Tensor, str]:
    """``(u [n, d_model], offset [n], metric name)``: the readout is ``normed . u + offset``."""
    d_model = model.cfg.d_model
    if direction is not None:
        if answers is not None:
            raise CircuitkitError(f"{where}: give answers or direction, not both")
        if direction.shape not in ((d_model,), (n, d_model)):
            raise ShapeError(
                f"{where}: direction has shape {tuple(direction.shape)}, expected ({d_model},) "
                f"or ({n}, {d_model})"
            )
        if not bool(torch.isfinite(direction).all()):
            raise CircuitkitError(f"{where}: direction has NaN or infinite entries")
        u = direction.detach().float().to(device).expand(n, d_model)
        return u, torch.zeros(n, device=device), "direction"
    if answers is None:
        if not (hasattr(ds, "io_tokens") and hasattr(ds, "s_tokens")):
            raise CircuitkitError(
                f"{where}: pass an IOI dataset, answers=(correct, incorrect) or direction=...; "
                f"got ds={type(ds).__name__}"
            )
        answers = (ds.io_tokens, ds.s_tokens)
    pair = isinstance(answers, (tuple, list))
    token_sets = list(answers) if pair else [answers]
    if pair and len(token_sets) != 2:
        raise ShapeError(f"{where}: answers must be (correct, incorrect), got {len(token_sets)}")
    for tokens in token_sets:
        if not isinstance(tokens, Tensor) or tokens.shape != (n,) or tokens.is_floating_point():
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ShapeError(f"{where}: answer tokens must be an integer [{n}] tensor, got {shape}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
            raise ShapeError(
                f"{where}: answer tokens must be in 0..{model.cfg.d_vocab - 1}, got values "
                f"{int(tokens.min())}..{int(tokens.max())}"
            )
    w_u = model.W_U.detach().float().to(device)
    b_u = model.b_U.detach().float().to(device)
    index = [t.to(device).long() for t in token_sets]
    u = w_u[:, index[0]].T
    offset = b_u[index[0]]
    if pair:
        u = u - w_u[:, index[1]].T
        offset = offset - b_u[index[1]]
    return u, offset, "logit_diff" if pair else "logit"


def _final_norm(model: HookedTransformer, device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """The final norm's weight and bias (ones and zeros where it has none), and whether it
    centres (LayerNorm) or not (RMSNorm, or no norm)."""
    d_model = model.cfg.d_model
    ln_final = getattr(model, "ln_final", None)
    w = getattr(ln_final, "w", None)
    b = getattr(ln_final, "b", None)
    weight = torch.ones(d_model) if w is None else w.detach().float()
    bias = torch.zeros(d_model) if b is None else b.detach().float()
    centre = model.cfg.normalization_type in ("LN", "LNPre")
    return weight.to(device), bias.to(device), centre


def _final_scale(
    model: HookedTransformer, cache: Any, rows: Tensor, read: Tensor, where: str, by: str
) -> Tensor:
    """[n, 1] the final norm's cached scale at the read positions (ones without a norm)."""
    if model.cfg.normalization_type is None:
        return torch.ones(rows.shape[0], 1, device=rows.device)
    scale = _cached(cache, get_act_name("scale"), where, by)
    return scale[rows, read].float().reshape(-1, 1)


def _model_readout(model: HookedTransformer, resid: Tensor, u: Tensor, offset: Tensor) -> Tensor:
    """[n]: ``ln_final(resid) . u + offset``, the model's own final norm (own statistics)."""
    normed = resid
    if model.cfg.normalization_type is not None:
        normed = model.ln_final(resid[:, None, :].to(model.cfg.dtype))[:, 0].float()
    return (normed * u).sum(-1) + offset


def _check_no_softcap(model: HookedTransformer, where: str) -> None:
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        raise CircuitkitError(
            f"{where}: this model soft-caps its logits (output_logits_soft_cap={cap}), so they "
            "are not a linear readout of the residual stream and do not decompose"
        )


def _check_layers(model: HookedTransformer, layers: Sequence[int] | None, where: str) -> list:
    if model.cfg.attn_only:
        raise ComponentError(f"{where}: this model is attention-only and has no neurons")
    chosen = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if not chosen:
        raise ComponentError(f"{where}: layers is empty; give at least one layer")
    for layer in chosen:
        if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
            raise ComponentError(
                f"{where}: layer {layer!r} is out of range; this model has layers "
                f"0..{model.cfg.n_layers - 1}"
            )
    return chosen


def _has_pos_embed(model: HookedTransformer) -> bool:
    """Whether learned positional embeddings are added to the residual stream."""
    return model.cfg.positional_embedding_type == "standard"


def _cached(cache: Any, name: str, where: str, by: str) -> Tensor:
    store = getattr(cache, "cache_dict", cache)
    if not isinstance(store, Mapping) or name not in store:
        raise CircuitkitError(
            f"{where}: the cache has no {name!r}; make it with model.run_with_cache(tokens), "
            f"keeping at least required_hooks(model, {by!r}) if you filter names"
        )
    return store[name]


def _read_positions(ds: Any, position: Any, n: int, n_pos: int, where: str) -> Tensor:
    """[n] the token index read in each example."""
    positions = getattr(ds, "positions", None)
    if position is None:
        position = "end" if positions is not None and "end" in positions else n_pos - 1
    if isinstance(position, str):
        if positions is None or position not in positions:
            known = sorted(positions) if positions is not None else []
            raise ComponentError(
                f"{where}: unknown position {position!r}; "
                + (f"the dataset has {known}" if known else "pass a dataset to resolve words")
            )
        read = positions[position]
    elif isinstance(position, int):
        if not -n_pos <= position < n_pos:
            raise ComponentError(
                f"{where}: position {position} is outside the prompt (0..{n_pos - 1})"
            )
        read = torch.full((n,), position % n_pos)
    elif isinstance(position, Tensor):
        read = position
    else:
        raise ComponentError(
            f"{where}: position must be a dataset word, an int or an [n] tensor, got {position!r}"
        )
    read = read.detach().long().cpu()
    if read.shape != (n,):
        raise ShapeError(
            f"{where}: the read positions have shape {tuple(read.shape)} but the cache has {n} "
            "examples"
        )
    if int(read.min()) < 0 or int(read.max()) >= n_pos:
        raise ComponentError(f"{where}: a read position is outside the prompt (0..{n_pos - 1})")
    return read


def _describe_position(position: Any, ds: Any) -> str:
    if position is None:
        positions = getattr(ds, "positions", None)
        return "end" if positions is not None and "end" in positions else "last"
    return position if isinstance(position, (str, int)) else "per-example tensor"
