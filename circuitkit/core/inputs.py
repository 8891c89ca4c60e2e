"""Inputs to methods: a dataset (anything with ``tokens`` and ``positions``) or a token tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from circuitkit.core.errors import ShapeError
from circuitkit.core.metrics import logit_diff


def as_tokens(data: Any, name: str, where: str) -> tuple[Tensor, Mapping[str, Tensor] | None]:
    """``(tokens [n, pos], positions or None)`` of a dataset-like object or a token tensor."""
    tokens = getattr(data, "tokens", data)
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(data).__name__
        raise ShapeError(
            f"{where}: {name} must be a dataset with .tokens or an integer [n, pos] token tensor, "
            f"got {shape}"
        )
    return tokens.long(), getattr(data, "positions", None)


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


def as_index_list(values: Any) -> list:
    if isinstance(values, Tensor):
        return values.tolist()
    if isinstance(values, (int, str)):
        return [values]
    return list(values)


__all__ = ["as_tokens", "check_same_shape", "default_metric", "token_labels", "as_index_list"]
