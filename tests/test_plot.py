"""ck.plot: figures for 1 to 3 axes, error bars, and faded cells where an interval spans zero."""

from __future__ import annotations

from statistics import NormalDist

import plotly.graph_objects as go
import pytest
import torch

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ShapeError
from circuitkit.core.results import Result


def mixed_result(shape, n=30, seed=0):
    """Cells with clear effects (+-3) next to cells with none (mean 0), noise 1."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(shape)
    means.view(-1)[::2] = 3.0
    means.view(-1)[1::4] = -3.0
    examples = means[..., None] + torch.randn(*shape, n, generator=g)
    axes = ("layer", "head", "pos", "extra")[: len(shape)]
    return Result.from_examples(examples, axes, {}, metric="logit_diff", method="ablation")


def spans_zero(result, **kwargs):
    low, high = result.ci(0.95, seed=0, **kwargs)
    return (low <= 0) & (high >= 0)


def faded(trace):
    return torch.tensor([[cell is not None for cell in row] for row in trace.z])


def slashed(trace, result, row_axis, col_axis):
    """The cells that hold a slash marker, as a boolean mask."""
    mask = torch.zeros(len(result.labels[row_axis]), len(result.labels[col_axis]), dtype=torch.bool)
    for x, y in zip(trace.x, trace.y, strict=True):
        mask[result.labels[row_axis].index(y), result.labels[col_axis].index(x)] = True
    return mask


@pytest.mark.parametrize("kind, trace_type", [("line", "scatter"), ("bar", "bar")])
def test_error_bars_are_the_bootstrap_interval(kind, trace_type):
    result = mixed_result((6,))
    fig = ck.plot(result, kind=kind)
    (trace,) = fig.data
    assert trace.type == trace_type
    low, high = result.ci(0.95, seed=0)
    assert trace.error_y.visible and trace.error_y.symmetric is False
    torch.testing.assert_close(torch.tensor(trace.error_y.array), (high - result.values).float())
    torch.testing.assert_close(
        torch.tensor(trace.error_y.arrayminus), (result.values - low).float()
    )
    assert min(trace.error_y.array) > 0
    assert "95% bootstrap interval over n=30" in fig.layout.title.text
    fig.to_json()


def test_sem_error_bars():
    result = mixed_result((5,))
    fig = ck.plot(result, error="sem", level=0.9)
    half = NormalDist().inv_cdf(0.95) * result.sem()
    torch.testing.assert_close(torch.tensor(fig.data[0].error_y.array), half.float())
    torch.testing.assert_close(torch.tensor(fig.data[0].error_y.arrayminus), half.float())
    assert "90% normal interval" in fig.layout.title.text


def test_no_interval_without_examples_or_when_off():
    result = mixed_result((5,))
    assert ck.plot(result, error=None).data[0].error_y.array is None
    bare = Result(result.values, result.axes, {})
    assert ck.plot(bare).data[0].error_y.array is None
    heat = ck.plot(Result(torch.randn(3, 4), ("layer", "head"), {}))
    assert [trace.type for trace in heat.data] == ["heatmap"]
    assert heat.layout.title.text == "result"


def test_heatmap_fades_cells_whose_interval_spans_zero():
    result = mixed_result((4, 5))
    fig = ck.plot(result)
    heatmap, fade, slashes = fig.data
    assert heatmap.type == fade.type == "heatmap" and slashes.type == "scatter"
    mask = spans_zero(result)
    assert 0 < int(mask.sum()) < mask.numel()  # some cells faded, some not
    assert torch.equal(faded(fade), mask)
    assert torch.equal(slashed(slashes, result, "layer", "head"), mask)
    assert slashes.marker.symbol == "line-ne" and slashes.hoverinfo == "skip"
    assert fade.opacity < 1 and fade.hoverinfo == "skip" and fade.showscale is False
    low, high = result.ci(0.95, seed=0)
    torch.testing.assert_close(torch.tensor(heatmap.customdata), torch.stack([low, high], -1))
    assert "interval" in heatmap.hovertemplate
    assert "faded, slashed cells: the interval includes 0" in fig.layout.title.text
    fig.to_json()


def mostly_uncertain_result(shape, n=30, seed=0):
    """Two cells with clear effects (+3, -3) among cells with none: as direct logit
    attribution by head, where most heads do little."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(shape)
    means.view(-1)[0], means.view(-1)[-1] = 3.0, -3.0
    examples = means[..., None] + torch.randn(*shape, n, generator=g)
    axes = ("layer", "head", "pos")[: len(shape)]
    return Result.from_examples(examples, axes, {}, metric="logit_diff", method="dla")


