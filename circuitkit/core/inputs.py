"""Inputs to methods: a dataset (anything with ``tokens`` and ``positions``) or a token tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.metrics import logit_diff


def as_tokens(
    data: Any, name: str, where: str, *, model: Any = None
) -> tuple[Tensor, Mapping[str, Tensor] | None]:
    """``(tokens [n, pos], positions or None)`` of a dataset-like object or a token tensor.

    The tokens are checked by ``check_token_ids``: against the model's vocabulary when
    ``model`` is given, else only for ids below 0.
    """
    tokens = getattr(data, "tokens", data)
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(data).__name__
        raise ShapeError(
            f"{where}: {name} must be a dataset with .tokens or an integer [n, pos] token tensor, "
            f"got {shape}"
        )
    d_vocab = None if model is None else model.cfg.d_vocab
    return check_token_ids(tokens, where, name=name, d_vocab=d_vocab), getattr(
        data, "positions", None
    )


def check_token_ids(
    tokens: Tensor, where: str, *, name: str = "tokens", d_vocab: int | None = None
) -> Tensor:
    """``tokens`` as a long tensor, after checking that it holds token ids.

    A token tensor must have an integer dtype (not bool or complex, which PyTorch would turn
    into ids without a word), at least one example and one position, and ids in ``[0,
    d_vocab)`` (with ``d_vocab`` None, ids >= 0): a negative id would silently index from the
    end of the vocabulary, one past it fails deep inside the embedding. Raises a
    ``ShapeError`` for the dtype or an empty tensor, a ``CircuitkitError`` for an id out of
    range, naming ``where`` and the offending values. Reading the range waits for the device
    once.

    Example::

        check_token_ids(tokens, "run_interventions", d_vocab=model.cfg.d_vocab)
    """
    dtype = tokens.dtype
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise ShapeError(
            f"{where}: {name} must be an integer [n, pos] tensor of token ids, got a {dtype} "
            f"tensor of shape {tuple(tokens.shape)}"
        )
    n, n_pos = tokens.shape
    if n == 0:
        raise ShapeError(
            f"{where}: {name} has no examples (shape {tuple(tokens.shape)}); give at least one "
            "prompt"
        )
    if n_pos == 0:
        raise ShapeError(
            f"{where}: {name} has no positions (shape {tuple(tokens.shape)}); each prompt needs "
            "at least one token"
        )
    tokens = tokens.long()
    low, high = (int(value) for value in torch.aminmax(tokens))
    if low < 0 or (d_vocab is not None and high >= d_vocab):
        valid = "ids >= 0" if d_vocab is None else f"[0, {d_vocab}) (the model's d_vocab)"
        raise CircuitkitError(
            f"{where}: {name} holds token ids from {low} to {high}, outside the valid range {valid}"
        )
    return tokens


def check_same_shape(a: Tensor, b: Tensor, names: tuple[str, str], where: str) -> None:
    """Raise a ShapeError unless two token tensors have the same [n, pos]."""
    if a.shape != b.shape:
        raise ShapeError(
            f"{where}: {names[0]} has shape {tuple(a.shape)} but {names[1]} has "
            f"{tuple(b.shape)}; both need the same [n, pos]"
        )


def default_metric(metric: Any, data: Any, where: str):
    """``metric`` if given, else the logit difference of a dataset that has IO and S tokens."""
    if metric is not None:
        return metric
    if hasattr(data, "io_tokens") and hasattr(data, "s_tokens"):
        return logit_diff(data)
    raise ShapeError(
        f"{where}: pass metric=...; it can only default to the logit difference of an IOI dataset"
    )


def token_labels(model: Any, tokens: Tensor) -> list[str]:
    """Labels for positions: ``"3: Mary"`` from the first example, or plain indices."""
    if getattr(model, "tokenizer", None) is None:
        return [str(i) for i in range(tokens.shape[1])]
    words = model.to_str_tokens(tokens[0]) if tokens.numel() else []
    return [f"{i}:{w}" for i, w in enumerate(words)]


def as_index_list(values: Any, where: str | None = None) -> list:
    """``values`` (an int, a word, a list of them or a 1-D tensor) as a list. With ``where``
    (the function called) they are positions, and an empty list is a ``ComponentError``."""
    if isinstance(values, Tensor):
        items = values.tolist()
    elif isinstance(values, (int, str)):
        items = [values]
    else:
        items = list(values)
    if where is not None and not items:
        raise ComponentError(
            f"{where}: positions is empty; give at least one position (an int, or a word such as "
            "'end'), or positions=None for whole components"
        )
    return items


__all__ = [
    "as_tokens",
    "check_token_ids",
    "check_same_shape",
    "default_metric",
    "token_labels",
    "as_index_list",
]
