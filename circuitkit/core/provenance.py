"""Provenance: a record, kept with every result, of how it was made.

A number in a notebook is worth keeping only if one can later tell what produced it: which
method with which arguments, which model (and exactly which weights: a fine-tuned or edited
copy carries the same name), which prompts, which metric, which versions of the code, on which
device, and when. ``record`` gathers all of that into a plain JSON-ready dict, which a method
attaches to its ``Result`` in one call::

    prov = provenance.record(model, method="ablate", args={"method": "mean", "components": comps},
                             data={"base": ds, "reference": abc}, metric=metric)
    return Result.from_examples(examples, axes, labels, ..., provenance=prov)

``result.provenance`` holds the record in full (for reports and saved results); the result's
repr shows a short form (``short``).

How values are written down. Arguments become JSON: numbers, strings and ``None`` as they are;
lists, tuples and dicts element by element (sets sorted); a tensor as its shape, dtype and the
SHA-256 of its bytes; a component (``Head(9, 9)``) as its repr; a dataset as its own
``.provenance`` record (``IOIDataset`` has one: n, seed, corruption, templates, ...); a metric
as its name; anything else as its type and repr.

The weights' fingerprint (``fingerprint``) is a SHA-256 over every parameter's name, dtype,
shape and bytes: all bytes, so any change to any weight changes it, including edits made
through ``param.data`` that leave no trace in PyTorch's version counters. Hashing every byte
takes long (half a second for GPT-2 small, seconds for a 7B model), so the digest is kept for
each model and given again while a cheap check, made on the weights' own device, finds every
parameter as it was: ``fingerprint`` says exactly what is checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from circuitkit.core.errors import CircuitkitError
from circuitkit.core.metrics import Metric
from circuitkit.core.version import __version__

_MAX_THREADS = 16
_ROW_WORDS = 1024  # the checksum reads a parameter's bytes as rows of 1024 64-bit words (8 KiB)
_BLOCK_ROWS = 32  # rows summed at a time on the CPU, so the column sums find them in cache
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _Fingerprinted:
    """A model's fingerprint with what its parameters were when it was computed."""

    keys: tuple[tuple[Any, ...], ...]
    """Per parameter: name, id, data_ptr, dtype, shape, stride, device, version counter."""
    checksums: tuple[bytes, ...]
    """Per parameter: the SHA-256 of its row sums, column sums and tail (``_checksums``)."""
    fingerprint: str


# weak keys: an entry holds no reference to its model or its parameters, and goes with the model
_fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, _Fingerprinted] = (
    weakref.WeakKeyDictionary()
)
_fingerprints_lock = threading.Lock()  # record_alongside fingerprints from a background thread


