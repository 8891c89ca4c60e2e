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
beside it. Each section of the printed output is one ``section_*`` function of
``circuitkit.interface.ioi_summary``.

Progress goes to stderr and results to stdout. circuitkit's own errors (an unknown model, a
tokenizer that cannot hold the prompts) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from circuitkit.core.errors import CircuitkitError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_N, QUICK_N = 100, 16
# Path patching from every head costs many forward passes per prompt, so the circuit is found
# on a subset of the prompts; its faithfulness is measured on all of them.
DISCOVER_N, QUICK_DISCOVER_N = 24, 8
# Activation patching sweeps every head's output, query, key and value: on fewer prompts still.
PATCH_N, QUICK_PATCH_N = 20, 4
QUICK_SWEEPS = ("resid", "head")
# The circuit's faithfulness under each ablation choice (ck.faithfulness_table): every default
# choice on the first TABLE_N prompts; with --quick the node-level values on fewer.
TABLE_N, QUICK_TABLE_N = 40, 8
QUICK_TABLE_CHOICES = ("mean-template", "mean", "zero", "resample", "corrupted")
# With --quick the circuit's senders are the heads of the layers from n_layers // 3 on.
QUICK_FIRST_LAYER = 3
# What a model's first load costs, said before it starts (the conversion is cached).
_FIRST_USE = {"smollm2-135m": " (its first use converts the GGUF file once: about 40 s)"}


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
        "--table-n",
        type=_positive_int,
        default=None,
        help=f"prompts the circuit's faithfulness under each ablation is measured on, the first "
        f"of the n ({TABLE_N}; {QUICK_TABLE_N} with --quick)",
    )
    ioi.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look: {QUICK_N} prompts, the circuit found on {QUICK_DISCOVER_N} among "
        "the heads of the later two thirds of the layers, activation patching of the residual "
        f"stream and heads' outputs on {QUICK_PATCH_N}, the faithfulness under "
        f"{len(QUICK_TABLE_CHOICES)} node-level ablations on {QUICK_TABLE_N}",
    )
    ioi.set_defaults(run=_run_ioi)

    trace = commands.add_parser(
        "trace",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="trace where a model keeps a fact (ROME-style causal tracing) and write a page",
        description="Noise the subject's token embeddings, restore clean activations one "
        "layer (window) and token at a time, and write the heatmaps of the target's restored "
        "probability and the indirect effect by layer to an HTML page.",
    )
    trace.add_argument("--model", default=DEFAULT_MODEL, help="model name")
    trace.add_argument("--prompt", default=_EIFFEL[0], help="the prompt, without the answer")
    trace.add_argument("--subject", default=_EIFFEL[1], help="the subject, as in the prompt")
    trace.add_argument(
        "--target",
        default=_EIFFEL[2],
        help="the answer token, with its leading space (default: %(default)r)",
    )
    trace.add_argument("--samples", type=_positive_int, default=10, help="noise samples")
    trace.add_argument("--noise", type=float, default=3.0, help="noise, in embedding stds")
    trace.add_argument("--seed", type=int, default=0, help="noise seed")
    trace.add_argument(
        "--device", default=None, help="torch device (default: %(default)s, the model's own)"
    )
    trace.add_argument("--out", default="trace.html", help="the page to write")
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


# The commands import the library when they run, not when the parser is built: ``--help`` and
# a mistyped argument answer without loading torch and TransformerLens.


def _run_ioi(args: argparse.Namespace) -> int:
    from circuitkit.circuits.faithfulness import DEFAULT_CHOICES
    from circuitkit.core.models import load_model
    from circuitkit.data.ioi import IOIDataset
    from circuitkit.interface.ioi_report import ioi_report, ioi_study
    from circuitkit.interface.ioi_summary import (
        section_baseline,
        section_circuit,
        section_direct_heads,
        section_faithfulness_table,
        section_header,
        section_logit_lens,
        section_templates,
    )

    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    discover_n = args.discover_n or (QUICK_DISCOVER_N if args.quick else DISCOVER_N)
    patch_n = args.patch_n or (QUICK_PATCH_N if args.quick else PATCH_N)
    table_n = args.table_n or (QUICK_TABLE_N if args.quick else TABLE_N)
    clock = time.perf_counter()
    _progress(f"loading {args.model}{_FIRST_USE.get(args.model, '')} ...")
    model = load_model(args.model, device=args.device)
    _progress(f"      done in {time.perf_counter() - clock:.0f} s")
    ds = IOIDataset(model, n=n, seed=args.seed)
    n_layers = model.cfg.n_layers
    study = ioi_study(
        model,
        ds,
        circuit=args.circuit,
        discover_n=discover_n,
        # a first look searches the later layers, where the IOI heads of most models are
        circuit_layers=range(n_layers // QUICK_FIRST_LAYER, n_layers) if args.quick else None,
        patching=args.out is not None,
        patch_n=patch_n,
        # a first look patches the residual stream and the heads' outputs; the whole study
        # also every head's query, key and value
        sweeps=QUICK_SWEEPS if args.quick else ("resid", "head", "q", "k", "v"),
        table_choices=QUICK_TABLE_CHOICES if args.quick else DEFAULT_CHOICES,
        table_n=table_n,
        batch_size=args.batch_size,
        say=_progress,
    )
    _progress(f"all done in {time.perf_counter() - clock:.0f} s")

    print(section_header(args.model, ds))
    print()
    print(section_baseline({"clean": study.clean, "ABC": study.corrupted}))
    print()
    print(section_templates(ds, study.clean))
    print()
    print(section_direct_heads(study.heads, args.top))
    print()
    print(section_logit_lens(study.lens))
    if study.circuit is not None and study.faithful is not None:
        seconds = (study.seconds["circuit"], study.seconds["faithfulness"])
        print()
        print(section_circuit(study.circuit, study.faithful, study.discover_n, seconds))
        if study.table is not None:
            print()
            print(section_faithfulness_table(study.table, study.table_n))
    if args.out is not None:
        path = ioi_report(study, model_name=args.model).write(args.out)
        print()
        print(f"wrote {path}")
    return 0


def _run_trace(args: argparse.Namespace) -> int:
    from circuitkit.core.models import load_model
    from circuitkit.interface.ioi_summary import table
    from circuitkit.interface.trace_report import trace_report

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
    print(table(["restored", "best layer", "at token", "p(target)"], rows, align="<><>"))
    path = report.write(args.out)
    print(f"wrote {path}")
    return 0
