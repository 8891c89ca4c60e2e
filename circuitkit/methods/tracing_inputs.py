"""The inputs of the tracing methods: token ids, targets, layers, positions and the clean run.

Shared by ``causal_tracing``, ``neuron_interventions`` and ``causal_effects``; each checks its
arguments here, so the three say the same thing about the same mistake.
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from circuitkit.core.components import (
    MLP,
    Attn,
    Component,
    Resid,
)
from circuitkit.core.errors import (
    CircuitkitError,
    ComponentError,
    ShapeError,
    TokenizationError,
    TokenizationWarning,
)
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.metrics import Metric

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")


def as_input_ids(model: HookedTransformer, input_ids: Any, where: str) -> tuple[Tensor, bool]:
    """``(tokens [batch, pos] on the model's device, whether the input was one sequence)``."""
    if isinstance(input_ids, str):
        if model.tokenizer is None:
            raise TokenizationError(f"{where}: this model has no tokenizer; pass token ids")
        return model.to_tokens(input_ids), True
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.ndim > 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ShapeError(
            f"{where}: input_ids must be a string or an integer [pos] or [batch, pos] tensor, "
            f"got {shape}"
        )
    if input_ids.ndim == 0:
        raise ShapeError(f"{where}: input_ids must be [pos] or [batch, pos], got a scalar")
    single = input_ids.ndim == 1
    tokens = input_ids[None] if single else input_ids
    if tokens.shape[1] == 0:
        raise ShapeError(f"{where}: input_ids has no positions")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ShapeError(
            f"{where}: input_ids has {tokens.shape[1]} positions but the model's context is "
            f"{model.cfg.n_ctx}"
        )
    check_token_ids(model, tokens, "input_ids", where)
    return tokens.long().to(model.cfg.device), single


def check_token_ids(model: HookedTransformer, ids: Tensor, name: str, where: str) -> None:
    vocab = model.cfg.d_vocab
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise TokenizationError(
            f"{where}: {name} holds token id {bad}, outside the vocabulary 0..{vocab - 1}"
        )


def single_token(
    model: HookedTransformer, token: Any, name: str, where: str, *, after_space: bool = False
) -> int:
    """The id of ``token``: an int id, or a string that must be exactly one token.

    A word without its leading space ("Paris") is usually a mistake for " Paris", the token a
    model predicts after a word: when the spaced form is one token too and the text before the
    token does not end in whitespace (``after_space=False``), a ``TokenizationWarning`` says so.
    """
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise TokenizationError(
            f"{where}: {name} must be a token id or a one-token string such as ' Paris', "
            f"got {token!r}"
        )
    if isinstance(token, int):
        check_token_ids(model, torch.tensor([token]), name, where)
        return token
    if model.tokenizer is None:
        raise TokenizationError(f"{where}: this model has no tokenizer; give {name} as a token id")
    if not token:
        raise TokenizationError(
            f"{where}: {name} is an empty string; give one token such as ' Paris'"
        )
    ids = model.to_tokens(token, prepend_bos=False)[0]
    # only words and numbers: punctuation such as "." follows a word without a space
    spaced = " " + token
    spaced_id = None
    if token[0].isalnum():
        spaced_ids = model.to_tokens(spaced, prepend_bos=False)[0]
        spaced_id = int(spaced_ids[0]) if spaced_ids.shape[0] == 1 else None
    if ids.shape[0] != 1:
        pieces = model.to_str_tokens(ids)
        hint = (
            f"{spaced!r}, with a leading space, is one token"
            if spaced_id is not None
            else "mind the leading space: ' Paris', not 'Paris'"
        )
        raise TokenizationError(
            f"{where}: {name} {token!r} is {ids.shape[0]} tokens {pieces}, expected exactly one "
            f"({hint})"
        )
    if spaced_id is not None and not after_space:
        warnings.warn(
            f"{where}: {name} {token!r} has no leading space, so it is token {int(ids[0])}, not "
            f"{spaced!r} (token {spaced_id}), the token that follows a word; the text before it "
            f"does not end in a space. Pass {spaced!r} (or the token id to keep {token!r})",
            TokenizationWarning,
            stacklevel=_user_stacklevel(),
        )
    return int(ids[0])


def ends_in_space(model: HookedTransformer, tokens: Tensor) -> bool:
    """Whether the last token of every row of ``tokens`` [batch, pos] ends in whitespace (so a
    target without a leading space is the natural next token)."""
    if model.tokenizer is None:
        return False
    last = tokens[:, -1].tolist()
    return all(model.tokenizer.decode([token])[-1:].isspace() for token in last)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside circuitkit, so that a warning points at the
    user's call whichever circuitkit function made it."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def checked_targets(
    model: HookedTransformer,
    target: Any,
    n: int,
    name: str,
    where: str,
    *,
    after_space: bool = False,
) -> Tensor:
    """``[n]`` token ids: one token for every example, or one per example.

    ``after_space`` is ``single_token``'s: whether every prompt ends in whitespace."""
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.shape not in ((n,), ()):
            raise ShapeError(
                f"{where}: {name} as a tensor must hold {n} integer token ids, got shape "
                f"{tuple(target.shape)}"
            )
        check_token_ids(model, target, name, where)
        return target.long().cpu().expand(n).clone()
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise ShapeError(f"{where}: {name} lists {len(target)} tokens for {n} examples")
        # each distinct string is checked (and warned about) once
        known: dict[str, int] = {}
        ids = []
        for token in target:
            if isinstance(token, str) and token in known:
                ids.append(known[token])
                continue
            ids.append(single_token(model, token, name, where, after_space=after_space))
            if isinstance(token, str):
                known[token] = ids[-1]
        return torch.tensor(ids)
    return torch.full((n,), single_token(model, target, name, where, after_space=after_space))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers of a window of ``window`` layers centred on ``layer``, clipped at the ends.

    ROME's rule: ``max(0, layer - window // 2) .. min(n_layers, layer - (-window // 2))``, so a
    window of 1 is the layer itself and a window of 10 is ``layer - 5 .. layer + 4``.
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def kind_component(kind: str, layer: int) -> Component:
    if kind == "resid":
        return Resid(layer, "post")
    if kind == "mlp":
        return MLP(layer)
    return Attn(layer)


