"""Indirect Object Identification (IOI) prompts, fitted to a model's tokenizer.

The IOI task (Wang et al., 2022) asks a model to complete a sentence that introduces two
people and then has one of them, the subject S, act towards the other, the indirect object IO::

    When Mary and John got to the park, John handed a ball to     ->  " Mary"

The two introductions come in both orders: **ABBA** ("Mary and John ..., John ...") and
**BABA** ("John and Mary ..., John ..."). A model that does the task puts more logit on the
IO name than on the S name at the last position; the logit difference IO - S is the usual
measure of how well it does.

Circuit analysis needs the same prompt with some names replaced (a *corrupted* run) and needs
every intervention to hit the same word in both runs, so the dataset is built to be
position-aligned:

- every name, place and object is a single token with a leading space in the model's
  tokenizer (the built-in word lists leave out those that are not; a word you give that is
  not is an error), so a template has one token layout and all its examples have the same
  length and the same positions;
- a corruption changes only name tokens, one for one, so ``ds.corrupted(kind)`` has the same
  ``tokens`` shape, the same ``positions`` and the same templates as ``ds``.

Different templates have different lengths. Prompts are padded on the right with the
tokenizer's pad token; in a causal model padding on the right leaves every real position
unchanged, and ``positions["end"]`` is the last real token of each example, the position at
which the IO name is predicted.
"""

from __future__ import annotations

import operator
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from circuitkit.core.errors import DatasetError, TokenizationError

# Templates are written in ABBA order; the BABA prompt swaps the two names of "{IO} and {S1}".
# Every name slot follows a space, so each name is read as " Name", one token.
TEMPLATES: tuple[str, ...] = (
    "When {IO} and {S1} got to the {PLACE}, {S2} handed a {OBJECT} to",
    "After {IO} and {S1} arrived at the {PLACE}, {S2} passed a {OBJECT} to",
    "While {IO} and {S1} were waiting outside the {PLACE}, {S2} offered a {OBJECT} to",
    "Once {IO} and {S1} had reached the {PLACE}, {S2} threw a {OBJECT} to",
    "On Saturday {IO} and {S1} walked over to the {PLACE}, where {S2} lent a {OBJECT} to",
    "Yesterday {IO} and {S1} stopped by the {PLACE}, and {S2} showed a {OBJECT} to",
    "As {IO} and {S1} were leaving the {PLACE}, {S2} tossed a {OBJECT} to",
    "Last week {IO} and {S1} had lunch near the {PLACE}. Afterwards, {S2} sent a {OBJECT} to",
    "Because {IO} and {S1} were both at the {PLACE}, {S2} brought a {OBJECT} to",
    "This morning {IO} and {S1} drove to the {PLACE}. There, {S2} gave a {OBJECT} to",
    "Before {IO} and {S1} went home from the {PLACE}, {S2} returned a {OBJECT} to",
    "In the evening {IO} and {S1} relaxed at the {PLACE}, and then {S2} sold a {OBJECT} to",
    "Soon after {IO} and {S1} entered the {PLACE}, {S2} quietly slipped a {OBJECT} to",
    "The day {IO} and {S1} visited the {PLACE}, {S2} mailed a {OBJECT} to",
    "Since {IO} and {S1} were meeting at the {PLACE}, {S2} carried a {OBJECT} over to",
    "After a long day at the {PLACE}, {IO} and {S1} sat down, and {S2} handed a {OBJECT} to",
    "Later that night {IO} and {S1} cleaned up the {PLACE}, so {S2} left a {OBJECT} for",
    "Every Friday {IO} and {S1} meet at the {PLACE}, and {S2} always brings a {OBJECT} to",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "Anna", "Lisa", "Paul", "James", "Robert", "Michael", "William",
    "David", "Richard", "Joseph", "Thomas", "Daniel", "Steven", "Andrew", "Kevin", "Brian",
    "George", "Edward", "Jason", "Ryan", "Eric", "Peter", "Sarah", "Emma", "Laura", "Kate",
    "Alice", "Rachel", "Jessica", "Amy", "Emily", "Helen", "Susan", "Linda", "Karen", "Nancy",
    "Ruth", "Jane", "Sophie", "Ben", "Sam", "Harry", "Luke", "Adam", "Alex", "Henry", "Carl",
    "Oscar", "Victor", "Julia", "Maria", "Anne", "Martin", "Simon", "Chris", "Lucy", "Claire",
    "Olivia", "Hannah",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "store", "park", "school", "beach", "office", "library", "garden", "station", "hospital",
    "restaurant", "market", "museum", "hotel", "church", "gym", "zoo", "bank", "theater",
    "airport", "mall", "lake", "farm", "bakery", "cinema", "pool",
)  # fmt: skip

