"""Automatic discovery of the IOI circuit, beside the one found by hand-style path patching.

Runs ``ck.discover_circuit`` (EAP-IG edge scores, then the smallest top-k edge set whose
circuit keeps ``--target`` of the logit difference, every other edge mean-ablated per template
over the ABC prompts) on smollm2-135m's IOI task, and prints the circuit's size (edges before
and after pruning, heads, MLPs), its faithfulness curve, the time of each step, and how it
compares with ``ck.find_ioi_circuit`` on the same prompts: the heads in both and in each only,
where the hand-found heads rank among the discovered ones (by the summed scores of their kept
edges), and the node-level faithfulness (``ck.faithfulness``: heads outside mean-ablated, MLPs
kept) of the hand-found circuit and of as many of the top discovered heads. The last line is
the speed of the exact circuit evaluation the search rests on: ``ck.patch_edges`` batched
against its one-forward-per-run reference, on a few circuits of the curve.

    python benchmarks/discover_ioi.py                  # smollm2-135m, 30 prompts
    python benchmarks/discover_ioi.py --n 20 --no-hand # skip find_ioi_circuit (several minutes)
    python benchmarks/discover_ioi.py --ablation corrupted --normalize
"""

from __future__ import annotations

import argparse
import time

import torch

import circuitkit as ck

# The circuit find_ioi_circuit finds on smollm2-135m with 40 prompts (README, "Circuits").
README_HEADS = {
    "name mover": [(23, 0), (23, 2), (23, 7)],
    "negative name mover": [(24, 4)],
    "other direct": [(23, 3), (29, 1)],
    "other negative direct": [(24, 5), (24, 7), (29, 0)],
    "s-inhibition": [(20, 0), (19, 2)],
    "induction": [(17, 4), (18, 6)],
    "duplicate token": [(5, 6), (8, 0), (8, 1), (17, 0)],
    "previous token": [(16, 0)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=30, help="IOI prompts (30)")
    parser.add_argument("--method", default="eap-ig", choices=["eap-ig", "eap", "path"])
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps (5)")
    parser.add_argument("--target", type=float, default=0.8, help="faithfulness (0.8)")
    parser.add_argument("--ablation", default="mean", choices=["mean", "corrupted"])
    parser.add_argument("--normalize", action="store_true", help="(F(C)-F(0))/(F(M)-F(0))")
    parser.add_argument("--no-hand", action="store_true", help="use the README's 18 heads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = ck.load_model(args.model, device=args.device)
    ds = ck.IOIDataset(model, n=args.n, seed=0)
    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    graph = ck.Graph.of(model)
    print(
        f"model {args.model}: {graph.n_edges} edges; IOI, {args.n} prompts, ABC corruption, "
        f"logit difference; {args.method}, ablation {args.ablation}, target {args.target}; "
        f"device {args.device}, {torch.get_num_threads()} torch threads"
    )

    start = time.perf_counter()
    circuit = ck.discover_circuit(
        model, ds, abc, metric, method=args.method, steps=args.steps, target=args.target,
        ablation=args.ablation, normalize=args.normalize, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    info = circuit.info
    mlps = len(circuit.mlps) if circuit.mlps != "all" else "all"
    print(
        f"\ndiscovered: faithfulness {info['faithfulness']:.3f} ({info['definition']}; "
        f"F(M) = {info['f_model']:.3f}, F(empty) = {info['f_empty']:.3f}) with the top "
        f"{info['k']} edges, {info['n_edges']} after pruning; {len(circuit)} heads, {mlps} MLPs"
    )
    print(
        f"time: {seconds:.1f} s (scores {info['seconds']['scores']:.1f} s, search "
        f"{info['seconds']['search']:.1f} s over {len(info['curve'].info['edges'])} circuits)"
    )
    curve = info["curve"]
    print("\nfaithfulness curve (top k edges; edges left after pruning):")
    for k, pruned, value in zip(
        curve.info["edges"], curve.info["pruned_edges"], curve.values.tolist(), strict=True
    ):
        print(f"  k {k:>6}  pruned {pruned:>6}  faithfulness {value:7.3f}")
    by_role: dict[str, list[str]] = {}
    for node in circuit.nodes:
        by_role.setdefault(node.role, []).append(node.head.label)
    for role, heads in by_role.items():
        print(f"  {role}: {len(heads)} heads")

    # -- the hand-found circuit ----------------------------------------------------------------
    if args.no_hand:
        hand = ck.Circuit.from_classes(
            {role: [ck.Head(*h) for h in heads] for role, heads in README_HEADS.items()},
            name="IOI (README)",
        )
        where = "README list"
    else:
        start = time.perf_counter()
        hand = ck.find_ioi_circuit(model, ds, reference=abc, metric=metric, progress=False)
        where = f"find_ioi_circuit on the same prompts, {time.perf_counter() - start:.0f} s"
    hand_heads = {(h.layer, h.head) for h in hand.heads}
    found = {(h.layer, h.head) for h in circuit.heads}
    print(f"\nhand-found circuit ({where}): {len(hand_heads)} heads")
    print(f"  in both: {len(hand_heads & found)}: {_labels(hand_heads & found)}")
    print(f"  hand-found only: {len(hand_heads - found)}: {_labels(hand_heads - found)}")
    print(f"  discovered only: {len(found - hand_heads)} heads")
    ranked = sorted(circuit.nodes, key=lambda node: -abs(node.effect or 0.0))
    rank = {(n.head.layer, n.head.head): i + 1 for i, n in enumerate(ranked)}
    roles = {(n.head.layer, n.head.head): n.role for n in hand.nodes}
    print("  rank of each hand-found head among the discovered heads, by |summed edge score|:")
    for head in sorted(hand_heads, key=lambda h: rank.get(h, 10**6)):
        print(f"    {head[0]}.{head[1]:<3} {roles[head]:<22} rank {rank.get(head, '-')}")
    top = {(n.head.layer, n.head.head) for n in ranked[: len(hand_heads)]}
    print(
        f"  top {len(hand_heads)} discovered heads: {_labels(top)}; "
        f"{len(top & hand_heads)} of them hand-found"
    )
    as_nodes = ck.Circuit.from_classes(
        {"discovered": [ck.Head(*h) for h in sorted(top)]}, name="top discovered heads"
    )
    for label, candidate in (("hand-found", hand), (f"top {len(top)} discovered", as_nodes)):
        f = ck.faithfulness(model, candidate, ds, reference=abc, metric=metric, progress=False)
        print(f"  node-level faithfulness of the {label} heads (MLPs kept): {f.ratio:.3f}")

    # -- speed of the exact evaluation ---------------------------------------------------------
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
        f"{difference:.1e}"
    )
    print(
        f"patch_edges batched is {timings[True][0] / timings[False][0]:.1f}x faster than its "
        "one-forward-per-run reference"
    )


def _labels(heads) -> str:
    return ", ".join(f"{layer}.{head}" for layer, head in sorted(heads)) or "-"


if __name__ == "__main__":
    main()
