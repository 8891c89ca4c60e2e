"""Uncertainty and provenance: how long the weight fingerprint and bootstrap intervals take.

The fingerprint is timed on a random model shaped like GPT-2 small (12 layers, d_model 768,
vocabulary 50,257; 163M parameters with the unembedding, 652 MB in float32) or, with
``--model smollm2``, like smollm2-135m (30 layers, d_model 576, 9 query and 3 key/value heads,
gated MLP of 1536, vocabulary 49,152), three ways: the first call, which hashes every byte (timed
after an in-place edit of one small weight, which makes every later call a first one again);
a cached call, which only checks that the weights are unchanged; and the plain one-thread
reference (the same hash, one parameter at a time), whose result both must equal. The bootstrap
is timed on a head-by-position sweep's worth of cells (30 x 9 x 20) with per-example values.

    python benchmarks/bench_results.py                   # CPU
    python benchmarks/bench_results.py --device cuda     # weights on the GPU
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitkit.core import provenance
from circuitkit.core.results import Result


def gpt2_shaped(device: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu",
        normalization_type="LN",
        device=device,
        seed=0,
    )
    return HookedTransformer(cfg)


def smollm_shaped(device: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_key_value_heads=3,
        d_head=64,
        d_mlp=1536,
        n_ctx=2048,
        d_vocab=49152,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        final_rms=True,
        device=device,
        seed=0,
    )
    return HookedTransformer(cfg)


def serial_fingerprint(model: torch.nn.Module) -> str:
    total = hashlib.sha256()
    for name, param in model.named_parameters():
        digest = hashlib.sha256(param.detach().cpu().numpy().tobytes()).hexdigest()
        total.update(f"{name}|{param.dtype}|{tuple(param.shape)}|{digest}\n".encode())
    return "sha256:" + total.hexdigest()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=100, help="examples per cell")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()

    model = {"gpt2": gpt2_shaped, "smollm2": smollm_shaped}[args.model](args.device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    megabytes = sum(p.numel() * p.element_size() for p in params) / 1e6
    smallest = min(params, key=lambda p: p.numel())

    def first_call() -> str:
        with torch.no_grad():
            smallest.mul_(1)  # same values, a new version: the kept fingerprint no longer applies
        return provenance.fingerprint(model)

    first_s, first = timed(first_call, args.repeats)
    cached_s, cached = timed(lambda: provenance.fingerprint(model), args.repeats)
    slow_s, slow = timed(lambda: serial_fingerprint(model), args.repeats)
    assert first == cached == slow, "the fingerprint differs from its reference"
    print(f"fingerprint of {n_params / 1e6:.0f}M parameters ({megabytes:.0f} MB) on {args.device}")
    for label, seconds in (
        ("first call (every byte hashed)", first_s),
        ("cached call (checksums only)", cached_s),
        ("one thread reference", slow_s),
    ):
        print(f"  {label:<32}{seconds:.3f} s  ({megabytes / seconds / 1e3:.2f} GB/s)")

    g = torch.Generator().manual_seed(0)
    examples = torch.randn(30, 9, 20, args.n, generator=g)
    result = Result.from_examples(examples, ("layer", "head", "pos"), {})
    ci_s, _ = timed(lambda: result.ci(0.95, n_boot=args.n_boot, seed=0), args.repeats)
    cmp_s, _ = timed(lambda: result.compare((9, 8, 0), (9, 6, 0), seed=0), args.repeats)
    cells = examples[..., 0].numel()
    print(f"bootstrap of {cells} cells x {args.n} examples, {args.n_boot} draws")
    print(f"  Result.ci       {ci_s:.3f} s")
    print(f"  Result.compare  {cmp_s:.3f} s")
    print(f"fingerprint speedup over one thread: {slow_s / first_s:.2f}x")
    print(f"fingerprint: first {first_s:.2f} s, cached {cached_s:.2f} s, {first_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