# Objects start with a consonant: every template says "a {OBJECT}".
OBJECTS: tuple[str, ...] = (
    "book", "ring", "pen", "bag", "ball", "cake", "hat", "key", "card", "phone", "box",
    "bottle", "basket", "cup", "map", "note", "ticket", "watch", "gift", "letter", "drink",
    "flower", "toy", "candle", "coin", "sandwich", "pencil", "camera", "towel",
)  # fmt: skip

ORDERS: tuple[str, ...] = ("ABBA", "BABA")

#: ``corrupted(kind)``: which name slots each corruption rewrites, and with what.
CORRUPTIONS: dict[str, str] = {
    "ABC": "IO, S1 and S2 each become a different new name (three distinct names, none of IO, S)",
    "flip": "S2 becomes the IO name ('..., Mary handed a ball to'); IO and S1 are unchanged",
    "random_io": "IO becomes a new name; S1 and S2 are unchanged",
    "random_s": "S1 and S2 both become the same new name; IO is unchanged",
    "random_names": "IO and S both become new names, consistently (a fresh ABB prompt)",
}

#: Two names for the prompt and three more for the ABC corruption.
MIN_NAMES = 5
# Memory of one prompt: its example record, strings and token rows (measured, rounded up).
_BYTES_PER_PROMPT = 4096

SLOTS = ("IO", "S1", "S2", "PLACE", "OBJECT")
_NAME_SLOTS = ("IO", "S1", "S2")


@dataclass(frozen=True)
class IOIExample:
    """One prompt of an ``IOIDataset``: what ``ds[i]`` and ``for example in ds`` give.

    Attributes:
        prompt: the text, without BOS.
        tokens: [pos] the prompt's tokens as the model reads them, without padding.
        io_name, s_name: the clean answer names (the metric's IO and S).
        io_token, s_token: their token ids (" Mary" as one token).
        positions: the token index of each word (``IOIDataset.positions``), as ints.
        template: index into ``IOIDataset.template_strings``.
        order: "ABBA" or "BABA".
    """

    prompt: str
    tokens: Int[Tensor, "pos"]
    io_name: str
    s_name: str
    io_token: int
    s_token: int
    positions: dict[str, int]
    template: int
    order: str


