"""The IOI study, its page and the ``circuitkit`` command on tiny TransformerBridge models
(TransformerLens 4), and ``ck.tiny_model``'s bridge.

Same weights, two kinds of model: ``tiny_transformers_model`` builds the transformers model that
a tiny bridge wraps; saved to a folder, ``ck.load_model(folder)`` on TransformerLens 3 gives the
``HookedTransformer`` of the same weights. The two lines cannot be installed together, so the
HookedTransformer's results (``ioi_study``, and with it ``ck.find_ioi_circuit``,
``ck.faithfulness`` and ``ck.faithfulness_table``; ``ck.discover_circuit`` at edge and node
level) are stored in ``tests/data/tiny_bridge_reference.safetensors``: on the 3.x line the tests
check the file against the HookedTransformer, on the 4.x line they check the bridge against it.
After a change that moves these results, write the file again on the 3.x line:

    python tests/test_bridge_report.py

Tolerance: the bridge runs the transformers model (eager attention) and the HookedTransformer
its own converted copy; their logits differ by about 1e-5 on these models, and the values
compared (logit differences, scores, faithfulness ratios, of order 0.1 to 10) are held to atol
2e-4, rtol 1e-4 (measured: at most 4.5e-6). The circuits found (heads, classes, positions, MLPs,
edges) must be the same.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import circuitkit as ck
from circuitkit.core import lens, models
from circuitkit.data.tiny import tiny_tokenizer, tiny_transformers_model
from circuitkit.interface import cli
from circuitkit.interface.ioi_report import ioi_study

REFERENCE = Path(__file__).parent / "data" / "tiny_bridge_reference.safetensors"
# The tiny models compared: kind -> tiny_transformers_model's arguments.
MODELS = {"llama": dict(n_layers=4, seed=1), "gpt2": dict(n_layers=3, seed=0)}
N_PROMPTS = 8
ATOL, RTOL = 2e-4, 1e-4

on_tl4 = pytest.mark.skipif(
    lens.LINE < 4,
    reason=f"TransformerBridge models need TransformerLens 4 (installed: {lens.VERSION}); "
    ".ci/run runs these tests in a second environment with TransformerLens 4",
)
on_tl3 = pytest.mark.skipif(
    lens.LINE >= 4, reason=f"needs TransformerLens 3 (installed: {lens.VERSION})"
)


def model_of(kind: str) -> Any:
    """The tiny model of ``kind`` in ``MODELS``: a bridge on TransformerLens 4, the
    HookedTransformer of the same weights (through a checkpoint folder) on TransformerLens 3."""
    if lens.LINE >= 4:
        return ck.tiny_model(kind, **MODELS[kind], backend="bridge")
    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory(prefix="circuitkit-tiny-") as folder:
        tiny_transformers_model(kind, **MODELS[kind], tokenizer=tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return ck.load_model(folder, device="cpu", backend="hooked")


def describe(circuit: ck.Circuit) -> str:
    """The circuit's heads with their classes and positions, its MLPs and its edges."""
    return "\n".join([repr(circuit), repr(circuit.mlps), *map(repr, circuit.edges)])


