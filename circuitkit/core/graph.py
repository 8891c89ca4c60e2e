"""The computational graph of a transformer: its senders, receivers and edges.

A transformer's residual stream is a sum: what enters the final layer norm is the embeddings
plus every head's output plus every MLP's output (plus the attention output biases, which no
node owns). Every head reads that sum through its query, key and value inputs, every MLP
through its input. So the model is a graph (Elhage et al. 2021; Conmy et al. 2023):

- **senders** (nodes that write to the residual stream): ``Embed()`` (the residual stream
  entering block 0: token plus positional embeddings, the token embeddings alone in a model
  with rotary positions), each head's output ``Head(l, h)`` (its ``z`` times its ``W_O``), and
  each MLP's output ``MLP(l)``;
- **receivers** (what reads it): each head's query, key and value inputs ``Head(l, h).q`` /
  ``.k`` / ``.v``, each MLP's input ``MLP(l)``, and ``"logits"`` (the final residual stream,
  before the final norm);
- an **edge** ``Edge(sender, receiver)`` for every sender that comes before a receiver: a
  head's inputs read the senders of earlier layers, an MLP also reads its own layer's heads
  (unless attention and MLP run in parallel), the logits read every sender.

In a grouped-query model (SmolLM2 shares each of its 3 key/value heads between 3 query heads)
the key and value of a group are computed once, from one input: that input is one receiver,
named by the group's first query head (``Head(l, 0).k`` for the group of heads 0, 1, 2), and
``Head(l, 1).k`` names the same receiver. Patching an edge into it changes the keys (values)
of every query head of the group.

``patch_edges`` (``circuitkit.methods.edge_patching``) runs the model with some of these edges
patched; ``sender_outputs`` records every sender's output, the values an edge patch puts back.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.core.components import MLP, Component, Embed, Head, Resid
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.inputs import as_tokens
from circuitkit.core.interventions import MetricLike
from circuitkit.core.lens import (
    POST_NORM_ARCHITECTURES,
    HookedTransformer,
    HookedTransformerConfig,
    is_bridge,
)
from circuitkit.core.metrics import Metric
from circuitkit.core.results import Result

LOGITS = "logits"


Receiver = Union[Component, str]  # noqa: UP007 (a runtime alias on 3.10)


def _name(node: Receiver) -> str:
    return node if isinstance(node, str) else repr(node)


def _check_sender(sender: Any, where: str) -> None:
    whole = getattr(sender, "pos", None) is None
    if not whole or not (
        isinstance(sender, Embed)
        or (isinstance(sender, Head) and sender.part == "z")
        or isinstance(sender, MLP)
    ):
        raise ComponentError(
            f"{where}: a sender is ck.Embed(), a head's output ck.Head(l, h) or an MLP's output "
            f"ck.MLP(l), at every position; got {sender!r}"
        )


def _check_receiver(receiver: Any, where: str) -> None:
    if receiver == LOGITS:
        return
    whole = getattr(receiver, "pos", None) is None
    if not whole or not (
        (isinstance(receiver, Head) and receiver.part in ("q", "k", "v"))
        or isinstance(receiver, MLP)
    ):
        raise ComponentError(
            f"{where}: a receiver is a head's input ck.Head(l, h).q / .k / .v, an MLP's input "
            f"ck.MLP(l) or 'logits', at every position; got {receiver!r}"
        )


@dataclass(frozen=True)
class Edge:
    """A direct path from a sender's output to a receiver's input.

    Attributes:
        sender: ``ck.Embed()``, a head's output ``ck.Head(l, h)`` or an MLP's ``ck.MLP(l)``.
        receiver: a head's input ``ck.Head(l, h).q`` / ``.k`` / ``.v``, an MLP's input
            ``ck.MLP(l)``, or ``"logits"``.

    Example::

        ck.Edge(ck.Head(23, 2), "logits")
        ck.Edge(ck.Head(17, 4), ck.Head(23, 2).k)
        ck.patch_edges(model, ds, [[ck.Edge(ck.Embed(), ck.MLP(0))]], ck.metrics.logit_diff(ds),
                       replacement=ck.sender_outputs(model, ds.corrupted("ABC")).mean())
    """

    sender: Component
    receiver: Receiver

    def __post_init__(self) -> None:
        _check_sender(self.sender, "Edge")
        _check_receiver(self.receiver, "Edge")

    @property
    def label(self) -> str:
        """``"Head(5, 1) -> Head(9, 9).q"``."""
        return f"{_name(self.sender)} -> {_name(self.receiver)}"

    def __repr__(self) -> str:
        return f"Edge({self.label})"


@dataclass(frozen=True, eq=False)
class Graph:
    """The senders, receivers and edges of a model (see the module docstring).

    Senders are in the order the model computes them: ``Embed()``, then per layer its heads
    and its MLP. Receivers likewise: per layer its heads' queries, the keys and values of its
    key/value heads, its MLP; then ``"logits"``. ``valid`` [receiver, sender] is True where an
    edge exists; the senders of each receiver are a prefix of ``senders``.

    Example::

        graph = ck.Graph.of(model)
        graph.n_edges                                    # 70,651 for smollm2-135m
        graph.index(ck.Edge(ck.Head(5, 1), ck.Head(9, 4).k))   # (row, column) in ``valid``
        mask = graph.mask([ck.Edge(ck.Embed(), "logits")])      # bool [receiver, sender]
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int  # key/value inputs per layer: n_heads without grouped-query attention
    has_mlp: bool
    parallel: bool  # attention and MLP read the same residual stream (GPT-J, Pythia)

    @classmethod
    def of(cls, model: HookedTransformer, where: str = "Graph.of") -> Graph:
        """The graph of ``model``; a clear error for architectures whose residual stream is not
        a plain sum of node outputs (post-norm, or normalised block outputs)."""
        cfg = model.cfg
        if (
            cfg.original_architecture in POST_NORM_ARCHITECTURES
            or cfg.use_normalization_before_and_after
        ):
            raise CircuitkitError(
                f"{where}: {cfg.model_name} normalises its attention and MLP outputs before "
                "adding them to the residual stream, so the stream is not a sum of node outputs "
                "and its graph has no edges to patch"
            )
        n_kv_heads = cfg.n_key_value_heads
        if n_kv_heads is None or getattr(cfg, "ungroup_grouped_query_attention", False):
            n_kv_heads = cfg.n_heads
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv_heads,
            has_mlp=not cfg.attn_only,
            parallel=bool(cfg.parallel_attn_mlp),
        )

    # -- layout -----------------------------------------------------------------------------

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def _per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + int(self.has_mlp)

    def attn_rows(self, layer: int) -> slice:
        """Rows of ``layer``'s query, key and value receivers (in that order)."""
        start = layer * self._per_layer
        return slice(start, start + self.n_heads + 2 * self.n_kv_heads)

    def mlp_row(self, layer: int) -> int:
        return layer * self._per_layer + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_row(self) -> int:
        return self.n_layers * self._per_layer

    def senders_before(self, layer: int) -> int:
        """The number of senders that ``layer``'s heads read: those of earlier layers."""
        return 1 + layer * (self.n_heads + int(self.has_mlp))

    def senders_into_mlp(self, layer: int) -> int:
        """The number of senders that ``layer``'s MLP reads."""
        return self.senders_before(layer) + (0 if self.parallel else self.n_heads)

    def head_columns(self, layer: int) -> slice:
        start = self.senders_before(layer)
        return slice(start, start + self.n_heads)

    def mlp_column(self, layer: int) -> int:
        return self.senders_before(layer) + self.n_heads

    # -- nodes and edges --------------------------------------------------------------------

    @cached_property
    def senders(self) -> tuple[Component, ...]:
        nodes: list[Component] = [Embed()]
        for layer in range(self.n_layers):
            nodes += [Head(layer, h) for h in range(self.n_heads)]
            if self.has_mlp:
                nodes.append(MLP(layer))
        return tuple(nodes)

    @cached_property
    def receivers(self) -> tuple[Receiver, ...]:
        nodes: list[Receiver] = []
        for layer in range(self.n_layers):
            nodes += [Head(layer, h).q for h in range(self.n_heads)]
            for part in ("k", "v"):
                nodes += [Head(layer, g * self.group, part) for g in range(self.n_kv_heads)]
            if self.has_mlp:
                nodes.append(MLP(layer))
        nodes.append(LOGITS)
        return tuple(nodes)

    @cached_property
    def receiver_layers(self) -> Int[Tensor, "receiver"]:
        """The layer of each receiver (``n_layers`` for the logits)."""
        layers = [r.layer if isinstance(r, Component) else self.n_layers for r in self.receivers]
        return torch.tensor(layers)

    @cached_property
    def n_senders_of(self) -> Int[Tensor, "receiver"]:
        """How many senders each receiver reads (they are the first ones)."""
        counts = torch.empty(len(self.receivers), dtype=torch.long)
        for layer in range(self.n_layers):
            counts[self.attn_rows(layer)] = self.senders_before(layer)
            if self.has_mlp:
                counts[self.mlp_row(layer)] = self.senders_into_mlp(layer)
        counts[self.logits_row] = len(self.senders)
        return counts

    @cached_property
    def valid(self) -> Tensor:
        """bool [receiver, sender]: True where the graph has an edge."""
        return torch.arange(len(self.senders))[None, :] < self.n_senders_of[:, None]

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, receiver by receiver, in the order of ``valid``'s True entries."""
        return tuple(
            Edge(self.senders[s], self.receivers[r]) for r, s in self.valid.nonzero().tolist()
        )

    @property
    def n_edges(self) -> int:
        return int(self.n_senders_of.sum())

    def canonical(self, receiver: Receiver) -> Receiver:
        """The receiver's name in this graph: a key or value input is named by the first query
        head of its group."""
        if isinstance(receiver, Head) and receiver.part in ("k", "v"):
            return replace(receiver, head=receiver.head - receiver.head % self.group)
        return receiver

    def sender_index(self, sender: Component, where: str = "Graph.sender_index") -> int:
        _check_sender(sender, where)
        if isinstance(sender, Embed):
            return 0
        self._check_layer(sender, sender.layer, where)  # type: ignore[attr-defined]
        if isinstance(sender, Head):
            self._check_head(sender, where)
            return self.head_columns(sender.layer).start + sender.head
        if not self.has_mlp:
            raise ComponentError(f"{where}: {sender!r}: this model is attention-only")
        return self.mlp_column(sender.layer)  # type: ignore[attr-defined]

    def receiver_index(self, receiver: Receiver, where: str = "Graph.receiver_index") -> int:
        _check_receiver(receiver, where)
        if receiver == LOGITS:
            return self.logits_row
        assert isinstance(receiver, (Head, MLP))
        self._check_layer(receiver, receiver.layer, where)
        if isinstance(receiver, MLP):
            if not self.has_mlp:
                raise ComponentError(f"{where}: {receiver!r}: this model is attention-only")
            return self.mlp_row(receiver.layer)
        self._check_head(receiver, where)
        start = self.attn_rows(receiver.layer).start
        if receiver.part == "q":
            return start + receiver.head
        kv = receiver.head // self.group
        return start + self.n_heads + (0 if receiver.part == "k" else self.n_kv_heads) + kv

    def index(self, edge: Edge, where: str = "Graph.index") -> tuple[int, int]:
        """``(receiver row, sender column)`` of an edge; an error if the graph has no such edge."""
        if not isinstance(edge, Edge):
            raise CircuitkitError(f"{where}: expected an Edge, got {edge!r}")
        row = self.receiver_index(edge.receiver, where)
        column = self.sender_index(edge.sender, where)
        if column >= int(self.n_senders_of[row]):
            raise ComponentError(
                f"{where}: there is no edge {edge.label}: a head's inputs read only the senders "
                "of earlier layers, an MLP's input also its own layer's heads"
            )
        return row, column

    def mask(self, edges: Collection[Edge], where: str = "Graph.mask") -> Tensor:
        """bool [receiver, sender]: True at the given edges."""
        mask = torch.zeros(len(self.receivers), len(self.senders), dtype=torch.bool)
        if edges:
            rows, columns = zip(*(self.index(e, where) for e in edges), strict=True)
            mask[list(rows), list(columns)] = True
        return mask

    def edges_in(self, mask: Tensor) -> list[Edge]:
        """The edges where a bool [receiver, sender] mask is True."""
        self.check_mask(mask, "Graph.edges_in")
        return [
            Edge(self.senders[s], self.receivers[r])
            for r, s in (mask.cpu() & self.valid).nonzero().tolist()
        ]

    def check_mask(self, mask: Any, where: str) -> None:
        shape = (len(self.receivers), len(self.senders))
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape[-2:] != shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else repr(mask)
            raise ShapeError(
                f"{where}: an edge mask is a bool tensor [..., {shape[0]}, {shape[1]}] "
                f"(receivers, senders), got {got}"
            )
        if (mask.cpu() & ~self.valid).any():
            raise ComponentError(
                f"{where}: the mask is True at {int((mask.cpu() & ~self.valid).sum())} places "
                "that are not edges (a receiver before its sender)"
            )

    def _check_layer(self, node: Component, layer: int, where: str) -> None:
        if not 0 <= layer < self.n_layers:
            raise ComponentError(
                f"{where}: {node!r}: layer {layer} is out of range; this model has layers "
                f"0..{self.n_layers - 1}"
            )

    def _check_head(self, node: Head, where: str) -> None:
        if not 0 <= node.head < self.n_heads:
            raise ComponentError(
                f"{where}: {node!r}: head {node.head} is out of range; this model has heads "
                f"0..{self.n_heads - 1}"
            )


