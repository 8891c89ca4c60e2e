"""The HTML report: its parts, its files, and the page in a real headless browser."""

from __future__ import annotations

import html
import json
import re
import struct

import plotly.graph_objects as go
import pytest
import torch
from _browser import figures_rendered, render
from _device import DEVICE

import circuitkit as ck
from circuitkit.circuits.faithfulness import DEFAULT_CHOICES
from circuitkit.interface.ioi_report import ioi_report, ioi_study, table_rows
from circuitkit.interface.report import FIGURE_WIDTH, Report
from circuitkit.interface.trace_report import trace_report


def small_results(model):
    ds = ck.IOIDataset(model, n=4, seed=1)
    heads = ck.activation_patching(model, ds, ds.corrupted("ABC"), "head", progress=False)
    _, cache = model.run_with_cache(ds.tokens)
    lens = ck.logit_lens(model, cache, ds)
    return heads, lens


def test_page_holds_every_part_escaped(tiny_gpt2, tmp_path):
    heads, lens = small_results(tiny_gpt2)
    report = Report("Title <one>", subtitle="a & b")
    report.heading("Heads", "Intro <b>not bold</b>")
    report.table(["name", "value"], [["x<y", 1.5], ["z", 2]], "A caption")
    report.figure(ck.plot(heads), "Each head's effect.", result=heads, name="heads")
    report.figure(ck.plot(lens), "The logit lens.", result=lens, name="lens")
    page = report.write(tmp_path / "study.html").read_text()
    assert "<title>Title &lt;one&gt;</title>" in page and "a &amp; b" in page
    assert "Intro &lt;b&gt;not bold&lt;/b&gt;" in page and '<td class="text">x&lt;y</td>' in page
    assert page.count('class="ck-figure"') == 2 == report.n_figures
    assert "How this was made: activation_patching" in page
    assert "study_results/heads" in page
    assert "https://" not in page.split("<script")[0]  # nothing fetched from a network


def test_results_are_saved_beside_the_page_and_load_back(tiny_gpt2, tmp_path):
    heads, lens = small_results(tiny_gpt2)
    report = Report("r")
    report.figure(ck.plot(heads), "heads", result=heads, name="heads")
    report.add_result(lens, "lens")
    report.write(tmp_path / "r.html")
    folder = tmp_path / "r_results"
    assert sorted(p.name for p in folder.iterdir()) == ["heads", "lens"]
    assert ck.Result.load(folder / "heads").equals(heads)
    assert ck.Result.load(folder / "lens").equals(lens)
    # writing again replaces the folder whole, leaving no temporary files
    report2 = Report("r")
    report2.add_result(lens, "only")
    report2.write(tmp_path / "r.html")
    assert sorted(p.name for p in folder.iterdir()) == ["only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_results"]


def test_bad_input(tiny_gpt2, tmp_path):
    heads, _ = small_results(tiny_gpt2)
    report = Report("r")
    with pytest.raises(ck.CircuitkitError, match="a row has 1 cells but there are 2 headers"):
        report.table(["a", "b"], [["only one"]])
    with pytest.raises(ck.CircuitkitError, match="needs a caption"):
        report.figure(ck.plot(heads), "  ")
    with pytest.raises(ck.CircuitkitError, match="expected a plotly Figure"):
        report.figure(heads, "caption")
    with pytest.raises(ck.CircuitkitError, match="needs a name of letters"):
        report.figure(ck.plot(heads), "caption", result=heads, name="../escape")
    report.add_result(heads, "heads")
    with pytest.raises(ck.CircuitkitError, match="already added"):
        report.add_result(heads, "heads")
    with pytest.raises(ck.CircuitkitError, match="must end in .html"):
        report.write(tmp_path / "page.txt")
    assert list(tmp_path.iterdir()) == []


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_page_renders_in_a_browser(tiny_gpt2, tmp_path):
    heads, lens = small_results(tiny_gpt2)
    trace = ck.causal_trace(
        tiny_gpt2, "The Eiffel Tower is in", "Eiffel Tower", " Paris", samples=2, progress=False
    )
    report = Report("Browser check")
    report.heading("Figures")
    report.figure(ck.plot(heads), "A heatmap.", result=heads, name="heads")
    report.figure(ck.plot(lens), "A line with error bars.")
    report.figure(ck.plot_causal_trace(trace), "A causal trace.")
    report.figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])), "A bar chart.")
    page = report.write(tmp_path / "page.html")
    shot = tmp_path / "page.png"
    rendered = render(page, screenshot=shot)
    assert [m for m in rendered.console if "error" in m.lower()] == []
    drawn = figures_rendered(rendered.dom)
    assert len(drawn) == 4 and all(count > 10 for count in drawn), drawn
    assert 'class="main-svg"' in rendered.dom
    assert _png_size(shot) == (1280, 2000) and shot.stat().st_size > 20_000


