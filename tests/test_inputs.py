"""Token inputs: every entry point checks dtype, emptiness and the range of ids in one place."""

from __future__ import annotations

import copy

import pytest
import torch

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ShapeError
from circuitkit.core.inputs import as_tokens, check_token_ids


def test_valid_ids_pass_as_long():
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        tokens = torch.tensor([[0, 5, 9], [1, 2, 3]], dtype=dtype)
        checked = check_token_ids(tokens, "my_method", d_vocab=10)
        assert checked.dtype == torch.long
        assert torch.equal(checked, tokens.long())


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.float32, torch.bfloat16])
def test_tokens_that_are_not_integers(dtype):
    tokens = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(
        ShapeError,
        match=rf"^my_method: tokens must be an integer \[n, pos\] tensor of token ids, got a "
        rf"{dtype} tensor of shape \(2, 3\)$",
    ):
        check_token_ids(tokens, "my_method", d_vocab=10)


@pytest.mark.parametrize(
    "ids, low, high",
    [([[0, -1, 3]], -1, 3), ([[0, 10, 3]], 0, 10), ([[-5, 2, 12]], -5, 12)],
)
def test_ids_out_of_range(ids, low, high):
    with pytest.raises(
        CircuitkitError,
        match=rf"^my_method: clean holds token ids from {low} to {high}, outside the valid "
        r"range \[0, 10\) \(the model's d_vocab\)$",
    ):
        check_token_ids(torch.tensor(ids), "my_method", name="clean", d_vocab=10)


def test_without_a_vocabulary_only_negative_ids_are_refused():
    assert check_token_ids(torch.tensor([[10**6]]), "my_method").item() == 10**6
    with pytest.raises(CircuitkitError, match=r"from -1 to 4, outside the valid range ids >= 0"):
        check_token_ids(torch.tensor([[-1, 4]]), "my_method")


def test_empty_tokens():
    with pytest.raises(ShapeError, match=r"^my_method: tokens has no examples \(shape \(0, 5\)\)"):
        check_token_ids(torch.zeros(0, 5, dtype=torch.long), "my_method")
    with pytest.raises(ShapeError, match=r"^my_method: tokens has no positions \(shape \(3, 0\)\)"):
        check_token_ids(torch.zeros(3, 0, dtype=torch.long), "my_method")


def test_as_tokens_checks_datasets_and_tensors(tiny_gpt2):
    class Data:
        tokens = torch.tensor([[1, 2], [3, -4]])
        positions = {"end": torch.tensor([1, 1])}

    with pytest.raises(CircuitkitError, match=r"^my_method: ds holds token ids from -4 to 3"):
        as_tokens(Data(), "ds", "my_method")
    Data.tokens = torch.tensor([[1, 2], [3, 4]])
    tokens, positions = as_tokens(Data(), "ds", "my_method")
    assert tokens.dtype == torch.long and positions is Data.positions
    vocab = tiny_gpt2.cfg.d_vocab
    past_vocab = torch.tensor([[1, vocab]])
    assert as_tokens(past_vocab, "clean", "my_method")[0].shape == (1, 2)  # no model: not known
    with pytest.raises(
        CircuitkitError, match=rf"to {vocab}, outside the valid range \[0, {vocab}\)"
    ):
        as_tokens(past_vocab, "clean", "my_method", model=tiny_gpt2)
    with pytest.raises(ShapeError, match=r"^my_method: clean must be an integer .*torch\.bool"):
        as_tokens(torch.ones(2, 2, dtype=torch.bool), "clean", "my_method")
    with pytest.raises(ShapeError, match=r"^my_method: clean must be a dataset with \.tokens"):
        as_tokens(torch.ones(4, dtype=torch.long), "clean", "my_method")


