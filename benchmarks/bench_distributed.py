"""A large sweep split across GPUs: every head x position of a Llama-7B-shaped model.

Start one process per GPU with torchrun; each builds the same random model (32 layers x 32
heads, d_model 4096, d_mlp 11008, vocabulary 32,000, bfloat16) on its GPU, runs its share of
the 15,360 patches of the head x position denoising sweep (``ck.activation_patching(...,
distributed=True)``) and receives the others'. Rank 0 prints the time; ``--check`` also runs
the whole sweep in rank 0 alone and checks that the gathered result equals it exactly.

    torchrun --nproc_per_node=1 benchmarks/bench_distributed.py          # one GPU
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --check  # two, checked
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --device cpu --model tiny

Scaling efficiency on k GPUs is (time on one GPU) / (k x time on k GPUs). The last line is the
time of the sweep.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from bench_gpu import ioi_shaped_data, llama_7b_shaped, sweep_flops

import circuitkit as ck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama7b", choices=["llama7b", "tiny"])
    parser.add_argument("--prompts", type=int, default=8, help="prompts (8)")
    parser.add_argument("--pos", type=int, default=15, help="tokens per prompt (15)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=16.0, help="GiB per chunk (16)")
    parser.add_argument("--check", action="store_true", help="compare with rank 0 alone")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    on_gpu = args.device == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = f"cuda:{local}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(local)
    try:
        if args.model == "llama7b":
            model = llama_7b_shaped(device)
        else:
            model = ck.tiny_model("llama", tokenizer=False, n_layers=4).to(device)
        clean, corrupted, metric, answers = ioi_shaped_data(
            args.prompts, args.pos, model.cfg.d_vocab
        )
        budget = int(args.budget * 2**30)  # the same everywhere, so chunks are the same

        def sweep(distributed: bool, positions=None) -> torch.Tensor:
            return ck.activation_patching(
                model,
                clean,
                corrupted,
                "head",
                metric,
                per_position=True,
                positions=positions,
                memory_budget=budget,
                distributed=distributed,
                progress=False,
            ).examples

        sweep(True, positions=[args.pos - 1])  # warm-up
        dist.barrier()
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        shared = sweep(True)
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            cfg = model.cfg
            patches = shared.shape[0] * shared.shape[1] * shared.shape[2]
            print(
                f"{world} process(es) on {device.split(':')[0]}; {cfg.n_layers} layers x "
                f"{cfg.n_heads} heads, d_model {cfg.d_model}, {cfg.dtype}; {args.prompts} "
                f"prompts x {args.pos} tokens; {patches} patches"
            )
            if args.check:
                single = sweep(False)
                same = torch.equal(shared, single)
                print(f"gathered result equals rank 0 alone: {same}")
            n_layers = cfg.n_layers
            starts = [  # each head at each position: its layer computes that position alone
                (layer, p, True, layer < n_layers - 1)
                for layer in range(n_layers)
                for _ in range(cfg.n_heads)
                for p in range(args.pos)
            ]
            flops = sweep_flops(model, args.prompts, args.pos, starts, answers.unique().numel())
            print(f"{flops:.3e} FLOP: {flops / seconds / 1e12:.1f} TFLOP/s over all processes")
            print(f"sweep: {seconds:.2f} s on {world} process(es)")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
