"""The IOI study of a model and its page (``circuitkit ioi``).

``ioi_study`` runs the model on IOI prompts and their ABC corruption (baseline scores, direct
logit attribution, the logit lens, activation patching sweeps and, unless left out, the IOI
circuit with its faithfulness, also under each ablation choice of ``ck.faithfulness_table``);
``ioi_report`` lays the study out as a ``Report``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.circuits.circuit import Circuit, CircuitHead
from circuitkit.circuits.faithfulness import (
    DEFAULT_CHOICES,
    Faithfulness,
    faithfulness,
    faithfulness_table,
)
from circuitkit.circuits.ioi_circuit import find_ioi_circuit
from circuitkit.core import metrics
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.lens import ActivationCache, HookedTransformer, is_bridge
from circuitkit.core.metrics import logit_diff
from circuitkit.core.results import Result
from circuitkit.data.ioi import IOIDataset
from circuitkit.interface.plot import plot
from circuitkit.interface.plot_circuit import plot_circuit
from circuitkit.interface.report import Report
from circuitkit.methods.ablation import Ablation
from circuitkit.methods.activation_patching import activation_patching
from circuitkit.methods.logit_attribution import (
    direct_logit_attribution,
    logit_lens,
    required_hooks,
)

# The IOI paper's figures for GPT-2 small, for comparison.
PAPER_GPT2 = (
    "the IOI paper's GPT-2 small circuit: 26 heads, logit diff about 3.1 of 3.56, about 87%"
)


@dataclass(frozen=True)
class IOIScores:
    """Per-example scores of one run (clean or corrupted) on the IOI task, each [n]."""

    logit_diff: Float[Tensor, "n"]
    accuracy: Float[Tensor, "n"]
    io_beats_s: Float[Tensor, "n"]
    prob_io: Float[Tensor, "n"]


def _clean_run(
    model: Any, tokens: Int[Tensor, "n pos"], read: Int[Tensor, "n"], batch_size: int
) -> tuple[Float[Tensor, "n d_vocab"], ActivationCache]:
    """The logits at the read positions, and a cache of what direct logit attribution by head
    and the logit lens need, from one batched pass."""
    needed = required_hooks(model, "head") | required_hooks(model, "logit_lens")
    out, parts = [], []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size]
            logits, cache = model.run_with_cache(batch, names_filter=lambda name: name in needed)
            rows = torch.arange(batch.shape[0], device=logits.device)
            out.append(logits[rows, read[start : start + batch_size].to(logits.device)].cpu())
            parts.append(cache.cache_dict)
    merged = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    return torch.cat(out).float(), ActivationCache(merged, model)


def _logits_at(
    model: Any, tokens: Int[Tensor, "n pos"], read: Int[Tensor, "n"], batch_size: int
) -> Float[Tensor, "n d_vocab"]:
    """The model's logits at one position per example, computed in batches, on the CPU."""
    out = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size]
            logits = model(batch, return_type="logits")
            rows = torch.arange(batch.shape[0], device=logits.device)
            out.append(logits[rows, read[start : start + batch_size].to(logits.device)].cpu())
    return torch.cat(out).float()


def ioi_scores(ds: IOIDataset, logits_at: Float[Tensor, "n d_vocab"]) -> IOIScores:
    """Score logits against the clean answers of ``ds`` (also for a corrupted run)."""
    return IOIScores(
        logit_diff=metrics.logit_diff(ds).at(logits_at),
        accuracy=metrics.accuracy(ds).at(logits_at),
        io_beats_s=metrics.accuracy(ds, against="S").at(logits_at),
        prob_io=metrics.prob(ds).at(logits_at),
    )


