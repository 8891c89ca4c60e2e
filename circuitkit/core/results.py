"""Labelled results: a tensor of effects with named axes, the per-example values behind it, how
sure we are of each effect, how it was made, and a file format to keep it.

Every sweep in circuitkit returns a ``Result``. ``values`` holds the effect of each intervention
(the metric averaged over examples), ``axes`` names its dimensions (``("layer", "head", "pos")``)
and ``labels`` gives a label for every index along each axis, so a dataframe or a plot labels
itself. ``examples`` keeps the per-example values (one more trailing axis, ``"example"``) and
``provenance`` records how the result was made (see ``circuitkit.core.provenance``).

    result = ck.activation_patching(model, clean=ds, corrupted=abc, component="head")
    result.values.shape          # torch.Size([30, 9])
    result.axes                  # ("layer", "head")
    result.top(5)                # the five largest effects, labelled
    result.ci(0.95)              # (low, high): a bootstrap interval per cell
    result.compare({"layer": 23, "head": 2}, {"layer": 23, "head": 0})   # paired test
    result.to_dataframe()        # one row per cell: layer, head, value, sem
    result.save("heads")         # heads/result.json + heads/result.safetensors
    ck.Result.load("heads")      # the same result again
    ck.plot(result)              # a labelled plotly heatmap; faded where the interval spans 0

Uncertainty. A cell's value is a mean over examples, so it has a sampling error.
``sem()`` is the standard error of that mean, ``std / sqrt(n)``. ``ci(level)`` is a percentile
bootstrap interval: draw ``n`` examples with replacement, take each cell's mean, repeat
``n_boot`` times; the interval runs between the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of those means. Each draw resamples the example *indices* once and uses them for every
cell (a paired bootstrap: the same prompts in every cell, as in the sweep itself), so a draw is
one matrix product over all cells, and the draws come from a seeded ``torch.Generator``: the same
seed gives the same interval. Draws are made in chunks, and cells taken in blocks, so memory
stays bounded for large results. Percentile intervals are slightly too narrow for small ``n``:
for normal data a 95% interval covers the mean about 90% of the time at n = 10, 93% at n = 20
and 94% at n = 60; use at least a few dozen examples.

``compare(a, b)`` tests whether two cells differ, paired over examples: the difference of their
means, a paired bootstrap interval for it, and the two-sided p-value of a sign-flip
permutation test (under "no difference" each example's difference is as likely to have either
sign; exact over all sign patterns when there are at most ``n_perm`` of them, otherwise
``n_perm`` random ones, with p = (1 + #extreme) / (1 + n_perm)).

Files. ``save(path)`` writes a folder ``path`` holding ``result.safetensors`` (values, examples
and every tensor inside ``info`` or ``provenance``) and ``result.json`` (everything else, with the
SHA-256 of the tensor file). The JSON also holds a ``"checksum"``: the SHA-256 of a canonical
serialisation of every other key of the document, the tensor file's SHA-256 among them, so it
covers both files: an edited label, metric name, info entry or provenance fingerprint, swapped
axis names or a changed tensor byte all make ``load`` fail, naming the file whose checksum did
not match. Each file is written to a temporary name and renamed into place, the tensor file
first and the JSON last, so an interrupted save leaves the previous result or a checksum
mismatch that ``load`` reports, never a half-written file or a silent mix of two saves.
``load`` reads only JSON and safetensors (it never unpickles) and checks the checksums, keys,
shapes, dtypes and every tagged value; anything wrong raises ``ResultFileError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkit.core import components
from circuitkit.core.components import Component
from circuitkit.core.errors import CircuitkitError, ResultFileError, ShapeError
from circuitkit.core.files import atomic_write, fsync_folder
from circuitkit.core.provenance import short

# A cell of a result: labels by axis ({"layer": 9, "head": 9}) or one index per axis ((9, 9)).
Cell = Union[Mapping[str, Any], Sequence[int]]  # noqa: UP007 (a runtime alias on 3.10)

# The keys of ``Result.info`` that hold the baseline run's metric (``Result.baseline``).
_BASELINE_KEYS = ("baseline", "baseline_examples")
_INTEGER = re.compile(r"-?[0-9]+")

# Bytes of float64 bootstrap means (or resampling weights) held at once.
_BOOTSTRAP_BLOCK_BYTES = 64 * 2**20

_FORMAT = "circuitkit.result"
# Version 2 adds the checksum of the JSON content; version 1 files load with a warning.
_FORMAT_VERSION = 2
_UNCHECKED_VERSION = 1
_JSON_FILE = "result.json"
_TENSOR_FILE = "result.safetensors"
_JSON_KEYS = ("axes", "labels", "metric", "method", "info", "provenance", "tensors")
# The keys that mark a JSON object as an encoded value (a tensor, a tuple, a component, ...).
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__slice__", "__component__")
# How deeply lists and dicts may nest in result.json. Results nest a few levels; the cap keeps
# a crafted file from exhausting the stack of the JSON reader or of the decoder.
_MAX_DEPTH = 100


@dataclass(eq=False)
class Result:
    """A tensor of effects with named axes.

    Attributes:
        values: the effects, one per cell, shape given by ``axes``.
        axes: the name of each dimension of ``values``.
        labels: for each axis, one label per index.
        examples: per-example values behind each cell, shape ``values.shape + (n,)``, or None.
        metric: the name of the metric the values are in.
        method: the method that produced the result ("activation_patching", ...).
        info: details of the result (baselines, direction, components).
        provenance: how the result was made (``circuitkit.core.provenance.record``), or empty.

    Example::

        result = ck.activation_patching(model, ds, ds.corrupted("ABC"), "head")
        result.axes                        # ('layer', 'head')
        result.top(5)                      # the five largest cells, with their labels
        result.to_dataframe()              # one row per cell: layer, head, value, sem
        ck.plot(result)
        result.save("heads.pt"); ck.Result.load("heads.pt")
    """

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    examples: Tensor | None = None
    metric: str = ""
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = tuple(self.axes)
        if self.values.ndim != len(self.axes):
            raise ShapeError(
                f"Result: values have {self.values.ndim} dimensions but {len(self.axes)} axes "
                f"{self.axes} were named"
            )
        for axis, size in zip(self.axes, self.values.shape, strict=True):
            labels = self.labels.get(axis)
            if labels is None:
                self.labels[axis] = [str(i) for i in range(size)]
            elif len(labels) != size:
                raise ShapeError(
                    f"Result: axis {axis!r} has {size} entries but {len(labels)} labels"
                )
        if self.examples is not None and tuple(self.examples.shape[:-1]) != tuple(
            self.values.shape
        ):
            raise ShapeError(
                f"Result: examples have shape {tuple(self.examples.shape)}, expected "
                f"{tuple(self.values.shape)} + (n,)"
            )

    @classmethod
    def from_examples(
        cls,
        examples: Tensor,
        axes: Sequence[str],
        labels: Mapping[str, Sequence[str]],
        *,
        keep_examples: bool = True,
        **kwargs: Any,
    ) -> Result:
        """A Result whose values are the mean over the last axis of ``examples``; with
        ``keep_examples=False`` the per-example values are dropped after averaging."""
        return cls(
            values=examples.mean(-1),
            axes=tuple(axes),
            labels={k: list(v) for k, v in labels.items()},
            examples=examples if keep_examples else None,
            **kwargs,
        )

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def n_examples(self) -> int | None:
        return None if self.examples is None else int(self.examples.shape[-1])

    def sem(self) -> Tensor | None:
        """The standard error of each cell's mean over examples (None without examples)."""
        if self.examples is None or self.examples.shape[-1] < 2:
            return None
        return self.examples.std(-1) / self.examples.shape[-1] ** 0.5

    def ci(
        self, level: float = 0.95, *, n_boot: int = 2000, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """A percentile bootstrap interval per cell: ``(low, high)``, each shaped like ``values``.

        ``n_boot`` resamplings of the examples (the same resampled indices for every cell) from
        a ``torch.Generator`` seeded with ``seed``; the interval holds the central ``level`` of
        the resampled means. Needs the per-example values (``examples``) of at least 2 examples.

        Example::

            low, high = result.ci(0.95, n_boot=2000, seed=0)
            spans_zero = (low <= 0) & (high >= 0)
        """
        check_interval(level, n_boot, seed, "Result.ci")
        examples = self._require_examples("Result.ci")
        bounds = bootstrap_interval(
            examples.reshape(-1, examples.shape[-1]), level, n_boot=n_boot, seed=seed
        )
        dtype = self.values.dtype if self.values.is_floating_point() else torch.float32
        low, high = (b.reshape(self.values.shape).to(dtype) for b in bounds)
        return low, high

    def compare(
        self,
        a: Cell,
        b: Cell,
        *,
        level: float = 0.95,
        n_boot: int = 2000,
        n_perm: int = 10_000,
        seed: int = 0,
    ) -> Comparison:
        """Whether cell ``a``'s effect differs from cell ``b``'s, paired over examples.

        Cells are given by label per axis (``{"layer": 9, "head": 9}``) or by index per axis
        (``(9, 9)``). The difference is ``mean(a - b)`` over examples; its interval is a paired
        percentile bootstrap, and its p-value is a two-sided sign-flip permutation test (see
        the module docstring). Both are seeded by ``seed``.

        Example::

            c = result.compare({"layer": 23, "head": 2}, {"layer": 23, "head": 0})
            c.difference, (c.ci_low, c.ci_high), c.p_value
        """
        where = "Result.compare"
        check_interval(level, n_boot, seed, where)
        if not isinstance(n_perm, numbers.Integral) or isinstance(n_perm, bool) or n_perm < 1:
            raise CircuitkitError(f"{where}: n_perm must be a positive int, got {n_perm!r}")
        examples = self._require_examples(where)
        index_a, index_b = self._index(a, where), self._index(b, where)
        if index_a == index_b:
            raise CircuitkitError(
                f"{where}: a and b are the same cell {self.label_of(index_a)}; give two cells"
            )
        differences = examples[index_a].double() - examples[index_b].double()
        low, high = bootstrap_interval(differences[None], level, n_boot=n_boot, seed=seed)
        p_value, test = sign_flip_test(differences, n_perm=n_perm, seed=seed)
        return Comparison(
            a=self.label_of(index_a),
            b=self.label_of(index_b),
            difference=float(differences.mean()),
            ci_low=float(low[0]),
            ci_high=float(high[0]),
            level=level,
            p_value=p_value,
            n=int(differences.shape[0]),
            test=test,
        )

    def label_of(self, index: Sequence[int]) -> dict[str, int | str]:
        """The labels of the cell at ``index``, by axis; integer labels as ints."""
        return {
            axis: _label_value(self.labels[axis][i])
            for axis, i in zip(self.axes, index, strict=True)
        }

    def index_of(self, cell: Cell) -> tuple[int, ...]:
        """The index of a cell given by label per axis (``{"layer": 9, "head": 9}``) or index."""
        return self._index(cell, "Result.index_of")

    def baseline(self) -> Tensor | None:
        """The metric of the run with no intervention, per example (``[n]``) where the result
        kept it, else its mean as a 0-d tensor; None for a result without one.

        Sweeps of interventions record it in ``info["baseline"]`` (the mean) and
        ``info["baseline_examples"]``: the unpatched base run of activation and path patching,
        the unablated run of an ablation sweep, the base run of attribution patching. Direct
        logit attribution and other results that are effects already have none.
        """
        examples = self.info.get("baseline_examples")
        if isinstance(examples, Tensor):
            return examples
        mean = self.info.get("baseline")
        return None if mean is None else torch.as_tensor(float(mean))

    def effect(self) -> Result:
        """Each cell's effect: its change from the baseline run (``minus(baseline())``), paired
        per example, or the result itself when it has no baseline."""
        baseline = self.baseline()
        if baseline is None:
            return self
        if self.examples is None and baseline.ndim == 1:
            baseline = baseline.mean()
        return self.minus(baseline)

    def top(self, k: int = 10, *, by_abs: bool = True) -> list[tuple[dict[str, int | str], float]]:
        """The ``k`` cells with the largest effects, labelled: ``[({"layer": 23, "head": 3},
        effect), ...]``.

        The effect of a cell is its change from the baseline run where the result has one
        (``effect()``: path and activation patching, ablation sweeps), else its value. Cells
        are ranked by the effect's absolute value unless ``by_abs=False`` (the largest first,
        sign included). Integer labels (layers, heads, positions) come back as ints.

        Example::

            ((cell, change),) = ck.path_patching(model, ds, abc, "heads", "logits").top(1)
            cell["layer"], cell["head"], change       # 23, 3, -1.2: noising it costs 1.2
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise CircuitkitError(f"Result.top: k must be a non-negative integer, got {k!r}")
        flat = self.effect().values.flatten()
        order = (flat.abs() if by_abs else flat).argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            index = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append((self.label_of([int(j) for j in index]), float(flat[i])))
        return out

    def minus(self, baseline: Float[Tensor, "n"] | float, *, metric: str | None = None) -> Result:
        """The change of every cell from a baseline run, paired per example.

        ``baseline`` is the per-example metric of the run to compare with ([n], such as the
        clean run's logit difference) or one number. The per-example values become
        ``examples - baseline`` (the values, their mean), so intervals and plots show the
        change each intervention makes, paired over the same prompts; without per-example
        values only ``values`` are shifted, by the baseline's mean. Axes, labels, method, info
        and provenance are kept; ``metric`` names the new values ("change in <metric>" unless
        given).

        Example::

            clean = metric(model(ds.tokens))                  # [n]
            direct = ck.path_patching(model, ds, abc, "heads", "logits", metric)
            ck.plot(direct.minus(clean))                      # what noising each head costs
        """
        base = torch.as_tensor(baseline).detach()
        if base.ndim > 1 or (base.ndim == 1 and self.n_examples not in (None, base.shape[0])):
            raise ShapeError(
                f"Result.minus: baseline has shape {tuple(base.shape)}; expected one number "
                f"or one value per example, ({self.n_examples},)"
            )
        examples = None
        if self.examples is not None:
            examples = self.examples - base.to(self.examples.device, self.examples.dtype)
            values = examples.mean(-1)
        else:
            values = self.values - base.to(self.values.device, self.values.dtype).mean()
        return dataclasses.replace(
            self,
            values=values,
            examples=examples,
            metric=metric if metric is not None else f"change in {self.metric or 'the metric'}",
            labels={axis: list(labels) for axis, labels in self.labels.items()},
            # the values are changes now: their baseline is the run subtracted
            info={k: v for k, v in self.info.items() if k not in _BASELINE_KEYS},
            provenance=dict(self.provenance),
        )

    def to_dataframe(self, *, ci: float | None = None, n_boot: int = 2000, seed: int = 0):
        """One row per cell: a column per axis (its label), ``value``, and uncertainty columns.

        ``sem`` is there whenever the result kept per-example values (at least 2 examples);
        ``ci_low`` and ``ci_high`` only when asked for with ``ci=level`` (a bootstrap, as in
        ``Result.ci``, so it takes a moment on big results and depends on ``seed``).

        Example::

            result.to_dataframe(ci=0.95).sort_values("value").tail()
        """
        import pandas as pd

        if ci is not None:
            where = f"{type(self).__name__}.to_dataframe"
            check_interval(ci, n_boot, seed, where, level_name="ci")
        grids = torch.meshgrid(*[torch.arange(s) for s in self.values.shape], indexing="ij")
        columns: dict[str, Any] = {}
        for axis, grid in zip(self.axes, grids, strict=True):
            columns[axis] = [self.labels[axis][i] for i in grid.flatten().tolist()]
        columns["value"] = self.values.flatten().tolist()
        sem = self.sem()
        if sem is not None:
            columns["sem"] = sem.flatten().tolist()
        if ci is not None:
            low, high = self.ci(ci, n_boot=n_boot, seed=seed)
            columns["ci_low"] = low.flatten().tolist()
            columns["ci_high"] = high.flatten().tolist()
        return pd.DataFrame(columns)

    # -- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write this result to the folder ``path`` (created if needed); return the folder.

        The folder holds ``result.safetensors`` (every tensor) and ``result.json`` (axes,
        labels, metric, method, info, provenance, the tensor file's SHA-256 and a checksum).
        Values that JSON cannot hold are written as tagged objects: tuples, components
        (``Head(9, 9)``), slices of ints, dicts with non-string keys (or with a key that is a
        tag's name). Anything else in ``info`` is an error, and so is nesting deeper than
        ``_MAX_DEPTH`` levels, so that every folder ``save`` writes, ``load`` reads.

        The checksum (format version 2) is the SHA-256 of the JSON document without its
        ``"checksum"`` key, serialised canonically: no spaces, ASCII escapes, keys in the
        order written (the order of ``info``'s keys is part of the result). Since the document
        records the tensor file's SHA-256, the checksum covers both files.

        Example::

            result.save("results/heads_abc")
            ck.Result.load("results/heads_abc").equals(result)    # True
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ResultFileError(
                f"Result.save: {folder} is a file; give a folder path (it will hold "
                f"{_JSON_FILE} and {_TENSOR_FILE})"
            )
        for name in ("metric", "method"):
            if not isinstance(getattr(self, name), str):
                raise ResultFileError(
                    f"Result.save: {name} must be a string, got {getattr(self, name)!r}"
                )
        tensors: dict[str, Tensor] = {"values": self.values}
        if self.examples is not None:
            tensors["examples"] = self.examples
        info = _encode(self.info, "info", tensors)
        provenance = _encode(self.provenance, "provenance", tensors)
        from safetensors.torch import save as safetensors_bytes

        blob = safetensors_bytes(_storable(tensors))
        document = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "axes": list(self.axes),
            "labels": {axis: list(self.labels[axis]) for axis in self.axes},
            "metric": self.metric,
            "method": self.method,
            "info": info,
            "provenance": provenance,
            "tensors": {
                name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                for name, t in tensors.items()
            },
            "tensor_file": _TENSOR_FILE,
            "tensor_sha256": hashlib.sha256(blob).hexdigest(),
        }
        depth = _nesting(document)
        if depth > _MAX_DEPTH:
            raise ResultFileError(
                f"Result.save: info and provenance nest {depth} levels deep in {_JSON_FILE}; a "
                f"saved result nests at most {_MAX_DEPTH}"
            )
        document["checksum"] = _checksum(document)
        text = json.dumps(document, indent=1)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / _TENSOR_FILE, lambda tmp: tmp.write_bytes(blob))
        atomic_write(folder / _JSON_FILE, lambda tmp: tmp.write_text(text))
        fsync_folder(folder)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a result written by ``Result.save`` from the folder ``path``.

        Reads JSON and safetensors only. First the JSON's checksum is recomputed over its
        content (see ``save``), then the tensor file's SHA-256; a mismatch of either raises
        ``ResultFileError`` naming the file that failed, since the folder was changed after it
        was written. Files of format version 1, written before the checksum existed, still
        load, with a ``UserWarning`` that their JSON cannot be verified (saving them again
        adds a checksum). Missing or truncated files, keys, shapes or dtypes that do not fit
        together, and malformed tagged values raise ``ResultFileError`` too.

        Example::

            result = ck.Result.load("results/heads_abc")
        """
        where = "Result.load"
        folder = Path(path)
        json_path, tensor_path = folder / _JSON_FILE, folder / _TENSOR_FILE
        for file in (json_path, tensor_path):
            if not file.is_file():
                raise ResultFileError(
                    f"{where}: {file} does not exist; expected a folder written by Result.save "
                    f"holding {_JSON_FILE} and {_TENSOR_FILE}"
                )
        try:
            document = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ResultFileError(
                f"{where}: {json_path} is not valid JSON ({err}); it is truncated or was edited"
            ) from err
        except RecursionError as err:
            raise ResultFileError(
                f"{where}: {json_path} nests lists and dicts too deeply to read; a saved result "
                f"nests at most {_MAX_DEPTH} levels, so this file was not written by Result.save"
            ) from err
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise ResultFileError(
                f"{where}: {json_path} is not a saved circuitkit result (expected a JSON object "
                f'with "format": "{_FORMAT}")'
            )
        depth = _nesting(document)
        if depth > _MAX_DEPTH:
            raise ResultFileError(
                f"{where}: {json_path} nests lists and dicts {depth} levels deep; a saved result "
                f"nests at most {_MAX_DEPTH}, so this file was not written by Result.save"
            )
        version = document.get("format_version")
        if version == _UNCHECKED_VERSION:
            warnings.warn(
                f"{where}: {json_path} has format version {version}, which has no checksum of "
                "its content, so its labels, metric, info and provenance cannot be verified; "
                "save the result again to add one",
                UserWarning,
                stacklevel=2,
            )
        elif version != _FORMAT_VERSION:
            raise ResultFileError(
                f"{where}: {json_path} has format version {version!r}; this circuitkit reads "
                f"versions {_UNCHECKED_VERSION} and {_FORMAT_VERSION}"
            )
        elif document.get("checksum") != _checksum(document):
            raise ResultFileError(
                f"{where}: {json_path} failed its checksum (its content does not match the "
                f"checksum recorded in it): the folder {folder} was changed after it was "
                "written"
            )
        missing = [key for key in (*_JSON_KEYS, "tensor_sha256") if key not in document]
        if missing:
            raise ResultFileError(f"{where}: {json_path} lacks the keys {missing}")
        blob = tensor_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != document["tensor_sha256"]:
            raise ResultFileError(
                f"{where}: {tensor_path} failed its checksum (its SHA-256 does not match the one "
                f"recorded in {json_path}): the folder {folder} was changed after it was "
                "written; the tensor file is truncated, was edited, or belongs to another save"
            )
        from safetensors.torch import load as safetensors_load

        try:
            tensors = safetensors_load(blob)
        except Exception as err:  # safetensors raises its own error type
            raise ResultFileError(f"{where}: cannot read {tensor_path}: {err}") from err
        _check_tensors(tensors, document["tensors"], where, json_path)
        axes, labels = document["axes"], document["labels"]
        if not (
            isinstance(axes, list)
            and all(isinstance(a, str) for a in axes)
            and len(set(axes)) == len(axes)
            and isinstance(labels, dict)
            and set(labels) == set(axes)
            and all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in labels.values()
            )
        ):
            raise ResultFileError(
                f"{where}: {json_path} must hold axes as a list of distinct strings and labels "
                "as a dict of lists of strings, one per axis"
            )
        for key in ("metric", "method"):
            if not isinstance(document[key], str):
                raise ResultFileError(
                    f"{where}: {json_path} must hold {key} as a string, got {document[key]!r:.80}"
                )
        fields = {}
        for key in ("info", "provenance"):
            fields[key] = _decode(document[key], tensors, f"{where}: {key}")
            if not isinstance(fields[key], dict):
                raise ResultFileError(
                    f"{where}: {json_path} must hold {key} as a dict, got "
                    f"{type(fields[key]).__name__}"
                )
        try:
            return cls(
                values=tensors["values"],
                axes=tuple(axes),
                labels=labels,
                examples=tensors.get("examples"),
                metric=document["metric"],
                method=document["method"],
                **fields,
            )
        except ShapeError as err:
            raise ResultFileError(f"{where}: {json_path} does not fit its tensors: {err}") from err

    def equals(self, other: Any) -> bool:
        """True if ``other`` is a Result with the same tensors (dtype, shape and every value,
        NaN equal to NaN), axes, labels, metric, method, info and provenance."""
        return isinstance(other, Result) and all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(Result)
        )

    # -- helpers ----------------------------------------------------------------------------

    def _require_examples(self, where: str) -> Tensor:
        if self.examples is None:
            raise CircuitkitError(
                f"{where}: this result kept no per-example values (examples is None); rerun the "
                "method with keep_examples=True"
            )
        if self.examples.shape[-1] < 2:
            raise CircuitkitError(
                f"{where}: needs at least 2 examples per cell, this result has "
                f"{self.examples.shape[-1]}"
            )
        return self.examples

    def _index(self, cell: Cell, where: str) -> tuple[int, ...]:
        if isinstance(cell, Mapping):
            unknown = [a for a in cell if a not in self.axes]
            missing = [a for a in self.axes if a not in cell]
            if unknown or missing:
                raise CircuitkitError(
                    f"{where}: a cell needs one label for each axis {list(self.axes)}; got "
                    f"{dict(cell)}" + (f" (unknown axes {unknown})" if unknown else "")
                )
            index = []
            for axis in self.axes:
                label, labels = str(cell[axis]), self.labels[axis]
                if label not in labels:
                    shown = labels if len(labels) <= 12 else [*labels[:12], "..."]
                    raise CircuitkitError(
                        f"{where}: axis {axis!r} has no label {label!r}; its labels are {shown}"
                    )
                index.append(labels.index(label))
            return tuple(index)
        if (
            isinstance(cell, Sequence)
            and not isinstance(cell, str)
            and len(cell) == len(self.axes)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in cell)
        ):
            index = []
            for axis, i, size in zip(self.axes, cell, self.values.shape, strict=True):
                if not -size <= i < size:
                    raise CircuitkitError(
                        f"{where}: index {i} is out of range for axis {axis!r} of size {size}"
                    )
                index.append(i % size)
            return tuple(index)
        raise CircuitkitError(
            f"{where}: a cell is a dict of labels by axis such as "
            f"{ {a: self.labels[a][0] for a in self.axes} } or a tuple of {len(self.axes)} "
            f"indices; got {cell!r}"
        )

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={s}" for a, s in zip(self.axes, self.values.shape, strict=True))
        parts = [f"Result({self.method or 'values'}: {dims}"]
        if self.metric:
            parts.append(f"metric={self.metric}")
        if self.examples is not None:
            parts.append(f"n={self.examples.shape[-1]}")
        if self.values.numel():
            best = self.top(1)[0]
            where = ", ".join(f"{a}={v}" for a, v in best[0].items())
            what = "largest |effect|" if self.baseline() is not None else "largest |value|"
            parts.append(f"{what} {best[1]:+.4g} at {where}")
        made = short(self.provenance)
        if made:
            parts.append(f"made with {made}")
        return ", ".join(parts) + ")"


