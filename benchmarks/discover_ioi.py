"""Automatic discovery of the IOI circuit: how sparse a circuit reaches the target, for each
pairing of scores and evaluation.

Runs ``ck.discover_circuit`` on smollm2-135m's IOI task (the ABC corruption, the logit
difference) for each pairing: edges scored by EAP-IG against the paired corrupted run
(``scores_from="corrupted"``, the EAP papers' choice) or against the values the evaluation
ablates with (``scores_from="ablation"``: the per-template mean over the ABC prompts), searched
at edge level (every edge outside the circuit ablated) or at node level (heads and MLPs, each
node scored by the sum of its outgoing edges' scores, every other node ablated), with and
without the greedy refinement that makes the circuit minimal for the target. Each is evaluated
with the same ablation, the per-template mean (``--ablation corrupted``: each prompt's ABC
twin). For each it prints the size at the target (top k, after pruning and refinement), the
faithfulness ``F(C) / F(M)``, and the CPR and CMD of MIB's normalised curve of the same
ranking under the same ablation (``ck.faithfulness_curve``), with the time each step took;
then the curves side by side.

    python benchmarks/discover_ioi.py                          # every pairing, 30 prompts
    python benchmarks/discover_ioi.py --scores-from ablation   # one score source
    python benchmarks/discover_ioi.py --levels node --refine-runs 200
    python benchmarks/discover_ioi.py --hand                   # and the find_ioi_circuit heads

The last line is the speed of the exact circuit evaluation the search rests on:
``ck.patch_edges`` batched against its one-forward-per-run reference, on a few circuits.
"""

from __future__ import annotations

import argparse
import time

import torch

