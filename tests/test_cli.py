"""The ``circuitkit ioi`` command, run end to end through ``main``."""

from __future__ import annotations

import pytest
from _device import DEVICE

import circuitkit as ck
from circuitkit import cli, models


def test_ioi_prints_the_circuit_and_its_faithfulness(monkeypatch, capsys):
    tiny = ck.tiny_model("llama", n_layers=4).to(DEVICE)
    monkeypatch.setattr(models, "load_model", lambda name, device=None: tiny)
    assert cli.main(["ioi", "--n", "8", "--discover-n", "6", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "IOI baseline: " in out and "Logit lens" in out
    assert "IOI circuit (ck.find_ioi_circuit): found on the first 6 of the 8 prompts" in out
    assert "faithfulness F(C)/F(M) = " in out and "the IOI paper's GPT-2 small circuit" in out
    # the printed faithfulness is the one ck.faithfulness gives for the circuit found
    ds = ck.IOIDataset(tiny, n=8)
    abc = ds.corrupted("ABC")
    circuit = ck.find_ioi_circuit(tiny, ds[:6], reference=abc[:6], progress=False)
    faithful = ck.faithfulness(tiny, circuit, ds, reference=abc, progress=False)
    assert f"{len(circuit)} heads; faithfulness F(C)/F(M) = {faithful.f_circuit:.3f}" in out
    assert f"= {100 * faithful.ratio:.1f}%" in out

    assert cli.main(["ioi", "--n", "8", "--no-circuit"]) == 0
    assert "IOI circuit" not in capsys.readouterr().out


def test_quick_takes_fewer_prompts(monkeypatch, capsys):
    tiny = ck.tiny_model("llama", n_layers=4).to(DEVICE)
    monkeypatch.setattr(models, "load_model", lambda name, device=None: tiny)
    assert cli.main(["ioi", "--quick"]) == 0
    out = capsys.readouterr().out
    assert f"n={cli.QUICK_N}," in out
    assert f"found on the first {cli.QUICK_DISCOVER_N} of the {cli.QUICK_N} prompts" in out


@pytest.mark.real
def test_ioi_on_smollm(capsys):
    assert cli.main(["ioi", "--n", "3", "--discover-n", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "IOI circuit (ck.find_ioi_circuit): found on the first 2 of the 3 prompts" in out
    assert "faithfulness F(C)/F(M) = " in out