@dataclass(frozen=True)
class Comparison:
    """The paired difference between two cells of a result (``Result.compare``).

    Attributes:
        a, b: the two cells, as labels by axis.
        difference: the mean over examples of a's value minus b's.
        ci_low, ci_high: the paired percentile bootstrap interval of ``difference``.
        level: the interval's coverage (0.95).
        p_value: two-sided p-value of the sign-flip permutation test of "no difference".
        n: the number of examples.
        test: how the p-value was computed (exact or with random sign patterns).

    Example::

        comparison = result.compare({"layer": 23, "head": 2}, {"layer": 23, "head": 0})
        comparison.difference, (comparison.ci_low, comparison.ci_high), comparison.p_value
    """

    a: dict[str, int | str]
    b: dict[str, int | str]
    difference: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    n: int
    test: str

    def __repr__(self) -> str:
        a = " ".join(f"{k}={v}" for k, v in self.a.items())
        b = " ".join(f"{k}={v}" for k, v in self.b.items())
        return (
            f"Comparison({a} minus {b}: {self.difference:+.4g}, {self.level:.0%} interval "
            f"[{self.ci_low:+.4g}, {self.ci_high:+.4g}], p={self.p_value:.3g}, n={self.n})"
        )


def compare(result: Result, a: Cell, b: Cell, **kwargs: Any) -> Comparison:
    """Whether two cells of ``result`` differ, paired over examples (``Result.compare``).

    Example::

        ck.compare(result, {"layer": 23, "head": 2}, {"layer": 23, "head": 0})
    """
    if not isinstance(result, Result):
        raise CircuitkitError(f"compare: expected a Result, got {type(result).__name__}")
    return result.compare(a, b, **kwargs)


