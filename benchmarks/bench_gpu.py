"""GPU benchmark: circuitkit's sweeps against TransformerLens, and against the device's limits.

One command on a GPU machine measures, in one process:

- the device's matrix-product throughput at a GPT-2 MLP shape (65536 x 768 x 3072) in float32,
  TF32 and bfloat16, and its copy bandwidth: the ceilings the sweeps are held against;
- on a GPT-2-small-shaped model with random weights (12 layers x 12 heads, d_model 768,
  vocabulary 50,257) and 100 prompts of 15 tokens: the head x position denoising sweep
  (2,160 patches), the resid x position sweep, the head sweep over all positions, path
  patching from all 144 heads to the logits, and attribution patching when circuitkit has it;
- each in float32, with TF32 matrix products (``ck.tf32()``) and in bfloat16, against
  ``transformer_lens.patching`` (path patching: against the plain per-sender loop,
  ``ck.path_patching(..., reference=True)``) run in float32 in the same process, with the
  largest difference;
- the floating-point operations each sweep must do (matrix products, attention and the
  unembedding, counting only the layers and positions the engine recomputes), the achieved
  TFLOP/s and its fraction of the measured ceiling;
- with ``--profile``, where the time of each activation-patching sweep goes: GPU time in
  matrix-product kernels, attention and everything else, the longest kernels, the GPU's idle
  time, and when the host had queued its last chunk (a host that finishes queueing just before
  the GPU finishes computing is what keeps the GPU idle: launch overhead);
- with ``--unfused``, the head x position sweep with TransformerLens's own blocks in the
  engine, to show what fusing them gains.

The Llama-7B-shaped sweep on one or more GPUs is ``benchmarks/bench_distributed.py``.

    python benchmarks/bench_gpu.py --out results.json          # the full run (a few minutes)
    python benchmarks/bench_gpu.py --profile --unfused         # and where the time goes
    python benchmarks/bench_gpu.py --quick --device cpu        # a smoke test on a CPU

The last line is the head x position sweep's speed-up over transformer_lens.patching in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching

import circuitkit as ck
from circuitkit.core import engine
from circuitkit.core.metrics import Metric

MODES = ("float32", "tf32", "bfloat16")
# the sweeps ``--profile`` profiles
PROFILED = ("head x pos", "resid x pos", "head (all positions)")


# ---------------------------------------------------------------------------------------------
# Models, data, metric


def gpt2_small_shaped(device: str, n_layers: int = 12) -> HookedTransformer:
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
        seed=0,
    )
    with torch.device(device):
        return HookedTransformer(cfg).eval()


def llama_7b_shaped(device: str, n_layers: int = 32) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=4096,
        n_heads=32,
        d_head=128,
        d_mlp=11008,
        n_ctx=2048,
        d_vocab=32000,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=128,
        dtype=torch.bfloat16,
        device=device,
        seed=0,
    )
    with torch.device(device):  # weights made on the GPU, not moved there
        return HookedTransformer(cfg).eval()


def ioi_shaped_data(
    n: int, n_pos: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, Metric, torch.Tensor]:
    """Random prompts; the corrupted ones differ in four positions (the names of an IOI prompt).
    The metric is a logit difference between two random tokens at the last position; the last
    value is those tokens, which the engine alone unembeds."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2:6] = torch.randint(0, vocab, (n, 4), generator=g)
    right, wrong = torch.randint(0, vocab, (2, n), generator=g)

    def logit_diff(logits_at: torch.Tensor) -> torch.Tensor:
        lead = logits_at.shape[:-2]

        def at(tokens: torch.Tensor) -> torch.Tensor:
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return at(right) - at(wrong)

    metric = Metric("logit_diff", torch.full((n,), n_pos - 1), logit_diff)
    return clean, corrupted, metric, torch.cat([right, wrong])


# ---------------------------------------------------------------------------------------------
# Counting and timing


