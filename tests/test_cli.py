"""The ``circuitkit`` command: its subcommands on tiny models (and the real one where it counts)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _browser import figures_rendered, render
from _device import DEVICE

import circuitkit as ck
from circuitkit.core import models
from circuitkit.interface import cli


@pytest.fixture
def tiny_by_name(monkeypatch, tiny_gpt2):
    """``load_model`` answers every name with the tiny GPT-2-like model."""
    names = []

    def fake_load(name, device=None, dtype=None):
        names.append(name)
        return tiny_gpt2

    monkeypatch.setattr(models, "load_model", fake_load)
    return names


def test_trace_writes_its_page(tiny_by_name, tmp_path, capsys):
    out = tmp_path / "t.html"
    status = cli.main(
        [
            "trace",
            "--model",
            "tiny",
            "--quick",
            "--out",
            str(out),
            "--prompt",
            "The Louvre is located in the city of",
            "--subject",
            "Louvre",
            "--target",
            " Paris",
        ]
    )
    assert status == 0 and tiny_by_name == ["tiny"]
    printed = capsys.readouterr().out
    assert "'The Louvre is located in the city of' -> ' Paris'" in printed
    for kind in ("resid", "mlp", "attn"):
        assert f"\n{kind} " in printed
    assert f"wrote {out}" in printed
    rendered = render(out)
    assert [m for m in rendered.console if "error" in m.lower()] == []
    assert len(figures_rendered(rendered.dom)) == 2
    saved = sorted(p.name for p in (tmp_path / "t_results").iterdir())
    assert saved == ["trace_attn", "trace_mlp", "trace_resid"]
    assert ck.Result.load(tmp_path / "t_results" / "trace_mlp").axes == ("layer", "pos")


def test_trace_errors_are_one_line(tiny_by_name, tmp_path, capsys):
    status = cli.main(["trace", "--subject", "Colosseum", "--out", str(tmp_path / "x.html")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("circuitkit trace: error:") and "Colosseum" in err[-1]
    assert not (tmp_path / "x.html").exists()


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


def test_ioi_writes_its_page(monkeypatch, capsys, tmp_path):
    tiny = ck.tiny_model("llama", n_layers=4).to(DEVICE)
    monkeypatch.setattr(models, "load_model", lambda name, device=None: tiny)
    out = tmp_path / "ioi.html"
    argv = ["ioi", "--n", "8", "--discover-n", "6", "--patch-n", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    shot = tmp_path / "ioi.png"
    rendered = render(out, screenshot=shot)
    assert [m for m in rendered.console if "error" in m.lower()] == []
    # every figure renders: logit lens, DLA, 5 patching sweeps, path patching to the logits
    # (and to the queries of the heads that write the answer, when there are such heads),
    # attention, the circuit graph
    n_figures = out.read_text().count('class="ck-figure"')
    assert n_figures >= 10 and len(figures_rendered(rendered.dom)) == n_figures
    assert shot.stat().st_size > 10_000
    for words in (
        "Baseline",
        "Logit lens",
        "Activation patching",
        "Path patching",
        "Attention of the circuit",
        "The circuit",
        "Faithfulness",
        "Faithfulness under each ablation",
        "How this was made",
    ):
        assert words in rendered.dom, words  # fmt: skip
    saved = {p.name for p in (tmp_path / "ioi_results").iterdir()}
    assert {"logit_lens", "dla_heads", "patching_head", "patching_q", "path_logits",
            "faithfulness"} <= saved  # fmt: skip
    # a figure redrawn from its saved result is the study's own
    heads = ck.Result.load(tmp_path / "ioi_results" / "patching_head")
    ds = ck.IOIDataset(tiny, n=8)
    again = ck.activation_patching(
        tiny, ds[:3], ds.corrupted("ABC")[:3], "head", ck.metrics.logit_diff(ds[:3]),
        progress=False,
    )  # fmt: skip
    torch.testing.assert_close(heads.values, again.values)
    assert heads.provenance["method"] == "activation_patching"


def test_quick_takes_fewer_prompts_and_searches_the_later_layers(monkeypatch, capsys):
    tiny = ck.tiny_model("llama", n_layers=6).to(DEVICE)
    monkeypatch.setattr(models, "load_model", lambda name, device=None: tiny)
    found = []
    search = ck.find_ioi_circuit

    def recorded(*args, **kwargs):
        found.append(kwargs["layers"])
        return search(*args, **kwargs)

    monkeypatch.setattr("circuitkit.interface.ioi_report.find_ioi_circuit", recorded)
    assert cli.main(["ioi", "--quick"]) == 0
    captured = capsys.readouterr()
    assert f"n={cli.QUICK_N}," in captured.out
    assert f"found on the first {cli.QUICK_DISCOVER_N} of the {cli.QUICK_N} prompts" in captured.out
    assert found == [range(6 // cli.QUICK_FIRST_LAYER, 6)]
    assert "heads of layers 2-5" in captured.err
    # the circuit's faithfulness under the few node-level ablations of a first look
    table = captured.out.split("under each ablation (ck.faithfulness_table, ")[1]
    assert table.startswith(f"{cli.QUICK_TABLE_N} prompts)")
    lines = table.splitlines()[4 : 4 + len(cli.QUICK_TABLE_CHOICES)]
    labels = [ck.Ablation(*(("mean", True) if c == "mean-template" else (c, False))).label
              for c in cli.QUICK_TABLE_CHOICES]  # fmt: skip
    assert [line.split("  ")[0] for line in lines] == labels


def test_each_stage_says_what_it_expects_and_what_it_took(monkeypatch, capsys, tmp_path):
    tiny = ck.tiny_model("llama", n_layers=4).to(DEVICE)
    monkeypatch.setattr(models, "load_model", lambda name, device=None: tiny)
    argv = ["ioi", "--quick", "--n", "6", "--discover-n", "4", "--out", str(tmp_path / "p.html")]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    starts = [line for line in err if line.startswith("[")]
    # baseline, two patching sweeps, the circuit and its faithfulness: numbered, in order
    assert [line.split("]")[0] for line in starts] == [f"[{i}/5" for i in range(1, 6)]
    assert all("(about " in line for line in starts[1:])
    assert sum(line.strip().startswith("done in ") for line in err) == 6  # and the load
    assert err[-1].startswith("all done in ")


def test_help_answers_without_loading_torch():
    code = (
        "import sys, contextlib, io\n"
        "from circuitkit.interface import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['trace', '--help'])\n"
        "assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trace_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["trace", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: ' Paris')" in out and "(default: 10)" in out and "(default: 3.0)" in out


@pytest.mark.real
def test_ioi_on_smollm(capsys):
    assert cli.main(["ioi", "--n", "3", "--discover-n", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "IOI circuit (ck.find_ioi_circuit): found on the first 2 of the 3 prompts" in out
    assert "faithfulness F(C)/F(M) = " in out
