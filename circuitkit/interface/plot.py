"""Plotly figures of results: lines or bars for 1-D results, heatmaps for 2-D and 3-D ones, with
the uncertainty of every effect shown.

``ck.plot(result)`` draws any ``Result`` with its axes and labels; 3-D results become one heatmap
per index of the first axis, as facets. When the result kept its per-example values, each
effect gets an interval (``error="ci"``: the percentile bootstrap interval of ``Result.ci``;
``error="sem"``: the normal interval ``value ± z·sem``, z = 1.96 for 95%). Lines and bars carry
the interval as error bars; heatmaps fade the cells whose interval includes zero under a
semi-transparent white layer, mark each with a slash (plotly heatmaps cannot be hatched) while
such cells are at most half of the figure, and show the interval on hover. The subtitle says
which interval is drawn and how the uncertain cells are marked. Diverging heatmaps use plotly's
"RdBu" scale: negative values red, positive values blue. Faithfulness curves (results with the
axis "size", ``ck.faithfulness_curve``) are lines over the fraction of edges or nodes, on a log
axis, with their CPR and CMD in the legend; ``plot_curves`` draws several on one figure.
Figures are plain ``plotly.graph_objects.Figure`` objects; nothing here changes plotly's global
settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any, Literal

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from circuitkit.circuits.curves import cmd, cpr
from circuitkit.core.errors import CircuitkitError, ShapeError
from circuitkit.core.results import Result, check_interval
from circuitkit.methods.causal_tracing import CausalTrace

# The diverging colour scale of heatmaps: low (negative) red, high (positive) blue.
_DIVERGING_SCALE = "RdBu"
# Opacity of the white layer over cells whose interval includes zero.
_FADE_OPACITY = 0.7
_SLASH_COLOUR = "rgba(60, 60, 60, 0.7)"
# Faded cells are slashed only while they are at most this share of all cells.
_SLASH_SHARE = 0.5


def plot(
    result: Result | CausalTrace | Sequence[CausalTrace],
    *,
    title: str | None = None,
    error: Literal["ci", "sem"] | None = "ci",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    kind: Literal["line", "bar"] = "line",
    **layout: Any,
) -> go.Figure:
    """A labelled plotly figure of ``result``, with the uncertainty of each effect.

    1-D results are a line (or bars with ``kind="bar"``) with error bars; 2-D results a heatmap
    centred at zero (plotly's "RdBu": negative red, positive blue), rows the first axis,
    cells whose interval includes zero faded (hover shows the interval); 3-D results one such
    heatmap per index of the first axis, on one colour scale.

    The faded cells are also slashed, so that a faded strong effect does not read as a weak
    one, but only while they are at most half of all the cells. A slash marks an exception;
    when most cells are uncertain (direct logit attribution by head, where most heads do
    little) slashes over nearly every cell would hide the colours they qualify, so the figure
    fades them only and the few cells whose interval excludes zero stand out in full colour.
    The subtitle says which marking is drawn.

    ``error`` picks the interval: "ci" (bootstrap, ``level``, ``n_boot`` draws, ``seed``),
    "sem" (normal, ``value ± z·sem`` at ``level``) or None (none drawn). Results without
    per-example values are drawn without intervals. A ``CausalTrace``, or a list of them, is
    drawn by ``plot_causal_trace``; a faithfulness curve (axis "size") by ``plot_curves``.
    ``layout`` goes to ``fig.update_layout``.

    Example::

        fig = ck.plot(ck.activation_patching(model, ds, abc, component="head"))
        fig.show()
    """
    if not isinstance(result, Result):
        traces = [result] if isinstance(result, CausalTrace) else result
        if not isinstance(traces, (list, tuple)) or not all(
            isinstance(t, CausalTrace) for t in traces
        ):
            raise ShapeError(
                f"plot: expected a Result, a CausalTrace or a list of them, got {type(result)}"
            )
        return plot_causal_trace(*traces, title=title, **layout)
    if error not in ("ci", "sem", None):
        raise CircuitkitError(f"plot: error must be 'ci', 'sem' or None, got {error!r}")
    if kind not in ("line", "bar"):
        raise CircuitkitError(f"plot: kind must be 'line' or 'bar', got {kind!r}")
    check_interval(level, n_boot, seed, "plot")
    if result.axes == ("size",):
        return plot_curves(
            {result.metric or "faithfulness": result},
            title=title if title is not None else "Faithfulness curve",
            error=error, level=level, n_boot=n_boot, seed=seed, **layout,
        )  # fmt: skip
    values = result.values.detach().float().cpu()
    if not 1 <= values.ndim <= 3:
        raise ShapeError(
            f"plot: can draw results with 1 to 3 axes, this one has {result.axes}; "
            "select a slice first"
        )
    interval = _interval(result, error, level, n_boot, seed)
    slash = interval is not None and _spans_zero(interval).float().mean() <= _SLASH_SHARE
    if values.ndim == 1:
        fig = _line(result, values, interval, kind)
    elif values.ndim == 2:
        fig = go.Figure(_heatmaps(result, values, interval, *result.axes, slash=slash))
        fig.update_yaxes(title_text=result.axes[0], autorange="reversed")
        fig.update_xaxes(title_text=result.axes[1])
    else:
        fig = _facets(result, values, interval, slash)
    title = title if title is not None else _default_title(result)
    note = _note(result, error, level, values.ndim, slash) if interval is not None else ""
    fig.update_layout(
        title=f"{title}<br><sup>{note}</sup>" if note else title,
        template="plotly_white",
        **layout,
    )
    return fig


def _interval(
    result: Result, error: str | None, level: float, n_boot: int, seed: int
) -> tuple[Tensor, Tensor] | None:
    """``(low, high)`` per cell as float32 CPU tensors, or None when none is drawn."""
    if error is None or result.examples is None or result.examples.shape[-1] < 2:
        return None
    if error == "ci":
        low, high = result.ci(level, n_boot=n_boot, seed=seed)
    else:
        if not 0 < level < 1:
            raise CircuitkitError(f"plot: level must be between 0 and 1, got {level}")
        half = NormalDist().inv_cdf((1 + level) / 2) * result.sem()
        low, high = result.values - half, result.values + half
    return low.detach().float().cpu(), high.detach().float().cpu()


def _spans_zero(interval: tuple[Tensor, Tensor]) -> Tensor:
    low, high = interval
    return (low <= 0) & (high >= 0)


def _note(result: Result, error: str | None, level: float, ndim: int, slash: bool) -> str:
    kind = "bootstrap interval" if error == "ci" else "normal interval (± z·sem)"
    marked = "faded, slashed cells" if slash else "faded cells"
    what = "error bars" if ndim == 1 else f"{marked}: the interval includes 0"
    return f"{what} · {level:.0%} {kind} over n={result.n_examples} examples"


def _default_title(result: Result) -> str:
    method = result.method.replace("_", " ") if result.method else "result"
    return f"{method} ({result.metric})" if result.metric else method


def _line(
    result: Result, values: Tensor, interval: tuple[Tensor, Tensor] | None, kind: str
) -> go.Figure:
    axis = result.axes[0]
    error = None
    if interval is not None:
        low, high = interval
        error = dict(
            type="data",
            symmetric=False,
            array=(high - values).clamp(min=0).tolist(),
            arrayminus=(values - low).clamp(min=0).tolist(),
            visible=True,
        )
    trace = go.Bar if kind == "bar" else go.Scatter
    extra = {} if kind == "bar" else {"mode": "lines+markers"}
    fig = go.Figure(
        trace(
            x=result.labels[axis],
            y=values.tolist(),
            error_y=error,
            name=result.metric or "value",
            **extra,
        )
    )
    fig.update_xaxes(title_text=axis, type="category")
    fig.update_yaxes(title_text=result.metric or "value")
    return fig


def _heatmaps(
    result: Result,
    values: Tensor,
    interval: tuple[Tensor, Tensor] | None,
    row_axis: str,
    col_axis: str,
    show_scale: bool = True,
    bound: float | None = None,
    slash: bool = True,
) -> list[go.Heatmap | go.Scatter]:
    """The heatmap of ``values`` and, with an interval, the layers that mark uncertain cells:
    a semi-transparent white heatmap over them and a scatter of slashes, one in each when
    ``slash`` and none otherwise (the trace is kept, so every facet has the same three).

    The colour scale runs from ``-bound`` to ``bound`` (default: the largest ``|value|``).
    """
    bound = bound if bound is not None else float(values.abs().max()) or 1.0
    hover = f"{row_axis} %{{y}}<br>{col_axis} %{{x}}<br>value %{{z:.4f}}"
    customdata = None
    if interval is not None:
        customdata = torch.stack(interval, dim=-1).tolist()
        hover += "<br>interval [%{customdata[0]:.4f}, %{customdata[1]:.4f}]"
    heatmap = go.Heatmap(
        z=values.tolist(),
        x=result.labels[col_axis],
        y=result.labels[row_axis],
        customdata=customdata,
        colorscale=_DIVERGING_SCALE,
        zmid=0.0,
        zmin=-bound,
        zmax=bound,
        showscale=show_scale,
        colorbar=dict(title=result.metric or "value"),
        hovertemplate=hover + "<extra></extra>",
    )
    if interval is None:
        return [heatmap]
    spans_zero = _spans_zero(interval)
    rows, cols = result.labels[row_axis], result.labels[col_axis]
    fade = go.Heatmap(
        z=[[1.0 if cell else None for cell in row] for row in spans_zero.tolist()],
        x=cols,
        y=rows,
        colorscale=[[0.0, "white"], [1.0, "white"]],
        opacity=_FADE_OPACITY,
        showscale=False,
        hoverinfo="skip",
        name="interval includes 0",
    )
    # A slash in each faded cell, so a faded strong effect does not read as a weak one; none
    # when most cells are faded (see plot's docstring).
    where = spans_zero.nonzero().tolist() if slash else []
    slashes = go.Scatter(
        x=[cols[j] for _, j in where],
        y=[rows[i] for i, _ in where],
        mode="markers",
        marker=dict(symbol="line-ne", size=12, line=dict(width=1, color=_SLASH_COLOUR)),
        hoverinfo="skip",
        showlegend=False,
        name="interval includes 0",
    )
    return [heatmap, fade, slashes]


def _facets(
    result: Result, values: Tensor, interval: tuple[Tensor, Tensor] | None, slash: bool
) -> go.Figure:
    outer, row_axis, col_axis = result.axes
    labels = result.labels[outer]
    cols = min(4, len(labels))
    rows = -(-len(labels) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{outer} {x}" for x in labels])
    bound = float(values.abs().max()) or 1.0  # one colour scale for all facets
    for i in range(len(labels)):
        facet_interval = None if interval is None else (interval[0][i], interval[1][i])
        traces = _heatmaps(
            result, values[i], facet_interval, row_axis, col_axis,
            show_scale=(i == 0), bound=bound, slash=slash,
        )  # fmt: skip
        for trace in traces:
            fig.add_trace(trace, row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed")
    return fig


def plot_curves(
    curves: Mapping[str, Result],
    *,
    title: str | None = None,
    error: Literal["ci", "sem"] | None = "ci",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    log_x: bool = True,
    **layout: Any,
) -> go.Figure:
    """Faithfulness curves on one figure: one line per curve, with intervals, CPR and CMD.

    Each curve (a ``Result`` with axis "size", from ``ck.faithfulness_curve``) is drawn against
    the fraction of edges (or nodes) in the circuit, on a log axis unless ``log_x=False`` (a
    fraction of 0 has no place on a log axis and is left out there), with error bars as in
    ``plot`` (``error``, ``level``, ``n_boot``, ``seed``); the legend names each curve with its
    CPR and CMD (``ck.cpr``, ``ck.cmd``, over all its sizes). A dotted line marks the full
    model's faithfulness, 1. ``layout`` goes to ``fig.update_layout``.

    Example::

        fig = ck.plot_curves({"EAP-IG": ig_curve, "EAP": eap_curve})
        fig.show()
    """
    where = "plot_curves"
    if not isinstance(curves, Mapping) or not curves:
        raise CircuitkitError(
            f"{where}: give the curves as {{name: curve}}, such as {{'EAP-IG': curve}}, got "
            f"{type(curves).__name__}"
        )
    if error not in ("ci", "sem", None):
        raise CircuitkitError(f"{where}: error must be 'ci', 'sem' or None, got {error!r}")
    check_interval(level, n_boot, seed, where)
    fig = go.Figure()
    notes, items = set(), set()
    for name, curve in curves.items():
        if not isinstance(curve, Result) or curve.axes != ("size",):
            got = curve.axes if isinstance(curve, Result) else type(curve).__name__
            raise ShapeError(
                f"{where}: {name!r} is not a faithfulness curve (a Result with the axis 'size', "
                f"from ck.faithfulness_curve), got {got}"
            )
        fractions = [float(x) for x in curve.info.get("fractions", curve.labels["size"])]
        values = curve.values.detach().float().cpu()
        shown = [i for i, x in enumerate(fractions) if x > 0 or not log_x]
        error_y = None
        interval = _interval(curve, error, level, n_boot, seed)
        if interval is not None:
            low, high = interval
            error_y = dict(
                type="data",
                symmetric=False,
                array=[max(float(high[i] - values[i]), 0.0) for i in shown],
                arrayminus=[max(float(values[i] - low[i]), 0.0) for i in shown],
                visible=True,
            )
            notes.add(_note(curve, error, level, 1, False))
        fig.add_trace(
            go.Scatter(
                x=[fractions[i] for i in shown],
                y=[float(values[i]) for i in shown],
                error_y=error_y,
                mode="lines+markers",
                name=f"{name} (CPR {cpr(curve):.3f}, CMD {cmd(curve):.3f})",
            )
        )
        items.add("nodes" if curve.info.get("level") == "node" else "edges")
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_xaxes(
        title_text=f"fraction of {' and '.join(sorted(items))} in the circuit",
        type="log" if log_x else "linear",
    )
    fig.update_yaxes(title_text="faithfulness (0: empty circuit, 1: full model)")
    title = title if title is not None else "Faithfulness curves"
    note = " · ".join(sorted(notes))
    fig.update_layout(
        title=f"{title}<br><sup>{note}</sup>" if note else title,
        template="plotly_white",
        **layout,
    )
    return fig


_TRACE_COLORS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_TRACE_NAMES = {"resid": "the residual stream", "mlp": "MLP outputs", "attn": "attention outputs"}
# Room of a causal-trace panel, in pixels: the heatmap's width, its height per token (and at
# least), the gaps between panels (a panel's colour bar and the next one's tokens side by side;
# the layer axis and the next panel's title one above the other) and the margins.
_PANEL_WIDTH = 280
_PANEL_ROW = 22
_PANEL_MIN_HEIGHT = 180
_PANEL_GAP_X = 160
_PANEL_GAP_Y = 110
_PANEL_MARGIN = dict(l=110, r=100, t=100, b=60)


def plot_causal_trace(
    *traces: Any, title: str | None = None, columns: int | None = None, **layout: Any
) -> go.Figure:
    """ROME-style heatmaps of one to three causal traces, ``columns`` to a row.

    Each panel has the prompt's tokens as rows (subject tokens marked ``*``) and layers as
    columns; the colour is the target's probability in the restored run, from the corrupted
    probability (light) up. Residual-stream traces are purple, MLP green, attention red, as in
    the paper. Panels sit side by side unless ``columns`` is smaller (``columns=1`` stacks
    them); the figure's width grows with the columns and its height with the rows of panels
    and the prompt's tokens, so every panel gets the same room however many there are. Each
    panel's colour bar sits just right of it. ``layout`` goes to ``fig.update_layout`` (a
    ``width`` given there fits the panels to it).

    Example::

        traces = [ck.causal_trace(model, prompt, subject, target, kind=k)
                  for k in ("resid", "mlp", "attn")]
        ck.plot_causal_trace(*traces).show()
        ck.plot_causal_trace(*traces, columns=1, width=900)  # stacked, for a narrow page
    """
    if not 1 <= len(traces) <= 3:
        raise ShapeError(f"plot_causal_trace: give one to three traces, got {len(traces)}")
    columns = len(traces) if columns is None else columns
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise CircuitkitError(
            f"plot_causal_trace: columns must be a positive integer, got {columns!r}"
        )
    columns = min(columns, len(traces))
    rows = -(-len(traces) // columns)
    n_tokens = max(len(trace.scores.labels["pos"]) for trace in traces)
    panel_height = max(_PANEL_MIN_HEIGHT, _PANEL_ROW * n_tokens)
    margin = _PANEL_MARGIN
    plot_width = columns * _PANEL_WIDTH + (columns - 1) * _PANEL_GAP_X
    plot_height = rows * panel_height + (rows - 1) * _PANEL_GAP_Y
    titles = []
    for trace in traces:
        window = f", {trace.window} layer window" if trace.window > 1 else ""
        titles.append(f"Restoring {_TRACE_NAMES[trace.kind]}{window}")
    fig = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=titles,
        horizontal_spacing=_PANEL_GAP_X / plot_width if columns > 1 else 0.0,
        vertical_spacing=_PANEL_GAP_Y / plot_height if rows > 1 else 0.0,
    )
    for i, trace in enumerate(traces):
        row, col = i // columns + 1, i % columns + 1
        panel = fig.get_subplot(row, col)
        scores = trace.scores
        values = scores.values.detach().float().cpu()
        low = min(trace.corrupted_prob, float(values.min()))
        high = max(float(values.max()), low + 1e-9)
        bottom, top = panel.yaxis.domain
        fig.add_trace(
            go.Heatmap(
                z=values.T.tolist(),
                x=scores.labels["layer"],
                y=scores.labels["pos"],
                colorscale=_TRACE_COLORS[trace.kind],
                zmin=low,
                zmax=high,
                # each panel's colour bar sits just right of its own panel, as tall as it
                colorbar=dict(
                    title=dict(text=scores.metric, side="right"),
                    x=panel.xaxis.domain[1] + 0.01,
                    xanchor="left",
                    y=(bottom + top) / 2,
                    yanchor="middle",
                    len=0.9 * (top - bottom),
                    thickness=12,
                ),
                hovertemplate="layer %{x}<br>token %{y}<br>p %{z:.4f}<extra></extra>",
            ),
            row=row,
            col=col,
        )
        fig.update_xaxes(title_text="layer", type="category", row=row, col=col)
    fig.update_yaxes(autorange="reversed", type="category")
    first = traces[0]
    default = (
        f"Causal trace of {first.scores.metric}: clean {first.clean_prob:.3f}, "
        f"corrupted {first.corrupted_prob:.3f}"
    )
    size = {
        "width": margin["l"] + plot_width + margin["r"],
        "height": margin["t"] + plot_height + margin["b"],
        "margin": margin,
    }
    fig.update_layout(
        title=title if title is not None else default,
        template="plotly_white",
        **{**size, **layout},
    )
    return fig
