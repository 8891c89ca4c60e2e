"""The ``circuitkit`` command.

``circuitkit ioi`` loads a model, builds an ``IOIDataset`` and prints how well the model does
the task, on clean prompts and on the ABC corruption, overall and per template: the baseline
every IOI circuit analysis starts from. It then prints the heads with the largest direct effect
on the logit difference (direct logit attribution) and the logit lens by layer, both from the
clean run's cache, and last the IOI circuit that ``ck.find_ioi_circuit`` finds (path patching
back from the logits, on the first ``--discover-n`` prompts) with its faithfulness on all of
them (``--no-circuit`` leaves it out; ``--quick`` takes fewer prompts for a first look).
With ``--out page.html`` it also runs activation patching (the residual stream by layer and
word, every head's output, query, key and value, on the first ``--patch-n`` prompts) and writes
the whole study as one self-contained HTML page (``ck.report.ioi_report``), its results saved
beside it. Each section of the output is one ``_section_*``
function that takes the runs it needs and returns its text, so new sections and subcommands
are added beside the existing ones.

Progress goes to stderr and results to stdout. circuitkit's own errors (an unknown model, a
tokenizer that cannot hold the prompts) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from circuitkit.circuits import Circuit, Faithfulness
from circuitkit.data.ioi import IOIDataset
from circuitkit.errors import CircuitkitError
from circuitkit.report import (
    PAPER_GPT2,
    IOIScores,
    baseline_rows,
    class_rows,
    ioi_report,
    ioi_study,
)
from circuitkit.results import Result

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_N, QUICK_N = 100, 16
# Path patching from every head costs many forward passes per prompt, so the circuit is found
# on a subset of the prompts; its faithfulness is measured on all of them.
DISCOVER_N, QUICK_DISCOVER_N = 24, 8
# Activation patching sweeps every head's output, query, key and value: on fewer prompts still.
PATCH_N, QUICK_PATCH_N = 20, 4


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``circuitkit`` command line; return the exit status.

    Example:
        >>> main(["ioi", "--n", "20"])          # the IOI baseline and circuit of smollm2-135m
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
        "template; then the heads with the largest direct effect on the logit difference, "
        "the logit lens by layer, and the IOI circuit found by path patching with its "
        "faithfulness.",
    )
    ioi.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    ioi.add_argument(
        "--n",
        type=_positive_int,
        default=None,
        help=f"number of prompts ({DEFAULT_N}; {QUICK_N} with --quick)",
    )
    ioi.add_argument("--seed", type=int, default=0, help="dataset seed (0)")
    ioi.add_argument("--device", default=None, help="torch device (the model's default)")
    ioi.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per forward")
    ioi.add_argument(
        "--top", type=_positive_int, default=10, help="heads listed by direct effect (10)"
    )
    ioi.add_argument(
        "--circuit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find the IOI circuit and print its faithfulness (default; --no-circuit skips it)",
    )
    ioi.add_argument(
        "--discover-n",
        type=_positive_int,
        default=None,
        help=f"prompts the circuit is found on, the first of the n ({DISCOVER_N}; "
        f"{QUICK_DISCOVER_N} with --quick); faithfulness is measured on all n",
    )
    ioi.add_argument(
        "--out",
        default=None,
        metavar="PAGE.html",
        help="also run activation patching and write the whole study as one HTML page, with "
        "its results saved beside it",
    )
    ioi.add_argument(
        "--patch-n",
        type=_positive_int,
        default=None,
        help=f"prompts the activation-patching sweeps of the page use, the first of the n "
        f"({PATCH_N}; {QUICK_PATCH_N} with --quick)",
    )
    ioi.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look: {QUICK_N} prompts, the circuit found on {QUICK_DISCOVER_N}, "
        f"activation patching of the residual stream and heads' outputs on {QUICK_PATCH_N}",
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


def _run_ioi(args: argparse.Namespace) -> int:
    from circuitkit.models import load_model

    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    discover_n = args.discover_n or (QUICK_DISCOVER_N if args.quick else DISCOVER_N)
    patch_n = args.patch_n or (QUICK_PATCH_N if args.quick else PATCH_N)
    _progress(f"loading {args.model} ...")
    model = load_model(args.model, device=args.device)
    _progress(f"building {n} IOI prompts (seed {args.seed}) ...")
    ds = IOIDataset(model, n=n, seed=args.seed)
    _progress(f"running {args.model} on the clean and ABC prompts ...")
    study = ioi_study(
        model,
        ds,
        circuit=args.circuit,
        discover_n=discover_n,
        patching=args.out is not None,
        patch_n=patch_n,
        # a first look patches the residual stream and the heads' outputs; the whole study
        # also every head's query, key and value
        sweeps=("resid", "head") if args.quick else ("resid", "head", "q", "k", "v"),
        batch_size=args.batch_size,
        say=_progress,
    )

    print(_section_header(args.model, ds))
    print()
    print(_section_baseline({"clean": study.clean, "ABC": study.corrupted}))
    print()
    print(_section_templates(ds, study.clean))
    print()
    print(_section_direct_heads(study.heads, args.top))
    print()
    print(_section_logit_lens(study.lens))
    if study.circuit is not None and study.faithful is not None:
        seconds = (study.seconds["circuit"], study.seconds["faithfulness"])
        print()
        print(_section_circuit(study.circuit, study.faithful, study.discover_n, seconds))
    if args.out is not None:
        path = ioi_report(study, model_name=args.model).write(args.out)
        print()
        print(f"wrote {path}")
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


def _section_baseline(runs: dict[str, IOIScores]) -> str:
    rows = baseline_rows(runs)
    headers = ["run", "logit diff mean", "std", "accuracy", "IO > S", "P(IO) mean"]
    return _table(headers, rows, align="<>>>>>")


def _section_templates(ds: IOIDataset, clean: IOIScores, width: int = 60) -> str:
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


def _section_circuit(
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
            _table(["class", "heads at their position (path-patching effect)"], rows, align="<<"),
            f"{len(circuit)} heads; faithfulness F(C)/F(M) = {faithful.f_circuit:.3f} / "
            f"{faithful.f_model:.3f} = {100 * faithful.ratio:.1f}% "
            f"(95% interval {100 * low:.0f}%..{100 * high:.0f}%)",
            "  F(C): every head outside the circuit, and every circuit head at its other "
            "positions, mean-ablated (ABC, per template); MLPs kept",
            f"  for comparison, {paper}",
        ]
    )


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
