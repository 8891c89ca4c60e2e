"""A circuit drawn as a graph: its nodes laid out by layer, its edges as lines.

``plot_circuit`` draws any ``ck.Circuit``. Layers run from left to right: the embeddings
(``Embed()``, "embed") first, then each layer's heads, then that layer's MLP half a step to the
right (an MLP reads its own layer's heads), and the logits last. Within a column the heads are
spread evenly about the middle in order of their index; the MLPs ("M3" for ``MLP(3)``) sit in
one row below all heads, the embeddings and the logits in the middle. Heads are coloured by class (a
circuit from ``ck.find_ioi_circuit`` has the IOI paper's classes: name movers, s-inhibition,
induction, ...), MLPs are grey squares, the embeddings and the logits black diamonds.

Edges (a circuit found edge by edge, such as ``ck.discover_circuit``'s) are lines from the
sender to the receiver, coloured by what they feed: a head's query, key or value input, an
MLP's input or the logits. A line into a head ends a little above the head's marker for its
query, at it for its key and a little below for its value, so the three inputs of one head
stay apart. When the circuit's ``info["scores"]`` holds the edges' scores (``ck.EdgeScores``)
a line's width grows with the edge's |score|, in four steps (plotly gives one width per
trace); lines are shallow arcs, higher the more layers they span, so that edges along one row stay
apart; hover over a line for the edge and its score. A circuit of heads alone (no
edges) is drawn as its nodes. The legend runs in rows under the title, above the graph, where
it stays in view however tall the graph is. Nothing here changes plotly's global settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from circuitkit.circuits.circuit import Circuit
from circuitkit.core.components import MLP, Component, Embed, Head
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.graph import LOGITS, Edge, EdgeScores

# Colours of the IOI classes, from plotly's qualitative palette, and of discover_circuit's
# classes; other classes take the colours below in the order they appear.
_CLASS_COLOURS = {
    "name mover": "#d62728",
    "negative name mover": "#8c564b",
    "backup name mover": "#ff9896",
    "s-inhibition": "#1f77b4",
    "induction": "#2ca02c",
    "duplicate token": "#9467bd",
    "previous token": "#ff7f0e",
    # the classes of ck.discover_circuit: what a head's strongest edge feeds, as its edges
    "writes to logits": "#e6550d",
    "writes to queries": "#1f77b4",
    "writes to keys": "#2ca02c",
    "writes to values": "#d62728",
    "writes to MLPs": "#9467bd",
}
_OTHER_COLOURS = (
    "#17becf",
    "#bcbd22",
    "#e377c2",
    "#7f7f7f",
    "#aec7e8",
    "#98df8a",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)
# Colours of edges by what they feed, and where a line into a head ends (above, at, below it).
_EDGE_COLOURS = {
    "q": "#1f77b4",
    "k": "#2ca02c",
    "v": "#d62728",
    "mlp": "#7f7f7f",
    "logits": "#111111",
}
_EDGE_NAMES = {
    "q": "into queries",
    "k": "into keys",
    "v": "into values",
    "mlp": "into MLPs",
    "logits": "into logits",
}
_PORT_OFFSET = {"q": 0.15, "k": 0.0, "v": -0.15}
_WIDTHS = (1.0, 2.0, 3.5, 5.5)
_ARC = tuple(i / 12 for i in range(13))  # points along each edge's arc
_BULGE = 0.04  # the arc's height per layer it spans
_TITLE_ROOM = 50  # pixels from the top of the figure to the legend, under the title
_LEGEND_ROOM = 60  # pixels added to the figure's height for the rows of the legend


def plot_circuit(circuit: Circuit, *, title: str | None = None) -> go.Figure:
    """A plotly figure of ``circuit`` as a graph: nodes by layer, heads coloured by class,
    edges coloured by the input they feed (see the module docstring).

    Traces, in order: one ``Scatter`` of lines per kind of receiver ("into queries", "into
    keys", "into values", "into MLPs", "into logits") and width step present, then one
    ``Scatter`` of markers per class of heads, then one for the MLPs and one for the
    embeddings and logits, where the circuit has them.

    Example::

        circuit = ck.find_ioi_circuit(model, ds, reference=abc)
        ck.plot_circuit(circuit).show()
        found = ck.discover_circuit(model, ds, abc)
        ck.plot_circuit(found, title="IOI, found edge by edge")
    """
    if not isinstance(circuit, Circuit):
        raise CircuitkitError(f"plot_circuit: expected a ck.Circuit, got {type(circuit).__name__}")
    roles = _roles_of_heads(circuit)
    mlps = set() if circuit.mlps == "all" else {MLP(m.layer) for m in circuit.mlps}
    ends: set[Any] = set()
    for edge in circuit.edges:
        for node in (edge.sender, edge.receiver):
            node = _node_of(node)
            if isinstance(node, Head):
                roles.setdefault(node, [])
            elif isinstance(node, MLP):
                mlps.add(node)
            else:
                ends.add(node)
    layers = [h.layer for h in roles] + [m.layer for m in mlps]
    last_layer = max(layers, default=-1)

    def column(node: Any) -> float:
        if isinstance(node, Embed):
            return -1.0
        if node == LOGITS:
            return last_layer + 1.0
        return node.layer + (0.5 if isinstance(node, MLP) else 0.0)

    # heads spread about 0 in their layer's column, MLPs in a row below all of them, the
    # embeddings and the logits at 0
    by_column: dict[float, list[Any]] = {}
    for head in sorted(roles, key=lambda h: (h.layer, h.head)):
        by_column.setdefault(column(head), []).append(head)
    tallest = max((len(m) for m in by_column.values()), default=1)
    place: dict[Any, tuple[float, float]] = {}
    for x, members in by_column.items():
        for i, node in enumerate(members):
            place[node] = (x, i - (len(members) - 1) / 2)
    mlp_row = -(tallest - 1) / 2 - 1
    for mlp in mlps:
        place[mlp] = (column(mlp), mlp_row)
    for node in ends:
        place[node] = (column(node), 0.0)

    fig = go.Figure()
    for trace in _edge_traces(circuit, place):
        fig.add_trace(trace)
    for trace in _node_traces(circuit, roles, mlps, ends, place):
        fig.add_trace(trace)

    ticks = sorted({x for x, _ in place.values()})
    tick_text = [
        "embed" if x == -1 else "logits" if x == last_layer + 1 and LOGITS in ends else
        (f"{int(x)}" if x == int(x) else "")
        for x in ticks
    ]  # fmt: skip
    fig.update_xaxes(
        title_text="layer", tickvals=ticks, ticktext=tick_text, showgrid=False, zeroline=False
    )
    top = tallest / 2 + 0.5 + _top_room(place)
    bottom = mlp_row - 0.6 if mlps else -tallest / 2 - 0.5
    fig.update_yaxes(visible=False, range=[bottom, top])
    summary = f"{len(roles)} heads" + (f", {len(circuit.edges)} edges" if circuit.edges else "")
    default = f"{circuit.name or 'Circuit'} ({summary})"
    # The legend runs in rows under the title, above the plot: beside a tall graph a column of
    # entries scrolls out of view, or into a scroll box of its own once it outgrows the figure.
    # Both sit at fixed pixels from the top (yref "container"), and plotly pushes the plot down
    # below however many rows of entries the figure's width gives.
    height = max(450, 45 * (top - bottom) + 150) + _LEGEND_ROOM
    fig.update_layout(
        title=dict(
            text=title if title is not None else default,
            yref="container",
            y=1.0,
            yanchor="top",
            pad=dict(t=15),
        ),
        template="plotly_white",
        hovermode="closest",
        legend=dict(
            orientation="h",
            x=0.0,
            xanchor="left",
            yref="container",
            y=1 - _TITLE_ROOM / height,
            yanchor="top",
            itemsizing="constant",
        ),
        margin=dict(t=_TITLE_ROOM),
        height=height,
    )
    return fig


def _top_room(place: dict[Any, tuple[float, float]]) -> float:
    """Room above the nodes for the arcs of the longest edges."""
    xs = [x for x, _ in place.values()]
    return _BULGE * (max(xs) - min(xs)) if xs else 0.0


def _node_of(node: Any) -> Any:
    """The node a sender or receiver belongs to: ``Head(l, h)`` for its query, key or value
    input, ``MLP(l)``, ``Embed()`` or "logits"."""
    if isinstance(node, Head):
        return Head(node.layer, node.head)
    if isinstance(node, MLP):
        return MLP(node.layer)
    if isinstance(node, Embed):
        return Embed()
    return node


def _roles_of_heads(circuit: Circuit) -> dict[Head, list[tuple[str, str]]]:
    """``{Head(l, h): [(class, positions label), ...]}`` of the circuit's nodes."""
    roles: dict[Head, list[tuple[str, str]]] = {}
    for node in circuit.nodes:
        pos = node.head.pos
        where = "all" if pos is None else node.label.split("@", 1)[-1]
        roles.setdefault(Head(node.head.layer, node.head.head), []).append((node.role, where))
    return roles


def _kind(receiver: Any) -> str:
    if receiver == LOGITS:
        return "logits"
    if isinstance(receiver, Head):
        return receiver.part
    return "mlp"


def _edge_traces(circuit: Circuit, place: dict[Any, tuple[float, float]]) -> list[go.Scatter]:
    scores = circuit.info.get("scores") if circuit.info else None
    magnitude: dict[Edge, float] = {}
    if isinstance(scores, EdgeScores):
        for edge in circuit.edges:
            try:
                magnitude[edge] = abs(scores.score(edge))
            except CircuitkitError:
                pass
    largest = max(magnitude.values(), default=0.0)

    def step(edge: Edge) -> int:
        if largest == 0 or edge not in magnitude:
            return 0
        return min(len(_WIDTHS) - 1, int(len(_WIDTHS) * magnitude[edge] / largest))

    groups: dict[tuple[str, int], list[Edge]] = {}
    for edge in circuit.edges:
        groups.setdefault((_kind(edge.receiver), step(edge)), []).append(edge)
    traces = []
    shown: set[str] = set()
    order = list(_EDGE_COLOURS)
    for kind, width in sorted(groups, key=lambda key: (order.index(key[0]), key[1])):
        xs: list[float | None] = []
        ys: list[float | None] = []
        text: list[str | None] = []
        for edge in groups[kind, width]:
            x0, y0 = place[_node_of(edge.sender)]
            x1, y1 = place[_node_of(edge.receiver)]
            label = edge.label
            if edge in magnitude:
                label += f"<br>score {scores.score(edge):+.4g}"  # type: ignore[union-attr]
            y1 += _PORT_OFFSET.get(kind, 0.0)
            # a shallow arc, higher the longer the edge, so edges along one row stay apart
            bulge = _BULGE * (x1 - x0)
            for t in _ARC:
                xs.append(x0 + t * (x1 - x0))
                ys.append(y0 + t * (y1 - y0) + 4 * bulge * t * (1 - t))
            xs.append(None)
            ys.append(None)
            text += [label] * len(_ARC) + [None]
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line=dict(color=_EDGE_COLOURS[kind], width=_WIDTHS[width]),
                opacity=0.6,
                text=text,
                hoverinfo="text",
                name=_EDGE_NAMES[kind],
                legendgroup=f"edges {kind}",
                showlegend=kind not in shown,
            )
        )
        shown.add(kind)
    return traces