def check_kind(model: HookedTransformer, kind: str, where: str) -> None:
    if kind not in KINDS:
        raise CircuitkitError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if kind == "mlp" and model.cfg.attn_only:
        raise ComponentError(f"{where}: kind 'mlp' needs MLP layers; this model is attention-only")


def check_window(window: Any, where: str) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise CircuitkitError(
            f"{where}: window must be a positive number of layers, got {window!r}"
        )
    return window


def checked_layers(model: HookedTransformer, layers: Sequence[int] | None, where: str) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    out = _indices(layers)
    if out is None:
        raise ComponentError(
            f"{where}: layers must be a sequence of layer indices such as [0, 1], got {layers!r}"
        )
    if not out:
        raise ComponentError(f"{where}: layers is empty; give at least one of 0..{n_layers - 1}")
    for layer in out:
        if not 0 <= layer < n_layers:
            raise ComponentError(
                f"{where}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}"
            )
    return out


def checked_positions(positions: Sequence[int] | None, n_pos: int, where: str) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise ComponentError(
            f"{where}: positions must be a sequence of token positions such as [0, -1], "
            f"got {positions!r}"
        )
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int):
            raise ComponentError(
                f"{where}: positions must be ints (negative ones count from the end), got {p!r}"
            )
        if not -n_pos <= p < n_pos:
            raise ComponentError(
                f"{where}: position {p!r} is outside the prompt, which has positions 0..{n_pos - 1}"
            )
        out.append(p % n_pos)
    if not out:
        raise ComponentError(f"{where}: positions is empty; give at least one of 0..{n_pos - 1}")
    return out


def _indices(values: Any) -> list[int] | None:
    """``values`` (a list, tuple, range or integer tensor) as a list of ints; None if it is not
    a collection of integers."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return None
    items = list(values)
    if any(isinstance(x, bool) for x in items):
        return None
    try:
        return [operator.index(x) for x in items]
    except TypeError:
        return None


def cache_of(
    model: HookedTransformer, tokens: Tensor, components: Sequence[Component], fwd_hooks=()
) -> dict[str, Tensor]:
    """The activations of ``components`` (by hook name) in one forward, with ``fwd_hooks``."""
    names = {comp.hook_name(model) for comp in components}
    cache: dict[str, Tensor] = {}

    def save(act: Tensor, name: str) -> None:
        cache[name] = act.detach().clone()

    # nothing after the last cached layer is needed
    stop = max(comp.layer for comp in components) + 1
    # keyed by the name asked for, not ``hook.name``: a bridge's hook point has its own name
    # (``blocks.0.hook_in`` for ``blocks.0.hook_resid_pre``)
    model.run_with_hooks(
        tokens,
        fwd_hooks=[
            *fwd_hooks,
            *((name, lambda act, hook, name=name: save(act, name)) for name in names),
        ],
        stop_at_layer=max(stop, 1),
    )
    return cache


def prob_metric(target_ids: Tensor, read: Tensor) -> Metric:
    """The probability of ``target_ids[i]`` at position ``read[i]``, per example."""

    def fn(logits_at: Tensor) -> Tensor:
        index = target_ids.to(logits_at.device).expand(logits_at.shape[:-1]).unsqueeze(-1)
        return logits_at.float().log_softmax(-1).gather(-1, index).squeeze(-1).exp()

    return Metric("prob", read, fn)


__all__ = [
    "KINDS",
    "Kind",
    "as_input_ids",
    "check_token_ids",
    "single_token",
    "ends_in_space",
    "checked_targets",
    "window_layers",
    "kind_component",
    "check_kind",
    "check_window",
    "checked_layers",
    "checked_positions",
    "cache_of",
    "prob_metric",
]
