"""Per-example metrics: logits [batch, pos, d_vocab] -> one number per example.

A ``Metric`` reads the logits at one position per example (``positions``, shape [n]). Knowing
that position lets the intervention engine unembed only the final-position residual stream
instead of the full [batch, pos, d_vocab] logits, which is most of the cost of a forward pass
on a model with a large vocabulary.

``Metric.at(logits_at)`` takes the logits already gathered at those positions, with any number
of leading batch dimensions, ``[..., n, d_vocab] -> [..., n]``; ``Metric(logits)`` takes the full
logits ``[n, pos, d_vocab] -> [n]``. Plain callables ``logits -> [n]`` are accepted everywhere a
metric is, at the cost of computing the full logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.core.errors import CircuitkitError, MetricError, ShapeError


class AnswerPrompts(Protocol):
    """What the answer metrics read of a dataset; ``ck.IOIDataset`` is one.

    Example::

        ck.metrics.logit_diff(ck.IOIDataset(model, n=8))   # any object with these four fields
    """

    tokens: Int[Tensor, "n pos"]
    io_tokens: Int[Tensor, "n"]
    s_tokens: Int[Tensor, "n"]
    positions: Mapping[str, Int[Tensor, "n"]]


@dataclass(frozen=True, eq=False)
class Metric:
    """A per-example metric that reads one position per example.

    Attributes:
        name: a short label used in results and plots ("logit_diff").
        positions: [n] index (>= 0, counted from the start) of the position read in each
            example.
        fn: ``logits_at [..., n, d_vocab] -> [..., n]``, the metric on the gathered logits.

    Reading one position per example lets the engine unembed that position alone.

    Example::

        paris = model.to_single_token(" Paris")
        last = torch.full((n,), tokens.shape[1] - 1)
        metric = ck.metrics.Metric("logit_paris", last, lambda at: at[..., paris])
        metric(model(tokens))                # [n]
    """

    name: str
    positions: Int[Tensor, "n"]
    fn: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        positions = self.positions
        where = f"Metric({self.name!r})"
        if (
            not isinstance(positions, Tensor)
            or positions.ndim != 1
            or positions.dtype == torch.bool
            or positions.is_floating_point()
            or positions.is_complex()
        ):
            given = (
                f"a {positions.dtype} tensor of shape {tuple(positions.shape)}"
                if isinstance(positions, Tensor)
                else f"{type(positions).__name__} {positions!r}"
            )
            raise MetricError(
                f"{where}: positions must be an integer [n] tensor, one position per example, "
                f"got {given}"
            )
        # the engine reads positions as indices from the start; -1 would not be the last token
        if positions.numel() and int(positions.min()) < 0:
            negative = sorted(set(positions[positions < 0].tolist()))
            raise MetricError(
                f"{where}: positions must be >= 0, got {negative}; give the index itself, "
                "such as tokens.shape[1] - 1 for the last position"
            )

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])

    def check_positions(self, n_pos: int, where: str) -> None:
        """Raise a ``ShapeError`` naming ``where`` unless every position read is in prompts of
        ``n_pos`` positions.

        Example::

            metric.check_positions(tokens.shape[1], "run_interventions")
        """
        if self.n and int(self.positions.max()) >= n_pos:
            raise ShapeError(
                f"{where}: the metric {self.name!r} reads position {int(self.positions.max())}, "
                f"but the prompts have positions 0..{n_pos - 1}"
            )

    def at(self, logits_at: Float[Tensor, "... n d_vocab"]) -> Float[Tensor, "... n"]:
        """The metric on logits already gathered at ``self.positions``."""
        if logits_at.ndim < 2 or logits_at.shape[-2] != self.n:
            raise ShapeError(
                f"{self.name}: expected logits at the read positions of shape [..., {self.n}, "
                f"d_vocab], got {tuple(logits_at.shape)}"
            )
        return self.fn(logits_at)

    def __call__(self, logits: Float[Tensor, "n pos d_vocab"]) -> Float[Tensor, "n"]:
        if logits.ndim != 3 or logits.shape[0] != self.n:
            raise ShapeError(
                f"{self.name}: expected logits of shape [{self.n}, pos, d_vocab], "
                f"got {tuple(logits.shape)}"
            )
        if int(self.positions.max()) >= logits.shape[1]:
            raise ShapeError(
                f"{self.name}: reads position {int(self.positions.max())} but the logits have "
                f"only {logits.shape[1]} positions"
            )
        rows = torch.arange(self.n, device=logits.device)
        return self.at(logits[rows, self.positions.to(logits.device)])


def check_metric_shape(values: Tensor, n: int, where: str) -> Tensor:
    """Raise a MetricError unless ``values`` is an [n] tensor; return it.

    Unlike ``check_metric_output`` it does not read the values, so on a GPU it does not wait
    for them to be computed.

    Example::

        check_metric_shape(my_metric(logits), n, "my_method")   # MetricError unless shape (n,)
    """
    if not isinstance(values, Tensor) or values.shape != (n,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise MetricError(
            f"{where}: the metric must return one value per example, shape ({n},), got {shape}"
        )
    return values


def check_metric_output(values: Tensor, n: int, where: str) -> Tensor:
    """Raise a MetricError unless ``values`` is a finite [n] tensor; return it.

    Example::

        check_metric_output(torch.tensor([1.0, float("nan")]), 2, "my_method")   # MetricError
    """
    check_metric_shape(values, n, where)
    if not torch.isfinite(values).all():
        raise MetricError(f"{where}: the metric returned NaN or infinite values: {values}")
    return values


def select_examples(
    metric: Metric | Callable[[Tensor], Tensor], rows: Int[Tensor, "b"], n: int
) -> Metric | Callable[[Tensor], Tensor]:
    """``metric`` (made for ``n`` examples) on the examples ``rows`` alone, for methods that
    take the examples in batches.

    A metric knows its examples (their answers, the positions it reads), so the batch's logits
    are put into their rows of an all-zero input for all ``n`` examples and only those rows of
    the result are kept. Each example's value depends on its own row only, so the values, and
    their gradients, are the batch's. A ``Metric`` gives a ``Metric`` (reading the batch's
    positions), a plain callable a callable.

    Example::

        first = select_examples(metric, torch.arange(10), n=50)
        first.at(logits_at[:10])        # == metric.at(logits_at)[:10]
    """
    rows = rows.detach().long().cpu()

    def put(logits: Tensor, dim: int) -> Tensor:
        shape = list(logits.shape)
        shape[dim] = n
        return logits.new_zeros(shape).index_copy(dim, rows.to(logits.device), logits)

    if isinstance(metric, Metric):

        def fn(logits_at: Tensor) -> Tensor:
            return metric.fn(put(logits_at, logits_at.ndim - 2))[..., rows.to(logits_at.device)]

        return Metric(metric.name, metric.positions[rows], fn)

    def selected(logits: Tensor) -> Tensor:
        return metric(put(logits, 0))[rows.to(logits.device)]

    selected.__name__ = getattr(metric, "__name__", "metric")
    return selected


# -- metrics of the IOI task ---------------------------------------------------------------
#
# Each builder reads the answers and positions from a dataset (anything with ``io_tokens``,
# ``s_tokens`` and ``positions``, such as ``IOIDataset``) and returns a ``Metric``. A corrupted
# ``IOIDataset`` keeps the clean answers, so ``logit_diff(ds)`` and ``logit_diff(abc)`` are the
# same metric and read the logits of either run.


def _read_positions(ds: AnswerPrompts, position: str | Int[Tensor, "n"], where: str) -> Tensor:
    if isinstance(position, Tensor):
        positions = position
    elif position in ds.positions:
        positions = ds.positions[position]
    else:
        raise CircuitkitError(
            f"{where}: unknown position {position!r}; choose one of {list(ds.positions)} "
            "or give an [n] tensor of token indices"
        )
    if positions.shape != ds.io_tokens.shape:
        raise ShapeError(
            f"{where}: positions has shape {tuple(positions.shape)} but the dataset has "
            f"{ds.io_tokens.shape[0]} examples"
        )
    return positions.detach().long().cpu()


def _answer_tokens(ds: AnswerPrompts, token: str, where: str) -> Tensor:
    if token == "IO":
        return ds.io_tokens
    if token == "S":
        return ds.s_tokens
    raise CircuitkitError(f"{where}: token must be 'IO' or 'S', got {token!r}")


def _logit_of(logits_at: Tensor, tokens: Tensor) -> Tensor:
    """``logits_at[..., i, tokens[i]]``: [..., n, d_vocab], [n] -> [..., n]."""
    index = tokens.to(logits_at.device).expand(logits_at.shape[:-1]).unsqueeze(-1)
    return logits_at.gather(-1, index).squeeze(-1)


def logit_diff(ds: AnswerPrompts, position: str | Int[Tensor, "n"] = "end") -> Metric:
    """The IO logit minus the S logit, per example, at ``position`` (default: the last token).

    The standard IOI metric: positive when the model prefers the indirect object. Logit
    differences are unaffected by the final softmax's normalisation, so they add up over
    components (direct logit attribution sums to them).

    Example:
        >>> metric = logit_diff(ds)
        >>> metric(model(ds.tokens)).mean()     # about 3 for smollm2-135m
    """
    io_tokens, s_tokens = ds.io_tokens.clone(), ds.s_tokens.clone()

    def fn(logits_at: Tensor) -> Tensor:
        return _logit_of(logits_at, io_tokens) - _logit_of(logits_at, s_tokens)

    return Metric("logit_diff", _read_positions(ds, position, "logit_diff"), fn)


def logprob(
    ds: AnswerPrompts, token: str = "IO", *, position: str | Int[Tensor, "n"] = "end"
) -> Metric:
    """The log-probability of the IO (or, with ``token="S"``, the S) name at ``position``.

    Example:
        >>> logprob(ds)(model(ds.tokens))        # [n], each <= 0
    """
    answers = _answer_tokens(ds, token, "logprob").clone()

    def fn(logits_at: Tensor) -> Tensor:
        return _logit_of(torch.log_softmax(logits_at, dim=-1), answers)

    return Metric(f"logprob_{token}", _read_positions(ds, position, "logprob"), fn)


def prob(
    ds: AnswerPrompts, token: str = "IO", *, position: str | Int[Tensor, "n"] = "end"
) -> Metric:
    """The softmax probability of the IO (or, with ``token="S"``, the S) name at ``position``.

    Example:
        >>> prob(ds)(model(ds.tokens)).mean()    # mean probability of the right name
    """
    answers = _answer_tokens(ds, token, "prob").clone()

    def fn(logits_at: Tensor) -> Tensor:
        return _logit_of(torch.log_softmax(logits_at, dim=-1), answers).exp()

    return Metric(f"prob_{token}", _read_positions(ds, position, "prob"), fn)


def accuracy(
    ds: AnswerPrompts, *, against: str = "vocab", position: str | Int[Tensor, "n"] = "end"
) -> Metric:
    """1.0 where the model gets the example right, else 0.0.

    With ``against="vocab"`` (the default) this is top-1 accuracy: the IO logit is larger than
    every other token's logit (a tie for the top counts as wrong). With ``against="S"`` it is
    the weaker "IO beats S" rate, ``logit_diff > 0``. The mean over examples is the accuracy.

    Example:
        >>> accuracy(ds)(model(ds.tokens)).mean()              # top-1 accuracy
        >>> accuracy(ds, against="S")(model(ds.tokens)).mean() # share with IO logit > S logit
    """
    io_tokens, s_tokens = ds.io_tokens.clone(), ds.s_tokens.clone()
    if against == "vocab":

        def fn(logits_at: Tensor) -> Tensor:
            index = io_tokens.to(logits_at.device).expand(logits_at.shape[:-1]).unsqueeze(-1)
            io = logits_at.gather(-1, index).squeeze(-1)
            others = logits_at.scatter(-1, index, float("-inf")).max(dim=-1).values
            return (io > others).to(logits_at.dtype)

    elif against == "S":

        def fn(logits_at: Tensor) -> Tensor:
            io, s = _logit_of(logits_at, io_tokens), _logit_of(logits_at, s_tokens)
            return (io > s).to(logits_at.dtype)

    else:
        raise CircuitkitError(f"accuracy: against must be 'vocab' or 'S', got {against!r}")
    name = "accuracy" if against == "vocab" else "accuracy_vs_S"
    return Metric(name, _read_positions(ds, position, "accuracy"), fn)


def kl_div(
    clean_logits: Float[Tensor, "n pos d_vocab"] | Float[Tensor, "n d_vocab"],
    positions: AnswerPrompts | Int[Tensor, "n"],
    *,
    position: str = "end",
) -> Metric:
    """KL(clean || patched) of the next-token distributions at the read positions, per example.

    0 where a run predicts exactly what the clean run did; it compares whole distributions, not
    just two names. ``clean_logits`` are the clean run's full logits [n, pos, d_vocab], or the
    logits already gathered at the read positions [n, d_vocab]. ``positions`` is a dataset
    (then ``ds.positions[position]`` is read) or an [n] tensor of token indices.

    Example:
        >>> clean_logits = model(ds.tokens)
        >>> metric = kl_div(clean_logits, ds)
        >>> metric(clean_logits)                # zeros
    """
    if isinstance(positions, Tensor):
        read = positions.detach().long().cpu()
    else:
        read = _read_positions(positions, position, "kl_div")
    n = read.shape[0]
    if clean_logits.ndim == 3 and clean_logits.shape[0] == n:
        if int(read.max()) >= clean_logits.shape[1]:
            raise ShapeError(
                f"kl_div: reads position {int(read.max())} but clean_logits has only "
                f"{clean_logits.shape[1]} positions"
            )
        clean_at = clean_logits[torch.arange(n), read.to(clean_logits.device)]
    elif clean_logits.ndim == 2 and clean_logits.shape[0] == n:
        clean_at = clean_logits
    else:
        raise ShapeError(
            f"kl_div: clean_logits must have shape [{n}, pos, d_vocab] or [{n}, d_vocab], "
            f"got {tuple(clean_logits.shape)}"
        )
    clean_logprobs = torch.log_softmax(clean_at.detach(), dim=-1)

    def fn(logits_at: Tensor) -> Tensor:
        if logits_at.shape[-1] != clean_logprobs.shape[-1]:
            raise ShapeError(
                f"kl_div: the clean logits have {clean_logprobs.shape[-1]} vocabulary entries "
                f"but these have {logits_at.shape[-1]}"
            )
        clean = clean_logprobs.to(logits_at.device, logits_at.dtype)
        patched = torch.log_softmax(logits_at, dim=-1)
        return (clean.exp() * (clean - patched)).sum(dim=-1)

    return Metric("kl_div", read, fn)


def normalized(
    metric: Metric,
    clean: Float[Tensor, "n pos d_vocab"] | Float[Tensor, "n d_vocab"] | Float[Tensor, "n"] | float,
    corrupted: Float[Tensor, "n pos d_vocab"]
    | Float[Tensor, "n d_vocab"]
    | Float[Tensor, "n"]
    | float,
) -> Metric:
    """``metric`` rescaled to be 0 at the corrupted baseline and 1 at the clean one.

    ``(m - corrupted_mean) / (clean_mean - corrupted_mean)``, with the *mean* of the metric
    over the examples as each baseline (the usual convention, as in ARENA's IOI material), so
    per-example values still vary around those ends. ``clean`` and ``corrupted`` are each the
    run's full logits [n, pos, d_vocab], its logits at the read positions [n, d_vocab], the
    metric's per-example values [n], or the baseline itself as a number.

    Example:
        >>> ld = logit_diff(ds)
        >>> metric = normalized(ld, model(ds.tokens), model(abc.tokens))
        >>> metric(model(abc.tokens)).mean()    # 0.0
    """
    if not isinstance(metric, Metric):
        raise TypeError(
            f"normalized: expected a Metric (from logit_diff, prob, ...), got {type(metric)}"
        )
    clean_value = _baseline(metric, clean, "clean")
    corrupted_value = _baseline(metric, corrupted, "corrupted")
    scale = clean_value - corrupted_value
    if not math.isfinite(scale) or abs(scale) <= 1e-9 * max(1.0, abs(clean_value)):
        raise MetricError(
            f"normalized: the clean baseline ({clean_value:.6g}) and the corrupted baseline "
            f"({corrupted_value:.6g}) of {metric.name} are equal, so there is no scale to "
            "normalise by"
        )

    def fn(logits_at: Tensor) -> Tensor:
        return (metric.fn(logits_at) - corrupted_value) / scale

    return Metric(f"normalized_{metric.name}", metric.positions, fn)


def _baseline(metric: Metric, value: Tensor | float, which: str) -> float:
    """The mean of ``metric`` on logits or per-example values, or a number given as is."""
    if not isinstance(value, Tensor):
        return float(value)
    with torch.no_grad():
        if value.ndim == 3:
            values = metric(value)
        elif value.ndim == 2:
            values = metric.at(value)
        elif value.ndim <= 1 and value.numel() in (1, metric.n):
            values = value
        else:
            raise ShapeError(
                f"normalized: {which} must be logits [{metric.n}, pos, d_vocab] or "
                f"[{metric.n}, d_vocab], values [{metric.n}] or a number, "
                f"got shape {tuple(value.shape)}"
            )
        return float(values.float().mean())
