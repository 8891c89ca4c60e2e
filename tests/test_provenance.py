"""Provenance: the weight fingerprint against a plain reference, and the records methods keep."""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.metadata
import json
import weakref
from datetime import datetime

import numpy as np
import pytest
import torch
from _device import DEVICE

import circuitkit as ck
from circuitkit.core import provenance


def reference_fingerprint(model) -> str:
    """The documented fingerprint written plainly: one parameter at a time, in one thread."""
    total = hashlib.sha256()
    for name, param in model.named_parameters():
        cpu = param.detach().cpu()
        if cpu.dtype == torch.bfloat16:  # numpy has no bfloat16: take its raw 2-byte words
            cpu = cpu.view(torch.int16)
        digest = hashlib.sha256(cpu.numpy().tobytes()).hexdigest()
        total.update(f"{name}|{param.dtype}|{tuple(param.shape)}|{digest}\n".encode())
    return "sha256:" + total.hexdigest()


def model_state(model):
    hooks = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    grads = [p.requires_grad for p in model.parameters()]
    return hooks, model.training, grads


def test_fingerprint_equals_reference(tiny_model):
    assert provenance.fingerprint(tiny_model) == reference_fingerprint(tiny_model)
    assert provenance.fingerprint(copy.deepcopy(tiny_model)) == reference_fingerprint(tiny_model)
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert provenance.fingerprint(half) == reference_fingerprint(half)
    assert provenance.fingerprint(half) != provenance.fingerprint(tiny_model)


def test_fingerprint_sees_every_weight_change(tiny_gpt2):
    before = provenance.fingerprint(tiny_gpt2)
    state = copy.deepcopy(tiny_gpt2.state_dict())
    w_o = tiny_gpt2.blocks[1].attn.W_O
    version = w_o._version

    w_o.data[2, 5, 7] += 1e-6  # an edit that PyTorch's version counter does not see
    assert w_o._version == version
    assert provenance.fingerprint(tiny_gpt2) != before
    w_o.data[2, 5, 7] -= 1e-6
    tiny_gpt2.load_state_dict(state)
    assert provenance.fingerprint(tiny_gpt2) == before

    with torch.no_grad():
        w_o[[0, 1]] = w_o[[1, 0]].clone()  # two heads swapped: same bytes, other places
    assert provenance.fingerprint(tiny_gpt2) != before
    tiny_gpt2.load_state_dict(state)
    assert provenance.fingerprint(tiny_gpt2) == before

    snapshot = model_state(tiny_gpt2)
    provenance.fingerprint(tiny_gpt2)
    assert model_state(tiny_gpt2) == snapshot


def count_full_hashes(monkeypatch) -> list[int]:
    """A list that grows by one for each parameter ``fingerprint`` hashes in full."""
    hashed: list[int] = []
    digest = provenance.tensor_digest

    def counting(tensor):
        hashed.append(tensor.numel())
        return digest(tensor)

    monkeypatch.setattr(provenance, "tensor_digest", counting)
    return hashed


def test_fingerprint_is_kept_while_the_weights_are_unchanged(tiny_gpt2, monkeypatch):
    hashed = count_full_hashes(monkeypatch)
    n_params = len(list(tiny_gpt2.parameters()))
    attributes = set(vars(tiny_gpt2))
    before = provenance.fingerprint(tiny_gpt2)
    assert len(hashed) == n_params

    ds = ck.IOIDataset(tiny_gpt2, n=2, seed=0)
    tiny_gpt2.run_with_cache(ds.tokens)
    provenance.record(tiny_gpt2, method="x", data=ds)
    assert provenance.fingerprint(tiny_gpt2) == before
    assert len(hashed) == n_params  # no parameter hashed again
    assert set(vars(tiny_gpt2)) == attributes  # nothing set on the model

    with torch.no_grad():
        tiny_gpt2.blocks[1].mlp.W_in.mul_(1)  # same values, a new version: hashed again
    assert provenance.fingerprint(tiny_gpt2) == before
    assert len(hashed) == 2 * n_params
    assert provenance.fingerprint(tiny_gpt2) == before
    assert len(hashed) == 2 * n_params


def edit_through_data(model):
    w_o = model.blocks[0].attn.W_O
    version = w_o._version
    w_o.data[0, 0, 0] += 1
    assert w_o._version == version  # no version counter sees it


def edit_in_place(model):
    with torch.no_grad():
        model.blocks[0].attn.W_O.add_(1)


def zero_a_head(model):
    model.blocks[0].attn.W_O.data[2] = 0


def negate_a_head(model):
    model.blocks[1].attn.W_O.data[1] *= -1


