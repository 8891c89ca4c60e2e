"""The ``circuitkit`` command: its subcommands on tiny models (and the real one where it counts)."""

from __future__ import annotations

import pytest
from _browser import figures_rendered, render

import circuitkit as ck
from circuitkit import cli, models


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
