"""Causal tracing of circuitkit.data.FACTS on smollm2-135m: where do the indirect effects peak?

For every fact and every kind (residual stream, MLP outputs over a 10-layer window, attention
outputs over a 10-layer window) this traces the last subject token and the last token at every
layer (every token with ``--all-positions``), averages the indirect effect over the facts
(``ck.average_indirect_effect``) and prints, per kind and token group, the effect by layer and
the layer where it peaks. With ``--grids`` it also traces every position of the first fact and
writes the three heatmaps to an HTML file.

    python benchmarks/trace_facts.py                          # every fact, 10 noise samples
    python benchmarks/trace_facts.py --facts 6 --samples 5    # a quicker look
    python benchmarks/trace_facts.py --grids traces.html      # plus the full grids of one fact
    python benchmarks/trace_facts.py --facts 6 --all-positions  # all six of ROME's groups

ROME (Meng et al. 2022) found, in GPT-2 XL, the MLP effect peaking in early-middle layers at
the last subject token and the attention effect in late layers at the last token.
"""

from __future__ import annotations

import argparse
import time

import circuitkit as ck
from circuitkit.data import FACTS
from circuitkit.methods.causal_tracing import find_subject

KINDS = ("resid", "mlp", "attn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=len(FACTS), help="how many facts to trace")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per trace")
    parser.add_argument("--noise", type=float, default=3.0, help="noise, in embedding stds")
    parser.add_argument("--grids", default=None, help="write the first fact's full grids here")
    parser.add_argument(
        "--all-positions", action="store_true", help="trace every token, not only two"
    )
    args = parser.parse_args()

    model = ck.load_model("smollm2-135m")
    facts = FACTS[: args.facts]
    traces: dict[str, list[ck.CausalTrace]] = {kind: [] for kind in KINDS}
    start = time.perf_counter()
    for fact in facts:
        tokens = model.to_tokens(fact.prompt)[0]
        last_subject = find_subject(model, tokens, fact.subject)[-1]
        line = [f"{fact.prompt!r} -> {fact.target!r}"]
        for kind in KINDS:
            trace = ck.causal_trace(
                model,
                fact.prompt,
                fact.subject,
                fact.target,
                kind,
                noise=args.noise,
                samples=args.samples,
                positions=None if args.all_positions else [last_subject, -1],
                progress=False,
            )
            traces[kind].append(trace)
            line.append(f"{kind} peak {float(trace.scores.values.max()):.3f}")
        line.insert(1, f"clean {trace.clean_prob:.3f} corrupted {trace.corrupted_prob:.3f}")
        print(" | ".join(line), flush=True)
    print(f"traced {len(facts)} facts x {len(KINDS)} kinds in {time.perf_counter() - start:.0f} s")

    for kind in KINDS:
        summary = ck.average_indirect_effect(traces[kind])
        for row in summary.labels["token"]:
            values = summary.values[summary.labels["token"].index(row)]
            peak = int(values.argmax())
            print(
                f"\n{kind:5} at the {row}: peak {float(values[peak]):.3f} at layer {peak} "
                f"(n={summary.info['n_prompts'][row]})"
            )
            print("  " + " ".join(f"{float(v):.3f}" for v in values))

    if args.grids:
        fact = facts[0]
        full = [
            ck.causal_trace(
                model,
                fact.prompt,
                fact.subject,
                fact.target,
                kind,
                noise=args.noise,
                samples=args.samples,
                progress=False,
            )
            for kind in KINDS
        ]
        ck.plot_causal_trace(*full).write_html(args.grids)
        print(f"\nwrote the grids of {fact.prompt!r} to {args.grids}")


if __name__ == "__main__":
    main()
