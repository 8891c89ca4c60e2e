"""Interventions: where in the model (a component) and what value goes there.

A value is another run's activation (``Patch``), zero (``Zero``), a given tensor such as a mean
(``SetTo``), a scaled copy (``Scale``) or added noise (``Add``). An ``Intervention`` pairs one
with a ``Component``; a *run* is a sequence of interventions applied together in one forward
pass. ``circuitkit.core.engine`` runs many of them at once.

Values are checked when they are made: a NaN or infinite entry would spread through every
later activation and show up, if at all, as a NaN metric far from its cause.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from circuitkit.core.components import Component
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.metrics import Metric

# Tensors already found finite, with their version counter then. A sweep makes thousands of
# values from one cached activation, and the engine rewraps them (cast, cut to positions);
# reading a GPU tensor's check waits for the device, so each tensor is checked once. Views
# (the engine's cuts) share their base's version counter, so an in-place change is seen.
_FINITE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_finite(value: object, where: str, numbers_too: bool) -> Tensor:
    """``value`` as a tensor, raising a CircuitkitError unless it is a finite tensor (or, with
    ``numbers_too``, a finite number)."""
    if numbers_too and _is_real(value):
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise CircuitkitError(f"{where} is {float(value)!r}; expected a finite number")  # type: ignore[arg-type]
        return torch.tensor(float(value))  # type: ignore[arg-type]
    if not isinstance(value, Tensor):
        expected = "a tensor or a number" if numbers_too else "a tensor"
        raise CircuitkitError(f"{where} must be {expected}, got {type(value).__name__} {value!r}")
    for known in (value, value._base):
        if known is not None and _FINITE.get(known) == known._version:
            return value
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CircuitkitError(
            f"{where} contains NaN or infinite entries ({bad} of {value.numel()}, shape "
            f"{tuple(value.shape)}); expected finite values"
        )
    _FINITE[value] = value._version
    return value


@dataclass(frozen=True, eq=False)
class Value:
    """What an intervention puts into the selected entries of an activation: ``Patch``,
    ``Zero``, ``SetTo``, ``Scale`` or ``Add``.

    Example::

        ck.Intervention(ck.Head(23, 2), ck.Scale(0.0))
    """


@dataclass(frozen=True, eq=False)
class Patch(Value):
    """Another run's activation: ``source`` has the activation's full shape ``[n, ...]``.

    Example::

        _, clean_cache = model.run_with_cache(ds.tokens)
        ck.Intervention(ck.Head(23, 2), ck.Patch(clean_cache["blocks.23.attn.hook_z"]))
    """

    source: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        _check_finite(self.source, "Patch: source", numbers_too=False)


@dataclass(frozen=True, eq=False)
class Zero(Value):
    """Zero (zero ablation).

    Example::

        ck.Intervention(ck.MLP(0), ck.Zero())
    """


@dataclass(frozen=True, eq=False)
class SetTo(Value):
    """A given tensor (or number), broadcast to the activation's shape (a mean, a direction).

    Example::

        mean = abc_cache["blocks.23.attn.hook_z"].mean(0)        # [pos, head, d_head]
        ck.Intervention(ck.Head(23, 2), ck.SetTo(mean))
    """

    value: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_finite(self.value, "SetTo: value", True))


@dataclass(frozen=True, eq=False)
class Scale(Value):
    """The activation itself, multiplied by ``factor`` (0 ablates, 2 doubles).

    Example::

        ck.Intervention(ck.Neuron(10, 1234), ck.Scale(2.0))
    """

    factor: float

    def __post_init__(self) -> None:
        if not _is_real(self.factor):
            raise CircuitkitError(
                f"Scale: factor must be a number, got {type(self.factor).__name__} {self.factor!r}"
            )
        if not math.isfinite(self.factor):
            raise CircuitkitError(
                f"Scale: factor is {float(self.factor)!r}; expected a finite number"
            )
        object.__setattr__(self, "factor", float(self.factor))


@dataclass(frozen=True, eq=False)
class Add(Value):
    """The activation plus ``delta``, a tensor (or number) broadcast to its shape (noise, a
    steering vector).

    Example::

        ck.Intervention(ck.Resid(6).at("end"), ck.Add(4.0 * direction))    # direction: [d_model]
    """

    delta: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", _check_finite(self.delta, "Add: delta", True))


@dataclass(frozen=True)
class Intervention:
    """Put ``value`` into ``component`` (an address from ``circuitkit.core.components``).

    Example::

        run = [ck.Intervention(ck.Head(23, 2), ck.Zero()),
               ck.Intervention(ck.Head(23, 0), ck.Zero())]
        ck.run_interventions(model, ds.tokens, [run], ck.metrics.logit_diff(ds))   # [1, n]
    """

    component: Component
    value: Value

    def __post_init__(self) -> None:
        if not isinstance(self.component, Component):
            raise CircuitkitError(
                f"Intervention: component must be a component such as ck.Head(9, 9), ck.MLP(3) "
                f"or ck.Resid(4, 'pre'), got {type(self.component).__name__} "
                f"{self.component!r:.80}"
            )
        if not isinstance(self.value, Value):
            raise CircuitkitError(
                f"Intervention: value must be ck.Patch, ck.Zero, ck.SetTo, ck.Scale or ck.Add, "
                f"got {type(self.value).__name__} {self.value!r:.80}"
            )


Run = Sequence[Intervention]


MetricLike = Metric | Callable[[Tensor], Tensor]


def value_tensor(value: Value) -> Tensor | None:
    if isinstance(value, Patch):
        return value.source
    if isinstance(value, SetTo):
        return value.value
    if isinstance(value, Add):
        return value.delta
    return None


def narrowed(value: Value, tensor: Tensor) -> Value:
    """``value`` holding ``tensor``, a view of its own tensor (the engine's cut to the positions
    a block computes), with no new check: the entries of a view of a finite tensor are finite,
    and checking a GPU tensor waits for the device."""
    kind = type(value)  # Patch, SetTo or Add: each holds its one tensor
    out = object.__new__(kind)
    object.__setattr__(out, dataclass_fields(kind)[0].name, tensor)
    return out


def apply_value(act: Tensor, mask: Tensor, value: Value) -> Tensor:
    """The activation with ``value`` put into the entries ``mask`` selects (reference path)."""
    if isinstance(value, Zero):
        return act.masked_fill(mask, 0.0)
    if isinstance(value, Scale):
        return torch.where(mask, act * value.factor, act)
    if isinstance(value, Add):
        return torch.where(mask, act + value.delta.to(act), act)
    tensor = value_tensor(value)
    return torch.where(mask, tensor.to(act), act)  # type: ignore[union-attr]


__all__ = [
    "Add",
    "Intervention",
    "MetricLike",
    "Patch",
    "Run",
    "Scale",
    "SetTo",
    "Value",
    "Zero",
    "apply_value",
    "value_tensor",
]
