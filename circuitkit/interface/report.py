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

from circuitkit.core.errors import CircuitkitError
from circuitkit.core.results import Result

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The widest figure the page shows whole, in pixels: main's max-width less its padding and the
# figure box's padding and border (see _STYLE). A wider one scrolls sideways inside its box.
FIGURE_WIDTH = 1180 - 2 * 32 - 2 * 12 - 2 * 1


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
            extra = provenance_details(result, name)
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


def provenance_details(result: Result, name: str) -> str:
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


__all__ = ["FIGURE_WIDTH", "Report", "provenance_details"]
