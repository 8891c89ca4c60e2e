"""Reports: one self-contained HTML page of a study's tables and interactive figures.

A ``Report`` collects, in order, headings, short paragraphs, tables and plotly figures, each
figure with a one-line caption that says what it shows and how to read it. ``Report.write``
writes a single HTML file that works offline: plotly.js is embedded once, every figure is an
interactive chart, and nothing is fetched from the network. The ``Result`` objects behind the
figures are saved beside the page (``report.html`` -> ``report_results/<name>/``, with
``Result.save``), so a figure can be redrawn later with ``ck.plot(ck.Result.load(path))``
without rerunning anything; the page lists them with the provenance of each.

The ``circuitkit ioi`` and ``circuitkit trace`` commands build their pages with it; it is also
usable from a notebook::

    report = Report("Heads that matter", subtitle="smollm2-135m, 50 IOI prompts")
    report.heading("Activation patching")
    report.figure(ck.plot(result), "Denoising each head's output ...", result=result, name="heads")
    report.write("heads.html")
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline

from circuitkit.errors import CircuitkitError
from circuitkit.results import Result

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d2330; background: #fafbfc; line-height: 1.5; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.3em; margin-top: 2.2em; border-bottom: 1px solid #d8dde6; padding-bottom: 4px; }
p.subtitle { color: #59637a; margin-top: 0; }
nav { background: #fff; border: 1px solid #d8dde6; border-radius: 6px; padding: 8px 16px;
      margin: 16px 0; font-size: 0.92em; }
nav a { margin-right: 14px; white-space: nowrap; }
figure { background: #fff; border: 1px solid #d8dde6; border-radius: 6px; margin: 18px 0;
         padding: 8px 12px; overflow-x: auto; }
figcaption { color: #3a4356; font-size: 0.93em; padding: 4px 4px 2px; }
table { border-collapse: collapse; margin: 12px 0; background: #fff; font-size: 0.92em; }
th, td { border: 1px solid #d8dde6; padding: 4px 10px; text-align: right; }
th { background: #eef1f6; }
td.text, th.text { text-align: left; }
caption { caption-side: bottom; text-align: left; color: #3a4356; padding-top: 4px; }
details { margin: 8px 0; font-size: 0.88em; }
pre { background: #f1f3f7; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Report:
    """An HTML report under construction: call the adding methods in order, then ``write``.

    Attributes:
        title: the page's title and first heading.
        subtitle: a line under the title (model, data, date...).
        blocks: the page's content so far, as HTML fragments.
        results: the results to save beside the page, by name.
    """

    title: str
    subtitle: str = ""
    blocks: list[str] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    _headings: list[tuple[str, str]] = field(default_factory=list, repr=False)
    _n_figures: int = field(default=0, repr=False)

    def heading(self, text: str, intro: str = "") -> None:
        """Start a section (listed in the page's table of contents), with an optional intro."""
        anchor = f"s{len(self._headings) + 1}"
        self._headings.append((anchor, text))
        self.blocks.append(f'<h2 id="{anchor}">{html.escape(text)}</h2>')
        if intro:
            self.paragraph(intro)

    def paragraph(self, text: str) -> None:
        """A paragraph of plain text (escaped)."""
        self.blocks.append(f"<p>{html.escape(text)}</p>")

    def table(
        self,
        headers: Sequence[str],
        rows: Sequence[Sequence[Any]],
        caption: str = "",
        *,
        text_columns: Sequence[int] = (0,),
    ) -> None:
        """A table; cells are written with ``str``; ``text_columns`` are left-aligned."""
        for row in rows:
            if len(row) != len(headers):
                raise CircuitkitError(
                    f"Report.table: a row has {len(row)} cells but there are {len(headers)} "
                    f"headers: {list(row)!r}"
                )

        def cell(tag: str, column: int, value: Any) -> str:
            cls = ' class="text"' if column in text_columns else ""
            return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

        head = "".join(cell("th", c, h) for c, h in enumerate(headers))
        body = "".join(
            "<tr>" + "".join(cell("td", c, v) for c, v in enumerate(row)) + "</tr>" for row in rows
        )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(
            f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    def figure(
        self,
        fig: go.Figure,
        caption: str,
        *,
        result: Result | None = None,
        name: str | None = None,
    ) -> None:
        """An interactive plotly figure with its one-line caption.

        With ``result`` (and a file-safe ``name``: letters, digits, ``_ . -``), the result is
        saved beside the page when it is written, and its provenance is shown under the figure.
        """
        if not isinstance(fig, go.Figure):
            raise CircuitkitError(
                f"Report.figure: expected a plotly Figure, got {type(fig).__name__}"
            )
        if not caption.strip():
            raise CircuitkitError("Report.figure: every figure needs a caption")
        self._n_figures += 1
        div_id = f"figure-{self._n_figures}"
        chart = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        extra = ""
        if result is not None:
            name = self._add_result(result, name)
            extra = _provenance_details(result, name)
        self.blocks.append(
            f'<figure class="ck-figure">{chart}'
            f"<figcaption>{html.escape(caption)}</figcaption>{extra}</figure>"
        )

    def add_result(self, result: Result, name: str) -> None:
        """Save ``result`` beside the page (under ``name``) without drawing it."""
        self._add_result(result, name)

    def _add_result(self, result: Result, name: str | None) -> str:
        if not isinstance(result, Result):
            raise CircuitkitError(
                f"Report: result must be a ck.Result, got {type(result).__name__}"
            )
        if name is None or not _NAME.match(name):
            raise CircuitkitError(
                f"Report: a saved result needs a name of letters, digits, '_', '.', '-', got "
                f"{name!r}"
            )
        if name in self.results:
            raise CircuitkitError(f"Report: a result named {name!r} was already added")
        self.results[name] = result
        return name

    @property
    def n_figures(self) -> int:
        return self._n_figures

    def to_html(self, results_folder: str | None = None) -> str:
        """The whole page as one HTML string (plotly.js embedded)."""
        toc = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self._headings)
        saved = ""
        if self.results and results_folder is not None:
            items = "".join(
                f"<li><code>{html.escape(results_folder)}/{html.escape(name)}</code></li>"
                for name in self.results
            )
            saved = (
                "<h2>Saved results</h2><p>Every result behind this page is saved beside it; "
                "redraw one with <code>ck.plot(ck.Result.load(path))</code>.</p>"
                f"<ul>{items}</ul>"
            )
        made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{html.escape(self.title)}</title>",
                f"<style>{_STYLE}</style>",
                f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
                "</head><body><main>",
                f"<h1>{html.escape(self.title)}</h1>",
                f'<p class="subtitle">{html.escape(self.subtitle)}</p>' if self.subtitle else "",
                f"<nav>{toc}</nav>" if toc else "",
                *self.blocks,
                saved,
                f'<p class="subtitle">Made by circuitkit on {made}.</p>',
                "</main></body></html>",
            ]
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` and its results to ``<stem>_results/`` beside it.

        Both are written to temporary names first and then moved into place, so an
        interrupted write leaves the previous report, if any, whole. Returns the page's path.
        """
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise CircuitkitError(f"Report.write: the page must end in .html, got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.with_name(f"{path.stem}_results")
        if self.results:
            staging = path.with_name(f".{folder.name}.{os.getpid()}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                for name, result in self.results.items():
                    result.save(staging / name)
                old = None
                if folder.exists():
                    old = folder.with_name(f".{folder.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    folder.rename(old)
                staging.rename(folder)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        page = self.to_html(folder.name if self.results else None)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(page, encoding="utf-8")
        temporary.replace(path)
        return path


# ---------------------------------------------------------------------------------------------
# The causal-tracing study of one prompt (``circuitkit trace``)

_KIND_WORDS = {
    "resid": "the residual stream (one layer)",
    "mlp": "MLP outputs (a window of layers)",
    "attn": "attention outputs (a window of layers)",
}


def trace_report(
    model: Any,
    prompt: str,
    subject: str,
    target: str,
    *,
    kinds: Sequence[str] = ("resid", "mlp", "attn"),
    samples: int = 10,
    noise: float = 3.0,
    window: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Report, dict[str, Any]]:
    """Trace one factual prompt with ``ck.causal_trace`` for each kind and build its page.

    Returns ``(report, traces)``: the ``Report`` (heatmaps of the restored probability over
    layers and tokens, the indirect effect by layer at the last subject token and at the last
    token, and a table of the peaks) and the ``CausalTrace`` of each kind.

    Example::

        report, traces = trace_report(model, "The Eiffel Tower is located in the city of",
                                      "Eiffel Tower", " Paris")
        report.write("eiffel.html")
    """
    from circuitkit.causal_tracing import causal_trace, find_subject
    from circuitkit.plot import plot_causal_trace

    traces = {
        kind: causal_trace(
            model,
            prompt,
            subject,
            target,
            kind,
            window=window,
            noise=noise,
            samples=samples,
            seed=seed,
            progress=progress,
        )
        for kind in kinds
    }
    first = next(iter(traces.values()))
    tokens = model.to_tokens(prompt)[0]
    last_subject = find_subject(model, tokens, subject)[-1]
    last = len(tokens) - 1

    report = Report(
        f"Causal trace: {prompt!r} -> {target!r}",
        subtitle=f"{model.cfg.model_name}; subject {subject!r}; noise {noise} x the embeddings' "
        f"std, {samples} samples, seed {seed}",
    )
    report.heading(
        "The prompt",
        "The corrupted run adds Gaussian noise to the subject's token embeddings; each restored "
        "run puts one clean activation back and measures how much of the target's probability "
        "returns.",
    )
    report.table(
        ["prompt", "subject", "target", "p(target) clean", "p(target) corrupted"],
        [[prompt, subject, target, f"{first.clean_prob:.4f}", f"{first.corrupted_prob:.4f}"]],
        text_columns=(0, 1, 2),
    )
    report.heading("Where restoring a clean state brings the answer back")
    report.figure(
        plot_causal_trace(*traces.values()),
        "Each cell is p(target) when the clean activation at that token (row; * marks the "
        "subject) and layer (column) is restored into the noised run; dark cells carry the "
        "fact.",
    )
    for kind, trace in traces.items():
        report.add_result(trace.scores, f"trace_{kind}")

    figure = go.Figure()
    rows = []
    for kind, trace in traces.items():
        effect = trace.indirect_effect
        column = {p: i for i, p in enumerate(trace.positions)}
        for label, position in (("last subject token", last_subject), ("last token", last)):
            values = effect.values[:, column[position]]
            figure.add_trace(
                go.Scatter(
                    x=effect.labels["layer"],
                    y=values.tolist(),
                    mode="lines+markers",
                    name=f"{kind}, {label}",
                    line=dict(dash="solid" if label == "last token" else "dot"),
                )
            )
            peak = int(values.argmax())
            rows.append(
                [
                    _KIND_WORDS[kind],
                    label,
                    effect.labels["layer"][peak],
                    f"{float(values[peak]):+.4f}",
                ]
            )
    figure.update_layout(
        title="Indirect effect by layer",
        xaxis_title="layer",
        yaxis_title="restored - corrupted p(target)",
        template="plotly_white",
    )
    report.heading("Indirect effect by layer")
    report.figure(
        figure,
        "The indirect effect (restored minus corrupted probability) at the last subject token "
        "(dotted) and the last token (solid); ROME found MLPs peaking in early-middle layers "
        "at the last subject token and attention late at the last token.",
    )
    report.table(
        ["restored", "token", "peak layer", "indirect effect"],
        rows,
        "Where each curve peaks.",
        text_columns=(0, 1),
    )
    return report, traces


def _provenance_details(result: Result, name: str) -> str:
    made: Mapping[str, Any] = result.provenance or {}
    if not made:
        return ""
    model = made.get("model") or {}
    versions = made.get("versions") or {}
    summary = ", ".join(
        part
        for part in [
            str(made.get("method", "")),
            str(model.get("name", "")),
            str(model.get("fingerprint", ""))[:15],
            f"circuitkit {versions.get('circuitkit', '?')}",
            f"{model.get('device', '')} {model.get('dtype', '')}".strip(),
        ]
        if part
    )
    record = html.escape(json.dumps(made, indent=1, default=str))
    return (
        f"<details><summary>How this was made: {html.escape(summary)} "
        f"(saved as <code>{html.escape(name)}</code>)</summary><pre>{record}</pre></details>"
    )


__all__ = ["Report", "trace_report"]
