"""Result: bootstrap intervals and paired comparisons against plain references, and files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pickle
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import circuitkit as ck
from circuitkit.core import results
from circuitkit.core.errors import CircuitkitError, ResultFileError, ShapeError
from circuitkit.core.results import Result, bootstrap_interval, sign_flip_test


def reference_interval(samples, level, n_boot, seed):
    """The bootstrap written plainly: one resampling of the examples at a time."""
    n = samples.shape[1]
    generator = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(n_boot):
        drawn = torch.randint(0, n, (n,), generator=generator)
        means.append(samples[:, drawn].double().mean(1))
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.stack(means, 1), quantiles, dim=1)
    return low, high


def reference_sign_flip(differences):
    """The exact sign-flip p-value by listing every sign pattern."""
    d = differences.double().tolist()
    observed = abs(sum(d) / len(d))
    patterns = list(itertools.product([-1, 1], repeat=len(d)))
    extreme = sum(
        abs(sum(s * x for s, x in zip(signs, d, strict=True)) / len(d)) >= observed * (1 - 1e-9)
        for signs in patterns
    )
    return extreme / len(patterns)


def normal_result(mean, std, n, seed, shape=(3,)):
    g = torch.Generator().manual_seed(seed)
    examples = mean + std * torch.randn(*shape, n, generator=g)
    axes = [f"axis{i}" for i in range(len(shape))]
    return Result.from_examples(examples, axes, {}, metric="m", method="synthetic")


# -- bootstrap intervals ----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n_cells=st.integers(1, 6),
    n=st.integers(2, 30),
    n_boot=st.integers(1, 60),
    seed=st.integers(0, 2**31),
    level=st.floats(0.5, 0.99),
    block_bytes=st.sampled_from([8, 200, 2000, 64 * 2**20]),
)
def test_bootstrap_equals_reference(n_cells, n, n_boot, seed, level, block_bytes):
    samples = torch.randn(n_cells, n, generator=torch.Generator().manual_seed(seed % 1000))
    # small blocks take cells a few at a time and draws a few at a time
    with mock.patch.object(results, "_BOOTSTRAP_BLOCK_BYTES", block_bytes):
        low, high = bootstrap_interval(samples, level, n_boot=n_boot, seed=seed)
    expected_low, expected_high = reference_interval(samples, level, n_boot, seed)
    torch.testing.assert_close(low, expected_low, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(high, expected_high, atol=1e-12, rtol=1e-12)
    assert (low <= high).all()


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 50),
    q=st.floats(0.0, 1.0),
    ties=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_tail_quantile_equals_torch_quantile(size, q, ties, seed):
    values = torch.randn(
        4, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    if ties:
        values = values.round()
    expected = torch.quantile(values, q, dim=1)
    torch.testing.assert_close(results._tail_quantile(values, q), expected, atol=1e-12, rtol=0)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    true_mean, reps = 1.3, 400
    covered = 0
    for rep in range(reps):
        result = normal_result(true_mean, 2.0, n=60, seed=rep, shape=(1,))
        low, high = result.ci(0.95, n_boot=1000, seed=rep)
        covered += bool(low[0] <= true_mean <= high[0])
    assert 0.92 <= covered / reps <= 0.98


def test_interval_narrows_as_n_grows():
    widths = []
    for n in (25, 100, 400):
        low, high = normal_result(0.0, 1.0, n=n, seed=1, shape=(50,)).ci(0.95, seed=0)
        widths.append(float((high - low).mean()))
    assert widths[1] < 0.65 * widths[0] and widths[2] < 0.65 * widths[1]
    assert widths[2] == pytest.approx(2 * 1.96 / 400**0.5, rel=0.15)  # about 2 * 1.96 sem


def test_interval_is_reproducible_by_seed():
    result = normal_result(0.5, 1.0, n=40, seed=3, shape=(4, 5))
    first, again = result.ci(seed=7), result.ci(seed=7)
    other = result.ci(seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == result.values.shape and first[0].dtype == result.values.dtype
    assert ((first[0] < result.values) & (result.values < first[1])).all()


def test_interval_errors():
    result = normal_result(0.0, 1.0, n=10, seed=0)
    with pytest.raises(CircuitkitError, match="level must be a number between 0 and 1"):
        result.ci(95)
    with pytest.raises(CircuitkitError, match="n_boot must be an int"):
        result.ci(n_boot=0)
    no_examples = Result(torch.zeros(3), ("layer",), {})
    with pytest.raises(CircuitkitError, match="Result.ci: this result kept no per-example"):
        no_examples.ci()
    one_example = Result.from_examples(torch.zeros(3, 1), ("layer",), {})
    with pytest.raises(CircuitkitError, match="at least 2 examples"):
        one_example.ci()


BAD_INTERVALS = [
    (dict(level=2), r"level must be a number between 0 and 1 \(such as 0\.95\), got 2$"),
    (dict(level=0), r"level must be a number between 0 and 1 .*got 0$"),
    (dict(level=1.0), r"level must be a number between 0 and 1 .*got 1\.0$"),
    (dict(level=math.nan), r"level must be a number between 0 and 1 .*got nan$"),
    (dict(level="0.95"), r"level must be a number between 0 and 1 .*got '0\.95'$"),
    (dict(level=True), r"level must be a number between 0 and 1 .*got True$"),
    (dict(n_boot=0), r"n_boot must be an int from 1 to 1e6 \(such as 2000\), got 0$"),
    (dict(n_boot=-5), r"n_boot must be an int from 1 to 1e6 .*got -5$"),
    (dict(n_boot=100.0), r"n_boot must be an int from 1 to 1e6 .*got 100\.0$"),
    (dict(n_boot=math.nan), r"n_boot must be an int from 1 to 1e6 .*got nan$"),
    (dict(n_boot=True), r"n_boot must be an int from 1 to 1e6 .*got True$"),
    (dict(seed=1.5), r"seed must be an int, got 1\.5$"),
]


@pytest.mark.parametrize("bad, message", BAD_INTERVALS)
def test_every_interval_names_the_call_and_the_argument(bad, message):
    result = normal_result(0.0, 1.0, n=10, seed=0, shape=(3,))
    level, n_boot, seed = bad.get("level", 0.95), bad.get("n_boot", 100), bad.get("seed", 0)
    calls = {
        "Result.ci": lambda: result.ci(level, n_boot=n_boot, seed=seed),
        "Result.compare": lambda: result.compare((0,), (1,), level=level, n_boot=n_boot, seed=seed),
        "Result.to_dataframe": lambda: result.to_dataframe(ci=level, n_boot=n_boot, seed=seed),
        "bootstrap_interval": lambda: bootstrap_interval(
            result.examples, level, n_boot=n_boot, seed=seed
        ),
    }
    for where, call in calls.items():
        named = message.replace("level must", "ci must") if where.endswith("frame") else message
        with pytest.raises(CircuitkitError, match=rf"^{where}: {named}"):
            call()


def test_compare_checks_n_perm_first():
    result = normal_result(0.0, 1.0, n=10, seed=0, shape=(3,))
    for n_perm in (0, 2.5, True):
        with pytest.raises(CircuitkitError, match=r"^Result.compare: n_perm must be a positive"):
            result.compare((0,), (1,), n_perm=n_perm)


# -- paired comparisons -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 9, 12])
def test_exact_sign_flip_equals_reference(n):
    differences = torch.randn(n, generator=torch.Generator().manual_seed(n)) + 0.3
    p_value, how = sign_flip_test(differences, n_perm=10_000)
    assert "exact" in how
    assert p_value == pytest.approx(reference_sign_flip(differences), abs=1e-12)


def test_sign_flip_small_cases_by_hand():
    # all five differences positive: only all-plus and all-minus are as extreme, p = 2 / 32
    assert sign_flip_test(torch.ones(5))[0] == pytest.approx(2 / 32)
    assert sign_flip_test(torch.zeros(7))[0] == 1.0


def test_random_sign_flips_approach_the_exact_p_value():
    differences = torch.randn(14, generator=torch.Generator().manual_seed(0)) + 0.4
    exact = reference_sign_flip(differences)
    sampled, how = sign_flip_test(differences, n_perm=5000, seed=1)
    assert "random" in how
    assert 0.01 < exact < 0.5  # a case where the p-value is not trivially 0 or 1
    assert sampled == pytest.approx(exact, abs=0.02)


def paired_cells(effect, n, seed, shared_std=3.0):
    """Two cells whose examples share a large per-example offset (as two heads on one prompt)."""
    g = torch.Generator().manual_seed(seed)
    shared = shared_std * torch.randn(n, generator=g)
    a = shared + effect + 0.5 * torch.randn(n, generator=g)
    b = shared + 0.5 * torch.randn(n, generator=g)
    return Result.from_examples(torch.stack([a, b]), ("head",), {"head": ["9", "6"]})


def test_compare_detects_a_real_difference_and_not_a_null_one():
    reps = 200
    found_real = found_null = 0
    for rep in range(reps):
        kwargs = dict(n_boot=400, n_perm=1000, seed=rep)
        real = paired_cells(0.5, n=40, seed=rep).compare({"head": 9}, {"head": 6}, **kwargs)
        null = paired_cells(0.0, n=40, seed=rep + 10_000).compare((0,), (1,), **kwargs)
        found_real += real.p_value < 0.05
        found_null += null.p_value < 0.05
    assert found_real / reps > 0.95  # 0.5 against a noise of 0.7 / sqrt(40): z about 4.5
    assert found_null / reps < 0.09  # false positives near the nominal 5%


def test_compare_is_paired():
    result = paired_cells(0.4, n=40, seed=0)
    comparison = ck.compare(result, {"head": "9"}, {"head": "6"}, seed=0)
    assert comparison.difference == pytest.approx(float(result.values[0] - result.values[1]))
    assert comparison.ci_low > 0 and comparison.p_value < 0.01
    # unpaired, the two cells' own intervals overlap: the shared offset hides the difference
    low, high = result.ci(seed=0)
    assert low[0] < high[1]
    assert comparison.a == {"head": 9} and comparison.n == 40
    assert "head=9 minus head=6" in repr(comparison)
    again = result.compare((0,), (1,), seed=0)
    assert again == comparison


def test_cells_by_label_and_index():
    result = Result(torch.zeros(2, 3), ("layer", "head"), {"layer": ["0", "1"]})
    assert result.index_of({"layer": 1, "head": "2"}) == (1, 2)
    assert result.index_of((1, -1)) == (1, 2)
    with pytest.raises(CircuitkitError, match=r"one label for each axis \['layer', 'head'\]"):
        result.index_of({"layer": 1})
    with pytest.raises(CircuitkitError, match="unknown axes"):
        result.index_of({"layer": 1, "head": 0, "pos": 3})
    with pytest.raises(CircuitkitError, match="axis 'head' has no label '7'"):
        result.index_of({"layer": 1, "head": 7})
    with pytest.raises(CircuitkitError, match="index 3 is out of range for axis 'head'"):
        result.index_of((0, 3))
    with pytest.raises(CircuitkitError, match="a tuple of 2 indices"):
        result.index_of((0,))


def test_compare_errors():
    result = normal_result(0.0, 1.0, n=10, seed=0)
    with pytest.raises(CircuitkitError, match="same cell"):
        result.compare((1,), {"axis0": 1})
    with pytest.raises(CircuitkitError, match="Result.compare: this result kept no"):
        Result(torch.zeros(3), ("layer",), {}).compare((0,), (1,))
    with pytest.raises(CircuitkitError, match="compare: expected a Result"):
        ck.compare(torch.zeros(3), (0,), (1,))


# -- dataframes and the dataclass -------------------------------------------------------------


def test_dataframe_columns():
    result = normal_result(0.0, 1.0, n=10, seed=0, shape=(2, 3))
    frame = result.to_dataframe()
    assert list(frame.columns) == ["axis0", "axis1", "value", "sem"]
    with_ci = result.to_dataframe(ci=0.9, n_boot=500, seed=2)
    assert list(with_ci.columns) == ["axis0", "axis1", "value", "sem", "ci_low", "ci_high"]
    low, high = result.ci(0.9, n_boot=500, seed=2)
    np.testing.assert_allclose(with_ci["ci_low"], low.flatten().numpy())
    np.testing.assert_allclose(with_ci["ci_high"], high.flatten().numpy())
    bare = Result(torch.zeros(2), ("layer",), {})
    assert list(bare.to_dataframe().columns) == ["layer", "value"]
    with pytest.raises(CircuitkitError, match="kept no per-example values"):
        bare.to_dataframe(ci=0.95)


def test_minus_is_the_change_from_a_baseline_paired_per_example():
    result = normal_result(0.0, 1.0, n=6, seed=3, shape=(2, 3))
    result.info["direction"] = "noise"
    baseline = torch.randn(6, generator=torch.Generator().manual_seed(4))
    change = result.minus(baseline)
    for index in itertools.product(range(2), range(3)):
        expected = [result.examples[index][i] - baseline[i] for i in range(6)]
        np.testing.assert_allclose(change.examples[index].numpy(), expected, rtol=1e-6)
        assert float(change.values[index]) == pytest.approx(float(sum(expected)) / 6, abs=1e-6)
    # paired: the standard error is that of the differences, not of the values
    assert not torch.allclose(change.sem(), result.sem())
    assert (change.axes, change.labels, change.method) == (result.axes, result.labels, "synthetic")
    assert change.metric == "change in m" and change.info == {"direction": "noise"}
    assert torch.allclose(result.minus(1.5).values, result.values - 1.5)
    assert result.minus(baseline, metric="drop").metric == "drop"
    bare = Result(torch.tensor([1.0, 2.0]), ("layer",), {}, metric="logit_diff")
    shifted = bare.minus(baseline)
    assert shifted.values.tolist() == pytest.approx((bare.values - baseline.mean()).tolist())
    assert shifted.metric == "change in logit_diff" and shifted.examples is None
    assert bare.values.tolist() == [1.0, 2.0]  # the original is unchanged
    with pytest.raises(ShapeError, match=r"Result.minus: baseline has shape \(5,\)"):
        result.minus(baseline[:5])
    with pytest.raises(ShapeError, match="baseline has shape"):
        result.minus(torch.zeros(2, 6))


def test_result_stays_a_backwards_compatible_dataclass():
    assert dataclasses.is_dataclass(Result)
    names = [f.name for f in dataclasses.fields(Result)]
    assert names == [
        "values", "axes", "labels", "examples", "metric", "method", "info", "provenance",
    ]  # fmt: skip
    positional = Result(torch.ones(2), ("layer",), {}, None, "m", "ablate", {"k": 1})
    assert positional.provenance == {} and positional.info == {"k": 1}
    assert repr(positional) == "Result(ablate: layer=2, metric=m, largest |value| +1 at layer=0)"


# -- files ------------------------------------------------------------------------------------


def rich_result() -> Result:
    examples = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    return Result.from_examples(
        examples,
        ("layer", "head"),
        {"layer": ["a", "b", "c"]},
        metric="logit_diff",
        method="activation_patching",
        info={
            "direction": "denoise",
            "scores": torch.tensor([1.5, float("nan")]),
            "view": examples[0, 0],  # shares memory with examples
            "ids": torch.arange(4),
            "half": torch.ones(2, dtype=torch.bfloat16),
            "nested": {"shape": (3, 4), "numbers": [1, 2.5, None, float("nan"), True]},
            "components": [ck.Head(9, 9).at("end"), ck.Resid(1, "post", pos=slice(1, 3))],
            "by_layer": {0: "x", (1, 2): ck.MLP(2)},
            "numpy_scalar": np.float64(0.25),
        },
        provenance={"method": "activation_patching", "model": {"name": "tiny"}},
    )


def test_save_and_load_round_trip(tmp_path):
    result = rich_result()
    folder = result.save(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "result.safetensors"]
    loaded = Result.load(folder)
    assert loaded.equals(result) and result.equals(loaded)
    assert loaded.info["components"][0] == ck.Head(9, 9).at("end")
    assert loaded.info["nested"]["shape"] == (3, 4)
    assert loaded.info["half"].dtype == torch.bfloat16
    assert repr(loaded) == repr(result)
    # saving again over the same folder replaces it, and leaves no temporary files
    result.values[0, 0] = 100.0
    assert Result.load(result.save(folder)).values[0, 0] == 100.0
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "result.safetensors"]


def test_round_trip_of_a_patching_result(tmp_path, tiny_llama):
    clean = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    corrupted = clean.flip(0)
    metric = ck.metrics.Metric("first", torch.full((3,), 4), lambda logits: logits[..., 0])
    result = ck.activation_patching(
        tiny_llama, clean, corrupted, "k", metric, per_position=True, progress=False
    )
    loaded = Result.load(result.save(tmp_path / "k"))
    assert loaded.equals(result)
    assert loaded.provenance["model"]["fingerprint"].startswith("sha256:")
    without = ck.activation_patching(
        tiny_llama, clean, corrupted, "head", metric, keep_examples=False, progress=False
    )
    assert Result.load(without.save(tmp_path / "head")).equals(without)


def test_equals_can_fail():
    result = rich_result()
    for change in [
        lambda r: r.values.__setitem__((0, 0), 7.0),
        lambda r: r.labels["head"].__setitem__(0, "zero"),
        lambda r: setattr(r, "metric", "prob"),
        lambda r: r.info["nested"].__setitem__("shape", [3, 4]),  # a list is not a tuple
        lambda r: r.info["scores"].__setitem__(1, 0.0),  # NaN replaced
        lambda r: setattr(r, "examples", None),
        lambda r: r.provenance["model"].__setitem__("name", "other"),
    ]:
        other = rich_result()
        change(other)
        assert not result.equals(other)
    assert result.equals(rich_result())
    assert not result.equals("a result")


def test_load_never_unpickles(tmp_path):
    folder = rich_result().save(tmp_path / "run")
    refuse = mock.Mock(side_effect=AssertionError("unpickling"))
    with (
        mock.patch.object(pickle, "load", refuse),
        mock.patch.object(pickle, "loads", refuse),
        mock.patch.object(torch, "load", refuse),
    ):
        assert Result.load(folder).equals(rich_result())
    assert not refuse.called


def edit_json(folder: Path, edit) -> None:
    """Edit result.json as someone editing the file would: its checksum stays as it was."""
    document = json.loads((folder / "result.json").read_text())
    edit(document)
    (folder / "result.json").write_text(json.dumps(document))


def rewrite_json(folder: Path, edit) -> None:
    """Edit result.json and record the checksum of the edited content, so that ``load`` reads
    past the checksum and reaches the checks behind it."""
    document = json.loads((folder / "result.json").read_text())
    edit(document)
    document["checksum"] = results._checksum(document)
    (folder / "result.json").write_text(json.dumps(document))


def test_damaged_files_are_clear_errors(tmp_path):
    def fresh(name):
        return rich_result().save(tmp_path / name)

    with pytest.raises(ResultFileError, match="does not exist"):
        Result.load(tmp_path / "nothing")

    folder = fresh("truncated")
    blob = (folder / "result.safetensors").read_bytes()
    (folder / "result.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ResultFileError, match="result.safetensors failed its checksum"):
        Result.load(folder)

    folder = fresh("swapped")
    other = Result.from_examples(torch.zeros(3, 4, 6), ("layer", "head"), {}).save(tmp_path / "o")
    (folder / "result.safetensors").write_bytes((other / "result.safetensors").read_bytes())
    with pytest.raises(ResultFileError, match="belongs to another save"):
        Result.load(folder)

    folder = fresh("bad_json")
    text = (folder / "result.json").read_text()
    (folder / "result.json").write_text(text[: len(text) - 40])
    with pytest.raises(ResultFileError, match="not valid JSON"):
        Result.load(folder)

    folder = fresh("missing_key")
    rewrite_json(folder, lambda d: d.pop("labels"))
    with pytest.raises(ResultFileError, match=r"lacks the keys \['labels'\]"):
        Result.load(folder)

    folder = fresh("not_ours")
    rewrite_json(folder, lambda d: d.update(format="something"))
    with pytest.raises(ResultFileError, match="not a saved circuitkit result"):
        Result.load(folder)

    folder = fresh("labels")
    rewrite_json(folder, lambda d: d["labels"]["head"].pop())
    with pytest.raises(ResultFileError, match="does not fit its tensors.*4 entries but 3 labels"):
        Result.load(folder)

    folder = fresh("axes")
    rewrite_json(folder, lambda d: d.update(axes=["layer"]))
    with pytest.raises(ResultFileError, match="one per axis"):
        Result.load(folder)

    folder = fresh("manifest")
    rewrite_json(folder, lambda d: d["tensors"]["values"].update(shape=[4, 3]))
    with pytest.raises(ResultFileError, match=r"'values' has shape \[3, 4\].*records"):
        Result.load(folder)


def _swap_axes(document):
    """Swap the names of the two axes, labels and all: a consistent file, only wrong."""
    layer, head = document["labels"]["layer"], document["labels"]["head"]
    document["axes"] = ["head", "layer"]
    document["labels"] = {"head": layer, "layer": head}


# Edits of result.json that old files loaded silently; each changes the result.
JSON_EDITS = {
    "label": lambda d: d["labels"]["layer"].__setitem__(0, "z"),
    "metric": lambda d: d.update(metric="prob"),
    "method": lambda d: d.update(method="ablate"),
    "info": lambda d: d["info"].update(direction="noise"),
    "nested_number": lambda d: d["info"]["nested"]["numbers"].__setitem__(1, 2.0),
    "new_info_key": lambda d: d["info"].update(extra=1),
    "info_key_order": lambda d: d.update(info=dict(reversed(list(d["info"].items())))),
    "component": lambda d: d["info"]["components"][0]["fields"].update(head=8),
    "provenance_fingerprint": lambda d: d["provenance"]["model"].update(
        fingerprint="sha256:" + "0" * 64
    ),
    "swapped_axes": _swap_axes,
}


@pytest.mark.parametrize("edit", JSON_EDITS.values(), ids=JSON_EDITS.keys())
def test_an_edit_of_the_json_fails_its_checksum(tmp_path, edit):
    folder = rich_result().save(tmp_path / "run")
    edit_json(folder, edit)
    with pytest.raises(
        ResultFileError, match="result.json failed its checksum.*changed after it was written"
    ):
        Result.load(folder)


@pytest.mark.parametrize("edit", JSON_EDITS.values(), ids=JSON_EDITS.keys())
def test_the_same_edits_load_once_the_checksum_is_recomputed(tmp_path, edit):
    # the edits above are caught by the checksum alone: with a fresh one, each file loads, as
    # a result that differs from the one saved
    folder = rich_result().save(tmp_path / "run")
    rewrite_json(folder, edit)
    assert not Result.load(folder).equals(rich_result())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("checksum"),
        lambda d: d.update(checksum=None),
        lambda d: d.update(checksum=d["checksum"].upper()),
        lambda d: d.update(tensor_sha256="0" * 64),
        lambda d: d.update(tensor_file="other.safetensors"),
    ],
    ids=["no_checksum", "null_checksum", "changed_checksum", "tensor_sha256", "tensor_file"],
)
def test_an_edit_of_the_checksums_fails_the_json_checksum(tmp_path, edit):
    folder = rich_result().save(tmp_path / "run")
    edit_json(folder, edit)
    with pytest.raises(ResultFileError, match="result.json failed its checksum"):
        Result.load(folder)


@pytest.mark.parametrize("where", [0, 8, 0.5, -1], ids=["first", "header", "middle", "last"])
def test_an_edit_of_the_tensor_file_fails_its_checksum(tmp_path, where):
    folder = rich_result().save(tmp_path / "run")
    blob = bytearray((folder / "result.safetensors").read_bytes())
    index = int(where * len(blob)) if isinstance(where, float) else where
    blob[index] ^= 1
    (folder / "result.safetensors").write_bytes(bytes(blob))
    with pytest.raises(
        ResultFileError,
        match="result.safetensors failed its checksum.*changed after it was written",
    ):
        Result.load(folder)


@pytest.mark.parametrize("indent", [None, 4])
def test_layout_that_reads_back_the_same_keeps_the_checksum(tmp_path, indent):
    folder = rich_result().save(tmp_path / "run")
    document = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps(document, indent=indent, ensure_ascii=False))
    assert Result.load(folder).equals(rich_result())


def test_version_1_files_load_with_a_warning_that_they_cannot_be_verified(tmp_path):
    folder = rich_result().save(tmp_path / "run")

    def to_version_1(document):
        document.pop("checksum")
        document["format_version"] = 1

    edit_json(folder, to_version_1)
    with pytest.warns(UserWarning, match="format version 1.*cannot be verified"):
        loaded = Result.load(folder)
    assert loaded.equals(rich_result())


@pytest.mark.parametrize("version", [0, 3, None, "2", 2.5])
def test_other_format_versions_are_refused(tmp_path, version):
    folder = rich_result().save(tmp_path / "run")
    rewrite_json(folder, lambda d: d.update(format_version=version))
    with pytest.raises(ResultFileError, match=r"format version .*reads versions 1 and 2"):
        Result.load(folder)


# Tagged values no save writes, each put into info["crafted"]; what the error says about it.
CRAFTED_TAGS = {
    "slice_not_a_list": ({"__slice__": 5}, "malformed tagged value"),
    "slice_too_short": ({"__slice__": [1, 2]}, "malformed tagged value"),
    "slice_of_strings": ({"__slice__": [1, "a", None]}, "malformed tagged value"),
    "tuple_not_a_list": ({"__tuple__": 3}, "malformed tagged value"),
    "tuple_of_a_dict": ({"__tuple__": {"a": 1}}, "malformed tagged value"),
    "dict_not_a_list": ({"__dict__": 7}, "malformed tagged value"),
    "dict_pair_too_short": ({"__dict__": [[1]]}, "malformed tagged value"),
    "dict_key_a_list": ({"__dict__": [[[1, 2], "x"]]}, "malformed tagged value"),
    "dict_key_a_dict": ({"__dict__": [[{"a": 1}, "x"]]}, "malformed tagged value"),
    "dict_key_a_tuple_of_lists": ({"__dict__": [[{"__tuple__": [[1]]}, 0]]}, "malformed"),
    "tag_with_other_keys": ({"__tensor__": "values", "extra": 1}, "malformed tagged value"),
    "tensor_missing": ({"__tensor__": "missing"}, "tensor 'missing'.*does not hold"),
    "tensor_name_a_list": ({"__tensor__": [1]}, r"tensor \[1\].*does not hold"),
    "component_unknown": ({"__component__": "Nope", "fields": {}}, "unknown component kind"),
    "component_base": ({"__component__": "Component", "fields": {}}, "unknown component kind"),
    "component_dunder": ({"__component__": "__class__", "fields": {}}, "unknown component"),
    "component_kind_a_number": ({"__component__": 5, "fields": {}}, "unknown component kind"),
    "component_fields_a_number": ({"__component__": "Head", "fields": 7}, "malformed"),
    "component_fields_a_tuple": (
        {"__component__": "MLP", "fields": {"__tuple__": []}},
        "malformed",
    ),
    "component_layer_a_string": (
        {"__component__": "Head", "fields": {"layer": "x", "head": 0}},
        "Head.layer is 'x'; expected int",
    ),
    "component_layer_a_bool": (
        {"__component__": "Head", "fields": {"layer": True, "head": 0}},
        "Head.layer is True; expected int",
    ),
    "component_part_unknown": (
        {"__component__": "Head", "fields": {"layer": 1, "head": 0, "part": "w"}},
        "Head.part is 'w'; expected Literal",
    ),
    "component_pos_of_strings": (
        {"__component__": "MLP", "fields": {"layer": 1, "pos": ["a"]}},
        r"MLP.pos is \['a'\]; expected Union",
    ),
    "component_unknown_field": (
        {"__component__": "MLP", "fields": {"layer": 1, "colour": 3}},
        "MLP has no field 'colour'",
    ),
    "component_field_missing": ({"__component__": "Head", "fields": {"layer": 1}}, "rebuild"),
    "component_non_string_field": (
        {"__component__": "MLP", "fields": {"__dict__": [[1, 2]]}},
        "MLP has no field 1",
    ),
}


@pytest.mark.parametrize(("crafted", "message"), CRAFTED_TAGS.values(), ids=CRAFTED_TAGS.keys())
def test_crafted_tags_are_result_file_errors_naming_where_they_are(tmp_path, crafted, message):
    folder = rich_result().save(tmp_path / "run")
    rewrite_json(folder, lambda d: d["info"].update(crafted=[crafted]))
    with pytest.raises(ResultFileError, match=r"Result.load: info\['crafted'\]\[0\].*" + message):
        Result.load(folder)


# Top-level fields of the wrong type, and what the error says.
CRAFTED_FIELDS = {
    "axes_a_string": (lambda d: d.update(axes="layer"), "axes as a list of distinct strings"),
    "axes_numbers": (lambda d: d.update(axes=[0, 1]), "axes as a list of distinct strings"),
    "axes_repeated": (
        lambda d: d.update(axes=["layer", "layer"], labels={"layer": ["a", "b", "c"]}),
        "axes as a list of distinct strings",
    ),
    "labels_a_list": (lambda d: d.update(labels=[["a"]]), "labels as a dict of lists"),
    "labels_a_string": (lambda d: d["labels"].update(layer="abc"), "labels as a dict of lists"),
    "labels_numbers": (lambda d: d["labels"].update(layer=[0, 1, 2]), "labels as a dict"),
    "metric_a_number": (lambda d: d.update(metric=5), "metric as a string, got 5"),
    "method_null": (lambda d: d.update(method=None), "method as a string, got None"),
    "info_a_list": (lambda d: d.update(info=[1]), "info as a dict, got list"),
    "info_a_tuple": (lambda d: d.update(info={"__tuple__": [1]}), "info as a dict, got tuple"),
    "provenance_a_number": (lambda d: d.update(provenance=3), "provenance as a dict, got int"),
    "manifest_a_list": (lambda d: d.update(tensors=[]), "no tensor manifest"),
    "manifest_entry_a_number": (lambda d: d["tensors"].update(values=5), "'values' has shape"),
}


@pytest.mark.parametrize(("edit", "message"), CRAFTED_FIELDS.values(), ids=CRAFTED_FIELDS.keys())
def test_fields_of_the_wrong_type_are_result_file_errors(tmp_path, edit, message):
    folder = rich_result().save(tmp_path / "run")
    rewrite_json(folder, edit)
    with pytest.raises(ResultFileError, match=message):
        Result.load(folder)


@pytest.mark.parametrize("text", ["[1, 2]", "5", '"result"', "null", '{"format": 1}'])
def test_a_json_that_is_not_a_result_object_is_refused(tmp_path, text):
    folder = rich_result().save(tmp_path / "run")
    (folder / "result.json").write_text(text)
    with pytest.raises(ResultFileError, match="not a saved circuitkit result"):
        Result.load(folder)


@pytest.mark.parametrize("depth", [results._MAX_DEPTH, 500, 10_000])
def test_deep_nesting_is_refused(tmp_path, depth):
    # built as text: the JSON writer itself cannot write 10,000 levels. The checksum is the
    # saved one; nesting is checked before it, as a checksum of such a file cannot be computed.
    folder = rich_result().save(tmp_path / "run")
    document = json.loads((folder / "result.json").read_text())
    document["info"]["deep"] = "DEEP"
    text = json.dumps(document).replace('"DEEP"', "[" * depth + "]" * depth)
    (folder / "result.json").write_text(text)
    with pytest.raises(
        ResultFileError, match=f"nests lists and dicts .*at most {results._MAX_DEPTH}"
    ):
        Result.load(folder)


def _nested_lists(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_up_to_the_cap_round_trips(tmp_path):
    # the document, info and the "deep" entry's lists: _MAX_DEPTH levels in all
    result = Result(torch.zeros(2), ("layer",), {}, info={"deep": _nested_lists(98)})
    assert (
        results._nesting(
            json.loads(result.save(tmp_path / "run").joinpath("result.json").read_text())
        )
        == results._MAX_DEPTH
    )
    assert Result.load(tmp_path / "run").equals(result)


def _holding_itself():
    info = {"a": []}
    info["a"].append(info)
    return info


@pytest.mark.parametrize(
    "info",
    [{"deep": _nested_lists(99)}, {"deep": _nested_lists(5000)}, _holding_itself()],
    ids=["one_level_too_deep", "far_too_deep", "holds_itself"],
)
def test_save_refuses_nesting_that_load_would_refuse(tmp_path, info):
    with pytest.raises(ResultFileError, match=f"Result.save: .*{results._MAX_DEPTH}"):
        Result(torch.zeros(2), ("layer",), {}, info=info).save(tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


@pytest.mark.parametrize(
    "info",
    [
        {"__slice__": 5},
        {"user": {"__tensor__": "values"}},
        {"user": {"__component__": "Head", "fields": {}}},
        {"user": {"__dict__": 7, "__tuple__": 3}},
        {"positions": ck.Resid(3, "mid", pos=[4, 5])},
    ],
    ids=["slice", "tensor", "component", "two_tags", "positions_as_a_list"],
)
def test_values_that_look_like_tags_round_trip(tmp_path, info):
    result = Result(torch.zeros(2), ("layer",), {}, info=info)
    assert Result.load(result.save(tmp_path / "run")).equals(result)


class OwnHead(ck.Head):
    """A component kind defined outside circuitkit.core.components."""


def _forced(component, **fields):
    """``component`` with ``fields`` set past its constructor's checks."""
    for name, value in fields.items():
        object.__setattr__(component, name, value)
    return component


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"s": slice("a", "b")}, r"info\['s'\] is the slice"),
        ({"c": OwnHead(1, 2)}, r"info\['c'\] is a OwnHead, which is not a component kind"),
        ({"c": _forced(ck.Head(1, 2), layer="x")}, r"info\['c'\]: Head.layer is 'x'; expected int"),
        ({"c": _forced(ck.MLP(1), pos=1.5)}, r"info\['c'\]: MLP.pos is 1.5; expected Union"),
    ],
    ids=["slice_of_strings", "own_component", "layer_a_string", "pos_a_float"],
)
def test_save_refuses_values_that_load_would_refuse(tmp_path, info, message):
    with pytest.raises(ResultFileError, match="Result.save: " + message):
        Result(torch.zeros(2), ("layer",), {}, info=info).save(tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_save_errors(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ResultFileError, match="is a file; give a folder"):
        rich_result().save(file)
    odd = Result(torch.zeros(2), ("layer",), {}, info={"fn": {"inner": print}})
    with pytest.raises(ResultFileError, match=r"info\['fn'\]\['inner'\] is a builtin_function"):
        odd.save(tmp_path / "odd")
    assert not (tmp_path / "odd" / "result.json").exists()
    with pytest.raises(ResultFileError, match="Result.save: metric must be a string, got 5"):
        Result(torch.zeros(2), ("layer",), {}, metric=5).save(tmp_path / "metric")


def test_failed_save_keeps_the_previous_one(tmp_path):
    first = rich_result()
    folder = first.save(tmp_path / "run")
    second = Result.from_examples(torch.ones(3, 4, 6), ("layer", "head"), {})
    with (
        mock.patch.object(Path, "write_bytes", side_effect=OSError("disk full")),
        pytest.raises(OSError, match="disk full"),
    ):
        second.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "result.safetensors"]
    assert Result.load(folder).equals(first)