import circuitkit as ck
from circuitkit.circuits.curves import MIB_SIZES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=30, help="IOI prompts (30)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps (5)")
    parser.add_argument("--target", type=float, default=0.8, help="faithfulness (0.8)")
    parser.add_argument("--ablation", default="mean", choices=["mean", "corrupted"])
    parser.add_argument(
        "--scores-from", nargs="+", default=["corrupted", "ablation"],
        choices=["corrupted", "ablation"],
    )  # fmt: skip
    parser.add_argument("--levels", nargs="+", default=["edge", "node"], choices=["edge", "node"])
    parser.add_argument("--rtol", type=float, default=0.02, help="bisection tolerance (0.02)")
    parser.add_argument(
        "--refine-runs", type=int, default=400,
        help="cap on the circuits node-level refinement evaluates (400; 0: no refinement)",
    )  # fmt: skip
    parser.add_argument(
        "--refine-edges", type=int, default=0,
        help="refine edge-level circuits too, with this cap on the circuits evaluated (0: no)",
    )  # fmt: skip
    parser.add_argument("--hand", action="store_true", help="compare with find_ioi_circuit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model.startswith("tiny-"):  # a quick check of the script: "tiny-gpt2", ...
        model = ck.tiny_model(args.model.removeprefix("tiny-")).to(args.device)
    else:
        model = ck.load_model(args.model, device=args.device)
    ds = ck.IOIDataset(model, n=args.n, seed=0)
    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    graph = ck.Graph.of(model)
    per_template = args.ablation == "mean"
    evaluation = ck.Ablation(args.ablation, per_template=per_template)
    print(
        f"model {args.model}: {graph.n_edges} edges, {len(graph.senders) - 1} nodes (heads and "
        f"MLPs); IOI, {args.n} prompts, ABC corruption, logit difference; EAP-IG with "
        f"{args.steps} steps; evaluation ablation {evaluation.name}; target {args.target}; "
        f"rtol {args.rtol}; device {args.device}, {torch.get_num_threads()} torch threads",
        flush=True,
    )

    rows, curves = [], {}
    first_edge_circuit = None
    for source in args.scores_from:
        start = time.perf_counter()
        scores = ck.edge_attribution_patching(
            model, ds, abc, metric, method="eap-ig", steps=args.steps,
            ablation=evaluation if source == "ablation" else "corrupted", progress=False,
        )  # fmt: skip
        score_seconds = time.perf_counter() - start
        print(f"\nscores from {source}: EAP-IG in {score_seconds:.0f} s", flush=True)
        for level in args.levels:
            refine_runs = args.refine_runs if level == "node" else args.refine_edges
            common = dict(level=level, target=args.target, ablation=args.ablation, scores=scores,
                          progress=False)  # fmt: skip
            start = time.perf_counter()
            # the search first (printed at once), then, starting from its k, the refinement
            circuit = ck.discover_circuit(model, ds, abc, metric, rtol=args.rtol, **common)
            seconds = time.perf_counter() - start
            found = circuit.info
            print(
                f"  {level}, scores from {source}: the top {found['k']} reach "
                f"{found['faithfulness']:.3f} ({found['n_edges']} edges after pruning); "
                f"{found['seconds']['search']:.0f} s",
                flush=True,
            )
            if refine_runs > 0:
                circuit = ck.discover_circuit(
                    model, ds, abc, metric, grid=[found["k"]], rtol=0.99, refine=True,
                    refine_runs=refine_runs, **common,
                )  # fmt: skip
                circuit.info["curve"] = found["curve"]
                circuit.info["seconds"]["search"] = found["seconds"]["search"]
            info = circuit.info
            if level == "edge" and first_edge_circuit is None:
                first_edge_circuit = circuit
            size = info["n_edges"] if level == "edge" else info["n_nodes"]
            refined = info.get("refined")
            before = refined["k_before"] if refined else size
            f_before = refined["faithfulness_before"] if refined else info["faithfulness"]
            start = time.perf_counter()
            curve = ck.faithfulness_curve(
                model, ds, abc, metric, level=level, ablation=_at(evaluation, level),
                scores=scores if level == "edge" else _node_scores(info["node_scores"]),
                progress=False,
            )  # fmt: skip
            curve_seconds = time.perf_counter() - start
            label = f"{level}, scores from {source}"
            curves[label] = curve
            rows.append(
                [label, info["k"], before, f"{f_before:.3f}", size, f"{info['faithfulness']:.3f}",
                 "-" if not refined else f"{refined['runs']} ({_yes(refined['minimal'])})",
                 f"{curve.info['cpr']:.3f}", f"{curve.info['cmd']:.3f}",
                 f"{info['seconds']['search']:.0f} + {info['seconds']['refine']:.0f} + "
                 f"{curve_seconds:.0f}"]
            )  # fmt: skip
            heads = len(circuit)
            mlps = "all" if circuit.mlps == "all" else len(circuit.mlps)
            print(
                f"  {label}: top k {info['k']} reach {f_before:.3f}; "
                f"{before} after pruning; {size} after refinement "
                f"(faithfulness {info['faithfulness']:.3f}); {heads} heads, {mlps} MLPs; "
                f"CPR {curve.info['cpr']:.3f}, CMD {curve.info['cmd']:.3f}; {seconds:.0f} s "
                f"(+ {curve_seconds:.0f} s for the curve)",
                flush=True,
            )
            print(
                "    curve (k: F(C)/F(M)): "
                + ", ".join(
                    f"{k}: {v:.2f}"
                    for k, v in zip(
                        info["curve"].info[f"{level}s"], info["curve"].values.tolist(), strict=True
                    )
                ),
                flush=True,
            )

    print(
        f"\nsize at faithfulness {args.target} ({evaluation.name} ablation; CPR and CMD of "
        "MIB's normalised curve, sizes ck.MIB_SIZES, |score| ranking):"
    )
    headers = ["pairing", "top k", "pruned", "F", "refined", "F", "refine runs (minimal)",
               "CPR", "CMD", "seconds (search + refine + curve)"]  # fmt: skip
    print("| " + " | ".join(headers) + " |")
    print("|" + " --- |" * len(headers))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print("\nMIB curves, normalised faithfulness at each fraction of the items:")
    fractions = MIB_SIZES
    print(f"  {'':<32}" + "".join(f"{f:>8}" for f in fractions))
    for label, curve in curves.items():
        print(f"  {label:<32}" + "".join(f"{v:8.2f}" for v in curve.values.tolist()))

    if args.hand and first_edge_circuit is not None:
        _compare_with_hand(model, ds, abc, metric, first_edge_circuit)

    # -- speed of the exact evaluation ---------------------------------------------------------
    if first_edge_circuit is not None:
        info = first_edge_circuit.info
        ranked_edges = [edge for edge, _ in info["scores"].top_edges(info["k"])]
        sizes = [k for k in (16, 256, info["k"]) if k <= len(ranked_edges)]
        runs = [graph.valid & ~graph.mask(ranked_edges[:k]) for k in sizes]
        mean = ck.sender_outputs(model, abc).mean()
        timings = {}
        for reference in (False, True):
            start = time.perf_counter()
            values = ck.patch_edges(
                model, ds, runs, metric, replacement=mean, reference=reference, progress=False
            )
            timings[reference] = (time.perf_counter() - start, values)
        difference = (timings[False][1] - timings[True][1]).abs().max().item()
        print(
            f"\nexact circuit evaluation of {len(runs)} circuits (per-position mean): batched "
            f"{timings[False][0]:.1f} s, reference {timings[True][0]:.1f} s, max |difference| "
            f"{difference:.1e}; batched is {timings[True][0] / timings[False][0]:.1f}x faster"
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _at(ablation: ck.Ablation, level: str) -> ck.Ablation:
    return ck.Ablation(ablation.value, per_template=ablation.per_template, level=level)


def _node_scores(node_scores: ck.Result) -> dict:
    """``{component: score}`` for ck.faithfulness_curve, from discover_circuit's node scores."""
    graph_nodes = node_scores.labels["node"]
    return {
        _component(label): float(value)
        for label, value in zip(graph_nodes, node_scores.values.tolist(), strict=True)
    }


def _component(label: str):
    # labels are the components' reprs: "Head(3, 1)" or "MLP(3)"
    name, numbers = label.split("(", 1)
    values = [int(x) for x in numbers.rstrip(")").split(",")]
    return ck.Head(*values) if name == "Head" else ck.MLP(*values)


def _compare_with_hand(model, ds, abc, metric, circuit) -> None:
    start = time.perf_counter()
    hand = ck.find_ioi_circuit(model, ds, reference=abc, metric=metric, progress=False)
    hand_heads = {(h.layer, h.head) for h in hand.heads}
    found = {(h.layer, h.head) for h in circuit.heads}
    print(
        f"\nfind_ioi_circuit on the same prompts ({time.perf_counter() - start:.0f} s): "
        f"{len(hand_heads)} heads; {len(hand_heads & found)} in the first edge-level circuit"
    )
    ranked = sorted(circuit.nodes, key=lambda node: -abs(node.effect or 0.0))
    top = {(n.head.layer, n.head.head) for n in ranked[: len(hand_heads)]}
    print(
        f"  top {len(hand_heads)} discovered heads by |summed edge score|: "
        f"{len(top & hand_heads)} of them hand-found"
    )


if __name__ == "__main__":
    main()
