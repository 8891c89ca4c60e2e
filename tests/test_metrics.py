"""Metrics: hand-computed values on random logits, shapes, normalisation, leading dimensions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import circuitkit as ck
from circuitkit.core import engine, metrics
from circuitkit.core.errors import MetricError, ShapeError
from circuitkit.core.metrics import Metric, check_metric_output
from circuitkit.data.ioi import IOIDataset

N, POS, VOCAB = 5, 7, 11


@pytest.fixture
def ds():
    """The fields the metrics read, on a vocabulary small enough to check by hand."""
    return SimpleNamespace(
        io_tokens=torch.tensor([1, 3, 5, 7, 9]),
        s_tokens=torch.tensor([2, 4, 6, 8, 10]),
        positions={"end": torch.tensor([6, 5, 4, 6, 3]), "S2": torch.tensor([2, 1, 1, 3, 0])},
    )


@pytest.fixture
def logits():
    return torch.randn(N, POS, VOCAB, generator=torch.Generator().manual_seed(0))


def at_end(ds, logits):
    return torch.stack([logits[i, int(ds.positions["end"][i])] for i in range(N)])


def test_logit_diff_by_hand(ds, logits):
    expected = [
        logits[i, ds.positions["end"][i], ds.io_tokens[i]]
        - logits[i, ds.positions["end"][i], ds.s_tokens[i]]
        for i in range(N)
    ]
    assert torch.allclose(metrics.logit_diff(ds)(logits), torch.stack(expected))
    at_s2 = metrics.logit_diff(ds, position="S2")(logits)
    assert torch.isclose(at_s2[0], logits[0, 2, 1] - logits[0, 2, 2])
    by_tensor = metrics.logit_diff(ds, position=ds.positions["S2"])(logits)
    assert torch.equal(by_tensor, at_s2)


def test_prob_logprob_and_accuracy_by_hand(ds, logits):
    gathered = at_end(ds, logits)
    probs = torch.softmax(gathered, dim=-1)
    rows = torch.arange(N)
    assert torch.allclose(metrics.prob(ds)(logits), probs[rows, ds.io_tokens])
    assert torch.allclose(metrics.prob(ds, token="S")(logits), probs[rows, ds.s_tokens])
    assert torch.allclose(metrics.logprob(ds)(logits), probs[rows, ds.io_tokens].log())
    top1 = (gathered.argmax(dim=-1) == ds.io_tokens).float()
    assert torch.equal(metrics.accuracy(ds)(logits), top1)
    beats = (gathered[rows, ds.io_tokens] > gathered[rows, ds.s_tokens]).float()
    assert torch.equal(metrics.accuracy(ds, against="S")(logits), beats)


def test_accuracy_counts_examples_where_io_is_the_top_token(ds):
    gathered = torch.zeros(N, VOCAB)
    gathered[0, 1] = 5.0  # IO top-1
    gathered[1, 3], gathered[1, 0] = 1.0, 2.0  # IO beats S but is not top-1
    gathered[2, 6] = 1.0  # S wins
    gathered[3, 7], gathered[3, 0] = 1.0, 1.0  # tied for the top: counts as wrong
    # row 4 is all zeros: nothing wins
    metric = metrics.accuracy(ds)
    assert metric.at(gathered).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert metrics.accuracy(ds, against="S").at(gathered).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_kl_div_matches_torch(ds, logits):
    clean = logits
    patched = logits + torch.randn(N, POS, VOCAB, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(at_end(ds, patched), -1),
        torch.log_softmax(at_end(ds, clean), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    for metric in (
        metrics.kl_div(clean, ds),
        metrics.kl_div(at_end(ds, clean), ds),
        metrics.kl_div(clean, ds.positions["end"]),
    ):
        assert torch.allclose(metric(patched), expected, atol=1e-6)
        assert torch.allclose(metric(clean), torch.zeros(N), atol=1e-6)
    with pytest.raises(ShapeError, match="clean_logits"):
        metrics.kl_div(clean[:3], ds)


def test_wrong_shapes_raise(ds, logits):
    for metric in (
        metrics.logit_diff(ds),
        metrics.prob(ds),
        metrics.logprob(ds),
        metrics.accuracy(ds),
        metrics.kl_div(logits, ds),
    ):
        with pytest.raises(ShapeError):
            metric(logits[:4])
        with pytest.raises(ShapeError):
            metric(logits[:, :3])  # the read positions are past the end
        with pytest.raises(ShapeError):
            metric(logits[0])
        with pytest.raises(ShapeError):
            metric.at(torch.zeros(4, VOCAB))
    with pytest.raises(ShapeError, match="positions"):
        metrics.logit_diff(ds, position=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown position 'S9'"):
        metrics.logit_diff(ds, position="S9")
    with pytest.raises(ValueError, match="'IO' or 'S'"):
        metrics.prob(ds, token="X")
    with pytest.raises(ValueError, match="against"):
        metrics.accuracy(ds, against="top5")


@pytest.mark.parametrize(
    "build",
    [
        metrics.logit_diff,
        metrics.prob,
        metrics.logprob,
        metrics.accuracy,
        lambda ds: metrics.kl_div(torch.randn(N, VOCAB), ds),
        lambda ds: metrics.normalized(metrics.logit_diff(ds), 2.0, -1.0),
    ],
)
def test_leading_dimensions_equal_per_block_calls(ds, build):
    metric = build(ds)
    blocks = torch.randn(2, 3, N, VOCAB, generator=torch.Generator().manual_seed(2))
    batched = metric.at(blocks)
    assert batched.shape == (2, 3, N)
    for a in range(2):
        for b in range(3):
            assert torch.allclose(batched[a, b], metric.at(blocks[a, b]))
    check_metric_output(metric.at(blocks[0, 0]), N, "test")


def test_normalized_is_zero_at_corrupted_and_one_at_clean(ds, logits):
    corrupted_logits = torch.randn(N, POS, VOCAB, generator=torch.Generator().manual_seed(3))
    ld = metrics.logit_diff(ds)
    clean_values, corrupted_values = ld(logits), ld(corrupted_logits)
    for clean, corrupted in (
        (logits, corrupted_logits),
        (at_end(ds, logits), at_end(ds, corrupted_logits)),
        (clean_values, corrupted_values),
        (float(clean_values.mean()), float(corrupted_values.mean())),
    ):
        metric = metrics.normalized(ld, clean, corrupted)
        assert isinstance(metric, Metric) and metric.name == "normalized_logit_diff"
        assert torch.isclose(metric(logits).mean(), torch.tensor(1.0), atol=1e-5)
        assert torch.isclose(metric(corrupted_logits).mean(), torch.tensor(0.0), atol=1e-5)
        scale = clean_values.mean() - corrupted_values.mean()
        expected = (clean_values - corrupted_values.mean()) / scale
        assert torch.allclose(metric(logits), expected, atol=1e-5)


def test_normalized_needs_two_different_baselines(ds, logits):
    ld = metrics.logit_diff(ds)
    with pytest.raises(MetricError, match="are equal"):
        metrics.normalized(ld, logits, logits)
    with pytest.raises(ShapeError, match="clean"):
        metrics.normalized(ld, torch.zeros(3), 0.0)
    with pytest.raises(TypeError, match="Metric"):
        metrics.normalized(lambda x: x, 1.0, 0.0)


def test_metrics_on_a_dataset_and_a_model(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=6, seed=0)
    abc = ds.corrupted("ABC")
    with torch.inference_mode():
        clean_logits, abc_logits = tiny_gpt2(ds.tokens), tiny_gpt2(abc.tokens)
    # a corrupted dataset keeps the clean answers, so both build the same metric
    assert torch.equal(metrics.logit_diff(abc)(abc_logits), metrics.logit_diff(ds)(abc_logits))
    values = metrics.logit_diff(ds)(clean_logits)
    rows = torch.arange(ds.n)
    end = clean_logits[rows, ds.positions["end"]]
    assert torch.allclose(values, end[rows, ds.io_tokens] - end[rows, ds.s_tokens])
    check_metric_output(metrics.kl_div(clean_logits, ds)(abc_logits), ds.n, "test")


@pytest.mark.parametrize("builder", [metrics.logit_diff, metrics.logprob, metrics.accuracy])
def test_select_examples_is_the_metric_on_those_rows(ds, logits, builder):
    metric = builder(ds)
    rows = torch.tensor([3, 0, 4])
    chosen = metrics.select_examples(metric, rows, N)
    assert torch.equal(chosen.positions, metric.positions[rows])
    expected = metric(logits)[rows]
    assert torch.equal(chosen(logits[rows]), expected)
    stacked = at_end(ds, logits)[rows].expand(2, 3, VOCAB)  # leading dimensions pass through
    assert torch.equal(chosen.at(stacked), expected.expand(2, 3))

    def plain(full_logits):
        return metric(full_logits)

    assert torch.equal(metrics.select_examples(plain, rows, N)(logits[rows]), expected)
    assert metric(logits).std() > 0


def test_a_metric_returning_one_number_fails_at_once_naming_the_method(tiny_gpt2, monkeypatch):
    ds = IOIDataset(tiny_gpt2, n=4)
    chunks = []
    run_blocks = engine.run_blocks

    def counted(*args, **kwargs):
        chunks.append(1)
        return run_blocks(*args, **kwargs)

    monkeypatch.setattr(engine, "run_blocks", counted)
    with pytest.raises(MetricError) as caught:
        ck.activation_patching(
            tiny_gpt2,
            ds,
            ds.corrupted("ABC"),
            "head",
            metric=lambda logits: logits[:, -1, 0].mean(),
            progress=False,
        )
    message = str(caught.value)
    assert message.startswith("activation_patching")
    assert "shape (4,)" in message and "one number for the whole batch" in message
    assert chunks == []  # no patched run was computed


# -- Metric positions: non-negative integer [n] tensors, checked when a Metric is made -------


@pytest.mark.parametrize(
    "positions, negative",
    [
        (torch.tensor([-1, -1, -1]), "[-1]"),
        (torch.tensor([3, -1, 2]), "[-1]"),
        (torch.tensor([-2, 0, -5], dtype=torch.int32), "[-5, -2]"),
    ],
)
def test_metric_rejects_negative_positions(positions, negative):
    with pytest.raises(MetricError) as caught:
        Metric("last", positions, lambda at: at[..., 0])
    assert str(caught.value) == (
        f"Metric('last'): positions must be >= 0, got {negative}; give the index itself, such "
        "as tokens.shape[1] - 1 for the last position"
    )


@pytest.mark.parametrize(
    "positions, given",
    [
        (torch.tensor([1.0, 2.0]), "a torch.float32 tensor of shape (2,)"),
        (torch.tensor([True, False]), "a torch.bool tensor of shape (2,)"),
        (torch.tensor([[1, 2]]), "a torch.int64 tensor of shape (1, 2)"),
        (torch.tensor(3), "a torch.int64 tensor of shape ()"),
        ([1, 2], "list [1, 2]"),
    ],
)
def test_metric_rejects_positions_that_are_not_an_integer_vector(positions, given):
    with pytest.raises(MetricError) as caught:
        Metric("m", positions, lambda at: at[..., 0])
    assert str(caught.value) == (
        f"Metric('m'): positions must be an integer [n] tensor, one position per example, "
        f"got {given}"
    )


def test_metric_positions_from_the_end_agree_on_the_fast_and_full_paths(tiny_gpt2):
    tokens = torch.randint(0, tiny_gpt2.cfg.d_vocab, (3, 6), generator=torch.Generator())
    last = torch.full((3,), tokens.shape[1] - 1)
    metric = Metric("first_logit", last, lambda at: at[..., 0])
    run = [ck.Intervention(ck.Head(2, 1).at(5), ck.Scale(3.0))]
    fast = ck.run_interventions(tiny_gpt2, tokens, [[], run], metric, progress=False)
    full = ck.run_interventions(
        tiny_gpt2, tokens, [[], run], lambda logits: logits[:, -1, 0], progress=False
    )
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast[0], fast[1])  # the patch at the last position is read


def test_the_built_in_metrics_read_non_negative_positions(tiny_gpt2):
    ds = IOIDataset(tiny_gpt2, n=4)
    clean_logits = tiny_gpt2(ds.tokens)
    for metric in (
        metrics.logit_diff(ds),
        metrics.logprob(ds, "S"),
        metrics.prob(ds, position="S2"),
        metrics.accuracy(ds, against="S"),
        metrics.kl_div(clean_logits, ds),
        metrics.normalized(metrics.logit_diff(ds), 1.0, 0.0),
        metrics.select_examples(metrics.logit_diff(ds), torch.tensor([2, 0]), 4),
    ):
        assert metric.positions.dtype == torch.long and int(metric.positions.min()) >= 0
    with pytest.raises(MetricError, match="positions must be >= 0"):
        metrics.logit_diff(ds, position=torch.full((4,), -1))


def test_a_metric_reading_past_the_prompt_is_refused_before_any_run(tiny_gpt2):
    """A ``Metric`` whose positions lie past the prompt is a ShapeError naming the method, on
    the fast path as on the reference (not an IndexError from inside the engine)."""
    ds = IOIDataset(tiny_gpt2, n=4, seed=0)
    n_pos = ds.tokens.shape[1]
    positions = ds.positions["end"].clone()
    positions[2] = n_pos + 3
    metric = Metric("past", positions, lambda at: at[..., 0])
    message = rf"the metric 'past' reads position {n_pos + 3}, but the prompts have positions 0\.\."
    for reference in (False, True):
        with pytest.raises(ShapeError, match=rf"^run_interventions: {message}"):
            ck.run_interventions(tiny_gpt2, ds.tokens, [[]], metric, reference=reference)
    replacement = ck.sender_outputs(tiny_gpt2, ds.corrupted("ABC"))
    with pytest.raises(ShapeError, match=rf"^patch_edges: {message}"):
        ck.patch_edges(tiny_gpt2, ds, [[]], metric, replacement=replacement, progress=False)
    with pytest.raises(ShapeError, match=rf"^activation_patching \(denoise\): {message}"):
        ck.activation_patching(tiny_gpt2, ds, ds.corrupted("ABC"), "head", metric, progress=False)
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())
    last = torch.full((4,), n_pos - 1)
    Metric("last", last, lambda at: at[..., 0]).check_positions(n_pos, "my_method")


@pytest.mark.parametrize("name", ["logit_diff", "logprob", "prob", "accuracy"])
def test_an_unknown_position_or_token_is_a_circuitkit_error(tiny_gpt2, name):
    ds = IOIDataset(tiny_gpt2, n=4, seed=0)
    build = getattr(metrics, name)
    with pytest.raises(ck.CircuitkitError, match=rf"^{name}: unknown position 100; choose one of"):
        build(ds, position=100)
    if name in ("logprob", "prob"):
        with pytest.raises(ck.CircuitkitError, match=rf"^{name}: token must be 'IO' or 'S'"):
            build(ds, "X")
    if name == "accuracy":
        with pytest.raises(ck.CircuitkitError, match=r"^accuracy: against must be 'vocab' or 'S'"):
            build(ds, against="IO")
