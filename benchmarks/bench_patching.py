"""Activation patching: circuitkit against transformer_lens.patching, in one process.

Runs the same denoising sweeps with both libraries on a GPT-2-small-shaped model with random
weights (12 layers, 12 heads, d_model 768, vocabulary 50,257), checks that they agree, and
prints the time of each and their ratio. The last line is the overall ratio.

    python benchmarks/bench_patching.py                       # CPU defaults: 8 prompts x 15
    python benchmarks/bench_patching.py --n 100 --device cuda # the IOI-sized GPU run

Sweeps: "resid" (resid_pre by layer x position) and "head" (head output by layer x head x
position). The metric is a logit difference between two random tokens at the last position.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def logit_diff_metric(n: int, n_pos: int, vocab: int, generator: torch.Generator) -> Metric:
    right, wrong = torch.randint(0, vocab, (2, n), generator=generator)

    def fn(logits_at: torch.Tensor) -> torch.Tensor:
        lead = logits_at.shape[:-2]
        pick = lambda t: logits_at.gather(-1, t.to(logits_at.device).expand(*lead, n)[..., None])  # noqa: E731
        return (pick(right) - pick(wrong))[..., 0]

    return Metric("logit_diff", torch.full((n,), n_pos - 1), fn)


def work(
    model: HookedTransformer, n: int, n_pos: int, units: int, alone: bool
) -> tuple[float, float]:
    """Floating-point operations of a by-layer-and-position sweep with ``units`` patches per
    layer and position: as the engine computes it, and as transformer_lens.patching does (a
    whole forward per patch, logits at every position)."""
    cfg = model.cfg
    last = cfg.n_layers - 1
    starts = [
        (layer, pos, alone, layer < last) for layer in range(cfg.n_layers) for pos in range(n_pos)
    ]
    engine = units * sweep_flops(model, n, n_pos, starts)
    forward = run_flops(cfg, n, n_pos, 0, 0) + n * (n_pos - 1) * 2 * cfg.d_model * cfg.d_vocab
    return engine, cfg.n_layers * n_pos * units * forward


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="prompts (8)")
    parser.add_argument("--pos", type=int, default=15, help="tokens per prompt (15)")
    parser.add_argument("--layers", type=int, default=12, help="layers (12)")
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    model = gpt2_small_shaped(args.device, dtype, args.layers)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (args.n, args.pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2:6] = torch.randint(0, model.cfg.d_vocab, (args.n, 4), generator=g)
    metric = logit_diff_metric(args.n, args.pos, model.cfg.d_vocab, g)
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731

    print(
        f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads; model "
        f"{args.layers} layers x 12 heads, d_model 768; {args.n} prompts x {args.pos} tokens"
    )
    total_ck = total_tl = 0.0
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
        expected = tl_fn(model, corrupted.to(args.device), clean_cache, tl_metric)
        synchronize(args.device)
        tl_seconds = time.perf_counter() - start
        if order is not None:
            expected = expected.permute(*order)

        difference = (result.values - expected.float().cpu()).abs().max().item()
        patches = result.values.numel()
        print(
            f"{name:>5} x pos: {patches} patches | circuitkit {ck_seconds:8.2f} s | "
            f"transformer_lens {tl_seconds:8.2f} s | max |difference| {difference:.2e} | "
            f"{tl_seconds / ck_seconds:6.1f}x"
        )
        units = patches // (model.cfg.n_layers * args.pos)  # patches per layer and position
        ck_flop, tl_flop = work(model, args.n, args.pos, units, alone)
        print(
            f"{'':>5}   work: circuitkit {ck_flop / 1e12:.2f} TFLOP, transformer_lens "
            f"{tl_flop / 1e12:.2f} TFLOP ({tl_flop / ck_flop:.1f}x as much); speed: circuitkit "
            f"{ck_flop / ck_seconds / 1e9:.0f} GFLOP/s, transformer_lens "
            f"{tl_flop / tl_seconds / 1e9:.0f} GFLOP/s"
        )
        total_ck += ck_seconds
        total_tl += tl_seconds
    print(f"circuitkit is {total_tl / total_ck:.1f}x faster than transformer_lens.patching")


if __name__ == "__main__":
    main()
