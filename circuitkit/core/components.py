"""Typed addresses of the places in a model where one can intervene.

A component names an activation of a TransformerLens ``HookedTransformer`` and, optionally, a
selection inside it: one head, one neuron, some positions. Every method in circuitkit speaks in
components; this module is the only place that knows TransformerLens hook names.

    Embed()                 token embeddings        hook_embed             [batch, pos, d_model]
    PosEmbed()              learned positions       hook_pos_embed         [batch, pos, d_model]
    Resid(l, "pre")         residual stream         blocks.l.hook_resid_pre (or _mid, _post)
    Attn(l)                 attention layer output  blocks.l.hook_attn_out [batch, pos, d_model]
    MLP(l)                  MLP layer output        blocks.l.hook_mlp_out  [batch, pos, d_model]
    Head(l, h)              one head's output z     blocks.l.attn.hook_z [batch, pos, head, d_head]
    Head(l, h).q / .k / .v  query / key / value     blocks.l.attn.hook_q / hook_k / hook_v
    Head(l, h).pattern      attention pattern       blocks.l.attn.hook_pattern [batch, head, q, k]
    Neuron(l, i)            one MLP neuron          blocks.l.mlp.hook_post [batch, pos, d_mlp]

Indices: layers, heads and neurons are ints >= 0, checked when a component is made; whether
they exist (layer 40 of a 30-layer model, an MLP of an attention-only model) is checked against
the model by ``validate``, ``hook_name`` and the selection masks.

Positions: every component takes ``pos``: ``None`` or ``"all"`` (every position), an int, a
slice, a tuple of ints, or a word of a dataset such as ``"S2"`` or ``"end"``, which is resolved
per example from the dataset's ``positions``: an [n] tensor of one position per example, or an
[n, pos] bool tensor that selects any positions per example. For ``pattern`` the position is
the query position. Ints and slices index the prompt as Python does (-1 is the last token); an
int or a slice bound outside the prompt, a slice that selects nothing, or an empty tuple is an
error, not an empty selection.
``Head(9, 9).at("end")`` returns the same head restricted to a position.

Grouped-query attention: in a model whose query heads share key/value heads (SmolLM2 shares
each of its 3 key/value heads between 3 query heads), TransformerLens keeps keys and values
per key/value head (``hook_k`` is [batch, pos, n_key_value_heads, d_head]). ``Head(l, h).k`` and
``.v`` therefore address the key/value head that query head ``h`` reads, ``h // (n_heads //
n_key_value_heads)``; intervening on it changes the keys or values of every query head in the
group. ``Head(l, h).q``, ``.pattern`` and ``Head(l, h)`` itself are per query head.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor

from circuitkit.core.errors import ComponentError
from circuitkit.core.lens import HookedTransformer

PosSpec = Union[None, int, slice, tuple, str]  # noqa: UP007 (a runtime alias on 3.10)


def _is_int(value: object) -> bool:
    """An int (or a NumPy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_pos(where: str, pos: PosSpec) -> PosSpec:
    """``pos`` as a component keeps it (a list or range becomes a tuple of ints)."""
    if isinstance(pos, (list, range)):
        pos = tuple(pos)
    if pos is None or isinstance(pos, str):
        return pos
    if _is_int(pos):
        return int(pos)  # type: ignore[arg-type]
    if isinstance(pos, slice):
        parts = (pos.start, pos.stop, pos.step)
        if all(part is None or _is_int(part) for part in parts) and pos.step != 0:
            return slice(*(None if part is None else int(part) for part in parts))
    elif isinstance(pos, tuple) and all(_is_int(p) for p in pos):
        if not pos:
            raise ComponentError(
                f"{where}: pos is an empty list of positions; give at least one position, or "
                "None for every position"
            )
        return tuple(int(p) for p in pos)
    raise ComponentError(
        f"{where}: pos must be None, 'all', an int, a slice of ints (step not 0), a tuple of "
        f"ints or a dataset word such as 'end', got {pos!r}"
    )


@dataclass(frozen=True)
class Component:
    """Base of all component addresses. Subclasses fix the hook and the unit selection.

    Example::

        ck.Head(23, 2).at("end")           # one head's output at the last token
        ck.Resid(3, "mid", pos=[4, 5])     # the residual stream mid-block 3, two positions
        ck.MLP(0).hook_name(model)         # 'blocks.0.hook_mlp_out'
    """

    def __post_init__(self) -> None:
        # indices are checked here, where the mistake is made; the model's range in validate
        names = [f.name for f in dataclasses.fields(self)]
        indices = [name for name in ("layer", "head", "neuron") if name in names]
        call = f"{type(self).__name__}({', '.join(repr(getattr(self, i)) for i in indices)})"
        for name in indices:
            value = getattr(self, name)
            if not _is_int(value):
                raise ComponentError(
                    f"{call}: {name} must be an int >= 0, got {value!r} ({type(value).__name__})"
                )
            # a negative layer is reported with the model's layers, by validate and hook_name
            if name != "layer" and value < 0:
                raise ComponentError(
                    f"{call}: {name} {value} is out of range; expected an int >= 0"
                )
            object.__setattr__(self, name, int(value))
        if "pos" in names:
            object.__setattr__(self, "pos", _check_pos(call, self.pos))  # type: ignore[attr-defined]

    def hook_name(self, model: HookedTransformer) -> str:
        raise NotImplementedError

    def _block(self, model: HookedTransformer) -> str:
        """``"blocks.{layer}"``, once the layer is checked against the model."""
        n_layers = model.cfg.n_layers
        if not 0 <= self.layer < n_layers:
            raise ComponentError(
                f"{self!r}: layer {self.layer} is out of range; this model has layers "
                f"0..{n_layers - 1}"
            )
        return f"blocks.{self.layer}"

    def _check_has_mlp(self, model: HookedTransformer) -> None:
        if model.cfg.attn_only:
            raise ComponentError(
                f"{self!r}: this model ({model.cfg.model_name}) is attention-only and has no MLPs"
            )

    # Every component has ``layer``: the block that contains its activation, -1 for the
    # embeddings (a field in the subclasses, a property in Embed and PosEmbed).

    @property
    def pos_dim(self) -> int:
        """The dimension of the activation that indexes (query) positions."""
        return 1

    @property
    def key_pos_dim(self) -> int | None:
        """The dimension that indexes key positions (an attention pattern's), else None."""
        return None

    def unit(self, model: HookedTransformer) -> tuple[int, int] | None:
        """``(dim, index)`` of the selected head or neuron in the activation, or None."""
        return None

    @property
    def stays_at_its_positions(self) -> bool:
        """Whether a change to this activation at some positions leaves the other positions of
        its block's output unchanged: true once the block's attention has mixed positions (a
        head's output, query or pattern row, the attention or MLP output, a neuron, the
        residual stream mid-block or after it), false before it (keys, values, the block's
        input), where later positions read the change."""
        return False

    def at(self, pos: PosSpec) -> Component:
        """The same component restricted to positions ``pos``."""
        return dataclasses.replace(self, pos=pos)  # type: ignore[call-arg]

    def validate(self, model: HookedTransformer) -> None:
        """Raise a ComponentError if this address does not exist in ``model``."""
        name = self.hook_name(model)  # checks the layer
        if name not in model.hook_dict:
            raise ComponentError(f"{self!r}: this model has no activation {name!r}")

    def mask_ndim(self) -> int:
        """Number of leading activation dims (batch first) that a selection mask spans."""
        return 3 if self.has_unit else 2

    @property
    def has_unit(self) -> bool:
        return False


@dataclass(frozen=True)
class Embed(Component):
    """The token embeddings (``hook_embed``).

    Example::

        ck.run_interventions(model, ds.tokens, [ck.Intervention(ck.Embed(pos="S2"), ck.Zero())],
                             ck.metrics.logit_diff(ds), positions=ds.positions)
    """

    pos: PosSpec = None

    def hook_name(self, model: HookedTransformer) -> str:
        return "hook_embed"

    @property
    def layer(self) -> int:
        return -1

    def __repr__(self) -> str:
        return _with_pos("Embed()", self.pos)


@dataclass(frozen=True)
class PosEmbed(Component):
    """The learned positional embeddings (``hook_pos_embed``); models with rotary or
    shortformer positions have none.

    Example::

        ck.Intervention(ck.PosEmbed(pos="end"), ck.Zero())
    """

    pos: PosSpec = None

    def hook_name(self, model: HookedTransformer) -> str:
        return "hook_pos_embed"

    @property
    def layer(self) -> int:
        return -1

    def __repr__(self) -> str:
        return _with_pos("PosEmbed()", self.pos)


@dataclass(frozen=True)
class Resid(Component):
    """The residual stream of ``layer``: before its block ("pre"), between attention and MLP
    ("mid") or after the block ("post").

    Example::

        ck.Resid(5)                        # entering block 5, every position
        ck.Resid(5, "post").at("S2")       # leaving block 5, at the second S
        ck.activation_patching(model, ds, ds.corrupted("ABC"), "resid_pre", per_position=True)
    """

    layer: int
    where: Literal["pre", "mid", "post"] = "pre"
    pos: PosSpec = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.where not in ("pre", "mid", "post"):
            raise ComponentError(f"Resid: where must be 'pre', 'mid' or 'post', got {self.where!r}")

    def hook_name(self, model: HookedTransformer) -> str:
        return f"{self._block(model)}.hook_resid_{self.where}"

    @property
    def stays_at_its_positions(self) -> bool:
        return self.where != "pre"

    def __repr__(self) -> str:
        return _with_pos(f"Resid({self.layer}, {self.where!r})", self.pos)


@dataclass(frozen=True)
class Attn(Component):
    """The output of attention layer ``layer`` (all heads together, biases included).

    Example::

        ck.ablate(model, ds, [ck.Attn(9), ck.Attn(10)], "mean", reference=ds.corrupted("ABC"))
    """

    layer: int
    pos: PosSpec = None

    def hook_name(self, model: HookedTransformer) -> str:
        return f"{self._block(model)}.hook_attn_out"

    @property
    def stays_at_its_positions(self) -> bool:
        return True

    def __repr__(self) -> str:
        return _with_pos(f"Attn({self.layer})", self.pos)


@dataclass(frozen=True)
class MLP(Component):
    """The output of MLP layer ``layer``.

    Example::

        ck.ablate(model, ds, ck.MLP(0).at("S1"), "zero")
    """

    layer: int
    pos: PosSpec = None

    def hook_name(self, model: HookedTransformer) -> str:
        self._check_has_mlp(model)
        return f"{self._block(model)}.hook_mlp_out"

    @property
    def stays_at_its_positions(self) -> bool:
        return True

    def __repr__(self) -> str:
        return _with_pos(f"MLP({self.layer})", self.pos)


@dataclass(frozen=True)
class Neuron(Component):
    """One MLP neuron: its activation after the nonlinearity (``mlp.hook_post``).

    Example::

        neuron = ck.Neuron(10, 1234, pos="end")
        ck.run_interventions(model, ds.tokens, [ck.Intervention(neuron, ck.Scale(2.0))],
                             ck.metrics.logit_diff(ds), positions=ds.positions)
    """

    layer: int
    neuron: int
    pos: PosSpec = None

    def hook_name(self, model: HookedTransformer) -> str:
        self._check_has_mlp(model)
        return f"{self._block(model)}.mlp.hook_post"

    @property
    def stays_at_its_positions(self) -> bool:
        return True

    @property
    def has_unit(self) -> bool:
        return True

    def unit(self, model: HookedTransformer) -> tuple[int, int]:
        return (2, self.neuron)

    def validate(self, model: HookedTransformer) -> None:
        super().validate(model)
        d_mlp = model.cfg.d_mlp
        if not 0 <= self.neuron < d_mlp:
            raise ComponentError(
                f"{self!r}: neuron {self.neuron} is out of range; layer {self.layer} has "
                f"neurons 0..{d_mlp - 1}"
            )

    def __repr__(self) -> str:
        return _with_pos(f"Neuron({self.layer}, {self.neuron})", self.pos)


HeadPart = Literal["z", "q", "k", "v", "pattern"]


@dataclass(frozen=True)
class Head(Component):
    """One attention head: its output ``z`` (default), or its query / key / value / pattern.

    ``Head(9, 9)`` is the head's output before the output projection; ``Head(9, 9).q`` its
    queries, ``.k`` / ``.v`` its keys / values (the shared key/value head in a grouped-query
    model), ``.pattern`` its attention pattern.

    Example::

        ck.Head(23, 2)                     # output z, every position
        ck.Head(23, 2).q.at("end")         # its query at the last token
        ck.ablate(model, ds, [ck.Head(23, 2), ck.Head(23, 0)], "mean",
                  reference=ds.corrupted("ABC"))
    """

    layer: int
    head: int
    part: HeadPart = "z"
    pos: PosSpec = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.part not in ("z", "q", "k", "v", "pattern"):
            raise ComponentError(
                f"Head: part must be one of 'z', 'q', 'k', 'v', 'pattern', got {self.part!r}"
            )

    @property
    def q(self) -> Head:
        return dataclasses.replace(self, part="q")

    @property
    def k(self) -> Head:
        return dataclasses.replace(self, part="k")

    @property
    def v(self) -> Head:
        return dataclasses.replace(self, part="v")

    @property
    def z(self) -> Head:
        return dataclasses.replace(self, part="z")

    @property
    def pattern(self) -> Head:
        return dataclasses.replace(self, part="pattern")

    def hook_name(self, model: HookedTransformer) -> str:
        return f"{self._block(model)}.attn.hook_{self.part}"

    @property
    def stays_at_its_positions(self) -> bool:
        # a query or a pattern row acts on its own position's output; keys and values on all
        return self.part in ("z", "q", "pattern")

    @property
    def pos_dim(self) -> int:
        return 2 if self.part == "pattern" else 1

    @property
    def key_pos_dim(self) -> int | None:
        return 3 if self.part == "pattern" else None

    @property
    def has_unit(self) -> bool:
        return True

    def unit(self, model: HookedTransformer) -> tuple[int, int]:
        if self.part == "pattern":
            return (1, self.head)
        if self.part in ("k", "v"):
            return (2, kv_head_of(model, self.head))
        return (2, self.head)

    def validate(self, model: HookedTransformer) -> None:
        super().validate(model)
        n_heads = model.cfg.n_heads
        if not 0 <= self.head < n_heads:
            raise ComponentError(
                f"{self!r}: head {self.head} is out of range; layer {self.layer} has heads "
                f"0..{n_heads - 1}"
            )

    def __repr__(self) -> str:
        suffix = "" if self.part == "z" else f".{self.part}"
        return _with_pos(f"Head({self.layer}, {self.head}){suffix}", self.pos)

    @property
    def label(self) -> str:
        """Short label in the field's usual notation, e.g. ``"9.9"`` or ``"9.9.q"``."""
        suffix = "" if self.part == "z" else f".{self.part}"
        return f"{self.layer}.{self.head}{suffix}"


def kv_head_of(model: HookedTransformer, head: int) -> int:
    """The key/value head that query head ``head`` reads (itself without grouped-query)."""
    n_kv = model.cfg.n_key_value_heads
    if n_kv is None:
        return head
    return head // (model.cfg.n_heads // n_kv)


InputPart = Literal["q", "k", "v", "mlp"]


def input_hook_name(layer: int, part: InputPart) -> str:
    """The hook of the inputs of ``layer``'s heads' queries, keys or values (``part`` "q", "k",
    "v": [batch, pos, head, d_model], one residual stream copy per head, or per key/value head
    in a grouped-query model), or of its MLP ("mlp": [batch, pos, d_model]).

    TransformerLens computes these only while ``cfg.use_split_qkv_input`` (queries, keys,
    values) or ``cfg.use_hook_mlp_in`` (the MLP) is set; ``circuitkit.core.graph.split_inputs``
    sets them for the length of a block. Each is the residual stream that one receiver reads,
    before its layer norm, so changing it changes what that receiver alone sees.
    """
    if part == "mlp":
        return f"blocks.{layer}.hook_mlp_in"
    if part not in ("q", "k", "v"):
        raise ComponentError(f"input_hook_name: part must be 'q', 'k', 'v' or 'mlp', got {part!r}")
    return f"blocks.{layer}.hook_{part}_input"


def _with_pos(text: str, pos: PosSpec) -> str:
    return text if pos is None else f"{text}.at({pos!r})"


# ---------------------------------------------------------------------------------------------
# Position selections


def position_mask(
    component: Component,
    n: int,
    n_pos: int,
    positions: Mapping[str, Tensor] | None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A bool [n, n_pos] mask of the positions ``component`` selects in each example.

    Words such as "end" are looked up in ``positions``: a dict of [n] index tensors (a
    dataset's) or of [n, n_pos] bool masks.
    """
    pos = component.pos  # type: ignore[attr-defined]
    mask = torch.zeros(n, n_pos, dtype=torch.bool, device=device)
    if pos is None or pos == "all":
        mask[:] = True
        return mask
    if isinstance(pos, str):
        if positions is None or pos not in positions:
            known = sorted(positions) if positions is not None else []
            raise ComponentError(
                f"{component!r}: unknown position word {pos!r}; "
                + (f"the dataset has {known}" if known else "pass a dataset to resolve words")
            )
        given = positions[pos]
        if given.dtype == torch.bool:
            if given.shape != (n, n_pos):
                raise ComponentError(
                    f"{component!r}: positions[{pos!r}] is a mask of shape "
                    f"{tuple(given.shape)}, expected ({n}, {n_pos})"
                )
            return given.to(device).clone()
        idx = given.to(device=device, dtype=torch.long)
        if idx.shape != (n,):
            raise ComponentError(
                f"{component!r}: positions[{pos!r}] has shape {tuple(idx.shape)}, expected ({n},)"
            )
        if int(idx.min()) < 0 or int(idx.max()) >= n_pos:
            raise ComponentError(
                f"{component!r}: position word {pos!r} points outside the prompt (0..{n_pos - 1})"
            )
        mask[torch.arange(n, device=device), idx] = True
        return mask
    if isinstance(pos, slice):
        # bounds are checked as int positions are: a slice past the prompt is a mistake, not
        # an empty selection
        start_ok = pos.start is None or -n_pos <= pos.start < n_pos
        stop_ok = pos.stop is None or -n_pos <= pos.stop <= n_pos
        bounds = [pos.start, pos.stop] + ([] if pos.step is None else [pos.step])
        text = ":".join("" if p is None else str(p) for p in bounds)
        if not (start_ok and stop_ok):
            raise ComponentError(
                f"{component!r}: position slice {text} is outside the prompt, which "
                f"has positions 0..{n_pos - 1}"
            )
        selected = list(range(n_pos)[pos])
        if not selected:
            raise ComponentError(
                f"{component!r}: position slice {text} selects no position of the "
                f"prompt, which has positions 0..{n_pos - 1}"
            )
        mask[:, selected] = True
        return mask
    indices = (pos,) if isinstance(pos, int) else pos
    for p in indices:
        if not -n_pos <= p < n_pos:
            raise ComponentError(
                f"{component!r}: position {p} is outside the prompt, which has positions "
                f"0..{n_pos - 1}"
            )
        mask[:, p] = True
    return mask


def check_component(component: Component, model: HookedTransformer, where: str) -> None:
    """``component.validate(model)``, with its ``ComponentError`` naming ``where``, the function
    called.

    Example::

        check_component(ck.Head(40, 0), model, "run_interventions")
        # ComponentError: run_interventions: Head(40, 0): layer 40 is out of range; ...
    """
    try:
        component.validate(model)
    except ComponentError as error:
        if str(error).startswith(f"{where}:"):
            raise
        raise ComponentError(f"{where}: {error}") from None


def selection_mask(
    component: Component,
    model: HookedTransformer,
    act_shape: Sequence[int],
    positions: Mapping[str, Tensor] | None,
    device: torch.device | str = "cpu",
    where: str | None = None,
) -> Tensor:
    """A bool mask over the activation ``component`` names, broadcastable to ``act_shape``.

    True marks the entries the component selects (positions, and its head or neuron). An
    address out of range for the model or the prompt is a ``ComponentError``, which names
    ``where`` (the function called) when given.
    """
    n = act_shape[0]
    pos_dim = component.pos_dim
    if where is None:
        component.validate(model)
        pos_mask = position_mask(component, n, act_shape[pos_dim], positions, device)
    else:
        check_component(component, model, where)
        try:
            pos_mask = position_mask(component, n, act_shape[pos_dim], positions, device)
        except ComponentError as error:
            raise ComponentError(f"{where}: {error}") from None
    unit = component.unit(model)
    if unit is None:
        mask = pos_mask  # [n, pos]
    else:
        unit_dim, index = unit
        onehot = torch.zeros(act_shape[unit_dim], dtype=torch.bool, device=device)
        onehot[index] = True
        if unit_dim > pos_dim:  # [n, pos, unit]
            mask = pos_mask[:, :, None] & onehot[None, None, :]
        else:  # pattern: [n, head, q_pos]
            mask = onehot[None, :, None] & pos_mask[:, None, :]
    return mask.reshape(*mask.shape, *([1] * (len(act_shape) - mask.ndim)))


# ---------------------------------------------------------------------------------------------
# Sweeps: every component of one kind in a model


ComponentKind = Literal[
    "resid_pre", "resid_mid", "resid_post", "attn", "mlp", "head", "q", "k", "v", "pattern"
]


def all_components(
    model: HookedTransformer,
    kind: str,
    layers: Sequence[int] | None = None,
    where: str | None = None,
) -> tuple[list[Component], tuple, dict]:
    """Every component of ``kind`` in ``model`` (in ``layers`` only, if given), with the axes
    and labels of a sweep over them. Errors name ``where``, the function called (else the kind).

    Returns ``(components, axes, labels)``: components in row-major order of ``axes``; the
    "layer" axis is labelled with the layers' own numbers.
    """
    cfg = model.cfg
    where = where or str(kind)
    kinds = (
        "'resid_pre', 'resid_mid', 'resid_post', 'attn', 'mlp', 'head', 'q', 'k', 'v', 'pattern'"
    )
    if not isinstance(kind, str):
        raise ComponentError(
            f"{where}: a component kind must be a string, one of {kinds}, got "
            f"{type(kind).__name__} {kind!r:.80}"
        )
    layers = check_layers(model, layers, where)
    resid = {"resid_pre": "pre", "resid_mid": "mid", "resid_post": "post"}
    if kind in resid:
        comps: list[Component] = [Resid(layer, resid[kind]) for layer in layers]
        return comps, ("layer",), {"layer": [str(layer) for layer in layers]}
    if kind in ("attn", "attn_out"):
        return [Attn(layer) for layer in layers], ("layer",), {"layer": [str(x) for x in layers]}
    if kind in ("mlp", "mlp_out"):
        if cfg.attn_only:
            raise ComponentError(f"{where}: this model is attention-only and has no MLP layers")
        return [MLP(layer) for layer in layers], ("layer",), {"layer": [str(x) for x in layers]}
    if kind in ("head", "z", "q", "k", "v", "pattern"):
        part = "z" if kind == "head" else kind
        comps = [Head(layer, h, part) for layer in layers for h in range(cfg.n_heads)]
        return (
            comps,
            ("layer", "head"),
            {"layer": [str(x) for x in layers], "head": [str(h) for h in range(cfg.n_heads)]},
        )
    raise ComponentError(f"{where}: unknown component kind {kind!r:.80}; expected one of {kinds}")


def check_layers(
    model: HookedTransformer, layers: Sequence[int] | None, what: str
) -> Sequence[int]:
    """``layers`` checked against the model (every layer when None)."""
    n_layers = model.cfg.n_layers
    if layers is None:
        return range(n_layers)
    chosen = list(layers) if not isinstance(layers, int) else [layers]
    if not chosen:
        raise ComponentError(f"{what}: layers is empty; give some of 0..{n_layers - 1}")
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ComponentError(
                f"{what}: layer {layer!r} is out of range; this model has layers 0..{n_layers - 1}"
            )
    if len(set(chosen)) != len(chosen):
        raise ComponentError(f"{what}: layers repeat: {chosen}")
    return chosen
