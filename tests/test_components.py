"""Component addresses: indices checked when made, layers and MLPs checked against the model,
position selections against a plain ``range`` reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import circuitkit as ck
from circuitkit.core.components import (
    MLP,
    Attn,
    Embed,
    Head,
    Neuron,
    Resid,
    position_mask,
    selection_mask,
)
from circuitkit.core.errors import ComponentError
from circuitkit.core.interventions import Intervention, Zero
from circuitkit.core.metrics import Metric

N_POS = 6


def last_token_metric(n: int) -> Metric:
    return Metric("first_logit", torch.full((n,), N_POS - 1), lambda at: at[..., 0])


def run_one(model, component):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, N_POS), generator=torch.Generator())
    run = [Intervention(component, Zero())]
    return ck.run_interventions(model, tokens, [run], last_token_metric(2), progress=False)


# -- indices, when a component is made -------------------------------------------------------


@pytest.mark.parametrize(
    "make, call, field, given",
    [
        (lambda: Head(0, 1.5), "Head(0, 1.5)", "head", "1.5"),
        (lambda: Head("0", 1), "Head('0', 1)", "layer", "'0'"),
        (lambda: Head(True, 0), "Head(True, 0)", "layer", "True"),
        (lambda: Neuron(0, 2.0), "Neuron(0, 2.0)", "neuron", "2.0"),
        (lambda: Neuron(None, 3), "Neuron(None, 3)", "layer", "None"),
        (lambda: MLP(1.0), "MLP(1.0)", "layer", "1.0"),
        (lambda: Attn(torch.tensor(1)), "Attn(tensor(1))", "layer", "tensor(1)"),
        (lambda: Resid([2]), "Resid([2])", "layer", "[2]"),
    ],
)
def test_a_non_int_index_fails_when_made(make, call, field, given):
    with pytest.raises(ComponentError) as caught:
        make()
    assert str(caught.value).startswith(f"{call}: {field} must be an int >= 0, got {given} (")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Neuron(0, -1), r"^Neuron\(0, -1\): neuron -1 is out of range; expected an int"),
        (lambda: Head(2, -3), r"^Head\(2, -3\): head -3 is out of range; expected an int >= 0"),
        (lambda: Head(1, -1).q, r"head -1 is out of range"),
    ],
)
def test_a_negative_head_or_neuron_fails_when_made(make, message):
    with pytest.raises(ComponentError, match=message):
        make()


def test_numpy_ints_are_kept_as_ints():
    head = Head(np.int64(2), np.int32(1), pos=np.int64(3))
    assert head == Head(2, 1, pos=3)
    assert type(head.layer) is int and type(head.head) is int and type(head.pos) is int
    assert repr(head) == "Head(2, 1).at(3)"


# -- layers and MLPs, against the model ------------------------------------------------------


BAD_LAYERS = [
    (Head(40, 0), 40),
    (Head(3, 1).k, 3),
    (Resid(-1), -1),
    (Resid(-2, "post"), -2),
    (Attn(3), 3),
    (MLP(-1), -1),
    (Neuron(7, 0), 7),
]


@pytest.mark.parametrize("component, layer", BAD_LAYERS)
@pytest.mark.parametrize("check", ["validate", "hook_name", "selection_mask", "run"])
def test_a_layer_out_of_range_names_the_model_s_layers(tiny_gpt2, component, layer, check):
    expected = f"{component!r}: layer {layer} is out of range; this model has layers 0..2"
    with pytest.raises(ComponentError, match=f"^{re.escape(expected)}$"):
        if check == "validate":
            component.validate(tiny_gpt2)
        elif check == "hook_name":
            component.hook_name(tiny_gpt2)
        elif check == "selection_mask":
            selection_mask(component, tiny_gpt2, (2, N_POS, 4, 16), None)
        else:
            run_one(tiny_gpt2, component)


@pytest.mark.parametrize("component", [Head(0, 4), Head(1, 9).pattern, Neuron(0, 256)])
def test_a_unit_out_of_range_fails_in_the_selection_mask(tiny_gpt2, component):
    shape = (2, 4, N_POS, N_POS) if component.pos_dim == 2 else (2, N_POS, 256)
    with pytest.raises(ComponentError, match="is out of range"):
        selection_mask(component, tiny_gpt2, shape, None)


@pytest.mark.parametrize("component", [MLP(0), MLP(2).at(1), Neuron(0, 1), Neuron(1, 0).at(-1)])
@pytest.mark.parametrize("check", ["validate", "hook_name", "run"])
def test_an_mlp_of_an_attention_only_model_is_a_component_error(tiny_attn_only, component, check):
    message = "this model (tiny-attn-only) is attention-only and has no MLPs"
    with pytest.raises(ComponentError) as caught:
        if check == "validate":
            component.validate(tiny_attn_only)
        elif check == "hook_name":
            component.hook_name(tiny_attn_only)
        else:
            run_one(tiny_attn_only, component)
    assert str(caught.value) == f"{component!r}: {message}"


def test_good_addresses_still_validate(tiny_model):
    cfg = tiny_model.cfg
    last = cfg.n_layers - 1
    components = [Embed(), Resid(0), Resid(last, "post"), Attn(last), Head(last, cfg.n_heads - 1)]
    components += [] if cfg.attn_only else [MLP(last), Neuron(last, cfg.d_mlp - 1)]
    for component in components:
        component.validate(tiny_model)
        assert component.hook_name(tiny_model) in tiny_model.hook_dict


# -- positions -------------------------------------------------------------------------------


VALID_SLICES = [
    slice(None),
    slice(2, None),
    slice(None, 3),
    slice(1, 6),
    slice(-3, None),
    slice(-6, -1),
    slice(0, 6, 2),
    slice(5, None, -1),
    slice(4, 0, -2),
    slice(5, 6),
]


@pytest.mark.parametrize("pos", VALID_SLICES)
def test_a_slice_selects_what_range_selects(pos):
    mask = position_mask(Head(0, 0).at(pos), 3, N_POS, None)
    expected = torch.zeros(3, N_POS, dtype=torch.bool)
    expected[:, list(range(N_POS)[pos])] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(
    "pos, text",
    [
        (slice(50, 60), "50:60"),
        (slice(6, None), "6:"),
        (slice(None, 7), ":7"),
        (slice(-7, None), "-7:"),
        (slice(2, 9, 2), "2:9:2"),
    ],
)
def test_a_slice_past_the_prompt_is_an_error(pos, text):
    component = Head(0, 0).at(pos)
    with pytest.raises(ComponentError) as caught:
        position_mask(component, 3, N_POS, None)
    assert str(caught.value) == (
        f"{component!r}: position slice {text} is outside the prompt, which has positions 0..5"
    )


@pytest.mark.parametrize(
    "pos, text",
    [
        (slice(3, 3), "3:3"),
        (slice(4, 2), "4:2"),
        (slice(None, -6), ":-6"),
        (slice(1, 4, -1), "1:4:-1"),
    ],
)
def test_a_slice_that_selects_nothing_is_an_error(pos, text):
    component = Resid(1).at(pos)
    with pytest.raises(ComponentError, match=rf"position slice {text} selects no position"):
        position_mask(component, 3, N_POS, None)


@pytest.mark.parametrize("component", [Head(0, 0).at(slice(50, 60)), Attn(1).at(slice(3, 3))])
def test_a_run_with_an_empty_slice_fails_rather_than_change_nothing(tiny_gpt2, component):
    with pytest.raises(ComponentError, match="position slice"):
        run_one(tiny_gpt2, component)


@pytest.mark.parametrize("pos", [[], (), range(0)])
def test_an_empty_list_of_positions_is_an_error(pos):
    with pytest.raises(ComponentError, match=r"^Head\(0, 0\): pos is an empty list of positions"):
        Head(0, 0).at(pos)
    with pytest.raises(ComponentError, match=r"^MLP\(1\): pos is an empty list of positions"):
        MLP(1, pos=pos)


@pytest.mark.parametrize(
    "pos", [1.5, True, (1, 2.0), (True,), slice(0, 2.5), slice(0, 4, 0), torch.tensor([1, 2])]
)
def test_a_malformed_position_fails_when_made(pos):
    with pytest.raises(ComponentError, match=r"^Head\(0, 0\): pos must be None, 'all', an int"):
        Head(0, 0, pos=pos)
    with pytest.raises(ComponentError, match=r"^Resid\(2\): pos must be None"):
        Resid(2).at(pos)


def test_lists_and_ranges_of_positions_become_tuples():
    assert Head(0, 0).at([1, 3]) == Head(0, 0).at((1, 3)) == Head(0, 0, pos=[1, 3])
    assert Attn(1).at(range(2, 4)).pos == (2, 3)
    assert hash(Head(0, 0, pos=[1, 3])) == hash(Head(0, 0).at((1, 3)))


@pytest.mark.parametrize("pos", [6, -7, (0, 6)])
def test_an_int_past_the_prompt_is_still_an_error(pos):
    with pytest.raises(ComponentError, match="is outside the prompt, which has positions 0..5"):
        position_mask(Head(0, 0).at(pos), 3, N_POS, None)
