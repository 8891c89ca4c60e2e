"""Sweeps split across GPUs: each process of a ``torch.distributed`` group runs a share of them.

A sweep is many independent runs of interventions, so it parallelises without communication:
every process holds the model and the inputs, evaluates the runs of its share with the engine
on its own GPU, and the shares' results are gathered so that every process ends with the whole
``[n_runs, n]`` tensor. Start one process per GPU with ``torchrun``::

    torchrun --nproc_per_node=2 my_sweep.py

and in the script, before anything uses the GPU::

    import torch, torch.distributed as dist
    import circuitkit as ck

    dist.init_process_group("nccl")            # "gloo" for processes on CPUs
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    model = ck.load_model("gpt2", device=f"cuda:{rank}")
    result = ck.activation_patching(model, ds, abc, "head", per_position=True,
                                    distributed=True)   # the same Result on every rank
    dist.destroy_process_group()

Runs are shared out whole groups at a time: runs that start at the same layer and position
(which the engine would batch into one forward pass) stay together, and groups go to the least
loaded process, largest first, by their cost (layers x positions computed). A run's result does
not depend on which process computes it, up to float rounding: a single process runs the runs of
one position that sit in one block through the later blocks together, whatever their layer, and
a process of several has only its share of them, so its matrix products have other batch sizes
(the gathered result agrees with a single process's to about 1e-6 in float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.core import engine
from circuitkit.core.errors import CircuitkitError
from circuitkit.core.interventions import Intervention, MetricLike, Run
from circuitkit.core.lens import HookedTransformer


def run_interventions(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"],
    runs: Sequence[Run | Intervention],
    metric: MetricLike,
    *,
    group: dist.ProcessGroup | None = None,
    positions: Mapping[str, Tensor] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    max_runs_per_chunk: int | None = None,
    progress: bool = True,
    desc: str = "interventions",
) -> Float[Tensor, "n_runs n"]:
    """``circuitkit.run_interventions`` with the runs shared out among the processes of
    ``group`` (default: the default process group); every process returns the whole result.

    Every process must call it with the same runs, tokens and metric (its own copy of the model,
    on its own device). Returns the per-example metric, shape ``[len(runs), n]``, on the CPU,
    in the order of ``runs``.

    Example::

        # in each process started by torchrun, after dist.init_process_group("nccl")
        values = ck.distributed.run_interventions(model, corrupted_tokens, runs, metric)
    """
    where = "distributed.run_interventions"
    if not dist.is_available() or not dist.is_initialized():
        raise CircuitkitError(
            f"{where}: torch.distributed has no process group; start the script with torchrun "
            "and call torch.distributed.init_process_group first"
        )
    runs_list = [(r,) if isinstance(r, Intervention) else tuple(r) for r in runs]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shares = share_runs(model, tokens.shape[1], runs_list, world)
    local = engine.run_interventions(
        model,
        tokens,
        [runs_list[r] for r in shares[rank]],
        metric,
        positions=positions,
        reference=reference,
        memory_budget=memory_budget,
        max_runs_per_chunk=max_runs_per_chunk,
        progress=progress,
        desc=f"{desc} (rank {rank} of {world})",
    )
    return _gather(local, shares, tokens.shape[0], group)


def share_runs(
    model: HookedTransformer, n_pos: int, runs: Sequence[Sequence[Intervention]], world: int
) -> list[list[int]]:
    """The indices of ``runs`` each of ``world`` processes evaluates, each list in order.

    Runs with the same start (first layer and first position they touch) stay together; the
    groups are handed out largest first, each to the process with the least work so far.

    Example::

        runs = [[ck.Intervention(ck.Head(layer, 0), ck.Zero())] for layer in range(4)]
        share_runs(model, n_pos=15, runs=runs, world=2)     # e.g. [[0, 3], [1, 2]]
    """
    n_layers = model.cfg.n_layers
    groups: dict[tuple[int, int], list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(_start(run, n_layers, n_pos), []).append(index)

    def cost(start: tuple[int, int]) -> int:
        layer, pos = start
        return len(groups[start]) * (max(n_layers - layer, 0) * (n_pos - pos) + 1)

    loads = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for start in sorted(groups, key=lambda s: (-cost(s), s)):
        least = min(range(world), key=lambda r: (loads[r], r))
        shares[least] += groups[start]
        loads[least] += cost(start)
    return [sorted(share) for share in shares]


def _start(run: Sequence[Intervention], n_layers: int, n_pos: int) -> tuple[int, int]:
    """Where the engine starts a run: its first layer, and its first position when every
    intervention names one position (an estimate otherwise; it only balances the work)."""
    if not run:
        return n_layers, 0
    layer = min(i.component.layer for i in run)
    positions = [getattr(i.component, "pos", None) for i in run]
    if all(isinstance(p, int) for p in positions):
        return layer, min(p % n_pos for p in positions)  # type: ignore[operator]
    return layer, 0


def _gather(
    local: Tensor, shares: list[list[int]], n: int, group: dist.ProcessGroup | None
) -> Tensor:
    """Every process's ``local`` rows, put back in run order on every process."""
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    longest = max(len(share) for share in shares)
    padded = torch.zeros(longest, n, dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(gathered, padded, group=group)
    results = torch.empty(sum(len(share) for share in shares), n, dtype=local.dtype)
    for share, rows in zip(shares, gathered, strict=True):
        results[share] = rows[: len(share)].cpu()
    return results
