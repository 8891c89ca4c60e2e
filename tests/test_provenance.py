"""Provenance: the weight fingerprint against a plain reference, and the records methods keep."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
from datetime import datetime

import numpy as np
import pytest
import torch

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
    with pytest.raises(ValueError, match="record: method must be a non-empty string"):
        provenance.record(None, method="")
    with pytest.raises(ValueError, match="args must be a dict of argument names"):
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