def compute(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The values (float32 CPU tensors) and the circuits (as text) compared between a tiny
    bridge and the HookedTransformer of the same weights."""
    ds = ck.IOIDataset(model, n=N_PROMPTS, seed=0)
    study = ioi_study(model, ds, discover_n=6, patch_n=3, sweeps=("resid", "head"), progress=False)
    table = study.table[["f_circuit", "f_model", "f_empty"]].to_numpy()
    values = {
        "clean": study.clean.logit_diff,
        "corrupted": study.corrupted.logit_diff,
        "dla_heads": study.heads.values,
        "logit_lens": study.lens.values,
        "patching_resid": study.patching["resid"].values,
        "patching_head": study.patching["head"].values,
        "path_logits": study.circuit.info["direct"].values,
        "faithfulness": torch.tensor(
            [study.faithful.ratio, study.faithful.f_circuit, study.faithful.f_model]
        ),
        "faithfulness_table": torch.tensor(table),
    }
    circuits = {"ioi": describe(study.circuit)}
    abc = study.abc
    for level in ("edge", "node"):
        # normalised: on these random models the empty circuit keeps most of F(M)
        found = ck.discover_circuit(
            model, ds, abc, method="eap-ig", steps=3, level=level, normalize=True, progress=False
        )
        values[f"discover_{level}_scores"] = found.info["scores"].values
        values[f"discover_{level}_curve"] = found.info["curve"].values
        circuits[f"discover_{level}"] = describe(found)
    values = {
        name: torch.as_tensor(v).detach().float().cpu().contiguous() for name, v in values.items()
    }
    return values, circuits


def load_reference() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(REFERENCE), framework="pt") as file:
        circuits = json.loads(file.metadata()["circuits"])
    return load_file(str(REFERENCE)), circuits


@pytest.mark.parametrize("kind", list(MODELS))
def test_bridge_equals_the_hooked_transformer_of_the_same_weights(kind):
    # on TransformerLens 3: the stored file is what the HookedTransformer gives today
    model = model_of(kind)
    assert lens.is_bridge(model) == (lens.LINE >= 4)
    values, circuits = compute(model)
    stored_values, stored_circuits = load_reference()
    names = {name.split("/", 1)[1] for name in stored_values if name.startswith(f"{kind}/")}
    assert names == set(values), "write it again: python tests/test_bridge_report.py"
    for name, value in values.items():
        assert_close(value, stored_values[f"{kind}/{name}"], atol=ATOL, rtol=RTOL, msg=name)
    assert circuits == stored_circuits[kind]
    # the comparison has something to compare: circuits with heads, values far from zero
    assert values["path_logits"].abs().max() > 1e-2
    assert all(
        " 0 heads" not in circuits[name] for name in ("ioi", "discover_edge", "discover_node")
    )


# -- ck.tiny_model's bridge ------------------------------------------------------------------


@on_tl4
@pytest.mark.parametrize("kind", list(MODELS))
def test_tiny_bridge_wraps_the_tiny_transformers_model(kind):
    import random

    import numpy as np

    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    model = ck.tiny_model(kind, seed=5, n_layers=2)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert lens.is_bridge(model) and not model.training
    assert model.cfg.model_name == f"tiny-{kind}" and model.cfg.n_layers == 2
    assert model.cfg.d_vocab == len(tiny_tokenizer())
    text = "When Mary and John went to the store, John gave a drink to"
    tokens = model.to_tokens(text)
    assert tokens[0].tolist() == tiny_tokenizer()(text).input_ids  # BOS first, as on 3.x
    hf_model = tiny_transformers_model(kind, seed=5, n_layers=2, tokenizer=tiny_tokenizer())
    with torch.no_grad():
        assert_close(model(tokens), hf_model(tokens).logits, atol=1e-5, rtol=0)
        # the same seed gives the same model, another seed another
        assert torch.equal(ck.tiny_model(kind, seed=5, n_layers=2)(tokens), model(tokens))
        other = ck.tiny_model(kind, seed=6, n_layers=2)(tokens)
    assert (other - model(tokens)).abs().max() > 0.1


def test_tiny_transformers_model_draws_from_its_seed_alone():
    first = tiny_transformers_model("llama", seed=3, n_layers=2)
    torch.manual_seed(123)  # the global generator's state does not matter
    again = dict(tiny_transformers_model("llama", seed=3, n_layers=2).named_parameters())
    params = {name: param.detach() for name, param in first.named_parameters()}
    assert all(torch.equal(params[name], again[name]) for name in params)
    std = 1.6 / 64**0.5
    matrix = params["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float(matrix.std()) - std) < 0.1 * std
    norm = params["model.layers.0.input_layernorm.weight"]
    assert abs(float(norm.mean()) - 1) < 0.05 and 0.05 < float(norm.std()) < 0.15
    gpt2 = {
        name: param.detach()
        for name, param in tiny_transformers_model("gpt2", seed=3, n_layers=2).named_parameters()
    }
    bias = gpt2["transformer.h.0.attn.c_attn.bias"]
    assert abs(float(bias.mean())) < 0.05 and 0.05 < float(bias.std()) < 0.15
    assert not torch.equal(gpt2["lm_head.weight"], gpt2["transformer.wte.weight"])


@on_tl4
def test_tiny_bridge_refuses_what_it_cannot_build():
    with pytest.raises(ck.ModelLoadError, match="kind 'attn-only' has no bridge"):
        ck.tiny_model("attn-only")
    with pytest.raises(ck.ModelLoadError, match="a tiny bridge needs a tokenizer"):
        ck.tiny_model("llama", tokenizer=False)
    with pytest.raises(ck.ModelLoadError, match="tiny_model: backend='hooked' needs"):
        ck.tiny_model("llama", backend="hooked")


@on_tl3
def test_tiny_bridge_needs_transformer_lens_4():
    with pytest.raises(ck.ModelLoadError, match="tiny_model: backend='bridge' needs"):
        ck.tiny_model("llama", backend="bridge")
    assert not lens.is_bridge(ck.tiny_model("llama"))  # the default follows the line


# -- the command and its pages on a tiny bridge ----------------------------------------------


@pytest.fixture
def tiny_bridge_by_name(monkeypatch):
    """``load_model`` answers every name with a tiny Llama-like bridge."""
    if lens.LINE < 4:
        pytest.skip(f"TransformerBridge models need TransformerLens 4 (installed: {lens.VERSION})")
    model = ck.tiny_model("llama", n_layers=4, seed=1, backend="bridge")
    monkeypatch.setattr(models, "load_model", lambda name, device=None: model)
    return model


@on_tl4
def test_ioi_writes_its_page_on_a_bridge(tiny_bridge_by_name, capsys, tmp_path):
    from _browser import figures_rendered, render

    model = tiny_bridge_by_name
    out = tmp_path / "ioi.html"
    argv = ["ioi", "--n", "8", "--discover-n", "6", "--patch-n", "3", "--table-n", "4"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "IOI circuit (ck.find_ioi_circuit): found on the first 6 of the 8 prompts" in printed
    assert f"wrote {out}" in printed
    # the printed circuit and faithfulness are those ck.find_ioi_circuit and ck.faithfulness give
    ds = ck.IOIDataset(model, n=8)
    abc = ds.corrupted("ABC")
    circuit = ck.find_ioi_circuit(model, ds[:6], reference=abc[:6], progress=False)
    faithful = ck.faithfulness(model, circuit, ds, reference=abc, progress=False)
    assert len(circuit) > 0
    assert f"{len(circuit)} heads; faithfulness F(C)/F(M) = {faithful.f_circuit:.3f}" in printed
    assert f"= {100 * faithful.ratio:.1f}%" in printed
    rendered = render(out)
    assert [m for m in rendered.console if "error" in m.lower()] == []
    # every figure is drawn: the logit lens, DLA, five patching sweeps (key and value of the
    # grouped-query heads among them), path patching, attention, the circuit graph
    n_figures = out.read_text().count('class="ck-figure"')
    assert n_figures >= 10 and len(figures_rendered(rendered.dom)) == n_figures
    for words in ("Baseline", "Activation patching", "Path patching", "The circuit",
                  "Faithfulness under each ablation", "How this was made"):  # fmt: skip
        assert words in rendered.dom, words
    # a figure redrawn from its saved result is the study's own
    saved = ck.Result.load(tmp_path / "ioi_results" / "patching_k")
    assert saved.values.shape == (4, model.cfg.n_key_value_heads)
    again = ck.activation_patching(
        model, ds[:3], abc[:3], "k", ck.metrics.logit_diff(ds[:3]), progress=False
    )
    assert_close(saved.values, again.values)


@on_tl4
def test_quick_ioi_on_a_bridge(tiny_bridge_by_name, capsys):
    assert cli.main(["ioi", "--quick", "--n", "6", "--discover-n", "4", "--table-n", "4"]) == 0
    captured = capsys.readouterr()
    assert "n=6," in captured.out and "found on the first 4 of the 6 prompts" in captured.out
    assert "heads of layers 1-3" in captured.err
    table = captured.out.split("under each ablation (ck.faithfulness_table, ")[1]
    assert table.startswith("4 prompts)")


@on_tl4
def test_trace_writes_its_page_on_a_bridge(tiny_bridge_by_name, tmp_path, capsys):
    from _browser import figures_rendered, render

    out = tmp_path / "t.html"
    prompt = "The Louvre is located in the city of"
    argv = ["trace", "--quick", "--out", str(out), "--prompt", prompt, "--subject", "Louvre",
            "--target", " Paris"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "'The Louvre is located in the city of' -> ' Paris' on smollm2-135m" in printed
    rendered = render(out)
    assert [m for m in rendered.console if "error" in m.lower()] == []
    assert len(figures_rendered(rendered.dom)) == 2
    saved = ck.Result.load(tmp_path / "t_results" / "trace_mlp")
    again = ck.causal_trace(
        tiny_bridge_by_name, prompt, "Louvre", " Paris", kind="mlp", samples=3, progress=False
    )
    assert_close(saved.values, again.scores.values)
    assert saved.values.abs().max() > 0


def write_reference() -> int:
    if lens.LINE != 3:
        print("write the reference on the TransformerLens 3.x line", file=sys.stderr)
        return 1
    tensors, circuits = {}, {}
    for kind in MODELS:
        values, circuits[kind] = compute(model_of(kind))
        tensors |= {f"{kind}/{name}": value for name, value in values.items()}
    REFERENCE.parent.mkdir(exist_ok=True)
    save_file(tensors, str(REFERENCE), metadata={"circuits": json.dumps(circuits)})
    print(f"wrote {len(tensors)} values and {sum(map(len, circuits.values()))} circuits to "
          f"{REFERENCE}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(write_reference())