def record(
    model: torch.nn.Module | None,
    *,
    method: str,
    args: Mapping[str, Any] | None = None,
    data: Any = None,
    metric: Any = None,
) -> dict[str, Any]:
    """A JSON-ready record of how a result is being made, to pass as ``Result(provenance=...)``.

    ``method`` names the method ("activation_patching"); ``args`` are the arguments that shape
    the result (leave out those that do not, such as ``progress``); ``data`` is the dataset, the
    token tensor, or a dict of them by role (``{"clean": ds, "corrupted": abc}``); ``metric`` is
    the metric object or callable. The record holds those, written down as the module docstring
    says, with the model's name, configuration and weight fingerprint, the device and dtype,
    the versions of circuitkit, TransformerLens, PyTorch and Python, and a UTC timestamp.

    Example::

        prov = ck.provenance.record(model, method="ablate", args={"method": "mean"},
                                    data=ds, metric=metric)
        prov["model"]["fingerprint"]      # 'sha256:4c1f...'
    """
    if not isinstance(method, str) or not method:
        raise CircuitkitError(
            f"provenance.record: method must be a non-empty string, got {method!r}"
        )
    if args is not None and not isinstance(args, Mapping):
        raise CircuitkitError(
            f"provenance.record: args must be a dict of argument names to values, got "
            f"{type(args).__name__}"
        )
    if isinstance(data, Mapping) and not hasattr(data, "provenance"):
        data_record = {str(role): describe(value) for role, value in data.items()}
    else:
        data_record = describe(data)
    return {
        "method": method,
        "args": {str(name): describe(value) for name, value in (args or {}).items()},
        "model": _model_record(model),
        "data": data_record,
        "metric": None if metric is None else metric_name(metric),
        "versions": _versions(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record_alongside(
    model: torch.nn.Module, work: Callable[[], T], **record_args: Any
) -> tuple[T, dict[str, Any]]:
    """``(work(), record(model, **record_args))``, the record made while ``work`` runs.

    The costly part of a record is the weight fingerprint: the first time for a set of weights,
    every weight is copied to the CPU and hashed (later, only checksums made on the GPU are
    copied; see ``fingerprint``). For a model on a GPU it is computed in a background thread,
    its checksums and copies queued on a side CUDA stream that waits for the work queued before
    this call (an in-place edit of a weight, say) but not for ``work``'s, so the hashing overlaps
    ``work``'s GPU computation. On the CPU the two run one after the other. If ``work`` raises,
    so does this, once the record is done.

    Example::

        values, prov = ck.provenance.record_alongside(
            model, lambda: run_interventions(model, tokens, runs, metric),
            method="my_sweep", data=tokens, metric=metric)
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cuda":
        value = work()
        return value, record(model, **record_args)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))

    def in_background() -> dict[str, Any]:
        with torch.cuda.stream(side):
            return record(model, **record_args)

    with ThreadPoolExecutor(max_workers=1) as pool:
        made = pool.submit(in_background)
        value = work()
        return value, made.result()


def fingerprint(model: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` over every parameter's name, dtype, shape and bytes, in order.

    The same weights give the same fingerprint on any device; a weight changed in any way gives
    another. Parameters are hashed in parallel threads; on a GPU each is copied to the CPU first,
    on the caller's current CUDA stream.

    Hashing every byte is slow, so the fingerprint is kept for each model, in a mapping private
    to this module with weak keys (nothing is set on the model, and the entry goes when the
    model does), together with two things per parameter:

    - a key: its name, ``id``, ``data_ptr()``, dtype, shape, strides, device and ``_version``
      (the counter that in-place operations on the parameter increase);
    - a checksum of its bytes, computed on the parameter's own device: the bytes are read as
      rows of 1024 64-bit words (8 KiB); the sum of each row and of each column (modulo 2^64)
      and the bytes after the last whole row are hashed with SHA-256. On the CPU each byte is
      read from memory once, on a GPU twice; only the sums (about 1/1000 of the bytes) are
      copied to the host.

    Every call computes the keys and checksums again: if all of them equal the kept ones it
    returns the kept fingerprint, otherwise it hashes every byte again and keeps the new
    fingerprint, keys and checksums. The checksum is what sees edits through ``param.data``
    (``model.blocks[0].attn.W_O.data[2] = 0``), which leave the parameter's ``_version`` as it
    was (``.data`` has a counter of its own); the key sees a replaced parameter, ``model.to``,
    ``load_state_dict`` and in-place operations on the parameters themselves.

    A change is missed only if it goes around the parameter's version counter and leaves every
    row sum, every column sum and the tail as they were. A change of one word, a swap of two
    different values, or any change within one row or one column always changes a sum. To be
    missed, differences must cancel in every row and every column at once, as when two values
    swapped in one row are swapped back, in the sums, by the same two values swapped in another
    row at the same columns. Random or trained floating-point weights essentially never line up
    so; weights with many equal values (hand-built, quantized) can. Sums that do change are
    missed only if SHA-256 collides, a chance of about 2^-256.

    Example::

        before = ck.provenance.fingerprint(model)           # hashes every byte
        ck.provenance.fingerprint(model) == before          # True, from the checksums alone
        saved = model.blocks[11].attn.W_O.data[2].clone()
        model.blocks[11].attn.W_O.data[2] = 0               # head 11.2's output weights
        ck.provenance.fingerprint(model) != before          # True
        model.blocks[11].attn.W_O.data[2] = saved
        ck.provenance.fingerprint(model) == before          # True
    """
    params = list(model.named_parameters())
    keys = tuple(
        (
            name,
            id(param),
            param.data_ptr(),
            param.dtype,
            tuple(param.shape),
            param.stride(),
            param.device,
            param._version,
        )
        for name, param in params
    )
    checksums = _checksums([param for _, param in params])
    with _fingerprints_lock:
        kept = _fingerprints.get(model)
    if kept is not None and kept.keys == keys and kept.checksums == checksums:
        return kept.fingerprint

    threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(params)))
    on_gpu = [param.device for _, param in params if param.is_cuda]
    # the current stream is per thread: the workers copy on the caller's
    stream = torch.cuda.current_stream(on_gpu[0]) if on_gpu else None

    def digest(named: tuple[str, Tensor]) -> str:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return tensor_digest(named[1])

    with torch.no_grad(), ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(digest, params))
    total = hashlib.sha256()
    for (name, param), digest in zip(params, digests, strict=True):
        total.update(f"{name}|{param.dtype}|{tuple(param.shape)}|{digest}\n".encode())
    value = "sha256:" + total.hexdigest()
    with _fingerprints_lock:
        _fingerprints[model] = _Fingerprinted(keys, checksums, value)
    return value


def _checksums(tensors: list[Tensor]) -> tuple[bytes, ...]:
    """Per tensor, the SHA-256 of its row sums, column sums and tail, as ``fingerprint`` says."""
    sums = [_row_and_column_sums(tensor) for tensor in tensors]
    on_device: dict[torch.device, list[int]] = {}
    for index, part in enumerate(sums):
        if part.device.type != "cpu":
            on_device.setdefault(part.device, []).append(index)
    for indices in on_device.values():
        # one copy to the host per device, not one per parameter
        host = torch.cat([sums[index] for index in indices]).cpu()
        pieces = host.split([sums[index].numel() for index in indices])
        for index, piece in zip(indices, pieces, strict=True):
            sums[index] = piece
    return tuple(hashlib.sha256(memoryview(part.numpy())).digest() for part in sums)