@dataclass
class IOIStudy:
    """Everything ``ioi_study`` computes; ``ioi_report`` draws it and ``circuitkit ioi`` prints it.

    Attributes:
        ds, abc: the clean prompts and their ABC corruption.
        clean, corrupted: per-example scores of the clean and ABC runs (``IOIScores``).
        heads: direct logit attribution by head, axes ("layer", "head").
        lens: the logit lens, the logit difference after each layer, axis ("layer",).
        patching: activation-patching sweeps (denoising: the ABC run with one clean activation
            restored) on the first ``patch_n`` prompts, by name: "resid" (residual stream
            before each layer, at each word), "head", "q", "k", "v"; empty when skipped.
        circuit: the IOI circuit found by ``find_ioi_circuit`` on the first ``discover_n``
            prompts, or None when skipped; its ``info`` holds the path-patching results.
        faithful: its faithfulness on all the prompts, or None.
        seconds: wall time of each part.
        table: its ``ck.faithfulness_table`` (one row per ablation choice) on the first
            ``table_n`` prompts, or None.
        table_n: the prompts the table is measured on.
    """

    ds: IOIDataset
    abc: IOIDataset
    clean: IOIScores
    corrupted: IOIScores
    heads: Result
    lens: Result
    patching: dict[str, Result]
    circuit: Circuit | None
    faithful: Faithfulness | None
    discover_n: int
    patch_n: int
    seconds: dict[str, float]
    table: Any = None
    table_n: int = 0


