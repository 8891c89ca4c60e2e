"""The causal-tracing page of one factual prompt (``circuitkit trace``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from circuitkit.interface.plot import plot_causal_trace
from circuitkit.interface.report import FIGURE_WIDTH, Report
from circuitkit.methods.causal_tracing import causal_trace, find_subject

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
    layers and tokens, one panel per kind, one under another as wide as the page; the indirect
    effect by layer at the last subject token and at the last token, and a table of the peaks)
    and the ``CausalTrace`` of each kind.

    Example::

        report, traces = trace_report(model, "The Eiffel Tower is located in the city of",
                                      "Eiffel Tower", " Paris")
        report.write("eiffel.html")
    """
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
    # One panel under another, as wide as the page: side by side, three panels of a model's
    # layers need more width than the page has and the last would be cut off.
    report.figure(
        plot_causal_trace(*traces.values(), columns=1, width=FIGURE_WIDTH),
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


__all__ = ["trace_report"]
