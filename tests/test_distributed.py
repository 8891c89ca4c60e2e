"""Sweeps shared out among processes equal the same sweep in one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import circuitkit as ck
from circuitkit.core.components import Attn, Head, Resid
from circuitkit.core.distributed import share_runs
from circuitkit.core.engine import run_interventions
from circuitkit.core.interventions import Intervention, Patch, Scale, Zero
from circuitkit.core.metrics import Metric

WORLD = 2
BUDGET = 1 << 20  # the same memory budget everywhere, so chunks are the same everywhere


def _case():
    model = ck.tiny_model("gpt2", tokenizer=False)
    g = torch.Generator().manual_seed(0)
    n, n_pos = 3, 6
    clean = torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=g)
    right, wrong = torch.randint(0, model.cfg.d_vocab, (2, n), generator=g)
    metric = Metric("diff", torch.full((n,), n_pos - 1), lambda x: _pick(x, right, wrong))
    _, cache = model.run_with_cache(clean)
    runs = [
        [Intervention(Head(layer, h, pos=p), Patch(cache[f"blocks.{layer}.attn.hook_z"]))]
        for layer in range(model.cfg.n_layers)
        for h in range(model.cfg.n_heads)
        for p in range(n_pos)
    ]
    runs += [
        [Intervention(Attn(1), Zero())],
        [Intervention(Resid(2, pos=3), Patch(cache["blocks.2.hook_resid_pre"]))],
        [Intervention(Head(0, 1), Scale(2.0)), Intervention(Head(2, 3, pos=1), Zero())],
        [],
    ]
    return model, clean, corrupted, runs, metric


def _pick(logits_at, right, wrong):
    lead = logits_at.shape[:-2]
    n = right.shape[0]

    def at(tokens):
        return logits_at.gather(-1, tokens.expand(*lead, n)[..., None])[..., 0]

    return at(right) - at(wrong)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, clean, corrupted, runs, metric = _case()
        kwargs = dict(memory_budget=BUDGET, progress=False)
        shared = ck.distributed.run_interventions(
            model, corrupted, runs, metric, max_runs_per_chunk=3, **kwargs
        )
        patching = ck.activation_patching(
            model, clean, corrupted, "head", metric, per_position=True, distributed=True, **kwargs
        )
        if rank == 0:  # the single-process results, with the same threads
            single = run_interventions(
                model, corrupted, runs, metric, max_runs_per_chunk=3, **kwargs
            )
            patching_single = ck.activation_patching(
                model, clean, corrupted, "head", metric, per_position=True, **kwargs
            )
            torch.save(
                {
                    "shared": shared,
                    "single": single,
                    "patching": patching.examples,
                    "patching_single": patching_single.examples,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shared_sweep_equals_single_process(tmp_path):
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    got = torch.load(out)
    # up to rounding: a process batches only its share of a position's runs together
    torch.testing.assert_close(got["shared"], got["single"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["patching"], got["patching_single"], atol=1e-5, rtol=1e-5)
    # the runs really differ, so the comparison can fail
    assert got["single"].std(dim=0).min() > 1e-3


def test_shares_keep_starts_together_and_balance():
    model, clean, _, runs, _ = _case()
    n_layers, n_pos = model.cfg.n_layers, clean.shape[1]
    sweep = n_layers * model.cfg.n_heads * n_pos  # the head x position runs come first
    shares = share_runs(model, n_pos, [tuple(r) for r in runs], 3)
    assert sorted(r for share in shares for r in share) == list(range(len(runs)))

    def start(r: int) -> tuple[int, int]:
        return runs[r][0].component.layer, runs[r][0].component.pos

    rank_of = {r: rank for rank, share in enumerate(shares) for r in share}
    ranks_by_start: dict[tuple[int, int], set[int]] = {}
    for r in range(sweep):
        ranks_by_start.setdefault(start(r), set()).add(rank_of[r])
    assert all(len(ranks) == 1 for ranks in ranks_by_start.values())
    work = [
        sum((n_layers - start(r)[0]) * (n_pos - start(r)[1]) for r in share if r < sweep)
        for share in shares
    ]
    assert max(work) < 1.2 * min(work)


def test_needs_a_process_group():
    model, clean, corrupted, runs, metric = _case()
    with pytest.raises(ck.CircuitkitError, match="torchrun"):
        ck.distributed.run_interventions(model, corrupted, runs, metric)