def run_flops(
    cfg,
    n: int,
    n_pos: int,
    layer: int,
    pos: int,
    *,
    alone: bool = False,
    read: bool = False,
    vocab: int | None = None,
) -> float:
    """Floating-point operations of one run as the engine computes it: blocks ``layer`` on at
    positions ``pos`` on (matrix products and attention); block ``layer`` at position ``pos``
    alone when ``alone``; the last block's keys and values at every position but the rest at
    the read position (the last) alone when ``read``; then the unembedding at the read
    position, of ``vocab`` vocabulary entries (default: all of them)."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    width = cfg.n_heads * cfg.d_head
    keys_values = 2 * cfg.d_model * 2 * n_kv * cfg.d_head  # per position
    rest = 2 * cfg.d_model * width + 2 * width * cfg.d_model  # queries, output projection
    if not cfg.attn_only:
        rest += 2 * cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    total = 0
    for block in range(layer, cfg.n_layers):
        queries = list(range(pos, n_pos))
        computed = len(queries)  # positions whose keys and values are computed
        if alone and block == layer:
            queries, computed = [pos], 1
        elif read and block == cfg.n_layers - 1:
            queries = [n_pos - 1]
        # scores and pattern @ values: the query at position t reads t + 1 keys
        attention = sum(4 * width * (t + 1) for t in queries)
        total += n * (computed * keys_values + len(queries) * rest + attention)
    return total + n * 2 * cfg.d_model * (cfg.d_vocab if vocab is None else vocab)


def sweep_flops(
    model: HookedTransformer, n: int, n_pos: int, starts: list[tuple], vocab: int | None = None
) -> float:
    """``starts``: (layer, pos, alone, read) of each run; ``vocab`` as for ``run_flops``."""
    return sum(
        run_flops(model.cfg, n, n_pos, layer, pos, alone=alone, read=read, vocab=vocab)
        for layer, pos, alone, read in starts
    )


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int = 1) -> tuple[float, object]:
    """The fastest of ``repeats`` runs (seconds), and the last run's output."""
    times, out = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), out


def mode_context(mode: str) -> contextlib.AbstractContextManager:
    return ck.tf32() if mode == "tf32" else contextlib.nullcontext()


def matmul_ceiling(mode: str, device: str, shape=(65536, 768, 3072), repeats: int = 20) -> float:
    """Measured TFLOP/s of one [m, k] @ [k, n] product, median of ``repeats``."""
    m, k, n = shape
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    times = []
    with mode_context(mode):
        for i in range(repeats + 3):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e12


def copy_bandwidth(device: str, n_bytes: int = 4 << 30) -> float:
    """Measured GB/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(8):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n_bytes / statistics.median(times) / 1e9


@dataclass
class Row:
    sweep: str
    mode: str
    patches: int
    seconds: float
    reference_seconds: float | None
    reference: str
    max_difference: float
    flops: float
    ceiling: float | None
    profile: dict | None = None

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    def line(self) -> str:
        ratio = f"{self.reference_seconds / self.seconds:7.1f}x" if self.reference_seconds else ""
        ref = f"{self.reference_seconds:8.2f} s" if self.reference_seconds else "         "
        share = f"{self.tflops / self.ceiling:6.1%}" if self.ceiling else "     -"
        return (
            f"{self.sweep:<26} {self.mode:<9} {self.patches:>6} | {self.seconds:8.3f} s | {ref} "
            f"{ratio:>8} | {self.max_difference:8.1e} | {self.flops:8.2e} | "
            f"{self.tflops:7.1f} | {share}"
        )


def profile_sweep(fn: Callable[[], object], device: str) -> dict:
    """Where the GPU time of ``fn`` goes: matrix products, attention, other kernels, idle."""
    from torch.profiler import ProfilerActivity, profile

    if not device.startswith("cuda"):
        return timeline(fn, device)
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - start
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    kernels = 0
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        kernels += 1
        entry = by_name.setdefault(event.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += event.device_time_total / 1e6
        if any(k in name for k in ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm80_")):
            kind = "matmul"
        elif any(k in name for k in ("fmha", "flash", "attention", "efficient")):
            kind = "attention"
        else:
            kind = "other"
        kinds[kind] += event.device_time_total / 1e6
    busy = sum(kinds.values())
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:14]
    for name, (count, seconds) in top:
        print(f"      {seconds:7.3f} s {count:6d}x  {name}")
    return {
        "wall_s": wall,
        "busy_s": busy,
        "kernels": kernels,
        **{k + "_s": v for k, v in kinds.items()},
        **timeline(fn, device),
    }


def timeline(fn: Callable[[], object], device: str) -> dict:
    """When the engine started its first chunk and had queued its last one, against the whole
    call's time (an unprofiled run)."""
    marks: list[float] = []
    run_blocks, read_logits = engine.run_blocks, engine.read_logits

    def first_block(*args, **kwargs):
        if not marks:
            marks.append(time.perf_counter())
        return run_blocks(*args, **kwargs)

    def last_logits(*args, **kwargs):
        out = read_logits(*args, **kwargs)
        marks[1:] = [time.perf_counter()]
        return out

    engine.run_blocks, engine.read_logits = first_block, last_logits
    try:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - start
    finally:
        engine.run_blocks, engine.read_logits = run_blocks, read_logits
    return {
        "first_chunk_started_s": marks[0] - start,
        "last_chunk_queued_s": marks[-1] - start,
        "unprofiled_wall_s": wall,
    }