def swap(first, second):
    """Swap two elements of block 0's W_O (4 x 16 x 64 float32: rows of 2048 in the checksum)."""

    def edit(model):
        flat = model.blocks[0].attn.W_O.data.view(-1)
        assert flat[first] != flat[second]
        flat[[first, second]] = flat[[second, first]].clone()

    return edit


def load_other_weights(model):
    model.load_state_dict(ck.tiny_model("gpt2", seed=1).to(DEVICE).state_dict())


def replace_a_parameter(model):
    attn = model.blocks[0].attn
    attn.W_O = torch.nn.Parameter(attn.W_O.detach() + 1)


EDITS = {
    "through .data": edit_through_data,
    "in place": edit_in_place,
    "zero a head through .data": zero_a_head,
    "negate a head through .data": negate_a_head,
    "swap within a 64-bit word": swap(4, 5),
    "swap within a row": swap(5, 7),
    "swap within a column": swap(5, 5 + 2048),
    "swap across rows and columns": swap(5, 2048 + 100),
    "load_state_dict": load_other_weights,
    "float64": lambda model: model.to(torch.float64),
    "float16": lambda model: model.to(torch.float16),
    "replace a parameter": replace_a_parameter,
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_fingerprint_sees_each_change(tiny_gpt2, edit):
    state = copy.deepcopy(tiny_gpt2.state_dict())
    before = provenance.fingerprint(tiny_gpt2)
    assert provenance.fingerprint(tiny_gpt2) == before

    edit(tiny_gpt2)
    after = provenance.fingerprint(tiny_gpt2)
    assert after != before
    assert after == reference_fingerprint(tiny_gpt2)  # what a computation from scratch gives
    assert after == provenance.fingerprint(copy.deepcopy(tiny_gpt2))  # a model never seen
    assert provenance.fingerprint(tiny_gpt2) == after

    tiny_gpt2.to(torch.float32)
    tiny_gpt2.load_state_dict(state)
    assert provenance.fingerprint(tiny_gpt2) == before


def test_replacing_a_parameter_by_an_equal_one_keeps_the_fingerprint(tiny_gpt2, monkeypatch):
    before = provenance.fingerprint(tiny_gpt2)
    hashed = count_full_hashes(monkeypatch)
    attn = tiny_gpt2.blocks[0].attn
    attn.W_O = torch.nn.Parameter(attn.W_O.detach().clone())
    assert provenance.fingerprint(tiny_gpt2) == before
    assert hashed  # a new parameter object: hashed again, to the same digest


def test_models_with_equal_weights_have_equal_fingerprints():
    first, second = ck.tiny_model("gpt2"), ck.tiny_model("gpt2")
    fingerprint = provenance.fingerprint(first)
    assert provenance.fingerprint(second) == fingerprint == reference_fingerprint(first)
    second.blocks[0].attn.W_O.data[0, 0, 0] += 1
    assert provenance.fingerprint(second) == reference_fingerprint(second) != fingerprint
    assert provenance.fingerprint(first) == fingerprint  # each model has its own entry


def test_kept_fingerprint_does_not_keep_the_model_alive():
    model = ck.tiny_model("gpt2")
    provenance.fingerprint(model)
    assert model in provenance._fingerprints
    # models of earlier tests may be collected in the same gc pass: count those still alive
    others = [weakref.ref(kept) for kept in list(provenance._fingerprints) if kept is not model]
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert len(provenance._fingerprints) == sum(other() is not None for other in others)


def reference_checksum(tensor) -> bytes:
    """The checksum written plainly: 64-bit words summed by row and by column in Python ints."""
    data = tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    row_words = 1024
    n_rows = len(data) // (8 * row_words)
    if n_rows == 0:
        return hashlib.sha256(data).digest()
    words = [
        int.from_bytes(data[at : at + 8], "little") for at in range(0, 8 * row_words * n_rows, 8)
    ]
    rows = [sum(words[row * row_words : (row + 1) * row_words]) % 2**64 for row in range(n_rows)]
    columns = [sum(words[column::row_words]) % 2**64 for column in range(row_words)]
    packed = b"".join(total.to_bytes(8, "little") for total in rows + columns)
    return hashlib.sha256(packed + data[8 * row_words * n_rows :]).digest()


def test_checksum_equals_reference():
    g = torch.Generator().manual_seed(0)
    full_range = torch.randint(-(2**63), 2**63 - 1, (40 * 1024 + 3,), generator=g)  # sums wrap
    floats = torch.randn(3 * 2048 + 5, generator=g)
    tensors = [
        torch.zeros(0),
        torch.arange(3, dtype=torch.uint8),
        torch.randn(2047, generator=g),  # 4 bytes short of one row: all tail
        torch.randn(2048, generator=g),  # exactly one row
        floats,
        floats[1:],  # 4 bytes off 8-byte alignment
        torch.randn(70, 130, generator=g).T,  # not contiguous
        torch.randn(3 * 4096 + 7, generator=g).to(torch.bfloat16),
        full_range,
    ]
    for tensor in tensors:
        expected = reference_checksum(tensor)
        assert provenance._checksums([tensor]) == (expected,)
        assert provenance._checksums([tensor.to(DEVICE)]) == (expected,)
    both = provenance._checksums([tensors[4].to(DEVICE), tensors[8]])
    assert both == (reference_checksum(tensors[4]), reference_checksum(tensors[8]))


def test_tensor_digest_is_the_sha256_of_the_bytes():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    expected = hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
    assert provenance.tensor_digest(tensor) == expected
    assert provenance.tensor_digest(tensor.T.contiguous().T) == expected  # layout does not matter
    assert provenance.tensor_digest(tensor + 1) != expected


def test_describe_writes_json():
    ds_like = type("Data", (), {"provenance": {"dataset": "X", "n": 3}})()
    metric = ck.metrics.Metric("logit_diff", torch.zeros(2, dtype=torch.long), lambda x: x)
    described = provenance.describe(
        {
            "tokens": torch.ones(2, 3, dtype=torch.long),
            "components": [ck.Head(9, 9), ck.Resid(3, "mid").at("end")],
            "data": ds_like,
            "metric": metric,
            "numbers": (1, 2.5, float("nan"), np.int64(4), None, True),
            "fn": len,
            5: slice(1, 3),
        }
    )
    assert described["tokens"] == {
        "tensor": [2, 3],
        "dtype": "int64",
        "sha256": provenance.tensor_digest(torch.ones(2, 3, dtype=torch.long)),
    }
    assert described["components"] == ["Head(9, 9)", "Resid(3, 'mid').at('end')"]
    assert described["data"] == {"dataset": "X", "n": 3}
    assert described["metric"] == {"metric": "logit_diff"}
    assert described["numbers"] == [1, 2.5, "nan", 4, None, True]
    assert described["fn"] == {"type": "builtin_function_or_method", "repr": repr(len)}
    assert described["5"] == "slice(1, 3, None)"
    json.dumps(described, allow_nan=False)


def test_record(tiny_llama):
    ds = ck.IOIDataset(tiny_llama, n=4, seed=1)
    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    made = provenance.record(
        tiny_llama,
        method="ablate",
        args={"components": [ck.Head(0, 1)], "method": "mean"},
        data={"base": ds, "reference": abc},
        metric=metric,
    )
    json.dumps(made, allow_nan=False)
    assert made["method"] == "ablate"
    assert made["args"] == {"components": ["Head(0, 1)"], "method": "mean"}
    assert made["data"]["base"] == ds.provenance
    assert made["data"]["reference"]["corruption"] == "ABC"
    assert made["metric"] == "logit_diff"
    model = made["model"]
    assert model["name"] == tiny_llama.cfg.model_name
    assert model["fingerprint"] == reference_fingerprint(tiny_llama)
    assert model["n_params"] == sum(p.numel() for p in tiny_llama.parameters())
    assert (model["device"], model["dtype"]) == ("cpu", "float32")
    assert model["n_key_value_heads"] == tiny_llama.cfg.n_key_value_heads
    assert made["versions"] == {
        "circuitkit": ck.__version__,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "torch": torch.__version__,
        "python": made["versions"]["python"],
    }
    assert datetime.fromisoformat(made["timestamp"]).utcoffset().total_seconds() == 0
    one_dataset = provenance.record(None, method="x", data=ds)
    assert one_dataset["data"] == ds.provenance and one_dataset["model"] is None


def test_record_errors():
    with pytest.raises(ck.CircuitkitError, match="record: method must be a non-empty string"):
        provenance.record(None, method="")
    with pytest.raises(ck.CircuitkitError, match="args must be a dict of argument names"):
        provenance.record(None, method="x", args=[1, 2])


def test_short():
    made = {"model": {"name": "gpt2", "fingerprint": "sha256:0123456789ab"}}
    made["timestamp"] = "2025-06-01T12:34:56+00:00"
    assert provenance.short(made) == "gpt2 sha256:01234567, 2025-06-01 12:34 UTC"
    assert provenance.short({}) == ""


def test_activation_patching_records_provenance(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=2)
    abc = ds.corrupted("ABC")
    snapshot = model_state(tiny_gpt2)
    result = ck.activation_patching(
        tiny_gpt2, ds, abc, "head", positions=["S2", "end"], progress=False
    )
    assert model_state(tiny_gpt2) == snapshot
    made = result.provenance
    assert made["method"] == "activation_patching"
    assert made["args"]["component"] == "head" and made["args"]["positions"] == ["S2", "end"]
    assert made["args"]["direction"] == "denoise" and made["args"]["keep_examples"] is True
    assert made["data"] == {"clean": ds.provenance, "corrupted": abc.provenance}
    assert made["metric"] == "logit_diff" == result.metric
    assert made["model"]["fingerprint"] == reference_fingerprint(tiny_gpt2)
    fingerprint_hex = made["model"]["fingerprint"][len("sha256:") :]
    assert f"made with {tiny_gpt2.cfg.model_name} sha256:{fingerprint_hex[:8]}" in repr(result)


def test_keep_examples(tiny_gpt2):
    clean = torch.randint(0, 1000, (5, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.flip(0)
    metric = ck.metrics.Metric("first", torch.full((5,), 5), lambda logits: logits[..., 3])
    kept = ck.activation_patching(tiny_gpt2, clean, corrupted, "mlp", metric, progress=False)
    dropped = ck.activation_patching(
        tiny_gpt2, clean, corrupted, "mlp", metric, keep_examples=False, progress=False
    )
    assert kept.examples.shape == (tiny_gpt2.cfg.n_layers, 5) and dropped.examples is None
    torch.testing.assert_close(dropped.values, kept.values)
    assert kept.values.std() > 1e-4
    assert dropped.provenance["args"]["keep_examples"] is False


@pytest.mark.real
def test_fingerprint_of_smollm(smollm):
    assert provenance.fingerprint(smollm) == reference_fingerprint(smollm)


def _every_method(model, keep_examples=True):
    """(name, Result) for every method that returns results, on a small IOI batch."""
    ds = ck.IOIDataset(model, n=4, seed=3)
    abc = ds.corrupted("ABC")
    kw = dict(keep_examples=keep_examples)
    quiet = dict(progress=False, **kw)
    _, cache = model.run_with_cache(ds.tokens)
    heads = [ck.Head(1, 0), ck.Head(1, 2)]
    trace = ck.causal_trace(
        model, "The Eiffel Tower is in", "Eiffel Tower", " Paris", samples=2, progress=False
    )
    effects = ck.causal_effects(
        model,
        ds.tokens[:2],
        abc.tokens[:2],
        ds.io_tokens[:2],
        foil=ds.s_tokens[:2],
        measure="logit_diff",
        kinds=["mlp"],
        per_position=False,
        **quiet,
    )
    yield "ablate", ck.ablate(model, ds, heads, reference=abc, **quiet)
    yield "ablation_sweep", ck.ablation_sweep(model, ds, "mlp", reference=abc, **quiet)
    yield "direct_logit_attribution", ck.direct_logit_attribution(model, cache, ds, "head", **kw)
    yield "logit_lens", ck.logit_lens(model, cache, ds, **kw)
    yield "path_patching", ck.path_patching(model, ds, abc, "heads", "logits", **quiet)
    yield "causal_trace", trace.scores
    yield "causal_trace", trace.indirect_effect
    yield "average_indirect_effect", ck.average_indirect_effect([trace])
    yield "causal_effects", effects.indirect["mlp"]


def test_every_method_records_provenance(tiny_gpt2):
    snapshot = model_state(tiny_gpt2)
    fingerprint = reference_fingerprint(tiny_gpt2)
    for method, result in _every_method(tiny_gpt2):
        made = result.provenance
        assert made["method"] == method, method
        assert made["model"]["fingerprint"] == fingerprint, method
        assert made["versions"]["circuitkit"] == ck.__version__, method
        assert made["data"], method
        json.dumps(made)  # the record is plain JSON
        assert "made with" in repr(result), method
    assert model_state(tiny_gpt2) == snapshot


def test_every_method_can_drop_examples(tiny_gpt2):
    kept = dict(_every_method(tiny_gpt2))
    dropped = dict(_every_method(tiny_gpt2, keep_examples=False))
    for method in (
        "ablate",
        "ablation_sweep",
        "direct_logit_attribution",
        "logit_lens",
        "path_patching",
        "causal_effects",
    ):
        assert kept[method].examples is not None and dropped[method].examples is None, method
        torch.testing.assert_close(dropped[method].values, kept[method].values)
        assert dropped[method].provenance["args"]["keep_examples"] is False
        assert kept[method].values.std() > 1e-5, method  # the comparison can fail
