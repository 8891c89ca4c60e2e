"""ck.plot_circuit: nodes by layer, heads by class, edges by the input they feed."""

from __future__ import annotations

import re

import pytest
import torch
from _browser import render

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.graph import EdgeScores


def ioi_style_circuit():
    return ck.Circuit.from_classes(
        {
            "name mover": [ck.Head(9, 9).at("end"), ck.Head(9, 6).at("end")],
            "s-inhibition": [ck.Head(8, 6).at("end"), ck.Head(7, 9).at("end")],
            "induction": [ck.Head(5, 5).at("S2")],
            "previous token": [ck.Head(2, 2).at("S1+1")],
            "my class": [ck.Head(5, 5).at("end")],  # a second class of a head already drawn
        },
        name="IOI",
    )


def markers(fig):
    return [t for t in fig.data if t.mode == "markers+text"]


def lines(fig):
    return [t for t in fig.data if t.mode == "lines"]


def test_a_circuit_of_heads_by_class():
    fig = ck.plot_circuit(ioi_style_circuit())
    assert lines(fig) == []
    # one marker trace per class that colours a head; 5.5 takes the colour of its first class
    assert [t.name for t in markers(fig)] == [
        "name mover", "s-inhibition", "induction", "previous token",
    ]  # fmt: skip
    drawn = {
        label: (x, y) for t in markers(fig) for label, x, y in zip(t.text, t.x, t.y, strict=True)
    }
    assert set(drawn) == {"9.9", "9.6", "8.6", "7.9", "5.5", "2.2"}
    assert {drawn[label][0] for label in ("9.9", "9.6")} == {9}  # x is the layer
    assert sorted(drawn[label][1] for label in ("9.6", "9.9")) == [-0.5, 0.5]  # spread about 0
    assert drawn["2.2"] == (2, 0)
    hover = next(t for t in markers(fig) if t.name == "induction").hovertext[0]
    assert "induction at S2" in hover and "my class at end" in hover
    assert len({t.marker.color for t in markers(fig)}) == 4
    assert fig.layout.title.text == "IOI (6 heads)"
    assert ck.plot_circuit(ioi_style_circuit(), title="mine").layout.title.text == "mine"
    fig.to_json()


def tiny_edge_circuit():
    edges = (
        ck.Edge(ck.Embed(), ck.Head(1, 0).q),
        ck.Edge(ck.Head(0, 1), ck.Head(1, 0).k),
        ck.Edge(ck.Head(0, 1), ck.Head(1, 0).v),
        ck.Edge(ck.Head(0, 1), ck.MLP(1)),
        ck.Edge(ck.MLP(1), "logits"),
        ck.Edge(ck.Head(1, 0), "logits"),
    )
    nodes = (ck.CircuitHead(ck.Head(1, 0), "feeds logits"),)
    return ck.Circuit(nodes, mlps=(ck.MLP(1),), edges=edges)


def test_an_edge_circuit():
    fig = ck.plot_circuit(tiny_edge_circuit())
    # one line trace per kind of receiver: q, k, v, mlp, logits
    assert [t.name for t in lines(fig)] == [
        "into queries", "into keys", "into values", "into MLPs", "into logits",
    ]  # fmt: skip
    assert [len([x for x in t.x if x is None]) for t in lines(fig)] == [1, 1, 1, 1, 2]
    # heads in the nodes, heads only the edges reach, MLPs, embeddings and logits
    names = [t.name for t in markers(fig)]
    assert names == ["feeds logits", "other heads", "MLPs (M<layer>)", "embed / logits"]
    ends = markers(fig)[-1]
    assert list(ends.text) == ["embed", "logits"] and list(ends.x) == [-1, 2]
    # an MLP half a layer after its layer's heads, in a row below them
    assert list(markers(fig)[2].x) == [1.5] and list(markers(fig)[2].text) == ["M1"]
    assert markers(fig)[2].y[0] < min(min(t.y) for t in markers(fig)[:2])
    # a line into a head's query ends above it, into its value below it
    queries, _, values = lines(fig)[:3]
    assert queries.y[-2] > 0 > values.y[-2]
    assert fig.layout.title.text == "Circuit (2 heads, 6 edges)"