@pytest.mark.parametrize("shape", [(6, 8), (5, 9), (3, 4, 6)])
def test_slashes_only_while_uncertain_cells_are_few(shape):
    uncertain = mostly_uncertain_result(shape)
    mask = spans_zero(uncertain)
    assert mask.float().mean() > 0.5  # most cells would be marked
    fig = ck.plot(uncertain)
    row_axis, col_axis = uncertain.axes[-2:]
    for i in range(0, len(fig.data), 3):  # each facet: its heatmap, fading and slashes
        _, fade, slashes = fig.data[i : i + 3]
        assert torch.equal(faded(fade), mask.reshape(-1, *mask.shape[-2:])[i // 3])
        assert not slashed(slashes, uncertain, row_axis, col_axis).any()
    assert "faded cells: the interval includes 0" in fig.layout.title.text
    assert "slashed" not in fig.layout.title.text
    # where the uncertain cells are the exception, every one is slashed
    few = mixed_result(shape)
    assert spans_zero(few).float().mean() <= 0.5
    fig = ck.plot(few)
    first = spans_zero(few).reshape(-1, *shape[-2:])[0]
    assert torch.equal(slashed(fig.data[2], few, row_axis, col_axis), first)
    assert "faded, slashed cells" in fig.layout.title.text


def test_sem_fading_uses_the_normal_interval():
    result = mixed_result((3, 4), n=5)
    fig = ck.plot(result, error="sem")
    half = 1.959964 * result.sem()
    expected = (result.values - half <= 0) & (result.values + half >= 0)
    assert torch.equal(faded(fig.data[1]), expected)


def test_three_axes_are_facets_with_one_colour_scale():
    result = mixed_result((3, 2, 4))
    fig = ck.plot(result)
    assert len(fig.data) == 9  # a heatmap, its fading layer and its slashes per facet
    mask = spans_zero(result)
    for i in range(3):
        heatmap, fade, slashes = fig.data[3 * i : 3 * i + 3]
        assert torch.equal(faded(fade), mask[i])
        assert torch.equal(slashed(slashes, result, "head", "pos"), mask[i])
        assert slashes.xaxis == heatmap.xaxis == ("x" if i == 0 else f"x{i + 1}")
        assert heatmap.zmax == float(result.values.abs().max())
    assert [a.text for a in fig.layout.annotations] == ["layer 0", "layer 1", "layer 2"]


def test_bad_arguments():
    with pytest.raises(ShapeError, match="plot: can draw results with 1 to 3 axes"):
        ck.plot(mixed_result((2, 2, 2, 2)))
    with pytest.raises(CircuitkitError, match="plot: error must be 'ci', 'sem' or None"):
        ck.plot(mixed_result((3,)), error="std")
    with pytest.raises(CircuitkitError, match="plot: kind must be 'line' or 'bar'"):
        ck.plot(mixed_result((3,)), kind="pie")


def test_patching_result_plots(tiny_attn_only):
    clean = torch.randint(0, 1000, (6, 5), generator=torch.Generator().manual_seed(0))
    metric = ck.metrics.Metric("first", torch.full((6,), 4), lambda logits: logits[..., 0])
    result = ck.activation_patching(
        tiny_attn_only, clean, clean.flip(0), "head", metric, per_position=True, progress=False
    )
    fig = ck.plot(result, title="heads")
    assert isinstance(fig, go.Figure) and fig.layout.title.text.startswith("heads<br>")
    assert len(fig.data) == 3 * tiny_attn_only.cfg.n_layers


def causal_trace_panels(fig, n_tokens):
    """Check that every panel of ``fig`` lies inside the plot area with room for its tokens and
    its colour bar beside it, and that no two overlap."""
    layout = fig.layout
    plot_width = layout.width - layout.margin.l - layout.margin.r
    plot_height = layout.height - layout.margin.t - layout.margin.b
    boxes = []
    for heatmap in fig.data:
        x_domain = layout[heatmap.xaxis.replace("x", "xaxis")].domain
        y_domain = layout[heatmap.yaxis.replace("y", "yaxis")].domain
        # every panel lies inside the plot area, at least 200 px wide and 18 px a token tall
        assert 0 <= x_domain[0] < x_domain[1] <= 1 and 0 <= y_domain[0] < y_domain[1] <= 1
        assert (x_domain[1] - x_domain[0]) * plot_width >= 200
        assert (y_domain[1] - y_domain[0]) * plot_height >= 18 * n_tokens
        # its colour bar beside it, as tall as it
        bar = heatmap.colorbar
        assert x_domain[1] < bar.x < x_domain[1] + 0.05
        assert y_domain[0] <= bar.y - bar.len / 2 and bar.y + bar.len / 2 <= y_domain[1]
        boxes.append((x_domain, y_domain))
    for i, (xa, ya) in enumerate(boxes):  # no two panels overlap
        for xb, yb in boxes[i + 1 :]:
            assert xa[1] <= xb[0] or xb[1] <= xa[0] or ya[1] <= yb[0] or yb[1] <= ya[0]


def test_causal_trace_panels_each_get_room_for_their_tokens(tiny_gpt2):
    traces = [
        ck.causal_trace(
            tiny_gpt2, "The Eiffel Tower is in", "Eiffel Tower", " Paris", kind=kind, samples=1,
            progress=False,
        )
        for kind in ("resid", "mlp", "attn")
    ]  # fmt: skip
    n_tokens = len(traces[0].scores.labels["pos"])
    for n_traces, columns in ((1, None), (2, None), (3, None), (3, 1), (3, 2)):
        fig = ck.plot_causal_trace(*traces[:n_traces], columns=columns)
        causal_trace_panels(fig, n_tokens)
    # side by side the figure widens with the panels; stacked it grows taller
    widths = [ck.plot_causal_trace(*traces[:n]).layout.width for n in (1, 2, 3)]
    heights = [ck.plot_causal_trace(*traces[:n], columns=1).layout.height for n in (1, 2, 3)]
    assert widths[0] < widths[1] < widths[2] and heights[0] < heights[1] < heights[2]
    # a given width is kept, and the panels fit it
    stacked = ck.plot_causal_trace(*traces, columns=1, width=700)
    assert stacked.layout.width == 700
    causal_trace_panels(stacked, n_tokens)
    with pytest.raises(CircuitkitError, match="columns must be a positive integer"):
        ck.plot_causal_trace(*traces, columns=0)