def test_a_script_error_is_seen(tmp_path):
    # the browser check can fail: a page whose script throws is reported
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>notAFunction();</script></body></html>")
    rendered = render(page)
    assert any("notAFunction" in m for m in rendered.console), rendered.console


def page_figures(report):
    """``{caption: figure}`` of every figure on the page, read back from its HTML."""
    figures = {}
    decoder = json.JSONDecoder()
    for block in report.blocks:
        call = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', block)
        if call is None:
            continue
        data, end = decoder.raw_decode(block, call.end())
        layout, _ = decoder.raw_decode(block, block.index("{", end))
        caption = html.unescape(re.search(r"<figcaption>(.*?)</figcaption>", block).group(1))
        figures[caption] = go.Figure(data=data, layout=layout)
    return figures


def figure_with(figures, words):
    (caption,) = [c for c in figures if words in c]
    return caption, figures[caption]


def colour_name(rgb):
    """ "red" or "blue": which of the two dominates an "rgb(r,g,b)" colour."""
    red, _, blue = map(int, re.findall(r"\d+", rgb))
    return "red" if red > blue else "blue"


@pytest.fixture(scope="module")
def ioi_page():
    model = ck.tiny_model("gpt2").to(DEVICE)
    ds = ck.IOIDataset(model, n=8, seed=1)
    study = ioi_study(model, ds, discover_n=8, patch_n=4, sweeps=("head",), progress=False)
    return study, ioi_report(study, model_name="tiny")


def test_dla_caption_names_the_colours_the_heatmap_uses(ioi_page):
    study, report = ioi_page
    caption, fig = figure_with(page_figures(report), "W_U[IO] - W_U[S]")
    heatmap = fig.data[0]
    assert heatmap.zmid == 0 and heatmap.zmax > 0 > heatmap.zmin
    positive, negative = (
        colour_name(heatmap.colorscale[-1][1]),
        colour_name(heatmap.colorscale[0][1]),
    )
    assert {positive, negative} == {"red", "blue"}
    towards = re.search(r"(red|blue) heads[^,:]* push towards the right name", caption)
    against = re.search(r", (red|blue) heads[^,]* against it", caption)
    assert towards and against, caption
    # DLA is positive for a head that raises logit(IO) - logit(S): it pushes towards IO
    assert towards.group(1) == positive and against.group(1) == negative


def test_the_faithfulness_table_of_the_circuit_is_on_the_page(ioi_page):
    study, report = ioi_page
    table = study.table
    assert list(table["ablation"]) == [choice.label for choice in DEFAULT_CHOICES]
    assert study.table_n == study.ds.n == int(table["n"].iloc[0])
    # the table is ck.faithfulness_table's for the circuit find_ioi_circuit found
    model = ck.tiny_model("gpt2").to(DEVICE)
    again = ck.faithfulness_table(
        model, study.circuit, study.ds, study.abc, reference=study.abc, progress=False
    )
    torch.testing.assert_close(
        torch.tensor(table[["faithfulness", "normalized", "f_circuit"]].to_numpy()),
        torch.tensor(again[["faithfulness", "normalized", "f_circuit"]].to_numpy()),
    )
    page = report.to_html()
    assert "Faithfulness under each ablation" in page
    rows = table_rows(table)
    assert len(rows) == len(DEFAULT_CHOICES)
    for row in rows:
        for cell in row:
            assert f">{html.escape(cell)}</td>" in page, cell


