"""The ``Circuit`` value: heads at positions, MLPs, edges and their IOI classes.

A *circuit* (Wang et al. 2022, the IOI paper) is a set of attention heads, each at the
positions where it acts (name movers at "end", induction heads at "S2", ...), together with the
MLPs, which the paper keeps whole (``mlps="all"``). A ``Circuit`` can also hold *edges* (a
sender and the input of a receiver it feeds, such as ``Head(5, 1) -> Head(9, 9).q``) and
free-form ``info`` (the results that found it, a faithfulness curve). How well a circuit carries
a behaviour is measured in ``circuitkit.circuits.faithfulness``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from circuitkit.core.components import MLP, Component, Head
from circuitkit.core.errors import ComponentError
from circuitkit.core.graph import Edge
from circuitkit.core.lens import HookedTransformer

#: The classes of heads in the IOI paper's circuit (any other label is allowed too).
IOI_CLASSES: tuple[str, ...] = (
    "name mover",
    "negative name mover",
    "backup name mover",
    "s-inhibition",
    "induction",
    "duplicate token",
    "previous token",
)


@dataclass(frozen=True)
class CircuitHead:
    """One head of a circuit at the positions where it acts.

    Attributes:
        head: the head's output, restricted to its positions: ``Head(9, 9).at("end")``
            (``Head(9, 9)`` alone acts at every position).
        role: its class, such as "name mover" (``IOI_CLASSES``), or "".
        effect: the effect that put it in the circuit (a path-patching effect), or None.

    Example::

        node = ck.CircuitHead(ck.Head(23, 2).at("end"), "name mover")
        node.label                         # '23.2@end'
        ck.Circuit(nodes=(node,), name="one head")
    """

    head: Head
    role: str = ""
    effect: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.head, Head) or self.head.part != "z":
            raise ComponentError(
                f"CircuitHead: head must be a head's output such as ck.Head(9, 9).at('end'), "
                f"got {self.head!r}"
            )

    @property
    def label(self) -> str:
        """``"9.9@end"``: layer.head, and the positions unless it acts at every one."""
        pos = self.head.pos
        return self.head.label if pos is None else f"{self.head.label}@{pos_label(pos)}"


@dataclass(frozen=True)
class Circuit:
    """A set of heads at the positions where they act, optionally MLPs and edges.

    Attributes:
        nodes: the circuit's heads (``CircuitHead``), each with its positions and class. A head
            may appear more than once, at different positions.
        mlps: "all" (every MLP is kept, the IOI paper's choice), or the MLPs in the circuit
            (``MLP(l)``, optionally ``.at(positions)``); every other MLP is then ablated too.
        edges: paths between components (``Edge``), for circuits found edge by edge; the
            evaluations in this module read ``nodes`` and ``mlps`` only.
        name: a label for reports.
        info: details of how the circuit was found (the results behind each class, thresholds,
            a faithfulness curve); not part of equality.

    Example::

        circuit = ck.Circuit.from_classes(
            {
                "name mover": [ck.Head(23, 2).at("end"), ck.Head(23, 0).at("end")],
                "s-inhibition": [ck.Head(20, 0).at("end")],
                "induction": [ck.Head(17, 4).at("S2")],
            },
            name="IOI",
        )
        len(circuit)             # 4 heads
        circuit.heads            # (Head(17, 4), Head(20, 0), Head(23, 0), Head(23, 2))
        circuit.to_dataframe()
        ck.faithfulness(model, circuit, ds, reference=ds.corrupted("ABC"))
    """

    nodes: tuple[CircuitHead, ...] = ()
    mlps: tuple[MLP, ...] | Literal["all"] = "all"
    edges: tuple[Edge, ...] = ()
    name: str = ""
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        nodes = tuple(self.nodes)
        for node in nodes:
            if not isinstance(node, CircuitHead):
                raise ComponentError(
                    f"Circuit: nodes must be CircuitHead objects (or use Circuit.from_classes), "
                    f"got {node!r}"
                )
        seen = set()
        for node in nodes:
            key = (node.head.layer, node.head.head, repr(node.head.pos))
            if key in seen:
                raise ComponentError(f"Circuit: the head {node.label} is listed twice")
            seen.add(key)
        object.__setattr__(self, "nodes", nodes)
        if self.mlps != "all":
            mlps = tuple(self.mlps)
            if not all(isinstance(m, MLP) for m in mlps):
                raise ComponentError(
                    f"Circuit: mlps must be 'all' or a sequence of ck.MLP(layer), got {self.mlps!r}"
                )
            object.__setattr__(self, "mlps", mlps)
        edges = tuple(self.edges)
        if not all(isinstance(e, Edge) for e in edges):
            raise ComponentError(f"Circuit: edges must be Edge objects, got {self.edges!r}")
        object.__setattr__(self, "edges", edges)

    @classmethod
    def from_classes(
        cls,
        classes: Mapping[str, Iterable[Head]],
        *,
        mlps: Sequence[MLP] | Literal["all"] = "all",
        name: str = "",
        effects: Mapping[Head, float] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Circuit:
        """A circuit from ``{class: [heads at their positions]}``.

        Example::

            ck.Circuit.from_classes({"name mover": [ck.Head(23, 2).at("end")],
                                     "induction": [ck.Head(17, 4).at("S2")]})
        """
        effects = effects or {}
        nodes = [
            CircuitHead(head, role, effects.get(head))
            for role, heads in classes.items()
            for head in heads
        ]
        return cls(tuple(nodes), mlps=mlps, name=name, info=dict(info or {}))  # type: ignore[arg-type]

    # -- reading -------------------------------------------------------------------------------

    @property
    def heads(self) -> tuple[Head, ...]:
        """The distinct heads (``Head(l, h)``, without positions), by layer and head."""
        unique = {(n.head.layer, n.head.head) for n in self.nodes}
        return tuple(Head(layer, head) for layer, head in sorted(unique))

    def __len__(self) -> int:
        """The number of distinct heads."""
        return len(self.heads)

    def __contains__(self, head: object) -> bool:
        if not isinstance(head, Head):
            return False
        return any((n.head.layer, n.head.head) == (head.layer, head.head) for n in self.nodes)

    @property
    def classes(self) -> dict[str, list[Head]]:
        """``{class: [heads at their positions]}``, classes in the order they first appear."""
        out: dict[str, list[Head]] = {}
        for node in self.nodes:
            out.setdefault(node.role, []).append(node.head)
        return out

    def positions_of(self, head: Head) -> tuple:
        """The positions at which ``head`` is in the circuit (``None`` meaning every one)."""
        return tuple(
            n.head.pos for n in self.nodes if (n.head.layer, n.head.head) == (head.layer, head.head)
        )

    def without(self, heads: Iterable[Head]) -> Circuit:
        """The circuit with ``heads`` removed (at every position; edges that touch them too)."""
        drop = {(h.layer, h.head) for h in heads}
        nodes = tuple(n for n in self.nodes if (n.head.layer, n.head.head) not in drop)

        def touches(component: Component) -> bool:
            return isinstance(component, Head) and (component.layer, component.head) in drop

        edges = tuple(e for e in self.edges if not (touches(e.sender) or touches(e.receiver)))
        return dataclasses.replace(self, nodes=nodes, edges=edges)

    def validate(self, model: HookedTransformer) -> None:
        """Raise a ComponentError if a head or MLP of the circuit does not exist in ``model``."""
        for node in self.nodes:
            node.head.validate(model)
        if self.mlps != "all":
            for mlp in self.mlps:
                mlp.validate(model)

    def to_dataframe(self):
        """One row per head and position: class, layer, head, position, effect.

        Example::

            circuit.to_dataframe().groupby("class").size()
        """
        import pandas as pd

        return pd.DataFrame(
            {
                "class": [n.role for n in self.nodes],
                "layer": [n.head.layer for n in self.nodes],
                "head": [n.head.head for n in self.nodes],
                "position": [pos_label(n.head.pos) for n in self.nodes],
                "effect": [n.effect for n in self.nodes],
            }
        )

    def __repr__(self) -> str:
        title = f"Circuit({self.name!r}, " if self.name else "Circuit("
        mlps = "all" if self.mlps == "all" else (", ".join(map(repr, self.mlps)) or "none")
        extra = f", {len(self.edges)} edges" if self.edges else ""
        lines = [f"{title}{len(self)} heads, MLPs: {mlps}{extra}"]
        width = max((len(role or "-") for role in self.classes), default=0)
        for role, heads in self.classes.items():
            labels = ", ".join(
                CircuitHead(h).label for h in sorted(heads, key=lambda h: (h.layer, h.head))
            )
            lines.append(f"  {role or '-':<{width}}  {labels}")
        return "\n".join(lines) + ")"


def pos_label(pos: Any) -> str:
    if pos is None:
        return "all"
    if isinstance(pos, slice):
        return f"{pos.start or ''}:{pos.stop or ''}"
    return str(pos)


__all__ = ["IOI_CLASSES", "CircuitHead", "Circuit", "pos_label"]