def test_constructor_shape_errors_still_raised():
    with pytest.raises(ShapeError, match="values have 1 dimensions but 2 axes"):
        Result(torch.zeros(2), ("layer", "head"), {})


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.real
def test_intervals_and_comparison_on_smollm(smollm, tmp_path):
    ds = ck.IOIDataset(smollm, n=8, seed=0)
    abc = ds.corrupted("ABC")
    # the whole residual stream before layer 0 restores the clean run; the last layer's at S2
    # (read by no later position) restores next to nothing
    components = [ck.Resid(0, "pre"), ck.Resid(29, "pre").at("S2")]
    result = ck.activation_patching(smollm, ds, abc, components, progress=False)
    low, high = result.ci(seed=0)
    assert (low <= result.values).all() and (result.values <= high).all()
    assert low[0] > high[1]
    comparison = result.compare((0,), (1,), seed=0)
    assert comparison.difference > 1 and comparison.ci_low > 0 and comparison.p_value < 0.05
    assert Result.load(result.save(tmp_path / "real")).equals(result)


def _with_baseline(examples: torch.Tensor, baseline: torch.Tensor) -> Result:
    return Result.from_examples(
        examples,
        ("layer", "head"),
        {"layer": ["0", "1"], "head": ["0", "1", "2"]},
        info={"baseline": float(baseline.mean()), "baseline_examples": baseline},
    )