def _row_and_column_sums(tensor: Tensor) -> Tensor:
    """A tensor's bytes as rows of 64-bit words: row sums, column sums, then the bytes left over.

    Sums wrap modulo 2^64. The result is uint8, on the tensor's device.
    """
    data = tensor.detach().reshape(-1).view(torch.uint8)
    if data.data_ptr() % 8:  # 64-bit words need 8-byte alignment; a copy has it
        data = data.clone()
    n_rows = data.numel() // (8 * _ROW_WORDS)
    if n_rows == 0:
        return data
    split = 8 * _ROW_WORDS * n_rows
    words = data[:split].view(torch.int64).view(n_rows, _ROW_WORDS)
    tail = data[split:]
    if data.device.type != "cpu":
        return torch.cat(
            [words.sum(dim=1).view(torch.uint8), words.sum(dim=0).view(torch.uint8), tail]
        )
    # on the CPU numpy's uint64 sums are much faster than torch's; each block of rows is summed
    # both ways while it is in cache, so the bytes are read from memory once
    matrix = words.numpy().view(np.uint64)
    row_sums = np.empty(n_rows, dtype=np.uint64)
    column_sums = np.zeros(_ROW_WORDS, dtype=np.uint64)
    for start in range(0, n_rows, _BLOCK_ROWS):
        block = matrix[start : start + _BLOCK_ROWS]
        np.sum(block, axis=1, out=row_sums[start : start + _BLOCK_ROWS])
        column_sums += block.sum(axis=0)
    parts = [row_sums.view(np.uint8), column_sums.view(np.uint8), tail.numpy()]
    return torch.from_numpy(np.concatenate(parts))


def tensor_digest(tensor: Tensor) -> str:
    """The SHA-256 (hex) of a tensor's bytes in row-major order, on any device and dtype.

    Example::

        tensor_digest(ds.tokens) == tensor_digest(ds.tokens.clone())   # True
    """
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


def describe(value: Any) -> Any:
    """``value`` written down as JSON: see the module docstring for each kind of value.

    Example::

        describe({"n": 100, "tokens": ds.tokens})   # {'n': 100, 'tokens': {'tensor': [...], ...}}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, Tensor):
        return {
            "tensor": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "sha256": tensor_digest(value),
        }
    if isinstance(getattr(value, "provenance", None), Mapping):
        return dict(value.provenance)
    if isinstance(value, Mapping):
        return {str(key): describe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((describe(item) for item in value), key=repr)
    if isinstance(value, slice):
        return repr(value)
    if isinstance(value, Metric):
        return {"metric": value.name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)  # components, interventions: their repr is their address
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return describe(value.item())  # numpy scalars
    return {"type": type(value).__name__, "repr": repr(value)[:200]}


def metric_name(metric: Any) -> str:
    """A metric's short name: ``Metric.name``, a function's ``__name__``, or its type.

    Example::

        metric_name(ck.metrics.logit_diff(ds))      # 'logit_diff'
    """
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", type(metric).__name__))


def short(provenance: Mapping[str, Any]) -> str:
    """One line for a repr: the model, the first 8 hex digits of its fingerprint, and when.

    Example::

        short(result.provenance)    # 'smollm2-135m sha256:4c1f9a02, 2025-06-01 12:00 UTC'
    """
    parts = []
    model = provenance.get("model") or {}
    if model:
        fingerprint_hex = str(model.get("fingerprint", "")).removeprefix("sha256:")
        parts.append(f"{model.get('name', '?')} sha256:{fingerprint_hex[:8]}")
    timestamp = provenance.get("timestamp")
    if isinstance(timestamp, str) and len(timestamp) >= 16:
        parts.append(f"{timestamp[:10]} {timestamp[11:16]} UTC")
    return ", ".join(parts)


def _model_record(model: torch.nn.Module | None) -> dict[str, Any] | None:
    if model is None:
        return None
    cfg = getattr(model, "cfg", None)
    device = getattr(cfg, "device", None)
    if device is None:
        device = next((p.device for p in model.parameters()), "cpu")
    dtype = getattr(cfg, "dtype", None)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters()), None)
    out: dict[str, Any] = {
        "name": getattr(cfg, "model_name", None) or type(model).__name__,
        "fingerprint": fingerprint(model),
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(torch.device(device))
    if cfg is not None:
        for key in ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_vocab"):
            out[key] = describe(getattr(cfg, key, None))
        out["architecture"] = describe(getattr(cfg, "original_architecture", None))
    return out


def _versions() -> dict[str, str]:
    return {
        "circuitkit": __version__,
        "transformer_lens": _package_version("transformer-lens"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__all__ = ["record", "fingerprint", "tensor_digest", "describe", "metric_name", "short"]
