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
    if check == "run":  # a method's error also names the method
        expected = f"run_interventions: {expected}"
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
    called = "run_interventions: " if check == "run" else ""
    assert str(caught.value) == f"{called}{component!r}: {message}"


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


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, ds: ck.ablate(m, ds, ["Head(0, 0)"], "zero", progress=False),
            r"^ablate: unknown component kind 'Head\(0, 0\)'; expected one of 'resid_pre'",
        ),
        (
            lambda m, ds: ck.ablation_sweep(m, ds, "heads", "zero", progress=False),
            r"^ablation_sweep: unknown component kind 'heads'",
        ),
        (
            lambda m, ds: ck.activation_patching(m, ds, ds, "heads!", progress=False),
            r"^activation_patching: unknown component kind 'heads!'",
        ),
        (
            lambda m, ds: ck.attribution_patching(
                m, ds, ds, None, "blocks.0.hook_z", progress=False
            ),
            r"^attribution_patching: unknown component kind 'blocks\.0\.hook_z'",
        ),
        (
            lambda m, ds: ck.ablation_sweep(m, ds, "mlp", "zero", progress=False),
            r"^ablation_sweep: this model is attention-only and has no MLP layers",
        ),
        (
            lambda m, ds: ck.activation_patching(m, ds, ds, "head", layers=[-1], progress=False),
            r"^activation_patching: layer -1 is out of range; this model has layers 0\.\.2",
        ),
    ],
)
def test_a_component_kind_given_as_a_string_names_the_function(tiny_attn_only, call, message):
    ds = ck.IOIDataset(tiny_attn_only, n=4, seed=0)
    with pytest.raises(ComponentError, match=message):
        call(tiny_attn_only, ds)
    assert all(
        not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_attn_only.hook_dict.values()
    )


@pytest.mark.parametrize(
    "component, text",
    [
        (Head(0, 0).at(slice(50, 60)), "position slice 50:60 is outside the prompt"),
        (Head(0, 0).at(50), "position 50 is outside the prompt"),
        (Head(0, 0).at(-50), "position -50 is outside the prompt"),
        (MLP(1).at(slice(-60, -50)), "position slice -60:-50 is outside the prompt"),
        (Head(0, 0).at("nowhere"), "unknown position word 'nowhere'"),
        (Head(5, 0), "layer 5 is out of range; this model has layers 0..2"),
    ],
)
def test_a_method_names_itself_for_an_address_outside_the_model_or_prompt(
    tiny_gpt2, component, text
):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=0)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    calls = {
        "run_interventions": lambda: ck.run_interventions(
            tiny_gpt2, ds.tokens, [[Intervention(component, Zero())]], metric, progress=False
        ),
        "record_activations": lambda: ck.record_activations(
            tiny_gpt2,
            ds.tokens,
            [[Intervention(component, Zero())]],
            [Head(0, 0)],
            positions=ds.positions,
            progress=False,
        ),
        "ablate": lambda: ck.ablate(tiny_gpt2, ds, [component], "zero", progress=False),
        "activation_patching": lambda: ck.activation_patching(
            tiny_gpt2, ds, abc, [component], progress=False
        ),
    }
    for where, call in calls.items():
        with pytest.raises(ComponentError, match=rf"^{where}\b.*: {re.escape(repr(component))}: "):
            call()
        with pytest.raises(ComponentError, match=re.escape(text)):
            call()
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())


NEGATIVE_LAYER_CALLS = {
    "ablation_sweep": lambda m, ds, abc, cache: ck.ablation_sweep(
        m, ds, "head", "zero", layers=[-1], progress=False
    ),
    "ablation_sweep neuron": lambda m, ds, abc, cache: ck.ablation_sweep(
        m, ds, "neuron", "zero", layer=-1, progress=False
    ),
    "activation_patching": lambda m, ds, abc, cache: ck.activation_patching(
        m, ds, abc, "head", layers=[-1], progress=False
    ),
    "attribution_patching": lambda m, ds, abc, cache: ck.attribution_patching(
        m, ds, abc, None, "head", layers=[-1], progress=False
    ),
    "path_patching": lambda m, ds, abc, cache: ck.path_patching(
        m, ds, abc, "heads", "logits", layers=[-1], progress=False
    ),
    "causal_trace": lambda m, ds, abc, cache: ck.causal_trace(
        m, ds.tokens[0], [1, 2], 5, layers=[-1], progress=False
    ),
    "causal_effects": lambda m, ds, abc, cache: ck.causal_effects(
        m, ds, abc, ds.io_tokens, layers=[-1], progress=False
    ),
    "direct_logit_attribution": lambda m, ds, abc, cache: ck.direct_logit_attribution(
        m, cache, ds, by="neuron", layers=[-1]
    ),
    "intervene_on_neuron": lambda m, ds, abc, cache: ck.intervene_on_neuron(m, ds.tokens, -1, 3),
    "find_ioi_circuit": lambda m, ds, abc, cache: ck.find_ioi_circuit(
        m, ds, reference=abc, layers=[-1], progress=False
    ),
}


@pytest.mark.parametrize("case", list(NEGATIVE_LAYER_CALLS))
def test_a_negative_layer_names_the_function_and_the_valid_range(tiny_gpt2, case):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=0)
    _, cache = tiny_gpt2.run_with_cache(ds.tokens)
    name = case.split()[0]
    with pytest.raises(
        ComponentError, match=rf"^{name}\b.*layer -1 is out of range; this model has layers 0\.\.2$"
    ):
        NEGATIVE_LAYER_CALLS[case](tiny_gpt2, ds, ds.corrupted("ABC"), cache)
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())


def test_direct_logit_attribution_refuses_layers_it_would_ignore(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=0)
    _, cache = tiny_gpt2.run_with_cache(ds.tokens)
    for by in ("layer", "head", "component"):
        with pytest.raises(
            ck.CircuitkitError,
            match=rf"^direct_logit_attribution: layers= is only for by='neuron', got by='{by}'$",
        ):
            ck.direct_logit_attribution(tiny_gpt2, cache, ds, by=by, layers=[0])
    neurons = ck.direct_logit_attribution(tiny_gpt2, cache, ds, by="neuron", layers=[1])
    assert neurons.labels["layer"] == ["1"]
