"""Intervention values: NaN, infinite and non-numeric values fail when made; numbers act as
the tensors they stand for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuitkit.core.components import Head
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.interventions import Add, Intervention, Patch, Scale, SetTo, Zero, apply_value

NAN, INF = float("nan"), float("inf")


def with_one(value: float, shape=(3, 4)) -> torch.Tensor:
    tensor = torch.randn(shape)
    tensor[1, 2] = value
    return tensor


@pytest.mark.parametrize(
    "make, where",
    [
        (lambda: Add(NAN), "Add: delta is nan"),
        (lambda: Add(-INF), "Add: delta is -inf"),
        (lambda: Add(np.float32("nan")), "Add: delta is nan"),
        (lambda: Scale(INF), "Scale: factor is inf"),
        (lambda: Scale(NAN), "Scale: factor is nan"),
        (lambda: SetTo(NAN), "SetTo: value is nan"),
    ],
)
def test_a_non_finite_number_fails_when_made(make, where):
    with pytest.raises(CircuitkitError) as caught:
        make()
    assert str(caught.value) == f"{where}; expected a finite number"


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize(
    "kind, where", [(Add, "Add: delta"), (SetTo, "SetTo: value"), (Patch, "Patch: source")]
)
def test_a_tensor_with_nan_or_inf_fails_when_made(kind, where, bad):
    with pytest.raises(CircuitkitError) as caught:
        kind(with_one(bad))
    assert str(caught.value) == (
        f"{where} contains NaN or infinite entries (1 of 12, shape (3, 4)); expected finite values"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_checked_too(dtype):
    with pytest.raises(CircuitkitError, match="NaN or infinite"):
        SetTo(with_one(INF).to(dtype))


@pytest.mark.parametrize("factor", ["2", None, True, torch.tensor(2.0), [2.0], 1j])
def test_a_non_numeric_factor_fails_when_made(factor):
    with pytest.raises(CircuitkitError, match=r"^Scale: factor must be a number, got "):
        Scale(factor)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Patch(3.0), "Patch: source must be a tensor, got float 3.0"),
        (lambda: Add("1"), "Add: delta must be a tensor or a number, got str '1'"),
        (lambda: SetTo([0.0, 1.0]), "SetTo: value must be a tensor or a number, got list"),
        (lambda: Add(True), "Add: delta must be a tensor or a number, got bool True"),
    ],
)
def test_a_value_that_is_not_a_tensor_fails_when_made(make, message):
    with pytest.raises(CircuitkitError, match=f"^{message}"):
        make()


def test_a_tensor_changed_in_place_after_a_check_is_checked_again():
    source = torch.zeros(3, 4)
    Patch(source)
    view = source[1:]
    Patch(view)
    source[2, 0] = NAN
    with pytest.raises(CircuitkitError, match="NaN or infinite entries"):
        Patch(source)
    with pytest.raises(CircuitkitError, match="NaN or infinite entries"):
        Patch(view)
    with pytest.raises(CircuitkitError, match="NaN or infinite entries"):
        SetTo(source.narrow(0, 2, 1))


@pytest.mark.parametrize("number", [0.0, -1.5, 2, np.float64(3.25)])
def test_numbers_act_as_the_tensors_they_stand_for(number):
    act = torch.randn(2, 5, 4)
    mask = torch.rand(2, 5, 1) > 0.5
    filled = torch.full_like(act, float(number))
    assert torch.equal(apply_value(act, mask, SetTo(number)), torch.where(mask, filled, act))
    assert torch.equal(apply_value(act, mask, Add(number)), torch.where(mask, act + filled, act))
    assert torch.equal(apply_value(act, mask, Scale(number)), torch.where(mask, act * number, act))
    assert Scale(number).factor == float(number) and type(Scale(number).factor) is float


def test_finite_values_are_kept_as_given():
    tensor = torch.randn(4, 3)
    assert Patch(tensor).source is tensor
    assert SetTo(tensor).value is tensor
    assert Add(tensor).delta is tensor
    assert torch.equal(apply_value(tensor, tensor > 0, Zero()), tensor.clamp(max=0))


@pytest.mark.parametrize(
    "component, value, message",
    [
        ("blocks.0.attn.hook_z", Zero(), r"component must be a component such as ck\.Head\(9, 9\)"),
        ("head", Zero(), r"component must be a component .*got str 'head'$"),
        ((0, 0), Zero(), r"component must be a component .*got tuple \(0, 0\)$"),
        (Head(0, 0), 0.0, r"value must be ck\.Patch, ck\.Zero, .*got float 0\.0$"),
        (Head(0, 0), Zero, r"value must be ck\.Patch, ck\.Zero, .*got type"),
    ],
)
def test_an_intervention_of_the_wrong_kinds_fails_when_made(component, value, message):
    """A hook name or a kind word given as the component (or a bare number as the value) is
    refused when the intervention is made, not deep inside a run."""
    with pytest.raises(CircuitkitError, match=rf"^Intervention: {message}"):
        Intervention(component, value)