def test_a_method_names_itself_and_the_argument(tiny_gpt2):
    clean = torch.randint(0, tiny_gpt2.cfg.d_vocab, (2, 5))
    corrupted = clean.clone()
    corrupted[1, 1] = -3
    with pytest.raises(
        CircuitkitError, match=r"^activation_patching: corrupted holds token ids from -3"
    ):
        ck.activation_patching(tiny_gpt2, clean, corrupted, "head", lambda logits: logits[:, -1, 0])
    with pytest.raises(ShapeError, match=r"^activation_patching: clean has no examples"):
        ck.activation_patching(
            tiny_gpt2, clean[:0], corrupted[:0], "head", lambda logits: logits[:, -1, 0]
        )


# -- every method checks its token ids before its first forward pass ----------------------------


def _circuit():
    return ck.Circuit.from_classes({"x": [ck.Head(2, 1).at("end"), ck.Head(1, 0)]})


# name: the function the error names; call(model, ds, bad, metric) with ``bad`` in one input
METHODS = {
    "activation_patching": lambda m, ds, bad, metric: ck.activation_patching(
        m, bad, ds, "head", metric, progress=False
    ),
    "activation_patching corrupted": lambda m, ds, bad, metric: ck.activation_patching(
        m, ds, bad, "head", metric, progress=False
    ),
    "path_patching": lambda m, ds, bad, metric: ck.path_patching(
        m, bad, ds, "heads", "logits", metric, progress=False
    ),
    "path_patching corrupted": lambda m, ds, bad, metric: ck.path_patching(
        m, ds, bad, "heads", "logits", metric, progress=False
    ),
    "ablate": lambda m, ds, bad, metric: ck.ablate(
        m, bad, [ck.Head(0, 0)], "mean", reference=ds, metric=metric, progress=False
    ),
    "ablate reference": lambda m, ds, bad, metric: ck.ablate(
        m, ds, [ck.Head(0, 0)], "mean", reference=bad, metric=metric, progress=False
    ),
    "ablation_sweep": lambda m, ds, bad, metric: ck.ablation_sweep(
        m, bad, "head", "zero", metric=metric, progress=False
    ),
    "attribution_patching": lambda m, ds, bad, metric: ck.attribution_patching(
        m, bad, ds, metric, "head", progress=False
    ),
    "edge_attribution_patching": lambda m, ds, bad, metric: ck.edge_attribution_patching(
        m, ds, bad, metric, progress=False
    ),
    "patch_edges": lambda m, ds, bad, metric: ck.patch_edges(
        m, bad, [[]], metric, replacement=ck.sender_outputs(m, ds), progress=False
    ),
    "sender_outputs": lambda m, ds, bad, metric: ck.sender_outputs(m, bad),
    "faithfulness": lambda m, ds, bad, metric: ck.faithfulness(
        m, _circuit(), bad, reference=ds, metric=metric, progress=False
    ),
    "faithfulness reference": lambda m, ds, bad, metric: ck.faithfulness(
        m, _circuit(), ds, reference=bad, metric=metric, progress=False
    ),
    "faithfulness_table": lambda m, ds, bad, metric: ck.faithfulness_table(
        m, _circuit(), bad, reference=ds, metric=metric, choices=["zero"], progress=False
    ),
    "completeness": lambda m, ds, bad, metric: ck.completeness(
        m, _circuit(), bad, reference=ds, metric=metric, progress=False
    ),
    "minimality": lambda m, ds, bad, metric: ck.minimality(
        m, _circuit(), bad, reference=ds, metric=metric, progress=False
    ),
    "causal_trace": lambda m, ds, bad, metric: ck.causal_trace(
        m, bad.tokens[1], [1, 2], 5, progress=False
    ),
    "causal_effects": lambda m, ds, bad, metric: ck.causal_effects(
        m, bad, ds, ds.io_tokens, progress=False
    ),
    "trace_token_probability": lambda m, ds, bad, metric: ck.trace_token_probability(
        m, bad.tokens, 5
    ),
    "intervene_on_neuron": lambda m, ds, bad, metric: ck.intervene_on_neuron(m, bad.tokens, 0, 3),
    "attention_scores": lambda m, ds, bad, metric: ck.attention_scores(m, bad, progress=False),
    "attention_head_scores": lambda m, ds, bad, metric: ck.attention_head_scores(
        m, bad, progress=False
    ),
    "find_ioi_circuit": lambda m, ds, bad, metric: ck.find_ioi_circuit(
        m, bad, reference=ds, metric=metric, progress=False
    ),
    "discover_circuit": lambda m, ds, bad, metric: ck.discover_circuit(
        m, bad, ds, metric, progress=False
    ),
    "run_interventions": lambda m, ds, bad, metric: ck.run_interventions(
        m, bad.tokens, [[]], metric, progress=False
    ),
    "record_activations": lambda m, ds, bad, metric: ck.record_activations(
        m, bad.tokens, [[]], [ck.Head(0, 0)], progress=False
    ),
}


