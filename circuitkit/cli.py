"""The ``circuitkit`` command.

``circuitkit ioi`` loads a model, builds an ``IOIDataset`` and prints how well the model does
the task, on clean prompts and on the ABC corruption, overall and per template: the baseline
every IOI circuit analysis starts from. It then prints the heads with the largest direct effect
on the logit difference (direct logit attribution) and the logit lens by layer, both from the
clean run's cache. Each section of the output is one ``_section_*``
function that takes the runs it needs and returns its text, so new sections and subcommands
are added beside the existing ones.

Progress goes to stderr and results to stdout. circuitkit's own errors (an unknown model, a
tokenizer that cannot hold the prompts) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from circuitkit import metrics
from circuitkit.attribution import direct_logit_attribution, logit_lens, required_hooks
from circuitkit.data.ioi import IOIDataset
from circuitkit.errors import CircuitkitError
from circuitkit.results import Result

DEFAULT_MODEL = "smollm2-135m"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``circuitkit`` command line; return the exit status.

    Example:
        >>> main(["ioi", "--n", "20"])          # prints the IOI baseline of smollm2-135m
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CircuitkitError as error:
        print(f"circuitkit {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitkit",
        description="Causal-intervention circuit analysis of transformer language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ioi = commands.add_parser(
        "ioi",
        help="print a model's baseline on the Indirect Object Identification task",
        description="Run the model on IOI prompts and on their ABC corruption and print the "
        "logit difference, accuracy and probability of the right name, overall and per "
        "template; then the heads with the largest direct effect on the logit difference and "
        "the logit lens by layer.",
    )
    ioi.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    ioi.add_argument("--n", type=_positive_int, default=100, help="number of prompts (100)")
    ioi.add_argument("--seed", type=int, default=0, help="dataset seed (0)")
    ioi.add_argument("--device", default=None, help="torch device (the model's default)")
    ioi.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per forward")
    ioi.add_argument(
        "--top", type=_positive_int, default=10, help="heads listed by direct effect (10)"
    )
    ioi.set_defaults(run=_run_ioi)

    trace = commands.add_parser(
        "trace",
        help="trace where a model keeps a fact (ROME-style causal tracing) and write a page",
        description="Noise the subject's token embeddings, restore clean activations one "
        "layer (window) and token at a time, and write the heatmaps of the target's restored "
        "probability and the indirect effect by layer to an HTML page.",
    )
    trace.add_argument("--model", default=DEFAULT_MODEL, help=f"model name ({DEFAULT_MODEL})")
    trace.add_argument("--prompt", default=_EIFFEL[0], help="the prompt, without the answer")
    trace.add_argument("--subject", default=_EIFFEL[1], help="the subject, as in the prompt")
    trace.add_argument("--target", default=_EIFFEL[2], help="the answer token, e.g. ' Paris'")
    trace.add_argument("--samples", type=_positive_int, default=10, help="noise samples (10)")
    trace.add_argument("--noise", type=float, default=3.0, help="noise, in embedding stds (3)")
    trace.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    trace.add_argument("--device", default=None, help="torch device (the model's default)")
    trace.add_argument("--out", default="trace.html", help="the page to write (trace.html)")
    trace.add_argument("--quick", action="store_true", help="3 noise samples, for a first look")
    trace.set_defaults(run=_run_trace)
    return parser


_EIFFEL = ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- circuitkit ioi ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scores:
    """Per-example scores of one run (clean or corrupted) on the IOI task."""

    logit_diff: Float[Tensor, "n"]
    accuracy: Float[Tensor, "n"]
    io_beats_s: Float[Tensor, "n"]
    prob_io: Float[Tensor, "n"]


def _run_ioi(args: argparse.Namespace) -> int:
    from circuitkit.models import load_model

    _progress(f"loading {args.model} ...")
    model = load_model(args.model, device=args.device)
    _progress(f"building {args.n} IOI prompts (seed {args.seed}) ...")
    ds = IOIDataset(model, n=args.n, seed=args.seed)
    abc = ds.corrupted("ABC")
    _progress(f"running {args.model} on the clean and ABC prompts ...")
    read = ds.positions["end"]
    clean_logits_at, cache = _clean_run(model, ds.tokens, read, args.batch_size)
    clean = _scores(ds, clean_logits_at)
    corrupted = _scores(ds, _logits_at(model, abc.tokens, read, args.batch_size))
    heads = direct_logit_attribution(model, cache, ds, by="head")
    lens = logit_lens(model, cache, ds)

    print(_section_header(args.model, ds))
    print()
    print(_section_baseline({"clean": clean, "ABC": corrupted}))
    print()
    print(_section_templates(ds, clean))
    print()
    print(_section_direct_heads(heads, args.top))
    print()
    print(_section_logit_lens(lens))
    return 0


def _run_trace(args: argparse.Namespace) -> int:
    from circuitkit.models import load_model
    from circuitkit.report import trace_report

    _progress(f"loading {args.model} ...")
    model = load_model(args.model, device=args.device)
    samples = 3 if args.quick else args.samples
    _progress(f"tracing {args.prompt!r} -> {args.target!r} ({samples} noise samples) ...")
    report, traces = trace_report(
        model,
        args.prompt,
        args.subject,
        args.target,
        samples=samples,
        noise=args.noise,
        seed=args.seed,
    )
    first = next(iter(traces.values()))
    print(f"Causal trace: {args.prompt!r} -> {args.target!r} on {args.model}")
    print(f"  p(target) clean {first.clean_prob:.4f}, corrupted {first.corrupted_prob:.4f}")
    rows = []
    for kind, trace in traces.items():
        values = trace.scores.values
        layer, column = divmod(int(values.argmax()), values.shape[1])
        rows.append(
            [
                kind,
                trace.scores.labels["layer"][layer],
                trace.scores.labels["pos"][column],
                f"{float(values.max()):.4f}",
            ]
        )
    print(_table(["restored", "best layer", "at token", "p(target)"], rows, align="<><>"))
    path = report.write(args.out)
    print(f"wrote {path}")
    return 0


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


def _scores(ds: IOIDataset, logits_at: Float[Tensor, "n d_vocab"]) -> _Scores:
    """Score logits against the clean answers of ``ds`` (also for a corrupted run)."""
    return _Scores(
        logit_diff=metrics.logit_diff(ds).at(logits_at),
        accuracy=metrics.accuracy(ds).at(logits_at),
        io_beats_s=metrics.accuracy(ds, against="S").at(logits_at),
        prob_io=metrics.prob(ds).at(logits_at),
    )


def _section_header(model_name: str, ds: IOIDataset) -> str:
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


def _section_baseline(runs: dict[str, _Scores]) -> str:
    rows = [
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
    headers = ["run", "logit diff mean", "std", "accuracy", "IO > S", "P(IO) mean"]
    return _table(headers, rows, align="<>>>>>")


def _section_templates(ds: IOIDataset, clean: _Scores, width: int = 60) -> str:
    rows = []
    for t, template in enumerate(ds.template_strings):
        chosen = ds.templates == t
        if not chosen.any():
            continue
        rows.append(
            [
                str(t),
                _shorten(template, width),
                str(int(chosen.sum())),
                f"{clean.logit_diff[chosen].mean():.3f}",
                f"{clean.accuracy[chosen].mean():.3f}",
            ]
        )
    headers = ["#", "template (clean)", "n", "logit diff", "accuracy"]
    return _table(headers, rows, align="><>>>")


def _section_direct_heads(heads: Result, k: int) -> str:
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
            _table(headers, rows, align="<>>>"),
        ]
    )


def _section_logit_lens(lens: Result) -> str:
    rows = [
        [label, f"{float(value):.3f}"]
        for label, value in zip(lens.labels["layer"], lens.values, strict=True)
    ]
    return "\n".join(
        [
            "Logit lens: the logit difference read off the residual stream after each layer",
            "  (the final norm applied with each stream's own statistics, then the unembedding)",
            _table(["after", "logit diff"], rows, align=">>"),
        ]
    )


def _std(values: Tensor) -> float:
    return float(values.std()) if values.numel() > 1 else 0.0


def _shorten(template: str, width: int) -> str:
    text = template.replace("{", "").replace("}", "")
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """A plain-text table; ``align`` has one "<" (left) or ">" (right) per column."""
    widths = [max(len(r[c]) for r in [headers, *rows]) for c in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths, strict=True))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)]).rstrip()


if __name__ == "__main__":
    sys.exit(main())