def test_path_patching_heatmaps_show_the_change_from_the_baseline(ioi_page, tmp_path):
    study, report = ioi_page
    figures = page_figures(report)
    info = study.circuit.info
    low_colour = None
    for key, words, name in (
        ("direct", "path to the logits", "path_logits"),
        ("queries", "paths to the queries", "path_queries"),
    ):
        if key not in info:
            continue
        raw = info[key]
        baseline = raw.baseline()
        assert baseline is not None and baseline.shape == (raw.n_examples,)
        change = raw.minus(baseline)
        caption, fig = figure_with(figures, words)
        heatmap = fig.data[0]
        torch.testing.assert_close(torch.tensor(heatmap.z), change.values.float())
        assert not torch.allclose(change.values, raw.values)  # a real shift, not a relabel
        assert "change" in caption and "change" in heatmap.colorbar.title.text
        # the saved result is the one drawn
        assert report.results[name].equals(change)
        low_colour = colour_name(heatmap.colorscale[0][1])
    assert "direct" in info and low_colour == "red"
    # noising a name mover lowers the logit difference: the caption's colour for it is the low end
    caption, _ = figure_with(figures, "path to the logits")
    assert re.search(r"red heads \(noising lowers it\) are name movers", caption), caption


def test_trace_page_fits_every_heatmap_in_the_page(tiny_gpt2):
    prompt = "The Eiffel Tower is located in the city of"
    report, traces = trace_report(
        tiny_gpt2, prompt, "Eiffel Tower", " Paris", samples=1, progress=False
    )
    _, fig = figure_with(page_figures(report), "Each cell is p(target)")
    heatmaps = [trace for trace in fig.data if trace.type == "heatmap"]
    assert len(heatmaps) == len(traces) == 3
    n_tokens = len(tiny_gpt2.to_tokens(prompt)[0])
    layout = fig.layout
    assert layout.width <= FIGURE_WIDTH  # nothing past the page's edge
    plot_height = layout.height - layout.margin.t - layout.margin.b
    for heatmap in heatmaps:
        x_domain = layout[heatmap.xaxis.replace("x", "xaxis")].domain
        y_domain = layout[heatmap.yaxis.replace("y", "yaxis")].domain
        assert 0 <= x_domain[0] and x_domain[1] <= 1 and 0 <= y_domain[0] and y_domain[1] <= 1
        assert (y_domain[1] - y_domain[0]) * plot_height >= 18 * n_tokens
        assert heatmap.colorbar.x < 1.1  # the colour bar inside the figure's right margin
    # the page's figure box leaves room for the width the figure takes
    main = re.search(r"main \{ max-width: (\d+)px;[^}]*padding: \d+px (\d+)px", report.to_html())
    assert FIGURE_WIDTH <= int(main.group(1)) - 2 * int(main.group(2)) - 2 * 12 - 2


@pytest.mark.real
def test_trace_page_on_smollm(smollm, tmp_path):
    fact = ck.data.FACTS[0]
    report, traces = trace_report(
        smollm,
        fact.prompt,
        fact.subject,
        fact.target,
        kinds=("mlp",),
        samples=2,
        progress=False,
    )
    assert traces["mlp"].clean_prob == pytest.approx(fact.smollm2_prob, abs=0.01)
    assert traces["mlp"].corrupted_prob < traces["mlp"].clean_prob
    page = report.write(tmp_path / "trace.html")
    rendered = render(page)
    assert [m for m in rendered.console if "error" in m.lower()] == []
    assert all(count > 10 for count in figures_rendered(rendered.dom))
    assert torch.equal(
        ck.Result.load(tmp_path / "trace_results" / "trace_mlp").values, traces["mlp"].scores.values
    )