@contextmanager
def split_inputs(model: HookedTransformer) -> Iterator[None]:
    """Within the block, every head's query, key and value input and every MLP's input is its own
    activation (``cfg.use_split_qkv_input``, ``cfg.use_hook_mlp_in``); both flags are put back as
    they were on exit, also when an exception is raised."""
    if is_bridge(model):  # a bridge keeps both flags on its config and sets them itself
        split, mlp_in = model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in
        try:
            model.set_use_split_qkv_input(True)
            if not model.cfg.attn_only:
                model.set_use_hook_mlp_in(True)
            yield
        finally:
            model.set_use_split_qkv_input(split)
            model.set_use_hook_mlp_in(mlp_in)
        return
    configs: dict[int, HookedTransformerConfig] = {}
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, HookedTransformerConfig):
            configs[id(cfg)] = cfg
    saved = [(cfg, cfg.use_split_qkv_input, cfg.use_hook_mlp_in) for cfg in configs.values()]
    try:
        for cfg, _, _ in saved:
            cfg.use_split_qkv_input = True
            if not cfg.attn_only:
                cfg.use_hook_mlp_in = True
        yield
    finally:
        for cfg, split, mlp_in in saved:
            cfg.use_split_qkv_input = split
            cfg.use_hook_mlp_in = mlp_in