def ioi_study(
    model: HookedTransformer,
    ds: IOIDataset,
    *,
    circuit: bool = True,
    discover_n: int = 24,
    circuit_layers: Sequence[int] | None = None,
    patching: bool = True,
    patch_n: int = 20,
    sweeps: Sequence[str] = ("resid", "head", "q", "k", "v"),
    table_choices: Sequence[Ablation | str] = DEFAULT_CHOICES,
    table_n: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> IOIStudy:
    """Run the IOI study of ``model`` on ``ds``: the baseline on the clean and ABC prompts,
    direct logit attribution by head, the logit lens, activation patching (``sweeps``: "resid",
    the residual stream by layer and word; "head", "q", "k", "v", every head's output, query,
    key and value) on the first ``patch_n`` prompts, and the IOI circuit (``find_ioi_circuit``
    on the first ``discover_n`` prompts, its senders the heads of ``circuit_layers``, all by
    default) with its faithfulness on all of them, and its ``ck.faithfulness_table`` under
    each ablation of ``table_choices`` (none: no table) on the first ``table_n`` prompts (all
    by default; the edge-level choices cost most).

    ``say`` receives a line as each stage starts, with its expected duration (from the time
    the baseline's forward passes took), and one when it ends, with the time it took.

    Example::

        study = ioi_study(model, ck.IOIDataset(model, n=40), discover_n=16, patch_n=8)
        ioi_report(study, model_name="smollm2-135m").write("ioi.html")
    """
    unknown = set(sweeps) - set(_PATCH_WORDS)
    if patching and unknown:
        raise CircuitkitError(
            f"ioi_study: unknown sweeps {sorted(unknown)}; choose from {list(_PATCH_WORDS)}"
        )
    cfg = model.cfg
    patch_n, discover_n = min(patch_n, ds.n), min(discover_n, ds.n)
    table_n = ds.n if table_n is None else min(table_n, ds.n)
    choices = list(table_choices)
    share = _SHARES["bridge" if is_bridge(model) else "hooked"]
    # three runs per choice (F(M), F(C), F(∅)); an edge-level run costs about two node-level ones
    table_passes = (
        sum(share["table"] * (2 if _level(c) == "edge" else 1) for c in choices) * table_n
    )
    words = [w for w in _WORDS if w in ds.positions]
    heads_searched = cfg.n_heads * (cfg.n_layers if circuit_layers is None else len(circuit_layers))
    # Forward passes of one prompt each stage costs (patches x prompts, weighted by the share
    # of the model the engine runs per patch); times the baseline's seconds per prompt pass.
    work = {
        "resid": len(words) * cfg.n_layers * patch_n * share["resid"],
        "head": cfg.n_layers * cfg.n_heads * patch_n * share["head"],
        "circuit": heads_searched * discover_n * share["circuit"],
        "faithfulness": share["faithfulness"] * ds.n + table_passes,
    }
    for name in ("q", "k", "v"):
        work[name] = work["head"]
    stages = [*(sweeps if patching else ()), *(("circuit", "faithfulness") if circuit else ())]
    seconds: dict[str, float] = {}
    per_pass: list[float] = []

    def stage(number: int, text: str, name: str | None) -> Callable[[], None]:
        expected = f" (about {_duration(work[name] * per_pass[0])})" if name and per_pass else ""
        if say is not None:
            say(f"[{number}/{len(stages) + 1}] {text}{expected} ...")
        clock = time.perf_counter()

        def done() -> None:
            elapsed = time.perf_counter() - clock
            seconds[name or "baseline"] = elapsed
            if say is not None:
                say(f"      done in {_duration(elapsed)}")

        return done

    done = stage(1, f"baseline, direct logit attribution and logit lens on {ds.n} prompts", None)
    abc = ds.corrupted("ABC")
    read = ds.positions["end"]
    clean_logits_at, cache = _clean_run(model, ds.tokens, read, batch_size)
    clock = time.perf_counter()
    corrupted = ioi_scores(ds, _logits_at(model, abc.tokens, read, batch_size))
    per_pass.append((time.perf_counter() - clock) / ds.n)
    clean = ioi_scores(ds, clean_logits_at)
    heads = direct_logit_attribution(model, cache, ds, by="head")
    lens = logit_lens(model, cache, ds)
    done()

    patched: dict[str, Result] = {}
    number = 2
    if patching:
        sub, sub_abc = ds[:patch_n], abc[:patch_n]
        metric = logit_diff(sub)
        for name, component, kwargs in (
            ("resid", "resid_pre", {"per_position": True, "positions": words}),
            ("head", "head", {}),
            ("q", "q", {}),
            ("k", "k", {}),
            ("v", "v", {}),
        ):
            if name not in sweeps:
                continue
            done = stage(
                number, f"activation patching: {_PATCH_WORDS[name]} ({patch_n} prompts)", name
            )
            patched[name] = activation_patching(
                model, sub, sub_abc, component=component, metric=metric,
                direction="denoise", progress=progress, **kwargs,
            )  # fmt: skip
            done()
            number += 1

    found, faithful, table = None, None, None
    if circuit:
        searched = "" if circuit_layers is None else f", heads of layers {_span(circuit_layers)}"
        done = stage(
            number,
            f"finding the IOI circuit on {discover_n} prompts (path patching{searched})",
            "circuit",
        )
        found = find_ioi_circuit(
            model,
            ds[:discover_n],
            reference=abc[:discover_n],
            layers=circuit_layers,
            progress=progress,
        )
        done()
        also = f", and under {len(choices)} ablations on {table_n}" if choices else ""
        done = stage(
            number + 1, f"measuring its faithfulness on {ds.n} prompts{also}", "faithfulness"
        )
        faithful = faithfulness(model, found, ds, reference=abc, progress=progress)
        if choices:
            sub_abc = abc[:table_n]
            table = faithfulness_table(
                model, found, ds[:table_n], sub_abc, reference=sub_abc, choices=choices,
                progress=progress,
            )  # fmt: skip
        done()
    return IOIStudy(
        ds, abc, clean, corrupted, heads, lens, patched, found, faithful, discover_n, patch_n,
        seconds, table, table_n if table is not None else 0,
    )  # fmt: skip


def _level(choice: Ablation | str) -> str:
    return choice.level if isinstance(choice, Ablation) else "node"


# The share of a full forward pass of one prompt that the engine runs per patch, by sweep (for
# the circuit, per head searched, all rounds of path patching together), and the passes per
# prompt of the faithfulness run and of each node-level choice of the table: measured on
# smollm2-135m (2-core CPU) against the baseline's own passes; estimates only. A bridge runs
# every layer of every patched run (the engine cannot start it at the first patched layer), so
# a patch costs more than a whole plain pass there.
_SHARES = {
    "hooked": {"resid": 0.4, "head": 0.3, "circuit": 0.6, "faithfulness": 3, "table": 3},
    "bridge": {"resid": 1.2, "head": 1.1, "circuit": 5.0, "faithfulness": 7, "table": 4},
}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.1f} min"