def test_edge_widths_follow_the_scores():
    circuit = tiny_edge_circuit()
    graph = ck.Graph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlp=True, parallel=False)
    values = torch.zeros(len(graph.receivers), len(graph.senders), 1)
    for i, edge in enumerate(circuit.edges):
        row, column = graph.index(edge)
        values[row, column] = 0.1 * (i + 1) * (-1) ** i
    scored = ck.Circuit(circuit.nodes, mlps=circuit.mlps, edges=circuit.edges,
                        info={"scores": EdgeScores.of_graph(graph, values)})  # fmt: skip
    fig = ck.plot_circuit(scored)
    widths = {(t.name, t.line.width) for t in lines(fig)}
    # |scores| 0.1 .. 0.6 of the largest 0.6: steps 0, 1, 2, 2, 3, 3 of four widths
    assert widths == {
        ("into queries", 1.0), ("into keys", 2.0), ("into values", 3.5), ("into MLPs", 3.5),
        ("into logits", 5.5),
    }  # fmt: skip
    assert sum(t.showlegend for t in lines(fig)) == 5  # one legend entry per kind
    assert "score -0.2" in next(t for t in lines(fig) if t.name == "into keys").text[0]


def tall_circuit():
    """Twelve classes of fourteen heads each: a graph taller than its legend's column."""
    return ck.Circuit.from_classes(
        {f"class {k}": [ck.Head(k, h).at("end") for h in range(14)] for k in range(12)}
    )


def test_the_legend_runs_in_rows_under_the_title():
    for circuit in (ioi_style_circuit(), tall_circuit(), tiny_edge_circuit()):
        fig = ck.plot_circuit(circuit)
        legend, title, height = fig.layout.legend, fig.layout.title, fig.layout.height
        assert legend.orientation == "h" and legend.xanchor == "left" and legend.x == 0
        # both fixed in pixels from the top of the figure, the legend below the title
        assert title.yref == legend.yref == "container"
        assert title.y == 1 and title.yanchor == "top" and legend.yanchor == "top"
        assert 40 <= (1 - legend.y) * height <= fig.layout.margin.t


@pytest.mark.parametrize("width", [500, 1100])
def test_the_legend_stays_above_a_tall_graph_in_a_browser(tmp_path, width):
    fig = ck.plot_circuit(tall_circuit())
    fig.update_layout(width=width)
    page = tmp_path / "tall.html"
    fig.write_html(page, include_plotlyjs=True, full_html=True)
    dom = render(page).dom
    legend = re.search(r'<g class="legend"[^>]*translate\(([\d.]+),([\d.]+)\)', dom)
    legend_height = re.search(r'<g class="legend".*?<rect class="bg"[^>]*height="([\d.]+)"', dom)
    plot_top = re.search(r'<rect class="nsewdrag drag" data-subplot="xy"[^>]*y="([\d.]+)"', dom)
    title_top = re.search(r'<text class="gtitle"[^>]*y="([\d.]+)"', dom)
    assert legend and legend_height and plot_top and title_top, "no legend, title or plot drawn"
    top, bottom = float(legend.group(2)), float(legend.group(2)) + float(legend_height.group(1))
    assert float(title_top.group(1)) + 17 <= top  # below the title's 17 px line
    assert bottom <= float(plot_top.group(1))  # above the graph, whatever its rows
    assert bottom < 250  # in view at the top of the figure, not down its side


def test_bad_input():
    with pytest.raises(CircuitkitError, match="plot_circuit: expected a ck.Circuit"):
        ck.plot_circuit([ck.Head(1, 1)])