@pytest.mark.parametrize("bad_id", ["d_vocab", -1])
@pytest.mark.parametrize("case", list(METHODS))
def test_every_method_refuses_ids_outside_the_vocabulary(tiny_gpt2, case, bad_id):
    """An id equal to d_vocab or below 0, in any token input, is a CircuitkitError naming the
    method, raised before any forward pass; the model keeps no hook and the same weights."""
    model = tiny_gpt2
    ds = ck.IOIDataset(model, n=4, seed=0)
    metric = ck.metrics.logit_diff(ds)
    bad = copy.copy(ds)
    bad.tokens = ds.tokens.clone()
    bad.tokens[1, 2] = model.cfg.d_vocab if bad_id == "d_vocab" else bad_id
    before = copy.deepcopy(model.state_dict())
    forwards = []
    counter = model.embed.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        name = case.split()[0]
        with pytest.raises(CircuitkitError, match=rf"^{name}\b.*holds token ids? "):
            METHODS[case](model, ds, bad, metric)
    finally:
        counter.remove()
    # sender_outputs(model, ds) builds the good replacement first; nothing runs on bad tokens
    assert not forwards or case == "patch_edges"
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())
    assert not model._forward_pre_hooks and not model.embed._forward_pre_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- every method checks memory_budget before any work --------------------------------------

# name: the function the error names; call(model, ds, abc, metric, budget)
BUDGETED = {
    "activation_patching": lambda m, ds, abc, metric, b: ck.activation_patching(
        m, ds, abc, "head", metric, memory_budget=b, progress=False
    ),
    "path_patching": lambda m, ds, abc, metric, b: ck.path_patching(
        m, ds, abc, "heads", "logits", metric, memory_budget=b, progress=False
    ),
    "ablate": lambda m, ds, abc, metric, b: ck.ablate(
        m, ds, [ck.Head(0, 0)], "zero", metric=metric, memory_budget=b, progress=False
    ),
    "ablation_sweep": lambda m, ds, abc, metric, b: ck.ablation_sweep(
        m, ds, "head", "zero", metric=metric, memory_budget=b, progress=False
    ),
    "attribution_patching": lambda m, ds, abc, metric, b: ck.attribution_patching(
        m, ds, abc, metric, "head", memory_budget=b, progress=False
    ),
    "edge_attribution_patching": lambda m, ds, abc, metric, b: ck.edge_attribution_patching(
        m, ds, abc, metric, memory_budget=b, progress=False
    ),
    "patch_edges": lambda m, ds, abc, metric, b: ck.patch_edges(
        m,
        ds,
        [[]],
        metric,
        replacement=ck.sender_outputs(m, abc),
        memory_budget=b,
        progress=False,
    ),
    "faithfulness": lambda m, ds, abc, metric, b: ck.faithfulness(
        m, _circuit(), ds, reference=abc, metric=metric, memory_budget=b, progress=False
    ),
    "faithfulness edge": lambda m, ds, abc, metric, b: ck.faithfulness(
        m,
        _circuit(),
        ds,
        reference=abc,
        metric=metric,
        ablation=ck.Ablation("zero", level="edge"),
        memory_budget=b,
        progress=False,
    ),
    "causal_trace": lambda m, ds, abc, metric, b: ck.causal_trace(
        m, ds.tokens[0], [1, 2], 5, memory_budget=b, progress=False
    ),
    "causal_effects": lambda m, ds, abc, metric, b: ck.causal_effects(
        m, ds, abc, ds.io_tokens, memory_budget=b, progress=False
    ),
    "attention_scores": lambda m, ds, abc, metric, b: ck.attention_scores(
        m, ds, memory_budget=b, progress=False
    ),
    "attention_head_scores": lambda m, ds, abc, metric, b: ck.attention_head_scores(
        m, ds, memory_budget=b, progress=False
    ),
    "discover_circuit": lambda m, ds, abc, metric, b: ck.discover_circuit(
        m, ds, abc, metric, memory_budget=b, progress=False
    ),
    "find_ioi_circuit": lambda m, ds, abc, metric, b: ck.find_ioi_circuit(
        m, ds, reference=abc, metric=metric, memory_budget=b, progress=False
    ),
    "faithfulness_curve": lambda m, ds, abc, metric, b: ck.faithfulness_curve(
        m,
        ds,
        abc,
        metric,
        scores=ck.edge_attribution_patching(m, ds, abc, metric, progress=False),
        sizes=[0.5],
        memory_budget=b,
        progress=False,
    ),
    "faithfulness_table": lambda m, ds, abc, metric, b: ck.faithfulness_table(
        m,
        _circuit(),
        ds,
        reference=abc,
        metric=metric,
        choices=["zero"],
        memory_budget=b,
        progress=False,
    ),
    "completeness": lambda m, ds, abc, metric, b: ck.completeness(
        m, _circuit(), ds, reference=abc, metric=metric, memory_budget=b, progress=False
    ),
    "minimality": lambda m, ds, abc, metric, b: ck.minimality(
        m, _circuit(), ds, reference=abc, metric=metric, memory_budget=b, progress=False
    ),
    "run_interventions": lambda m, ds, abc, metric, b: ck.run_interventions(
        m, ds.tokens, [[]], metric, memory_budget=b, progress=False
    ),
    "record_activations": lambda m, ds, abc, metric, b: ck.record_activations(
        m, ds.tokens, [[]], [ck.Head(0, 0)], memory_budget=b, progress=False
    ),
}