def test_top_ranks_by_the_change_from_the_baseline_and_returns_integer_labels():
    generator = torch.Generator().manual_seed(0)
    baseline = 4.0 + torch.randn(5, generator=generator)
    examples = baseline + 0.01 * torch.randn(2, 3, 5, generator=generator)
    examples[1, 2] -= 1.5  # the one patch that matters: it lowers the metric by about 1.5
    result = _with_baseline(examples, baseline)
    # by raw value every cell is about 4; by effect cell (1, 2) stands out
    ((cell, effect),) = result.top(1)
    assert cell == {"layer": 1, "head": 2}
    assert isinstance(cell["layer"], int) and isinstance(cell["head"], int)
    expected = float((examples[1, 2] - baseline).mean())
    assert effect == pytest.approx(expected, abs=1e-6)
    assert "largest |effect|" in repr(result) and "layer=1, head=2" in repr(result)
    # by_abs=False: the largest signed change, not the most negative one
    assert result.top(1, by_abs=False)[0][0] != {"layer": 1, "head": 2}


def test_effect_is_minus_the_baseline_and_has_no_baseline_left():
    baseline = torch.tensor([1.0, 2.0, 3.0])
    examples = torch.arange(18.0).reshape(2, 3, 3)
    result = _with_baseline(examples, baseline)
    effect = result.effect()
    torch.testing.assert_close(effect.examples, examples - baseline)
    assert effect.baseline() is None and effect.effect() is effect
    assert effect.top(1) == result.top(1)


def test_a_result_without_a_baseline_ranks_by_value():
    values = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    result = Result(values, ("layer", "pos"), {"layer": ["0", "1"], "pos": ["0: When", "1: Mary"]})
    assert result.baseline() is None
    assert result.top(2) == [
        ({"layer": 0, "pos": "1: Mary"}, -3.0),
        ({"layer": 1, "pos": "0: When"}, 2.0),
    ]
    assert "largest |value|" in repr(result)


@pytest.mark.parametrize("k", [-1, 1.5, True, "3"])
def test_top_rejects_a_bad_k(k):
    result = Result(torch.zeros(2), ("layer",), {})
    with pytest.raises(CircuitkitError, match="Result.top: k must be a non-negative integer"):
        result.top(k)
