"""Token inputs: every entry point checks dtype, emptiness and the range of ids in one place."""

from __future__ import annotations

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