@dataclass(frozen=True, eq=False)
class SenderOutputs:
    """What every sender of a model's graph outputs in a run, or the mean over a distribution.

    Attributes:
        embed: [n, pos, d_model] the residual stream entering block 0.
        z: one [n, pos, head_index, d_head] per layer; head ``h``'s output is
            ``z[:, :, h] @ W_O[h]``.
        mlp_out: one [n, pos, d_model] per layer (none in an attention-only model).

    ``n`` is 1 after ``mean()``; such outputs serve as the replacement for a base of any size.

    Example::

        outputs = ck.sender_outputs(model, ds.corrupted("ABC"))
        outputs.z[9].shape                 # [n, pos, n_heads, d_head]
        mean = outputs.mean()              # n = 1
    """

    embed: Float[Tensor, "n pos d_model"]
    z: tuple[Float[Tensor, "n pos head_index d_head"], ...]
    mlp_out: tuple[Float[Tensor, "n pos d_model"], ...]

    @property
    def n(self) -> int:
        return int(self.embed.shape[0])

    def mean(self) -> SenderOutputs:
        """The mean over examples, per position (mean ablation), as outputs of one example."""
        return SenderOutputs(
            self.embed.mean(0, keepdim=True),
            tuple(z.mean(0, keepdim=True) for z in self.z),
            tuple(out.mean(0, keepdim=True) for out in self.mlp_out),
        )

    def rows(self, index: Tensor) -> SenderOutputs:
        """The outputs of some examples (all of them where ``n`` is 1)."""
        if self.n == 1:
            return self
        return SenderOutputs(
            self.embed[index],
            tuple(z[index] for z in self.z),
            tuple(out[index] for out in self.mlp_out),
        )