def check_interval(
    level: Any, n_boot: Any, seed: Any, where: str, *, level_name: str = "level"
) -> None:
    """Raise a ``CircuitkitError`` naming ``where`` and the argument unless ``level`` is a number
    strictly between 0 and 1 (not NaN), ``n_boot`` an int from 1 to 1e6 and ``seed`` an int.

    ``level_name`` is the argument's name in the caller (``ci`` in ``to_dataframe(ci=0.95)``).

    Example::

        check_interval(level, n_boot, seed, "Result.ci")
    """
    real = isinstance(level, numbers.Real) and not isinstance(level, bool)
    if not real or not 0 < level < 1:  # NaN fails both comparisons
        raise CircuitkitError(
            f"{where}: {level_name} must be a number between 0 and 1 (such as 0.95), got {level!r}"
        )
    if (
        not isinstance(n_boot, numbers.Integral)
        or isinstance(n_boot, bool)
        or not 1 <= n_boot <= 1_000_000
    ):
        raise CircuitkitError(
            f"{where}: n_boot must be an int from 1 to 1e6 (such as 2000), got {n_boot!r}"
        )
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise CircuitkitError(f"{where}: seed must be an int, got {seed!r}")


def bootstrap_interval(
    samples: Float[Tensor, "cells n"], level: float = 0.95, *, n_boot: int = 2000, seed: int = 0
) -> tuple[Float[Tensor, "cells"], Float[Tensor, "cells"]]:
    """Percentile bootstrap interval of each row's mean: ``(low, high)`` in float64.

    Draw ``i`` resamples the column indices with ``torch.randint(0, n, (n,))`` from a generator
    seeded with ``seed`` (the same indices for every row) and counts how often each is drawn;
    the resampled means of a block of rows are then one matrix product with those counts. Rows
    are taken in blocks and draws in chunks of ``_BOOTSTRAP_BLOCK_BYTES``; each block replays
    the same draws from the seed.

    Example::

        low, high = bootstrap_interval(torch.randn(3, 50), 0.95, n_boot=1000, seed=0)
    """
    where = "bootstrap_interval"
    check_interval(level, n_boot, seed, where)
    n_boot, seed = int(n_boot), int(seed)
    if samples.ndim != 2 or samples.shape[1] < 2:
        raise ShapeError(
            f"{where}: expected samples of shape [cells, n] with n >= 2, got {tuple(samples.shape)}"
        )
    n_cells, n = samples.shape
    rows_per_block = max(1, _BOOTSTRAP_BLOCK_BYTES // (8 * n_boot))
    draws_per_chunk = max(1, _BOOTSTRAP_BLOCK_BYTES // (16 * n))
    low = torch.empty(n_cells, dtype=torch.float64)
    high = torch.empty(n_cells, dtype=torch.float64)
    for start in range(0, n_cells, rows_per_block):
        block = samples[start : start + rows_per_block].detach().to("cpu", torch.float64)
        generator = torch.Generator().manual_seed(seed)
        means = torch.empty(block.shape[0], n_boot, dtype=torch.float64)
        for first in range(0, n_boot, draws_per_chunk):
            count = min(draws_per_chunk, n_boot - first)
            drawn = torch.randint(0, n, (count, n), generator=generator)
            weights = torch.zeros(count, n, dtype=torch.float64)
            weights.scatter_add_(1, drawn, torch.ones(count, n, dtype=torch.float64))
            means[:, first : first + count] = block @ weights.T / n
        low[start : start + block.shape[0]] = _tail_quantile(means, (1 - level) / 2)
        high[start : start + block.shape[0]] = _tail_quantile(means, (1 + level) / 2)
    return low, high


def _tail_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q, dim=1)`` (linear interpolation) for q in a tail of the rows.

    Reads the two order statistics around rank ``q * (N - 1)`` with ``topk`` from the nearer
    end, which is several times faster than sorting whole rows.
    """
    size = values.shape[1]
    rank = q * (size - 1)
    below, above = math.floor(rank), math.ceil(rank)
    if rank <= (size - 1) / 2:
        smallest = values.topk(above + 1, dim=1, largest=False).values
        lower, upper = smallest[:, below], smallest[:, above]
    else:
        largest = values.topk(size - below, dim=1, largest=True).values
        lower, upper = largest[:, size - 1 - below], largest[:, size - 1 - above]
    return torch.lerp(lower, upper, rank - below)


def sign_flip_test(
    differences: Float[Tensor, "n"], *, n_perm: int = 10_000, seed: int = 0
) -> tuple[float, str]:
    """Two-sided p-value that paired ``differences`` have mean 0, and how it was computed.

    Flips the sign of each difference at random (under the null each sign is equally likely)
    and counts the patterns whose ``|mean|`` reaches the observed one: all ``2**n`` patterns
    when there are at most ``n_perm`` (exact), otherwise ``n_perm`` random ones from a generator
    seeded with ``seed``, with ``p = (1 + extreme) / (1 + n_perm)``.

    Example::

        p, how = sign_flip_test(result.examples[9, 9] - result.examples[9, 6])
    """
    if not isinstance(n_perm, int) or n_perm < 1:
        raise CircuitkitError(f"sign_flip_test: n_perm must be a positive int, got {n_perm!r}")
    if differences.ndim != 1 or differences.shape[0] < 1:
        raise ShapeError(
            f"sign_flip_test: expected [n] differences, got {tuple(differences.shape)}"
        )
    diffs = differences.detach().to("cpu", torch.float64)
    n = diffs.shape[0]
    # Patterns whose |mean| equals the observed one up to rounding count as extreme.
    threshold = float(diffs.mean().abs()) * (1 - 1e-9)
    if n < 63 and 2**n <= n_perm:
        codes = torch.arange(2**n)[:, None]
        signs = ((codes >> torch.arange(n)) & 1).to(torch.float64) * 2 - 1
        extreme = int(((signs @ diffs).abs() / n >= threshold).sum())
        return extreme / 2**n, f"exact sign-flip test over all {2**n} sign patterns"
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _BOOTSTRAP_BLOCK_BYTES // (16 * n))
    extreme = 0
    for first in range(0, n_perm, chunk):
        count = min(chunk, n_perm - first)
        signs = torch.randint(0, 2, (count, n), generator=generator).to(torch.float64) * 2 - 1
        extreme += int(((signs @ diffs).abs() / n >= threshold).sum())
    return (1 + extreme) / (1 + n_perm), f"sign-flip test with {n_perm} random sign patterns"


# -- file format helpers ----------------------------------------------------------------------


def _label_value(label: str) -> int | str:
    return int(label) if _INTEGER.fullmatch(label) else label


def _encode(value: Any, where: str, tensors: dict[str, Tensor], depth: int = 0) -> Any:
    """``value`` as JSON; tensors go into ``tensors`` and leave a ``{"__tensor__": name}``."""
    if depth > _MAX_DEPTH:
        raise ResultFileError(
            f"Result.save: {where} nests more than {_MAX_DEPTH} levels deep (or holds itself), "
            f"deeper than a saved result may"
        )
    depth += 1
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        name = f"{where.split('[')[0]}/{len(tensors)}"
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, Mapping):
        # a dict with a tag's name among its keys is written as pairs, not read back as a tag
        if all(isinstance(key, str) and key not in _TAGS for key in value):
            return {
                key: _encode(item, f"{where}[{key!r}]", tensors, depth)
                for key, item in value.items()
            }
        return {
            "__dict__": [
                [
                    _encode(key, where, tensors, depth),
                    _encode(item, f"{where}[{key!r}]", tensors, depth),
                ]
                for key, item in value.items()
            ]
        }
    if isinstance(value, list):
        return [_encode(item, f"{where}[{i}]", tensors, depth) for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {
            "__tuple__": [
                _encode(item, f"{where}[{i}]", tensors, depth) for i, item in enumerate(value)
            ]
        }
    if isinstance(value, slice):
        bounds = [value.start, value.stop, value.step]
        if not all(_is_int_or_none(bound) for bound in bounds):
            raise ResultFileError(
                f"Result.save: {where} is the slice {value!r}; a saved result holds slices of "
                "ints and None only"
            )
        return {"__slice__": bounds}
    if isinstance(value, Component):
        kind = type(value).__name__
        if _component_class(kind) is not type(value):
            raise ResultFileError(
                f"Result.save: {where} is a {kind}, which is not a component kind of "
                "circuitkit.core.components, so a saved result cannot name it"
            )
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        _check_fields(type(value), fields, f"Result.save: {where}")
        encoded = {
            name: _encode(item, f"{where}.{name}", tensors, depth) for name, item in fields.items()
        }
        return {"__component__": kind, "fields": encoded}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _encode(value.item(), where, tensors, depth)  # numpy scalars
    raise ResultFileError(
        f"Result.save: {where} is a {type(value).__name__} ({value!r:.80}), which a saved result "
        "cannot hold; use tensors, numbers, strings, lists, tuples, dicts or components"
    )


def _decode(value: Any, tensors: Mapping[str, Tensor], where: str) -> Any:
    """The value that ``_encode`` wrote as ``value``; a malformed tag raises ResultFileError
    saying where in the file it is."""
    if isinstance(value, list):
        return [_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        return value
    keys = set(value)
    if keys == {"__tensor__"}:
        name = value["__tensor__"]
        if not isinstance(name, str) or name not in tensors:
            raise ResultFileError(
                f"{where}: the JSON refers to tensor {name!r:.80}, which the tensor file does "
                "not hold"
            )
        return tensors[name]
    if keys == {"__tuple__"}:
        items = value["__tuple__"]
        if not isinstance(items, list):
            raise _malformed(where, value, '{"__tuple__": [items]}')
        return tuple(_decode(items, tensors, where))
    if keys == {"__dict__"}:
        pairs = value["__dict__"]
        if not (
            isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs)
        ):
            raise _malformed(where, value, '{"__dict__": [[key, value], ...]}')
        out = {}
        for key, item in pairs:
            key = _decode(key, tensors, f"{where} (a key)")
            try:
                hash(key)
            except TypeError as err:
                raise _malformed(where, value, "keys that are numbers, strings or tuples") from err
            out[key] = _decode(item, tensors, f"{where}[{key!r:.40}]")
        return out
    if keys == {"__slice__"}:
        bounds = value["__slice__"]
        if not (
            isinstance(bounds, list) and len(bounds) == 3 and all(map(_is_int_or_none, bounds))
        ):
            raise _malformed(where, value, '{"__slice__": [start, stop, step]} of ints or null')
        return slice(*bounds)
    if keys == {"__component__", "fields"}:
        cls = _component_class(value["__component__"])
        if cls is None:
            raise ResultFileError(
                f"{where}: unknown component kind {value['__component__']!r:.80}; a saved "
                "result names a class of circuitkit.core.components such as 'Head'"
            )
        fields = _decode(value["fields"], tensors, f"{where}.fields")
        if not isinstance(fields, dict):
            raise _malformed(where, value, '{"__component__": kind, "fields": {name: value}}')
        _check_fields(cls, fields, where)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise ResultFileError(f"{where}: cannot rebuild a {cls.__name__}: {err}") from err
    if keys & set(_TAGS):
        raise _malformed(where, value, "one of the tags " + ", ".join(_TAGS) + " alone")
    return {key: _decode(item, tensors, f"{where}[{key!r}]") for key, item in value.items()}


def _malformed(where: str, value: Any, expected: str) -> ResultFileError:
    return ResultFileError(f"{where}: malformed tagged value {value!r:.80}; expected {expected}")


def _is_int_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _component_class(kind: Any) -> type[Component] | None:
    """The class of circuitkit.core.components named ``kind``, or None."""
    cls = getattr(components, kind, None) if isinstance(kind, str) else None
    if isinstance(cls, type) and issubclass(cls, Component) and cls is not Component:
        return cls
    return None


def _check_fields(cls: type[Component], fields: Mapping[Any, Any], where: str) -> None:
    """Raise ResultFileError unless each of ``fields`` is an init field of ``cls`` whose value
    has the field's annotated type (the dataclasses themselves do not check types)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for name, item in fields.items():
        if name not in names:
            raise ResultFileError(
                f"{where}: {cls.__name__} has no field {name!r:.40}; its fields are {names}"
            )
        if not _fits(item, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name]).replace("typing.", ""))
            raise ResultFileError(
                f"{where}: {cls.__name__}.{name} is {item!r:.80}; expected {expected}"
            )


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` of a component field. A bare ``tuple`` stands
    for positions: a tuple or list of ints, as components take them."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return any(type(value) is type(o) and value == o for o in typing.get_args(hint))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is tuple:
        return isinstance(value, (tuple, list)) and all(_fits(item, int) for item in value)
    return isinstance(hint, type) and isinstance(value, hint)


def _nesting(document: Any) -> int:
    """How deeply lists and dicts nest in a JSON document (0 for a scalar), without recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return deepest


def _checksum(document: Mapping[str, Any]) -> str:
    """The SHA-256 of ``document`` without its "checksum" key, serialised canonically.

    Canonical: no spaces, non-ASCII characters escaped, floats as Python writes them (which
    read back exactly), keys in the document's order. Any change of a key or a value changes
    it; changes of layout that JSON reads back the same (spacing, escapes) do not.
    """
    content = {key: value for key, value in document.items() if key != "checksum"}
    canonical = json.dumps(content, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _storable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, no two sharing memory (safetensors refuses that)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        stored = tensor.detach().cpu().contiguous()
        pointer = stored.untyped_storage().data_ptr()
        if pointer in seen and stored.numel():
            stored = stored.clone()
        seen.add(stored.untyped_storage().data_ptr())
        out[name] = stored
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensors(
    tensors: Mapping[str, Tensor], manifest: Any, where: str, json_path: Path
) -> None:
    if not isinstance(manifest, dict) or "values" not in manifest:
        raise ResultFileError(f"{where}: {json_path} has no tensor manifest with 'values'")
    if set(tensors) != set(manifest):
        raise ResultFileError(
            f"{where}: the tensor file holds {sorted(tensors)} but {json_path} lists "
            f"{sorted(manifest)}"
        )
    for name, entry in manifest.items():
        tensor = tensors[name]
        expected = (entry.get("shape"), entry.get("dtype")) if isinstance(entry, dict) else None
        if expected != (list(tensor.shape), _dtype_name(tensor.dtype)):
            raise ResultFileError(
                f"{where}: tensor {name!r} has shape {list(tensor.shape)} and dtype "
                f"{_dtype_name(tensor.dtype)}, but {json_path} records {entry}"
            )


def _same(a: Any, b: Any) -> bool:
    """Deep equality for result fields: tensors by dtype, shape and value (NaN equals NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point() or a.is_complex():
            nan_a, nan_b = a.isnan(), b.isnan()
            return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
        return torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


__all__ = [
    "Result",
    "Comparison",
    "Cell",
    "compare",
    "bootstrap_interval",
    "check_interval",
    "sign_flip_test",
]