def attention_backends(device: str, dtype: torch.dtype) -> None:
    """Which scaled-dot-product-attention kernels take the engine's typical shape (a chunk of
    12 runs x 100 prompts, 8 new positions after 7 cached ones), and their times."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1200, 12, 8, 64, device=device, dtype=dtype)
    k = torch.randn(1200, 12, 15, 64, device=device, dtype=dtype)
    mask = torch.ones(8, 15, dtype=torch.bool, device=device).tril(7)
    for backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                call = functools.partial(
                    torch.nn.functional.scaled_dot_product_attention, q, k, k, attn_mask=mask
                )
                call()
                seconds, _ = timed(call, device, 5)
            print(f"  attention {dtype}, {backend.name}: {seconds * 1e3:.3f} ms")
        except RuntimeError as error:
            print(f"  attention {dtype}, {backend.name}: not available ({str(error)[:80]})")


def limit_of(profile: dict | None) -> str:
    if profile is None or "busy_s" not in profile:
        return ""
    idle = 1 - profile["busy_s"] / profile["wall_s"]
    if idle > 0.3:
        return f"launch overhead ({idle:.0%} idle)"
    if profile["matmul_s"] >= profile["busy_s"] - profile["matmul_s"]:
        return f"compute ({profile['matmul_s'] / profile['busy_s']:.0%} of GPU time in matmuls)"
    return f"memory bandwidth ({1 - profile['matmul_s'] / profile['busy_s']:.0%} outside matmuls)"


# ---------------------------------------------------------------------------------------------
# The run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=100, help="prompts (100)")
    parser.add_argument("--pos", type=int, default=15, help="tokens per prompt (15)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row; the fastest")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--profile", action="store_true", help="profile the patching sweeps")
    parser.add_argument("--unfused", action="store_true", help="also the engine without fusion")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    parser.add_argument("--out", help="write every number to this JSON file")
    parser.add_argument(
        "--sweeps", nargs="+", help="only these sweeps, by name (all); e.g. 'resid x pos'"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.layers, args.repeats = 4, 2, 1

    torch.set_grad_enabled(False)
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"device {name}; torch {torch.__version__}; {args.n} prompts x {args.pos} tokens")

    ceilings: dict[str, float] = {}
    if device.startswith("cuda"):
        for mode in MODES:
            ceilings[mode] = matmul_ceiling(mode, device)
        bandwidth = copy_bandwidth(device)
        print(
            "matmul 65536x768x3072: "
            + ", ".join(f"{m} {t:.1f} TFLOP/s" for m, t in ceilings.items())
            + f"; copy {bandwidth:.0f} GB/s"
        )
    else:
        bandwidth = float("nan")

    model32 = gpt2_small_shaped(device, args.layers)
    if args.profile:
        seconds, _ = timed(functools.partial(ck.provenance.fingerprint, model32), device)
        print(f"  weight fingerprint (provenance) of the float32 model: {seconds:.3f} s")
        if device.startswith("cuda"):
            for dtype in (torch.float32, torch.bfloat16):
                attention_backends(device, dtype)
    models = {"float32": model32, "tf32": model32}
    if "bfloat16" in args.modes:
        models["bfloat16"] = gpt2_small_shaped(device, args.layers).to(torch.bfloat16)
    clean, corrupted, metric, answers = ioi_shaped_data(args.n, args.pos, model32.cfg.d_vocab)
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    n, n_pos, n_layers, n_heads = args.n, args.pos, args.layers, 12

    def tl_run(fn: Callable, order: tuple[int, ...] | None) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            _, clean_cache = model32.run_with_cache(clean.to(device))
            out = fn(model32, corrupted.to(device), clean_cache, tl_metric)
            return (out.permute(*order) if order else out).float().cpu()

        return run

    # the same logit difference as users write it, a plain callable of the full logits
    rows_index = torch.arange(n, device=device)
    right, wrong = answers.to(device).view(2, n)
    plain = lambda logits: logits[rows_index, -1, right] - logits[rows_index, -1, wrong]  # noqa: E731
    head_by_pos = [
        # a head's output at one position: its layer computes that position alone
        (layer, p, True, layer < n_layers - 1)
        for layer in range(n_layers)
        for _ in range(n_heads)
        for p in range(n_pos)
    ]
    sweeps = {
        # name: (circuitkit call, reference name, reference call, engine starts); a reference
        # call given as a string is the named sweep's, not run again
        "head x pos": (
            lambda m: (
                ck.activation_patching(
                    m, clean, corrupted, "head", metric, per_position=True, progress=False
                ).values
            ),
            "transformer_lens",
            tl_run(tl_patching.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
            head_by_pos,
        ),
        "head x pos, plain lambda": (
            lambda m: (
                ck.activation_patching(
                    m, clean, corrupted, "head", plain, per_position=True, progress=False
                ).values
            ),
            "transformer_lens",
            "head x pos",
            head_by_pos,
        ),
        "resid x pos": (
            lambda m: (
                ck.activation_patching(
                    m, clean, corrupted, "resid_pre", metric, per_position=True, progress=False
                ).values
            ),
            "transformer_lens",
            tl_run(tl_patching.get_act_patch_resid_pre, None),
            [
                (layer, p, False, layer < n_layers - 1)
                for layer in range(n_layers)
                for p in range(n_pos)
            ],
        ),
        "head (all positions)": (
            lambda m: (
                ck.activation_patching(m, clean, corrupted, "head", metric, progress=False).values
            ),
            "transformer_lens",
            tl_run(tl_patching.get_act_patch_attn_head_out_all_pos, None),
            [
                (layer, 0, False, layer < n_layers - 1)
                for layer in range(n_layers)
                for _ in range(n_heads)
            ],
        ),
        "path: 144 heads -> logits": (
            lambda m: (
                ck.path_patching(
                    m, clean, corrupted, "heads", "logits", metric, progress=False
                ).values
            ),
            "plain per-sender loop",
            lambda: (
                ck.path_patching(
                    model32,
                    clean,
                    corrupted,
                    "heads",
                    "logits",
                    metric,
                    reference=True,
                    progress=False,
                ).values
            ),
            # every later layer's attention output is held, the last one's too
            [(layer, 0, False, False) for layer in range(n_layers) for _ in range(n_heads)],
        ),
    }

    rows: list[Row] = []
    references: dict[str, tuple[float, torch.Tensor]] = {}
    print(
        f"{'sweep':<26} {'mode':<9} {'patches':>6} | {'circuitkit':>10} | {'reference':>10} "
        f"{'ratio':>8} | {'max diff':>8} | {'FLOP':>8} | {'TFLOP/s':>7} | ceiling"
    )
    if args.sweeps:
        unknown = set(args.sweeps) - set(sweeps)
        if unknown:
            parser.error(f"unknown sweeps {sorted(unknown)}; the sweeps are {list(sweeps)}")
        sweeps = {name: sweep for name, sweep in sweeps.items() if name in args.sweeps}
    for sweep, (ck_call, ref_name, ref_call, starts) in sweeps.items():
        if isinstance(ref_call, str):
            if ref_call not in references:
                continue  # the named sweep's reference failed or was not run
            ref_seconds, expected = references[ref_call]
        else:
            ref_seconds, expected = timed(ref_call, device)
        references[sweep] = (ref_seconds, expected)
        flops = sweep_flops(model32, n, n_pos, starts, vocab=answers.unique().numel())
        for mode in args.modes:
            model = models[mode]
            try:
                with mode_context(mode):
                    ck_call(model)  # warm-up
                    call = functools.partial(ck_call, model)
                    seconds, values = timed(call, device, args.repeats)
                    profile = None
                    if args.profile and sweep in PROFILED:
                        print(f"  profile of {sweep}, {mode}:")
                        profile = profile_sweep(call, device)
            except Exception as error:  # report and go on: the other rows stand on their own
                print(f"{sweep}, {mode}: failed: {error!r}", flush=True)
                continue
            difference = (values.float().cpu() - expected).abs().max().item()
            row = Row(
                sweep,
                mode,
                len(starts),
                seconds,
                ref_seconds,
                ref_name,
                difference,
                flops,
                ceilings.get(mode),
                profile,
            )
            rows.append(row)
            print(row.line() + (f" | {limit_of(profile)}" if profile else ""), flush=True)
            if profile:
                print("    profile: " + json.dumps({k: round(v, 3) for k, v in profile.items()}))
        if args.unfused and sweep == "head x pos":
            engine._FUSED_BLOCKS = False
            try:
                for mode in ("float32", "tf32"):
                    with mode_context(mode):
                        seconds, values = timed(functools.partial(ck_call, model32), device)
                    difference = (values.float().cpu() - expected).abs().max().item()
                    row = Row(
                        sweep + " (TL blocks)",
                        mode,
                        len(starts),
                        seconds,
                        ref_seconds,
                        ref_name,
                        difference,
                        flops,
                        ceilings.get(mode),
                    )
                    rows.append(row)
                    print(row.line(), flush=True)
            finally:
                engine._FUSED_BLOCKS = True

    if "head x pos" not in references:
        print("attribution patching: skipped (it is held against the head x pos sweep, not run)")
    elif importlib.util.find_spec("circuitkit.methods.attribution_patching") is not None:
        exact = references["head x pos"]
        for mode in args.modes:
            model = models[mode]

            def attribution(model: HookedTransformer = model) -> torch.Tensor:
                with torch.enable_grad():  # the method takes gradients
                    return ck.attribution_patching(
                        model, clean, corrupted, metric, component="head", per_position=True
                    ).values

            try:
                with mode_context(mode):
                    attribution()  # warm-up
                    seconds, values = timed(attribution, device, args.repeats)
            except Exception as error:  # report and go on: the other rows stand on their own
                print(f"attribution patching, {mode}: failed: {error!r}")
                continue
            values = values.float().cpu()
            difference = (
                (values - exact[1]).abs().max().item()
                if values.shape == exact[1].shape
                else float("nan")
            )
            # two forward passes and one backward pass (about two forwards) of n prompts
            flops = 4 * run_flops(model32.cfg, n, n_pos, 0, 0)
            row = Row(
                "attribution patching",
                mode,
                values.numel(),
                seconds,
                exact[0],
                "transformer_lens (exact)",
                difference,
                flops,
                ceilings.get(mode),
            )
            rows.append(row)
            print(row.line() + "  (difference: the approximation's error)", flush=True)
    else:
        print("attribution patching: skipped (circuitkit.methods.attribution_patching is missing)")

    per_patch = {r.sweep: r.seconds / r.patches for r in rows if r.mode == "float32"}
    if {"path: 144 heads -> logits", "head (all positions)", "head x pos"} <= set(per_patch):
        path = per_patch["path: 144 heads -> logits"]
        print(
            f"path patching per patch: {path / per_patch['head (all positions)']:.2f}x the head "
            f"(all positions) sweep's, {path / per_patch['head x pos']:.2f}x the head x pos "
            "sweep's (float32)"
        )

    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "ceilings_tflops": ceilings,
                    "copy_gb_s": bandwidth,
                    "rows": [r.__dict__ | {"tflops": r.tflops} for r in rows],
                },
                f,
                indent=1,
            )
    head = next((r for r in rows if r.sweep == "head x pos" and r.mode == "float32"), None)
    if head is None:
        print("head x pos, float32: not measured")
        return
    print(
        f"head x pos, float32: circuitkit is {head.reference_seconds / head.seconds:.1f}x faster "
        "than transformer_lens.patching"
    )


if __name__ == "__main__":
    main()