def sender_outputs(model: HookedTransformer, data: Any | Int[Tensor, "n pos"]) -> SenderOutputs:
    """The output of every sender of ``model``'s graph on ``data`` (a dataset or tokens).

    Example::

        mean = ck.sender_outputs(model, ds.corrupted("ABC")).mean()   # for mean ablation
    """
    tokens, _ = as_tokens(data, "data", "sender_outputs", model=model)
    n_layers = model.cfg.n_layers
    embed_name = Resid(0, "pre").hook_name(model)
    z_names = [Head(layer, 0).hook_name(model) for layer in range(n_layers)]
    mlp_names = [] if model.cfg.attn_only else [MLP(x).hook_name(model) for x in range(n_layers)]
    names = {embed_name, *z_names, *mlp_names}
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(model.cfg.device),
            names_filter=lambda name: name in names,
            stop_at_layer=n_layers,
        )
    return SenderOutputs(
        cache[embed_name],
        tuple(cache[name] for name in z_names),
        tuple(cache[name] for name in mlp_names),
    )


def head_outputs(model: HookedTransformer, layer: int, z: Tensor) -> Tensor:
    """[..., pos, head_index, d_model]: each head's output, from its ``z``."""
    return torch.einsum("...hk,hkd->...hd", z, model.blocks[layer].attn.W_O)


