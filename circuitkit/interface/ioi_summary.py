"""The printed summary of ``circuitkit ioi``: one function per section, each returning text.

Each ``section_*`` takes the runs it needs and returns its lines; ``table`` lays out rows in
aligned columns. New sections go beside these.
"""

from __future__ import annotations

from typing import Any

from circuitkit.circuits.circuit import Circuit
from circuitkit.circuits.faithfulness import Faithfulness
from circuitkit.core.results import Result
from circuitkit.data.ioi import IOIDataset
from circuitkit.interface.ioi_report import (
    PAPER_GPT2,
    IOIScores,
    baseline_rows,
    class_rows,
    table_rows,
)


def section_header(model_name: str, ds: IOIDataset) -> str:
    bos = "BOS prepended" if ds.prepend_bos else "no BOS"
    n_templates = len(set(ds.templates.tolist()))
    return "\n".join(
        [
            f"IOI baseline: {model_name}, n={ds.n}, seed={ds.seed}, {n_templates} templates, "
            f"ABBA and BABA, {bos}",
            "  logit diff: logit(IO) - logit(S) at the last token",
            "  accuracy: IO is the top-1 token;  IO > S: logit diff > 0",
            "  ABC: IO, S1 and S2 replaced by three other names, scored on the clean IO and S",
        ]
    )


def section_baseline(runs: dict[str, IOIScores]) -> str:
    rows = baseline_rows(runs)
    headers = ["run", "logit diff mean", "std", "accuracy", "IO > S", "P(IO) mean"]
    return table(headers, rows, align="<>>>>>")


def section_templates(ds: IOIDataset, clean: IOIScores, width: int = 60) -> str:
    rows = []
    for t, template in enumerate(ds.template_strings):
        chosen = ds.templates == t
        if not chosen.any():
            continue
        rows.append(
            [
                str(t),
                shorten(template, width),
                str(int(chosen.sum())),
                f"{clean.logit_diff[chosen].mean():.3f}",
                f"{clean.accuracy[chosen].mean():.3f}",
            ]
        )
    headers = ["#", "template (clean)", "n", "logit diff", "accuracy"]
    return table(headers, rows, align="><>>>")


def section_direct_heads(heads: Result, k: int) -> str:
    sem = heads.sem()
    rows = []
    for labels, value in heads.top(k):
        layer, head = int(labels["layer"]), int(labels["head"])
        rows.append(
            [
                f"{layer}.{head}",
                f"{value:+.3f}",
                "" if sem is None else f"{float(sem[layer, head]):.3f}",
                f"{float((heads.examples[layer, head] > 0).float().mean()):.2f}",
            ]
        )
    headers = ["head", "direct effect", "sem", "share > 0"]
    total = float(heads.info["total"].mean())
    all_heads = float(heads.values.sum())
    return "\n".join(
        [
            f"Direct logit attribution: the {len(rows)} heads with the largest |direct effect| on "
            "the logit difference",
            "  each head's z @ W_O at the last token, through the final norm (its scale frozen "
            "from the clean run),",
            f"  projected on W_U[IO] - W_U[S]; all heads together {all_heads:+.3f} of the clean "
            f"logit diff {total:.3f}",
            table(headers, rows, align="<>>>"),
        ]
    )


def section_logit_lens(lens: Result) -> str:
    rows = [
        [label, f"{float(value):.3f}"]
        for label, value in zip(lens.labels["layer"], lens.values, strict=True)
    ]
    return "\n".join(
        [
            "Logit lens: the logit difference read off the residual stream after each layer",
            "  (the final norm applied with each stream's own statistics, then the unembedding)",
            table(["after", "logit diff"], rows, align=">>"),
        ]
    )


def section_circuit(
    circuit: Circuit, faithful: Faithfulness, discover_n: int, seconds: tuple[float, float]
) -> str:
    n = faithful.result.n_examples or 0
    subset = f"the first {discover_n} of the {n} prompts" if discover_n < n else f"{n} prompts"
    rows = class_rows(circuit)
    low, high = faithful.ci(0.95)
    paper = PAPER_GPT2
    return "\n".join(
        [
            f"IOI circuit (ck.find_ioi_circuit): found on {subset} in {seconds[0]:.0f} s, "
            f"evaluated on all {n} in {seconds[1]:.0f} s",
            "  path patching (ABC senders) from every head to the logits, then to the queries "
            "at end of the heads that carry the answer,",
            "  to the values at S2 of the s-inhibition heads and to the keys at S1+1 of the "
            "induction heads; classes by attention pattern",
            table(["class", "heads at their position (path-patching effect)"], rows, align="<<"),
            f"{len(circuit)} heads; faithfulness F(C)/F(M) = {faithful.f_circuit:.3f} / "
            f"{faithful.f_model:.3f} = {100 * faithful.ratio:.1f}% "
            f"(95% interval {100 * low:.0f}%..{100 * high:.0f}%)",
            "  F(C): every head outside the circuit, and every circuit head at its other "
            "positions, mean-ablated (ABC, per template); MLPs kept",
            f"  for comparison, {paper}",
        ]
    )


def section_faithfulness_table(frame: Any, n: int) -> str:
    """The circuit's ``ck.faithfulness_table``, one line per ablation choice."""
    headers = ["ablation", "F(C)/F(M) (95% interval)", "normalised (95% interval)", "F(C)",
               "F(M)", "F(∅)"]  # fmt: skip
    return "\n".join(
        [
            f"Faithfulness of the circuit under each ablation (ck.faithfulness_table, {n} prompts)",
            "  normalised: (F(C) - F(∅)) / (F(M) - F(∅)), F(∅) with everything ablated",
            table(headers, table_rows(frame), align="<<<>>>"),
        ]
    )


def shorten(template: str, width: int) -> str:
    text = template.replace("{", "").replace("}", "")
    return text if len(text) <= width else text[: width - 3] + "..."


def table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """A plain-text table; ``align`` has one "<" (left) or ">" (right) per column."""
    widths = [max(len(r[c]) for r in [headers, *rows]) for c in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths, strict=True))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)]).rstrip()


__all__ = [
    "section_header",
    "section_baseline",
    "section_templates",
    "section_direct_heads",
    "section_logit_lens",
    "section_circuit",
    "section_faithfulness_table",
    "table",
]