class IOIDataset:
    """IOI prompts in both orders, fitted to a model's tokenizer and position-aligned.

    Example ``i`` uses template ``i // 2`` (in a seed-dependent order of the templates, cycling)
    and order ABBA for even ``i``, BABA for odd ``i``, so templates are balanced and both orders
    are present whenever ``n >= 2``. Its names, place and object are drawn from a
    ``random.Random`` seeded by ``(seed, i)``, never from the global RNG: the dataset is the
    same for the same seed, and ``IOIDataset(model, n=10)`` is ``IOIDataset(model, n=100)[:10]``.

    Every name, place and object must be one token with a leading space in the model's
    tokenizer: the built-in lists (``NAMES``, ``PLACES``, ``OBJECTS``) leave out the words that
    are not, while a word given in ``names``, ``places`` or ``objects`` that is several tokens
    raises ``TokenizationError`` naming it and its tokens. Fewer than ``MIN_NAMES`` names
    raises too.
    Tokens follow ``model.to_tokens``: BOS is prepended when ``model.cfg.default_prepend_bos``
    (or ``prepend_bos``) says so, and the tokens are checked against ``model.to_tokens`` of
    every prompt. Examples are padded on the right with the tokenizer's pad token.

    Args:
        model: a ``HookedTransformer`` with a tokenizer.
        n: number of prompts.
        seed: seed of the names, places, objects and template order.
        templates: template strings in ABBA order with the slots ``{IO}``, ``{S1}``, ``{S2}``
            and optionally ``{PLACE}``, ``{OBJECT}``; each must contain "{IO} and {S1}", have
            ``{S2}`` after it, and have a space before every slot. Defaults to ``TEMPLATES``.
        names, places, objects: word pools (defaults ``NAMES``, ``PLACES``, ``OBJECTS``).
        prepend_bos: override ``model.cfg.default_prepend_bos``.

    Attributes:
        prompts: list of n prompt strings (without BOS).
        tokens: [n, pos] token ids, on the CPU, right-padded with ``pad_token_id``.
        io_tokens, s_tokens: [n] token ids of the clean IO and S names. A corrupted dataset
            keeps the clean ones, so one metric reads the logits of either run.
        positions: dict of [n] token indices: "IO", "S1", "S2" (the three name slots; "S1" is
            the first mention of S, "S2" the second), "IO+1", "S1+1", "and" (the " and" between
            the first two names), "start" (the first token after BOS) and "end" (the last real
            token, where IO is predicted).
        templates: [n] template index into ``template_strings``.
        orders: list of n "ABBA" / "BABA".
        io_names, s_names: the clean answer names.
        slot_names: dict "IO" / "S1" / "S2" -> the n names that stand in each slot of the
            prompt (for a clean dataset IO, S and S; a corruption changes these).
        places, objects: the place and object of each example.
        ids: [n] index of each example in the dataset it was generated as (kept by slicing).
        names: the name pool (the built-in names that are one token, or the names given).
        corruption: None for clean prompts, else the ``corrupted`` kind.
        seed, model_name, prepend_bos, pad_token_id, name_tokens: provenance.

    Example:
        >>> ds = IOIDataset(model, n=100, seed=0)
        >>> abc = ds.corrupted("ABC")
        >>> ds.tokens.shape == abc.tokens.shape
        True
        >>> ds.prompts[0]
        'When Mary and John got to the park, John handed a ball to'
    """

    def __init__(
        self,
        model: Any,
        n: int = 100,
        seed: int = 0,
        *,
        templates: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        places: Sequence[str] | None = None,
        objects: Sequence[str] | None = None,
        prepend_bos: bool | None = None,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DatasetError(f"IOIDataset: n must be a positive integer, got {n!r}")
        need, have = n * _BYTES_PER_PROMPT, _physical_memory()
        if have and need > have // 2:
            raise DatasetError(
                f"IOIDataset: n={n:,} prompts would need about {need / 2**30:,.1f} GiB of memory; "
                f"this machine has {have / 2**30:.1f} GiB (at most half of it is used)"
            )
        if getattr(model, "tokenizer", None) is None:
            raise TokenizationError(
                "IOIDataset: the model has no tokenizer; build it with one "
                "(HookedTransformer(cfg, tokenizer=...) or model.set_tokenizer(...))"
            )
        template_strings = tuple(
            _strings(TEMPLATES if templates is None else templates, "templates")
        )
        if not template_strings:
            raise DatasetError("IOIDataset: templates is empty; give at least one template")
        for template in template_strings:
            _check_template(template)
        bos = model.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)

        def single_tokens(
            words: Sequence[str] | None, default: Sequence[str], name: str
        ) -> dict[str, int]:
            # The built-in lists are fitted to the tokenizer: words that are several tokens in
            # it are left out. A word the user gave is never left out silently.
            given = words is not None
            kept: dict[str, int] = {}
            split: dict[str, list[str]] = {}
            for word in _strings(words, name) if given else default:
                ids = _encode(model, " " + word, prepend_bos=False)
                if len(ids) == 1:
                    kept.setdefault(word, ids[0])
                elif given:
                    split[word] = model.to_str_tokens(torch.tensor(ids))
            if split:
                listed = "; ".join(
                    f"{word!r} is {len(pieces)} tokens {pieces}" for word, pieces in split.items()
                )
                spaced = [word for word in split if word[:1].isspace()]
                hint = (
                    f" (give them without the leading space, which is added: {spaced})"
                    if spaced
                    else ""
                )
                raise TokenizationError(
                    f"IOIDataset: every word in {name} must be one token with a leading space "
                    f"in this tokenizer, but {listed}{hint}; leave them out or choose others"
                )
            return kept

        name_tokens = single_tokens(names, NAMES, "names")
        if len(name_tokens) < MIN_NAMES:
            needed = (
                f"at least {MIN_NAMES} are needed (two per prompt and three more for the ABC "
                "corruption)"
            )
            if names is None:
                raise TokenizationError(
                    f"IOIDataset: only {len(name_tokens)} of the {len(NAMES)} built-in names are "
                    f"one token with a leading space in this tokenizer ({sorted(name_tokens)}); "
                    f"{needed}; give names= that are"
                )
            raise DatasetError(
                f"IOIDataset: names has {len(name_tokens)} different names "
                f"({sorted(name_tokens)}); {needed}"
            )
        place_tokens = single_tokens(places, PLACES, "places")
        object_tokens = single_tokens(objects, OBJECTS, "objects")
        for slot, pool in (("PLACE", place_tokens), ("OBJECT", object_tokens)):
            if not pool and any("{" + slot + "}" in t for t in template_strings):
                raise TokenizationError(
                    f"IOIDataset: none of the words for {{{slot}}} is one token with a leading "
                    "space in this tokenizer, and the templates use that slot"
                )

        layouts = {
            (t, order): _layout(model, template_strings[t], order, bos)
            for t in range(len(template_strings))
            for order in ORDERS
        }

        # Templates cycle in a seed-dependent order; orders alternate.
        template_order = list(range(len(template_strings)))
        random.Random(f"ioi-templates:{seed}").shuffle(template_order)
        word_tokens = {**name_tokens, **place_tokens, **object_tokens}
        templates_used, orders, prompts, rows, words_used = [], [], [], [], []
        for i in range(n):
            rng = random.Random(f"ioi-example:{seed}:{i}")
            t = template_order[(i // 2) % len(template_order)]
            order = ORDERS[i % 2]
            io_name, s_name = rng.sample(sorted(name_tokens), 2)
            words = {
                "IO": io_name,
                "S1": s_name,
                "S2": s_name,
                "PLACE": rng.choice(sorted(place_tokens)) if place_tokens else "",
                "OBJECT": rng.choice(sorted(object_tokens)) if object_tokens else "",
            }
            layout = layouts[t, order]
            templates_used.append(t)
            orders.append(order)
            prompts.append(_fill(template_strings[t], order, words))
            rows.append([word_tokens[words[x]] if isinstance(x, str) else x for x in layout.tokens])
            words_used.append(words)

        pad_token_id = _pad_token_id(model.tokenizer)
        tokens = _pad(rows, pad_token_id)
        _check_against_model(model, prompts, tokens, bos, pad_token_id)
        if tokens.shape[1] > model.cfg.n_ctx:
            raise TokenizationError(
                f"IOIDataset: the longest prompt has {tokens.shape[1]} tokens but the model's "
                f"context is {model.cfg.n_ctx}"
            )

        def column(slot: str) -> list[str]:
            return [words[slot] for words in words_used]

        self._set(
            prompts=prompts,
            tokens=tokens,
            io_tokens=torch.tensor([name_tokens[x] for x in column("IO")], dtype=torch.long),
            s_tokens=torch.tensor([name_tokens[x] for x in column("S1")], dtype=torch.long),
            positions={
                key: torch.tensor(
                    [
                        layouts[t, o].positions[key]
                        for t, o in zip(templates_used, orders, strict=True)
                    ],
                    dtype=torch.long,
                )
                for key in _POSITION_KEYS
            },
            templates=torch.tensor(templates_used, dtype=torch.long),
            orders=orders,
            io_names=column("IO"),
            s_names=column("S1"),
            slot_names={slot: column(slot) for slot in _NAME_SLOTS},
            places=column("PLACE"),
            objects=column("OBJECT"),
            ids=torch.arange(n),
            template_strings=template_strings,
            names=tuple(name_tokens),
            name_tokens=name_tokens,
            corruption=None,
            seed=seed,
            model_name=str(getattr(model.cfg, "model_name", "")),
            prepend_bos=bos,
            pad_token_id=pad_token_id,
            tokenizer=model.tokenizer,
        )

    # -- construction helpers -----------------------------------------------------------------

    def _set(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        self.n = len(self.prompts)

    def _replace(self, **changes: Any) -> IOIDataset:
        new = object.__new__(type(self))
        new._set(**{**{k: getattr(self, k) for k in _ALL_FIELDS}, **changes})
        return new

    def _subset(self, index: list[int]) -> IOIDataset:
        rows = torch.tensor(index, dtype=torch.long)
        return self._replace(
            prompts=[self.prompts[i] for i in index],
            tokens=self.tokens[rows],
            io_tokens=self.io_tokens[rows],
            s_tokens=self.s_tokens[rows],
            positions={k: v[rows] for k, v in self.positions.items()},
            templates=self.templates[rows],
            orders=[self.orders[i] for i in index],
            io_names=[self.io_names[i] for i in index],
            s_names=[self.s_names[i] for i in index],
            slot_names={k: [v[i] for i in index] for k, v in self.slot_names.items()},
            places=[self.places[i] for i in index],
            objects=[self.objects[i] for i in index],
            ids=self.ids[rows],
        )

    # -- sequence protocol --------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> IOIExample | IOIDataset:
        """``ds[i]`` is an ``IOIExample``; ``ds[2:10]``, ``ds[[0, 5]]`` and ``ds[mask]`` are
        ``IOIDataset`` views with every per-example field selected the same way."""
        if isinstance(index, Tensor) and index.is_floating_point():
            raise DatasetError(
                f"IOIDataset: a tensor index must hold integers or booleans, got {index.dtype}"
            )
        if isinstance(index, bool) or isinstance(index, (str, bytes, float)):
            raise DatasetError(
                f"IOIDataset: index must be an int, a slice, a list of ints or a boolean mask, "
                f"got {index!r}"
            )
        if isinstance(index, int) or (isinstance(index, Tensor) and index.ndim == 0):
            i = int(index)
            if not -self.n <= i < self.n:
                raise IndexError(f"IOIDataset: index {i} out of range for {self.n} prompts")
            i %= self.n
            end = int(self.positions["end"][i])
            return IOIExample(
                prompt=self.prompts[i],
                tokens=self.tokens[i, : end + 1],
                io_name=self.io_names[i],
                s_name=self.s_names[i],
                io_token=int(self.io_tokens[i]),
                s_token=int(self.s_tokens[i]),
                positions={k: int(v[i]) for k, v in self.positions.items()},
                template=int(self.templates[i]),
                order=self.orders[i],
            )
        if isinstance(index, slice):
            return self._subset(list(range(self.n))[index])
        if isinstance(index, Tensor) and index.dtype == torch.bool:
            if index.shape != (self.n,):
                raise IndexError(
                    f"IOIDataset: a boolean mask must have shape ({self.n},), "
                    f"got {tuple(index.shape)}"
                )
            return self._subset(torch.nonzero(index).flatten().tolist())
        picked = _indices(index)
        if picked is None:
            raise DatasetError(
                f"IOIDataset: index must be an int, a slice, a list of ints or a boolean mask, "
                f"got {index!r}"
            )
        if any(not -self.n <= i < self.n for i in picked):
            raise IndexError(f"IOIDataset: an index in {picked} is out of range for {self.n}")
        return self._subset([i % self.n for i in picked])

    def __iter__(self) -> Iterator[IOIExample]:
        for i in range(self.n):
            yield self[i]  # type: ignore[misc]

    def __repr__(self) -> str:
        kind = "clean" if self.corruption is None else f"corrupted={self.corruption!r}"
        return (
            f"IOIDataset(n={self.n}, seed={self.seed}, {kind}, "
            f"templates={len(set(self.templates.tolist()))}, tokens={tuple(self.tokens.shape)})"
        )

    # -- corruption ---------------------------------------------------------------------------

    def corrupted(self, kind: str) -> IOIDataset:
        """The same prompts with some names replaced, aligned example by example.

        ``kind`` is one of ``CORRUPTIONS``:

        - "ABC": IO, S1 and S2 become three distinct names, none of the original two (the IOI
          paper's main corruption: no name repeats, so the model has nothing to copy);
        - "flip": S2 becomes the IO name, "When Mary and John ..., Mary handed a ball to";
        - "random_io": IO becomes a new name;
        - "random_s": S1 and S2 both become the same new name;
        - "random_names": IO and S both become new names, consistently.

        The result has the same ``tokens`` shape, ``positions``, templates, places and objects;
        its tokens differ only at the rewritten name positions. It keeps the **clean**
        ``io_tokens`` and ``s_tokens`` (and ``io_names``, ``s_names``), so a metric built from
        either dataset is the clean task's metric on the corrupted run; ``slot_names`` says
        which names the corrupted prompts contain. New names are drawn from the name pool with
        a ``random.Random`` seeded by ``(seed, kind, example id)``, so the corruption is
        deterministic and ``ds[:10].corrupted(k)`` is ``ds.corrupted(k)[:10]``.

        Example:
            >>> abc = ds.corrupted("ABC")
            >>> abc.prompts[0]
            'When Lisa and Paul got to the park, Tom handed a ball to'
        """
        if not isinstance(kind, str) or kind not in CORRUPTIONS:
            raise DatasetError(
                f"IOIDataset.corrupted: unknown kind {kind!r}; choose one of {list(CORRUPTIONS)}"
            )
        if self.corruption is not None:
            raise DatasetError(
                f"IOIDataset.corrupted: this dataset is already corrupted ({self.corruption!r}); "
                "corrupt the clean dataset instead"
            )
        pool = sorted(self.names)
        tokens = self.tokens.clone()
        slot_names: dict[str, list[str]] = {slot: [] for slot in _NAME_SLOTS}
        prompts = []
        for i in range(self.n):
            io_name, s_name = self.io_names[i], self.s_names[i]
            rng = random.Random(f"ioi-corruption:{self.seed}:{kind}:{int(self.ids[i])}")
            fresh = [name for name in pool if name not in (io_name, s_name)]
            if kind == "ABC":
                new = dict(zip(_NAME_SLOTS, rng.sample(fresh, 3), strict=True))
            elif kind == "flip":
                new = {"IO": io_name, "S1": s_name, "S2": io_name}
            elif kind == "random_io":
                new = {"IO": rng.choice(fresh), "S1": s_name, "S2": s_name}
            elif kind == "random_s":
                s_new = rng.choice(fresh)
                new = {"IO": io_name, "S1": s_new, "S2": s_new}
            else:
                io_new, s_new = rng.sample(fresh, 2)
                new = {"IO": io_new, "S1": s_new, "S2": s_new}
            for slot in _NAME_SLOTS:
                slot_names[slot].append(new[slot])
                tokens[i, self.positions[slot][i]] = self.name_tokens[new[slot]]
            words = {**new, "PLACE": self.places[i], "OBJECT": self.objects[i]}
            template = self.template_strings[int(self.templates[i])]
            prompts.append(_fill(template, self.orders[i], words))
        return self._replace(prompts=prompts, tokens=tokens, slot_names=slot_names, corruption=kind)

    # -- provenance ---------------------------------------------------------------------------

    @property
    def provenance(self) -> dict[str, Any]:
        """A JSON-ready record of how this dataset was made (for reports and saved results)."""
        return {
            "dataset": "IOIDataset",
            "n": self.n,
            "seed": self.seed,
            "corruption": self.corruption,
            "model_name": self.model_name,
            "tokenizer": getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__),
            "prepend_bos": self.prepend_bos,
            "pad_token_id": self.pad_token_id,
            "ids": self.ids.tolist(),
            "templates": list(self.template_strings),
            "names": list(self.names),
        }


_POSITION_KEYS = ("IO", "IO+1", "S1", "S1+1", "S2", "and", "start", "end")
_ALL_FIELDS = (
    "prompts", "tokens", "io_tokens", "s_tokens", "positions", "templates", "orders",
    "io_names", "s_names", "slot_names", "places", "objects", "ids", "template_strings",
    "names", "name_tokens", "corruption", "seed", "model_name", "prepend_bos", "pad_token_id",
    "tokenizer",
)  # fmt: skip


@dataclass(frozen=True)
class _Layout:
    """One template in one order, tokenized: fixed tokens with one-token slots."""

    tokens: list[int | str]  # a token id, or the name of the slot that goes there
    positions: dict[str, int]


def _check_template(template: str) -> None:
    for slot in _NAME_SLOTS:
        if template.count("{" + slot + "}") != 1:
            raise DatasetError(
                f"IOIDataset: template {template!r} must contain {{{slot}}} exactly once"
            )
    if "{IO} and {S1}" not in template or template.index("{S2}") < template.index("{S1}"):
        raise DatasetError(
            f"IOIDataset: template {template!r} must introduce the names as "
            "'{IO} and {S1}' and mention {S2} after them"
        )
    for slot in SLOTS:
        start = template.find("{" + slot + "}")
        if start != -1 and (start == 0 or template[start - 1] != " "):
            raise DatasetError(
                f"IOIDataset: template {template!r} needs a space before {{{slot}}}, so the "
                "word is read as one token with a leading space"
            )
    try:
        template.format(**{slot: "x" for slot in SLOTS})
    except (KeyError, IndexError, ValueError) as error:
        raise DatasetError(
            f"IOIDataset: template {template!r} has an unknown slot or a stray brace ({error}); "
            f"the slots are {['{' + s + '}' for s in SLOTS]}"
        ) from None


def _indices(index: Any) -> list[int] | None:
    """``index`` (a list, tuple, range or integer tensor) as a list of ints; None if it is not
    a collection of integers."""
    if not isinstance(index, Iterable):
        return None
    items = list(index)
    if any(isinstance(i, bool) for i in items):
        return None
    try:
        return [operator.index(i) for i in items]
    except TypeError:
        return None


def _strings(words: Any, name: str) -> list[str]:
    """``words`` as a list of non-empty strings, or a ``DatasetError`` naming ``name``."""
    if isinstance(words, str) or not isinstance(words, Iterable):
        raise DatasetError(
            f"IOIDataset: {name} must be a list of strings such as ['Mary', 'John'], got {words!r}"
        )
    words = list(words)
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise DatasetError(
                f"IOIDataset: {name} must hold non-empty strings, got {word!r} in {words!r}"
            )
    return words


def _fill(template: str, order: str, words: dict[str, str]) -> str:
    """The prompt text; BABA puts S1 in the first slot and IO in the second."""
    if order == "BABA":
        template = template.replace("{IO} and {S1}", "{S1} and {IO}")
    return template.format(**words)


def _encode(model: Any, text: str, *, prepend_bos: bool) -> list[int]:
    return model.to_tokens(text, prepend_bos=prepend_bos, move_to_device=False)[0].tolist()


def _layout(model: Any, template: str, order: str, bos: bool) -> _Layout:
    """Tokenize the text between the slots once; each slot is one token with a leading space."""
    if order == "BABA":
        template = template.replace("{IO} and {S1}", "{S1} and {IO}")
    tokens: list[int | str] = []
    rest = template
    first = True
    while rest:
        start = rest.find("{")
        text = rest if start == -1 else rest[: start - 1]  # the space goes with the slot
        if text or (first and bos):
            tokens.extend(_encode(model, text, prepend_bos=first and bos))
        first = False
        if start == -1:
            break
        close = rest.index("}", start)
        tokens.append(rest[start + 1 : close])
        rest = rest[close + 1 :]
    at = {slot: tokens.index(slot) for slot in SLOTS if slot in tokens}
    positions = {
        "IO": at["IO"],
        "IO+1": at["IO"] + 1,
        "S1": at["S1"],
        "S1+1": at["S1"] + 1,
        "S2": at["S2"],
        "and": min(at["IO"], at["S1"]) + 1,
        "start": 1 if bos else 0,
        "end": len(tokens) - 1,
    }
    return _Layout(tokens=tokens, positions=positions)


def _pad_token_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _pad(rows: list[list[int]], pad_token_id: int) -> Tensor:
    tokens = torch.full((len(rows), max(len(r) for r in rows)), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens


def _check_against_model(
    model: Any, prompts: list[str], tokens: Tensor, bos: bool, pad_token_id: int
) -> None:
    """The slot-by-slot tokens must be what ``model.to_tokens`` gives for the whole prompt."""
    for i, prompt in enumerate(prompts):
        expected = _encode(model, prompt, prepend_bos=bos)
        row = tokens[i, : len(expected)].tolist()
        rest = tokens[i, len(expected) :]
        if row != expected or bool((rest != pad_token_id).any()):
            raise TokenizationError(
                f"IOIDataset: the prompt {prompt!r} tokenizes differently as a whole than slot "
                "by slot, so its positions would be wrong; the template splits a word across "
                "a slot boundary in this tokenizer"
            )


def _physical_memory() -> int:
    """Bytes of memory this machine has (0 where the platform cannot say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 0