def _node_traces(
    circuit: Circuit,
    roles: dict[Head, list[tuple[str, str]]],
    mlps: set[MLP],
    ends: set[Any],
    place: dict[Any, tuple[float, float]],
) -> list[go.Scatter]:
    # classes in the order the circuit lists them; a head takes the colour of its first class
    by_class: dict[str, list[Head]] = {node.role: [] for node in circuit.nodes}
    for head in sorted(roles, key=lambda h: (h.layer, h.head)):
        role = roles[head][0][0] if roles[head] else ""
        by_class.setdefault(role, []).append(head)
    by_class = {role: heads for role, heads in by_class.items() if heads}
    colours = dict(_CLASS_COLOURS)
    spare = iter(_OTHER_COLOURS)
    traces = []
    for role, heads in by_class.items():
        if role not in colours:
            colours[role] = next(spare, "#7f7f7f")
        hover = [
            f"{head.label}<br>"
            + "<br>".join(f"{r or 'no class'} at {where}" for r, where in roles[head])
            if roles[head]
            else f"{head.label}<br>(reached by the circuit's edges)"
            for head in heads
        ]
        traces.append(
            _markers(
                heads, place, role or "other heads", colours[role], "circle", 16,
                [h.label for h in heads], hover,
            )
        )  # fmt: skip
    if mlps:
        chosen = sorted(mlps, key=lambda m: m.layer)
        labels, hover = [f"M{m.layer}" for m in chosen], [f"MLP {m.layer}" for m in chosen]
        traces.append(
            _markers(chosen, place, "MLPs (M<layer>)", "#9e9e9e", "square", 14, labels, hover)
        )
    ends_present: Sequence[Any] = [node for node in (Embed(), LOGITS) if node in ends]
    if ends_present:
        labels = ["embed" if isinstance(node, Embed) else "logits" for node in ends_present]
        name = "embed / logits"
        traces.append(_markers(ends_present, place, name, "#111111", "diamond", 16, labels, labels))
    return traces


def _markers(
    nodes: Sequence[Component | str],
    place: dict[Any, tuple[float, float]],
    name: str,
    colour: str,
    symbol: str,
    size: int,
    labels: list[str],
    hover: list[str],
) -> go.Scatter:
    return go.Scatter(
        x=[place[node][0] for node in nodes],
        y=[place[node][1] for node in nodes],
        mode="markers+text",
        marker=dict(color=colour, symbol=symbol, size=size, line=dict(width=1, color="white")),
        text=labels,
        textposition="top center",
        hovertext=hover,
        hoverinfo="text",
        name=name,
    )


__all__ = ["plot_circuit"]