def _span(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


# Positions of an IOI prompt, in the order they come, and what each patching sweep patches.
_WORDS = ("IO", "S1", "S1+1", "S2", "end")


_PATCH_WORDS = {
    "resid": "the residual stream before each layer, at each word",
    "head": "each head's output",
    "q": "each head's query",
    "k": "each key head's key",
    "v": "each value head's value",
}


def ioi_report(study: IOIStudy, *, model_name: str) -> Report:
    """The page of an ``IOIStudy``: the baseline table, the logit lens, direct logit
    attribution by head, the activation-patching heatmaps, the path-patching results behind the
    circuit (to the logits and to the name movers' queries, each head's change of the logit
    difference from the unpatched run), the attention scores of the circuit's heads, the
    circuit as a graph with its classes and its faithfulness, and its faithfulness under each
    ablation choice (``ck.faithfulness_table``) when the study has it. Every figure is an
    interactive plotly chart with a one-line caption; every result is saved beside the page
    when it is written.

    Example::

        ioi_report(ioi_study(model, ds), model_name="smollm2-135m").write("ioi.html")
    """
    ds = study.ds
    report = Report(
        f"IOI on {model_name}",
        subtitle=f"{ds.n} prompts (seed {ds.seed}), {len(set(ds.templates.tolist()))} templates, "
        f"ABBA and BABA; corrupted: ABC (three other names)",
    )

    report.heading(
        "Baseline",
        "The logit difference logit(IO) - logit(S) at the last token, the accuracy (IO is the "
        "top-1 token), how often IO beats S and the probability of IO, on the clean prompts and "
        "on the ABC prompts scored against the clean answers.",
    )
    rows = baseline_rows({"clean": study.clean, "ABC": study.corrupted})
    report.table(["run", "logit diff", "std", "accuracy", "IO > S", "P(IO)"], rows)
    rows = []
    for t, template in enumerate(ds.template_strings):
        chosen = ds.templates == t
        if chosen.any():
            rows.append(
                [
                    template,
                    int(chosen.sum()),
                    f"{study.clean.logit_diff[chosen].mean():.3f}",
                    f"{study.clean.accuracy[chosen].mean():.3f}",
                ]
            )
    report.table(
        ["template", "n", "logit diff", "accuracy"], rows, "The clean prompts by template."
    )

    report.heading("Logit lens")
    report.figure(
        plot(study.lens, title="Logit difference read off the residual stream after each layer"),
        "The logit difference if the model stopped after each layer (final norm and unembedding "
        "applied to that layer's residual stream); where it jumps, the layers that write the "
        "answer.",
        result=study.lens,
        name="logit_lens",
    )

    report.heading("Direct logit attribution by head")
    report.figure(
        plot(study.heads, title="Direct effect of each head on the logit difference"),
        "Each head's output at the last token projected on W_U[IO] - W_U[S] through the final "
        "norm: blue heads (positive) push towards the right name directly, red heads "
        "(negative) against it.",
        result=study.heads,
        name="dla_heads",
    )

    if study.patching:
        report.heading(
            "Activation patching",
            f"Denoising on the first {study.patch_n} prompts: the ABC run with one clean "
            "activation restored; each cell is the logit difference of that run (the ABC run "
            "alone is near 0, the clean run near the baseline above). A component that brings "
            "it back carries the information the answer needs.",
        )
        captions = {
            "resid": "The residual stream before each layer (rows) at each word (columns): the "
            "information about the names moves from their own positions to the last token, "
            "where the layer at which it arrives shows.",
            "head": "Each head's output, at every position: the heads whose output alone brings "
            "the answer back.",
            "q": "Each head's query input: heads whose queries (what they look for) carry the "
            "difference, as the name movers' queries do in the IOI paper.",
            "k": "Each key head's key input (grouped-query models share one among several query "
            "heads): where the keys hold the difference.",
            "v": "Each value head's value input: where the values hold the difference.",
        }
        for name, result in study.patching.items():
            report.figure(
                plot(result, title=f"Denoising {_PATCH_WORDS[name]}"),
                captions[name],
                result=result,
                name=f"patching_{name}",
            )

    if study.circuit is not None and study.faithful is not None:
        _circuit_sections(report, study)
    return report


def _circuit_sections(report: Report, study: IOIStudy) -> None:
    circuit, faithful = study.circuit, study.faithful
    assert circuit is not None and faithful is not None
    info = circuit.info
    # Each round's change from the unpatched run (its baseline), paired per prompt: the raw
    # logit differences all sit near the baseline, one colour on a scale centred at 0.
    changes = {
        key: info[key].effect() for key in ("direct", "queries", "s2", "s1+1") if key in info
    }
    report.heading(
        "Path patching",
        f"On the first {study.discover_n} prompts, noising: each head's ABC output is sent only "
        "along its direct paths (through MLPs, not through other heads) to the receivers, and "
        "the logit difference read. Each cell is its change from the unpatched run "
        f"(logit difference {info['base']:.3f}). ck.find_ioi_circuit runs these rounds and "
        "classes the heads that matter by their attention patterns.",
    )
    if "direct" in changes:
        report.figure(
            plot(changes["direct"], title="Path patching: each head -> the logits"),
            "The change in the logit difference from the unpatched run when one head's path to "
            "the logits carries its ABC output: red heads (noising lowers it) are name movers "
            "and other heads that write the answer, blue heads (noising raises it) write "
            "against it.",
            result=changes["direct"],
            name="path_logits",
        )
    if "queries" in changes:
        report.figure(
            plot(changes["queries"], title="Path patching: each head -> the name movers' queries"),
            "The same change for the paths to the queries at the last token of the heads that "
            "write the answer: red heads are the s-inhibition heads that tell them which name "
            "to avoid.",
            result=changes["queries"],
            name="path_queries",
        )
    for key in ("s2", "s1+1"):  # the later rounds: saved, drawn on request
        if key in changes:
            report.add_result(changes[key], f"path_{key.replace('+', 'p')}")

    report.heading("Attention of the circuit's heads")
    report.figure(
        _attention_figure(circuit),
        "What each circuit head attends to: from the last token to IO, S1 and S2 (name movers "
        "look at IO, s-inhibition heads at S2), and the previous-token, duplicate-token and "
        "induction scores of the heads that act earlier.",
    )
    report.add_result(info["attention"], "attention_end")
    report.add_result(info["head_scores"], "attention_head_scores")

    report.heading(
        "The circuit",
        f"{len(circuit)} heads, found on the first {study.discover_n} prompts; each at the "
        "position where it acts.",
    )
    report.figure(
        plot_circuit(circuit, title="The IOI circuit"),
        "The circuit's heads by layer, coloured by class; arrows run from the heads that "
        "feed each class to the heads they feed, as the path-patching rounds found them.",
    )
    rows = class_rows(circuit)
    report.table(
        ["class", "heads at their position (path-patching effect)"],
        rows,
        "The classes of the IOI paper, named by attention pattern.",
        text_columns=(0, 1),
    )

    report.heading(
        "Faithfulness",
        "F(C): the logit difference with every head outside the circuit, and every circuit "
        "head at its other positions, mean-ablated (ABC, per template), MLPs kept; F(M): the "
        "full model's.",
    )
    low, high = faithful.ci(0.95)
    report.table(
        ["", "value"],
        [
            ["F(M), the full model", f"{faithful.f_model:.3f}"],
            ["F(C), the circuit alone", f"{faithful.f_circuit:.3f}"],
            [
                "F(C) / F(M)",
                f"{100 * faithful.ratio:.1f}% (95% interval {100 * low:.0f}% to {100 * high:.0f}%)",
            ],
            ["heads", str(faithful.n_heads)],
            ["for comparison", PAPER_GPT2],
        ],
        f"On {faithful.result.n_examples} prompts.",
        text_columns=(0, 1),
    )
    report.add_result(faithful.result, "faithfulness")
    if study.table is not None:
        report.heading(
            "Faithfulness under each ablation",
            "The same circuit with what 'ablated' means changed (Miller et al. 2024 show how "
            "much the number depends on it): the value that replaces an ablated output (zero, "
            "the mean over the ABC prompts, per template or over all, a resampled ABC prompt, "
            "each prompt's own ABC twin), at node level (heads and MLPs outside the circuit) "
            "or edge level (only the edges outside it), circuit heads kept at their positions "
            "or at all. Normalised: (F(C) - F(∅)) / (F(M) - F(∅)), F(∅) with everything "
            "ablated.",
        )
        report.table(
            ["ablation", "F(C) / F(M) (95% interval)", "normalised (95% interval)", "F(C)",
             "F(M)", "F(∅)"],
            table_rows(study.table),
            f"ck.faithfulness_table on {study.table_n} prompts.",
            text_columns=(0, 1, 2),
        )  # fmt: skip


def _attention_figure(circuit: Circuit) -> go.Figure:
    """Grouped bars: for the circuit's heads that act at the last token, how much it attends
    to IO, S1 and S2; for those that act earlier, their previous-token, duplicate-token and
    induction scores."""
    from plotly.subplots import make_subplots

    attention, scores = circuit.info["attention"], circuit.info["head_scores"]
    late = [n for n in circuit.nodes if n.head.pos == "end"]
    early = [n for n in circuit.nodes if n.head.pos != "end"]
    figure = make_subplots(
        rows=1,
        cols=2,
        column_widths=[max(len(late), 1), max(len(early), 1)],
        subplot_titles=("from the last token to ...", "attention-pattern scores"),
    )
    for col, nodes, result in ((1, late, attention), (2, early, scores)):
        names = [f"{n.head.layer}.{n.head.head} {n.role}" for n in nodes]
        for k, key in enumerate(result.labels[result.axes[-1]]):
            figure.add_trace(
                go.Bar(
                    x=names,
                    y=[float(result.values[n.head.layer, n.head.head, k]) for n in nodes],
                    name=str(key),
                    legendgroup=str(col),
                ),
                row=1,
                col=col,
            )
    figure.update_layout(
        title="Attention of the circuit's heads",
        barmode="group",
        yaxis_title="attention probability",
        template="plotly_white",
    )
    return figure


def baseline_rows(runs: Mapping[str, IOIScores]) -> list[list[str]]:
    """One row per run: its name, logit diff mean and std, accuracy, IO > S, P(IO)."""
    return [
        [
            name,
            f"{s.logit_diff.mean():.3f}",
            f"{_std(s.logit_diff):.3f}",
            f"{s.accuracy.mean():.3f}",
            f"{s.io_beats_s.mean():.3f}",
            f"{s.prob_io.mean():.3f}",
        ]
        for name, s in runs.items()
    ]


def class_rows(circuit: Circuit) -> list[list[str]]:
    """One row per class of ``circuit``: the class and its heads at their positions, each with
    its effect when known."""
    effects = {n.head: n.effect for n in circuit.nodes}
    return [
        [
            role,
            ", ".join(
                CircuitHead(h).label + ("" if effects[h] is None else f" ({effects[h]:+.2f})")
                for h in sorted(heads, key=lambda h: (h.layer, h.head))
            ),
        ]
        for role, heads in circuit.classes.items()
    ]


def table_rows(table: Any) -> list[list[str]]:
    """One row per ablation of a ``ck.faithfulness_table``: its label, the faithfulness and the
    normalised faithfulness with their intervals (in %), and F(C), F(M), F(∅)."""

    def percent(value: float, low: float, high: float) -> str:
        if math.isnan(low) or math.isnan(high):  # a denominator that can reach 0: no interval
            return f"{100 * value:.1f}% (no interval)"
        return f"{100 * value:.1f}% ({100 * low:.0f}% to {100 * high:.0f}%)"

    return [
        [
            row.ablation,
            percent(row.faithfulness, row.ci_low, row.ci_high),
            percent(row.normalized, row.normalized_ci_low, row.normalized_ci_high),
            f"{row.f_circuit:.3f}",
            f"{row.f_model:.3f}",
            f"{row.f_empty:.3f}",
        ]
        for row in table.itertuples()
    ]


def _std(values: Tensor) -> float:
    return float(values.std()) if values.numel() > 1 else 0.0


__all__ = [
    "PAPER_GPT2",
    "IOIScores",
    "IOIStudy",
    "baseline_rows",
    "class_rows",
    "ioi_report",
    "ioi_scores",
    "ioi_study",
    "table_rows",
]