def sender_deltas(
    model: HookedTransformer, graph: Graph, outputs: SenderOutputs, replacement: SenderOutputs
) -> Float[Tensor, "n sender pos d_model"]:
    """``out_u - replacement_u`` for every sender ``u``, in the graph's sender order."""
    n, n_pos = outputs.embed.shape[:2]
    deltas = outputs.embed.new_empty(n, len(graph.senders), n_pos, model.cfg.d_model)
    deltas[:, 0] = outputs.embed - replacement.embed
    for layer in range(graph.n_layers):
        z_delta = outputs.z[layer] - replacement.z[layer]
        deltas[:, graph.head_columns(layer)] = head_outputs(model, layer, z_delta).transpose(1, 2)
        if graph.has_mlp:
            deltas[:, graph.mlp_column(layer)] = outputs.mlp_out[layer] - replacement.mlp_out[layer]
    return deltas


def check_graph_metric(metric: MetricLike, n: int, where: str) -> None:
    if isinstance(metric, Metric):
        if metric.n != n:
            raise ShapeError(
                f"{where}: the metric {metric.name!r} is made for {metric.n} examples but the "
                f"base input has {n}"
            )
    elif not callable(metric):
        raise CircuitkitError(f"{where}: metric must be callable, got {metric!r}")


class EdgeScores(Result):
    """A score per edge of a model's graph: a ``Result`` with axes ("receiver", "sender").

    ``values[r, s]`` is the score of the edge from sender ``s`` to receiver ``r`` (0 where the
    graph has no such edge); ``examples`` holds the per-example scores. On top of what a
    ``Result`` does, ``top`` and ``to_dataframe`` list edges only, ``top_edges`` returns
    ``Edge`` objects, and ``score`` reads one edge. ``info`` holds the graph's ``senders``,
    ``receivers`` and ``edge_mask``, so a saved and loaded ``EdgeScores`` works the same.

    Example::

        scores = ck.edge_attribution_patching(model, ds, abc, metric, method="eap-ig")
        scores.top_edges(5)           # [(Edge(Head(23, 2) -> logits), 0.81), ...]
        scores.score(ck.Edge(ck.Head(23, 2), "logits"))
        scores.to_dataframe().head()  # receiver, sender, value, sem
    """

    @classmethod
    def of_graph(
        cls, graph: Graph, examples: Float[Tensor, "receiver sender n"], **kwargs: Any
    ) -> EdgeScores:
        info = dict(kwargs.pop("info", {}))
        info.update(
            senders=list(graph.senders), receivers=list(graph.receivers), edge_mask=graph.valid
        )
        return cls(
            values=examples.mean(-1),
            axes=("receiver", "sender"),
            labels={
                "receiver": [_name(r) for r in graph.receivers],
                "sender": [_name(s) for s in graph.senders],
            },
            examples=examples,
            info=info,
            **kwargs,
        )

    @property
    def edge_mask(self) -> Tensor:
        return self.info["edge_mask"]

    def edges(self) -> list[Edge]:
        """Every edge, in the order of ``edge_mask``'s True entries."""
        senders, receivers = self.info["senders"], self.info["receivers"]
        return [Edge(senders[s], receivers[r]) for r, s in self.edge_mask.nonzero().tolist()]

    def score(self, edge: Edge) -> float:
        """The score of one edge (a key or value receiver may name any head of its group)."""
        receivers, senders = self.info["receivers"], self.info["senders"]
        receiver = edge.receiver
        if isinstance(receiver, Head) and receiver.part in ("k", "v"):
            # a group's receiver is named by its first query head: the last name up to this head
            names = [
                r
                for r in receivers
                if isinstance(r, Head)
                and (r.layer, r.part) == (receiver.layer, receiver.part)
                and r.head <= receiver.head
            ]
            receiver = names[-1] if names else receiver
        if receiver not in receivers or edge.sender not in senders:
            raise ComponentError(f"EdgeScores.score: the graph has no edge {edge.label}")
        r, s = receivers.index(receiver), senders.index(edge.sender)
        if not bool(self.edge_mask[r, s]):
            raise ComponentError(f"EdgeScores.score: the graph has no edge {edge.label}")
        return float(self.values[r, s])

    def top_edges(self, k: int = 10, *, by_abs: bool = True) -> list[tuple[Edge, float]]:
        """The ``k`` edges with the largest scores (by absolute value unless ``by_abs=False``)."""
        senders, receivers = self.info["senders"], self.info["receivers"]
        return [
            (Edge(senders[s], receivers[r]), value)
            for (r, s), value in self._top_indices(k, by_abs)
        ]

    def top(self, k: int = 10, *, by_abs: bool = True) -> list[tuple[dict[str, str], float]]:
        """The ``k`` edges with the largest scores, labelled as ``Result.top`` labels cells."""
        return [(self.label_of(index), value) for index, value in self._top_indices(k, by_abs)]

    def _top_indices(self, k: int, by_abs: bool) -> list[tuple[tuple[int, int], float]]:
        rows, columns = self.edge_mask.nonzero(as_tuple=True)
        scores = self.values[rows, columns]
        order = (scores.abs() if by_abs else scores).argsort(descending=True)[:k]
        return [((int(rows[i]), int(columns[i])), float(scores[i])) for i in order.tolist()]

    def to_dataframe(self, *, ci: float | None = None, n_boot: int = 2000, seed: int = 0):
        """One row per edge: receiver, sender, value, and uncertainty columns as in
        ``Result.to_dataframe``."""
        frame = super().to_dataframe(ci=ci, n_boot=n_boot, seed=seed)
        return frame[self.edge_mask.flatten().numpy()].reset_index(drop=True)


def check_edge_scores(scores: Any, graph: Graph, where: str, *, needed: str = "scores") -> None:
    """Raise a CircuitkitError unless ``scores`` are the ``EdgeScores`` of ``graph``;
    ``needed`` says what was required (``"with level='edge', scores"``)."""
    mask = getattr(scores, "edge_mask", None) if isinstance(scores, EdgeScores) else None
    if not isinstance(mask, Tensor) or not torch.equal(mask.cpu(), graph.valid):
        raise CircuitkitError(
            f"{where}: {needed} must be the EdgeScores of this model's graph "
            f"({len(graph.receivers)} receivers x {len(graph.senders)} senders, from "
            f"ck.edge_attribution_patching), got {type(scores).__name__}"
            + (f" over {tuple(mask.shape)}" if isinstance(mask, Tensor) else "")
        )


__all__ = [
    "LOGITS",
    "Edge",
    "EdgeScores",
    "Graph",
    "Receiver",
    "SenderOutputs",
    "check_edge_scores",
    "check_graph_metric",
    "head_outputs",
    "sender_deltas",
    "sender_outputs",
    "split_inputs",
]