@pytest.mark.parametrize("budget", ["1GB", 0, -1, 2.5, float("nan")])
@pytest.mark.parametrize("case", list(BUDGETED))
def test_every_method_refuses_a_bad_memory_budget(tiny_gpt2, case, budget):
    model = tiny_gpt2
    ds = ck.IOIDataset(model, n=4, seed=0)
    abc, metric = ds.corrupted("ABC"), ck.metrics.logit_diff(ds)
    name = case.split()[0]
    with pytest.raises(CircuitkitError, match=rf"^{name}\b.*memory_budget must be a positive"):
        BUDGETED[case](model, ds, abc, metric, budget)
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize(
    "call",
    [
        lambda m, ds, pos: ck.activation_patching(
            m, ds, ds.corrupted("ABC"), "head", positions=pos, progress=False
        ),
        lambda m, ds, pos: ck.attribution_patching(
            m, ds, ds.corrupted("ABC"), None, "head", positions=pos, progress=False
        ),
        lambda m, ds, pos: ck.ablation_sweep(m, ds, "head", "zero", positions=pos, progress=False),
    ],
    ids=["activation_patching", "attribution_patching", "ablation_sweep"],
)
def test_sweeps_refuse_no_positions_and_positions_past_the_prompt(tiny_gpt2, call, request):
    """``positions=[]`` would sweep nothing: it is refused, as are positions and slices past the
    prompt, naming the function."""
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=0)
    where = request.node.callspec.id
    n_pos = ds.tokens.shape[1]
    for empty in ([], (), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(CircuitkitError, match=rf"^{where}: positions is empty; give at least"):
            call(tiny_gpt2, ds, empty)
    with pytest.raises(CircuitkitError, match=rf"^{where}: position {n_pos} is outside the prompt"):
        call(tiny_gpt2, ds, [0, n_pos])
    with pytest.raises(CircuitkitError, match=r"slice 40:50 is outside the prompt"):
        call(tiny_gpt2, ds, [slice(40, 50)])
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())
