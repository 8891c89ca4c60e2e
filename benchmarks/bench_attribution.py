"""Attribution patching against exact activation patching, in one process.

Runs the same sweeps with ``ck.attribution_patching`` (one forward and backward pass) and with
``ck.activation_patching`` (the batched engine: one patched run per cell) on smollm2-135m's
IOI task (ABC corruption, logit difference), and prints the time of each, how well they agree
(Pearson and Spearman correlation over the sweep's cells, the largest absolute difference) and
the ratio of the times. The last line is the overall ratio.

    python benchmarks/bench_attribution.py                        # 20 prompts, heads, both ways
    python benchmarks/bench_attribution.py --n 100 --device cuda --sweeps head head_pos resid
    python benchmarks/bench_attribution.py --edges 100            # also EAP and EAP-IG

Sweeps: "head" (every head's output at all positions), "head_pos" (every head at S1, S2 and
end), "resid" (resid_pre by layer and position). ``--directions`` picks denoising, noising or
both. With ``--edges K`` the script also times EAP and EAP-IG (``--steps``) over the whole
graph and compares both with exact single-edge patching (``ck.patch_edges``) of K edges: the
K/2 with the largest |EAP-IG| score and K/2 drawn at random.
"""

from __future__ import annotations

import argparse
import time

import torch

import circuitkit as ck

SWEEPS = {
    # name: (component kind, keyword arguments)
    "head": ("head", {}),
    "head_pos": ("head", {"positions": ["S1", "S2", "end"]}),
    "resid": ("resid_pre", {"per_position": True}),
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.flatten().argsort().argsort().double()

    return pearson(ranks(a), ranks(b))


def timed(device: str, fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return out, time.perf_counter() - start


def compare_edges(model, ds, abc, metric, args) -> None:
    graph = ck.Graph.of(model)
    scores = {}
    for method in ("eap", "eap-ig"):
        scores[method], seconds = timed(
            args.device,
            ck.edge_attribution_patching,
            *(model, ds, abc, metric),
            method=method,
            steps=args.steps,
            progress=False,
        )
        label = "EAP" if method == "eap" else f"EAP-IG ({args.steps} steps)"
        print(f"{label:>17}: {graph.n_edges} edges in {seconds:8.2f} s")

    rows, columns = graph.valid.nonzero(as_tuple=True)
    ig = scores["eap-ig"].values[rows, columns]
    top = ig.abs().argsort(descending=True)[: args.edges // 2]
    rest = torch.ones(len(ig), dtype=torch.bool)
    rest[top] = False
    g = torch.Generator().manual_seed(0)
    drawn = rest.nonzero()[:, 0][torch.randperm(int(rest.sum()), generator=g)]
    chosen = torch.cat([top, drawn[: args.edges - len(top)]])
    runs = [[], *([graph.edges[i]] for i in chosen.tolist())]
    replacement = ck.sender_outputs(model, abc)
    kwargs = dict(replacement=replacement, progress=False)
    patched, seconds = timed(args.device, ck.patch_edges, model, ds, runs, metric, **kwargs)
    exact = (patched[1:] - patched[0]).mean(1)
    print(f"{'exact':>17}: {len(chosen)} single-edge patches in {seconds:8.2f} s")
    for method, result in scores.items():
        estimate = result.values[rows[chosen], columns[chosen]]
        difference = (estimate - exact).abs().max().item()
        print(
            f"{method:>17} vs exact on those edges: pearson {pearson(estimate, exact):6.3f} | "
            f"spearman {spearman(estimate, exact):6.3f} | max |difference| {difference:.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m)")
    parser.add_argument("--n", type=int, default=20, help="IOI prompts (20)")
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=["head"])
    parser.add_argument(
        "--directions", nargs="+", choices=["denoise", "noise"], default=["denoise", "noise"]
    )
    parser.add_argument("--edges", type=int, default=0, help="edges to patch exactly (0: none)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps (5)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = ck.load_model(args.model, device=args.device)
    ds = ck.IOIDataset(model, n=args.n, seed=0)
    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    print(
        f"device {args.device}, {torch.get_num_threads()} threads; {args.model}; IOI, "
        f"{args.n} prompts x {ds.tokens.shape[1]} tokens, ABC corruption, logit difference"
    )
    if args.edges:
        compare_edges(model, ds, abc, metric, args)

    total_attribution = total_exact = 0.0
    for name in args.sweeps:
        kind, kwargs = SWEEPS[name]
        for direction in args.directions:
            settings = dict(direction=direction, progress=False, **kwargs)
            approx, attribution_seconds = timed(
                args.device, ck.attribution_patching, model, ds, abc, metric, kind, **settings
            )
            exact, exact_seconds = timed(
                args.device, ck.activation_patching, model, ds, abc, kind, metric, **settings
            )
            difference = (approx.values - exact.values).abs().max().item()
            print(
                f"{name:>8} ({direction:>7}): {exact.values.numel()} cells | attribution "
                f"{attribution_seconds:8.2f} s | exact {exact_seconds:8.2f} s | pearson "
                f"{pearson(approx.values, exact.values):6.3f} | spearman "
                f"{spearman(approx.values, exact.values):6.3f} | max |difference| "
                f"{difference:.2e} | {exact_seconds / attribution_seconds:6.1f}x"
            )
            total_attribution += attribution_seconds
            total_exact += exact_seconds
    print(
        f"attribution patching is {total_exact / total_attribution:.1f}x faster than exact "
        "activation patching"
    )


if __name__ == "__main__":
    main()
