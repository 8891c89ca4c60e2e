"""IOIDataset: every position names its word, corruptions are aligned, sampling is seeded."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitkit.core.errors import CircuitkitError, DatasetError, TokenizationError
from circuitkit.core.metrics import logit_diff
from circuitkit.data import ioi
from circuitkit.data.ioi import (
    CORRUPTIONS,
    MIN_NAMES,
    NAMES,
    TEMPLATES,
    IOIDataset,
    IOIExample,
)

N_ALL = 2 * len(TEMPLATES)  # every template in both orders


def word(model, ds, i, key):
    return model.tokenizer.decode([int(ds.tokens[i, ds.positions[key][i]])])


def expected_tokens(model, prompts, pad_token_id, width):
    """What ``model.to_tokens`` gives for each prompt alone, right-padded to ``width``."""
    rows = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        row = model.to_tokens(prompt, move_to_device=False)[0]
        rows[i, : len(row)] = row
    return rows


def test_positions_point_at_their_words(tiny_model):
    ds = IOIDataset(tiny_model, n=N_ALL, seed=1)
    assert {(int(t), o) for t, o in zip(ds.templates, ds.orders, strict=True)} == {
        (t, o) for t in range(len(TEMPLATES)) for o in ("ABBA", "BABA")
    }
    expected = expected_tokens(tiny_model, ds.prompts, ds.pad_token_id, ds.tokens.shape[1])
    assert torch.equal(ds.tokens, expected)
    bos = tiny_model.tokenizer.bos_token_id
    for i in range(ds.n):
        assert word(tiny_model, ds, i, "IO") == " " + ds.io_names[i]
        assert word(tiny_model, ds, i, "S1") == " " + ds.s_names[i]
        assert word(tiny_model, ds, i, "S2") == " " + ds.s_names[i]
        assert word(tiny_model, ds, i, "and") == " and"
        assert ds.positions["IO+1"][i] == ds.positions["IO"][i] + 1
        assert ds.positions["S1+1"][i] == ds.positions["S1"][i] + 1
        assert int(ds.tokens[i, 0]) == bos and ds.positions["start"][i] == 1
        end = int(ds.positions["end"][i])
        n_real = len(tiny_model.to_tokens(ds.prompts[i])[0])
        assert end == n_real - 1
        assert (ds.tokens[i, end + 1 :] == ds.pad_token_id).all()
        assert ds.io_tokens[i] == ds.tokens[i, ds.positions["IO"][i]]
        assert ds.s_tokens[i] == ds.tokens[i, ds.positions["S2"][i]]
        first = "IO" if ds.orders[i] == "ABBA" else "S1"
        assert ds.positions[first][i] + 2 == ds.positions["S1" if first == "IO" else "IO"][i]
    assert ds.tokens.shape[1] == int(ds.positions["end"].max()) + 1


def test_every_example_of_a_template_has_the_same_layout(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=4 * len(TEMPLATES), seed=3)
    for t in range(len(TEMPLATES)):
        for order in ("ABBA", "BABA"):
            rows = [i for i in range(ds.n) if ds.templates[i] == t and ds.orders[i] == order]
            assert len(rows) == 2
            for positions in ds.positions.values():
                assert positions[rows[0]] == positions[rows[1]]


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_aligned_with_the_clean_prompts(tiny_model, kind):
    ds = IOIDataset(tiny_model, n=N_ALL, seed=2)
    bad = ds.corrupted(kind)
    assert bad.corruption == kind and ds.corruption is None
    assert bad.tokens.shape == ds.tokens.shape
    assert bad.positions.keys() == ds.positions.keys()
    for key in ds.positions:
        assert torch.equal(bad.positions[key], ds.positions[key])
    for field in ("templates", "io_tokens", "s_tokens", "ids"):
        assert torch.equal(getattr(bad, field), getattr(ds, field))
    assert bad.orders == ds.orders and bad.places == ds.places and bad.objects == ds.objects
    expected = expected_tokens(tiny_model, bad.prompts, bad.pad_token_id, bad.tokens.shape[1])
    assert torch.equal(bad.tokens, expected)

    names_at = torch.zeros_like(ds.tokens, dtype=torch.bool)
    for slot in ("IO", "S1", "S2"):
        names_at[torch.arange(ds.n), ds.positions[slot]] = True
    assert torch.equal(bad.tokens[~names_at], ds.tokens[~names_at])
    assert (bad.tokens != ds.tokens).any()
    for i in range(ds.n):
        for slot in ("IO", "S1", "S2"):
            assert word(tiny_model, bad, i, slot) == " " + bad.slot_names[slot][i]


def test_corruption_kinds_replace_the_names_they_say(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=40, seed=4)
    by_kind = {kind: ds.corrupted(kind).slot_names for kind in CORRUPTIONS}
    for i in range(ds.n):
        io, s = ds.io_names[i], ds.s_names[i]
        abc = [by_kind["ABC"][slot][i] for slot in ("IO", "S1", "S2")]
        assert len(set(abc)) == 3 and not set(abc) & {io, s}
        flip = [by_kind["flip"][slot][i] for slot in ("IO", "S1", "S2")]
        assert flip == [io, s, io]
        new_io = by_kind["random_io"]["IO"][i]
        assert new_io not in (io, s)
        assert [by_kind["random_io"][slot][i] for slot in ("S1", "S2")] == [s, s]
        new_s = by_kind["random_s"]["S1"][i]
        assert new_s not in (io, s) and by_kind["random_s"]["S2"][i] == new_s
        assert by_kind["random_s"]["IO"][i] == io
        both = [by_kind["random_names"][slot][i] for slot in ("IO", "S1", "S2")]
        assert both[1] == both[2] != both[0] and not set(both) & {io, s}


def test_flip_puts_the_io_name_at_s2(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=6)
    flip = ds.corrupted("flip")
    for i in range(ds.n):
        head, _, tail = ds.prompts[i].rpartition(" " + ds.s_names[i])
        assert flip.prompts[i] == head + " " + ds.io_names[i] + tail


def test_same_seed_same_dataset_and_other_seeds_differ(tiny_gpt2):
    a, b = IOIDataset(tiny_gpt2, n=30, seed=7), IOIDataset(tiny_gpt2, n=30, seed=7)
    assert a.prompts == b.prompts and torch.equal(a.tokens, b.tokens)
    for kind in CORRUPTIONS:
        assert a.corrupted(kind).prompts == b.corrupted(kind).prompts
    c = IOIDataset(tiny_gpt2, n=30, seed=8)
    assert c.prompts != a.prompts
    assert a.corrupted("ABC").prompts != c.corrupted("ABC").prompts


def test_global_rng_is_neither_used_nor_changed(tiny_gpt2):
    import random

    random.seed(123)
    torch.manual_seed(123)
    state, torch_state = random.getstate(), torch.get_rng_state()
    a = IOIDataset(tiny_gpt2, n=10, seed=0)
    a.corrupted("ABC")
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    random.seed(999)
    assert IOIDataset(tiny_gpt2, n=10, seed=0).prompts == a.prompts


def test_smaller_datasets_and_slices_are_prefixes(tiny_gpt2):
    big = IOIDataset(tiny_gpt2, n=30, seed=5)
    small = IOIDataset(tiny_gpt2, n=10, seed=5)
    assert small.prompts == big.prompts[:10]
    for kind in CORRUPTIONS:
        assert big[:10].corrupted(kind).prompts == big.corrupted(kind).prompts[:10]
        assert torch.equal(big[5:9].corrupted(kind).tokens, big.corrupted(kind).tokens[5:9])


def test_sequence_protocol(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=12, seed=0)
    assert len(ds) == 12 and ds.n == 12
    part = ds[2:7]
    assert isinstance(part, IOIDataset) and len(part) == 5
    assert part.prompts == ds.prompts[2:7]
    assert torch.equal(part.tokens, ds.tokens[2:7])
    assert torch.equal(part.io_tokens, ds.io_tokens[2:7])
    assert torch.equal(part.ids, torch.arange(2, 7))
    for key in ds.positions:
        assert torch.equal(part.positions[key], ds.positions[key][2:7])
    assert part.slot_names["IO"] == ds.slot_names["IO"][2:7]
    assert part.orders == ds.orders[2:7] and torch.equal(part.templates, ds.templates[2:7])

    picked = ds[[3, 0]]
    assert picked.prompts == [ds.prompts[3], ds.prompts[0]]
    masked = ds[ds.templates == ds.templates[0]]
    assert all(t == ds.templates[0] for t in masked.templates)

    examples = list(ds)
    assert len(examples) == 12 and all(isinstance(e, IOIExample) for e in examples)
    last = ds[-1]
    assert last.prompt == ds.prompts[11] and last.io_token == int(ds.io_tokens[11])
    assert last.tokens.shape[0] == last.positions["end"] + 1
    assert ds[0].positions["IO"] == int(ds.positions["IO"][0])
    with pytest.raises(IndexError):
        ds[12]
    assert "n=12" in repr(ds)


def test_names_given_that_are_several_tokens_are_an_error(tiny_gpt2):
    good = ["Mary", "John", "Tom", "Anna", "Lisa", "Paul"]
    counts = {
        name: len(tiny_gpt2.to_tokens(" " + name, prepend_bos=False)[0])
        for name in ("Bartholomew", "Gwendolyn")
    }
    assert all(count > 1 for count in counts.values())
    with pytest.raises(TokenizationError) as caught:
        IOIDataset(tiny_gpt2, n=4, names=[*good[:3], "Bartholomew", *good[3:], "Gwendolyn"])
    message = str(caught.value)
    assert message.startswith("IOIDataset: every word in names must be one token")
    for name, count in counts.items():
        assert f"'{name}' is {count} tokens" in message
    assert "'Mary'" not in message
    with pytest.raises(TokenizationError, match=r"' Mary'.*without the leading space"):
        IOIDataset(tiny_gpt2, n=4, names=[" Mary", *good])
    with pytest.raises(TokenizationError, match=r"every word in places.*'Bartholomew Street' is"):
        IOIDataset(tiny_gpt2, n=4, places=["park", "Bartholomew Street"])
    with pytest.raises(TokenizationError, match=r"every word in objects.*'Gwendolyn' is"):
        IOIDataset(tiny_gpt2, n=4, objects=["book", "Gwendolyn"])
    assert set(IOIDataset(tiny_gpt2, n=4, names=good).names) == set(good)


def test_built_in_names_are_fitted_to_the_tokenizer_silently(tiny_gpt2, monkeypatch):
    monkeypatch.setattr(ioi, "NAMES", (*ioi.NAMES, "Bartholomew", "Gwendolyn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = IOIDataset(tiny_gpt2, n=40)
    assert "Bartholomew" not in ds.names and "Gwendolyn" not in ds.names
    assert set(ds.names) == set(NAMES)
    text = " ".join(" ".join(d.prompts) for d in (ds, *(ds.corrupted(k) for k in CORRUPTIONS)))
    assert "Bartholomew" not in text and "Gwendolyn" not in text


def test_too_few_names_is_an_error(tiny_gpt2, monkeypatch):
    with pytest.raises(DatasetError, match=f"names has 3 different names.*at least {MIN_NAMES}"):
        IOIDataset(tiny_gpt2, n=4, names=["Mary", "John", "Tom", "Mary"])
    monkeypatch.setattr(ioi, "NAMES", ("Mary", "John", "Tom", "Bartholomew", "Gwendolyn"))
    with pytest.raises(TokenizationError, match=r"only 3 of the 5 built-in names.*give names="):
        IOIDataset(tiny_gpt2, n=4)


def test_both_orders_present(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=2)
    assert ds.orders == ["ABBA", "BABA"]
    assert ds.positions["IO"][0] < ds.positions["S1"][0]
    assert ds.positions["S1"][1] < ds.positions["IO"][1]
    assert ds.prompts[1].index(ds.s_names[1]) < ds.prompts[1].index(ds.io_names[1])


def test_custom_templates_words_and_no_bos(tiny_gpt2):
    template = "Then {IO} and {S1} saw the {PLACE} and {S2} gave a {OBJECT} to"
    ds = IOIDataset(
        tiny_gpt2,
        n=6,
        templates=[template],
        places=["park"],
        objects=["book"],
        prepend_bos=False,
    )
    assert ds.places == ["park"] * 6 and not ds.prepend_bos
    assert ds.positions["start"].tolist() == [0] * 6
    assert ds.tokens[0, 0] == tiny_gpt2.to_tokens("Then", prepend_bos=False)[0, 0]
    assert word(tiny_gpt2, ds, 0, "IO") == " " + ds.io_names[0]


@pytest.mark.parametrize(
    "template",
    [
        "When {IO} met {S1} at the shop, {S2} waved to",  # no "{IO} and {S1}"
        "{IO} and {S1} left, and {S2} waved to",  # no space before a slot
        "When {IO} and {S1} left, {S2} waved at {S2}",  # a slot twice
        "When {IO} and {S1} left, {S2} waved at {FRIEND}",  # an unknown slot
    ],
)
def test_bad_templates_are_rejected(tiny_gpt2, template):
    with pytest.raises(ValueError, match="template"):
        IOIDataset(tiny_gpt2, n=2, templates=[template])


def test_invalid_arguments(tiny_gpt2):
    with pytest.raises(DatasetError, match="n must be a positive integer"):
        IOIDataset(tiny_gpt2, n=0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=10, act_fn="relu"
    )
    with pytest.raises(TokenizationError, match="no tokenizer"):
        IOIDataset(HookedTransformer(cfg), n=2)
    with pytest.raises(DatasetError, match=r"names must be a list of strings.*got 'Mary'"):
        IOIDataset(tiny_gpt2, n=2, names="Mary")
    with pytest.raises(DatasetError, match=r"names must hold non-empty strings, got 7"):
        IOIDataset(tiny_gpt2, n=2, names=["Mary", "John", "Tom", "Anna", 7])
    with pytest.raises(DatasetError, match="templates must be a list of strings"):
        IOIDataset(tiny_gpt2, n=2, templates=TEMPLATES[0])
    ds = IOIDataset(tiny_gpt2, n=2)
    with pytest.raises(DatasetError, match="already corrupted"):
        ds.corrupted("ABC").corrupted("flip")


@pytest.mark.parametrize("kind", ["XYZ", "abc", ["ABC"], None])
def test_unknown_corruption_names_the_method_and_the_choices(tiny_gpt2, kind):
    ds = IOIDataset(tiny_gpt2, n=2)
    with pytest.raises(DatasetError) as caught:
        ds.corrupted(kind)
    assert isinstance(caught.value, CircuitkitError)
    message = str(caught.value)
    assert message.startswith(f"IOIDataset.corrupted: unknown kind {kind!r}")
    assert all(repr(name) in message for name in CORRUPTIONS)


@pytest.mark.parametrize("index", ["IO", 1.5, [0.5], [True, False], torch.tensor([0.0])])
def test_indexing_with_a_wrong_type_is_an_error(tiny_gpt2, index):
    ds = IOIDataset(tiny_gpt2, n=4)
    with pytest.raises(DatasetError, match=r"IOIDataset: .*index must"):
        ds[index]


def test_provenance_records_how_it_was_made(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=4, seed=9)[1:3].corrupted("ABC")
    record = ds.provenance
    assert record["seed"] == 9 and record["corruption"] == "ABC" and record["ids"] == [1, 2]
    assert record["prepend_bos"] is True and len(record["templates"]) == len(TEMPLATES)


@pytest.mark.real
def test_smollm_does_the_task_and_abc_breaks_it(smollm):
    ds = IOIDataset(smollm, n=20, seed=0)
    metric = logit_diff(ds)
    with torch.inference_mode():
        clean = metric(smollm(ds.tokens)).mean()
        abc = metric(smollm(ds.corrupted("ABC").tokens)).mean()
    assert clean > 1.0
    assert clean > abc + 1.0


def test_a_dataset_too_large_for_memory_is_refused_up_front(tiny_gpt2):
    with pytest.raises(DatasetError, match=r"n=1,000,000,000 prompts would need about .* GiB"):
        IOIDataset(tiny_gpt2, n=10**9)
