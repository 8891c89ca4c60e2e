"""Edge attribution patching and ``patch_edges`` on a TransformerLens 4 ``TransformerBridge``:
their fast paths against their plainly written references, on fresh random inputs.

The models are tiny randomly initialised Hugging Face checkpoints saved to a folder and loaded
with ``ck.load_model(folder, backend="bridge")``: a Llama (RMSNorm, rotary positions, 4 query
heads sharing 2 key/value heads, gated MLP) and a GPT-2 (LayerNorm, learned positions, one
joint query/key/value projection). Their weights are drawn wider than Hugging Face's default
(``initializer_range``), so attention is far from uniform and the scores are of order 0.1 to 1.

Tolerances: scores and metrics are float32 sums of at most a few hundred terms of order 1; the
fast paths and the references add them in another order, which moves them by about 1e-7 (the
largest difference measured here is 3e-7). The tests allow ``atol=1e-5, rtol=1e-5``, and check
that the values compared are spread by more than 1e-2, so that a fast path that went wrong (an
MLP input's gradient that also holds the skip connection's, blocks run without their rotary
embeddings) cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import circuitkit as ck
from circuitkit.core import lens
from circuitkit.core.metrics import Metric
from circuitkit.methods import attribution_patching, edge_patching

pytestmark = pytest.mark.skipif(
    lens.LINE < 4,
    reason=f"TransformerBridge models need TransformerLens 4 (installed: {lens.VERSION}); "
    ".ci/run runs these tests in a second environment with TransformerLens 4",
)

ATOL, RTOL = 1e-5, 1e-5


def _save_tiny(kind: str, folder) -> None:
    """A tiny random Llama or GPT-2 checkpoint, with circuitkit's tiny tokenizer, in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from circuitkit.data.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            initializer_range=0.15,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.15,
            **ids,
        )
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bridge(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    _save_tiny(request.param, folder)
    model = ck.load_model(folder, device="cpu", backend="bridge")
    assert lens.is_bridge(model)
    return model


class Data:
    """A dataset-like object: tokens and the word "end" (where the metric reads)."""

    def __init__(self, tokens, positions):
        self.tokens = tokens
        self.positions = positions


def random_pair(model, seed: int, n: int = 3, n_pos: int = 7):
    """Random clean tokens, a corruption of positions 1 to 3, and a logit difference between two
    random tokens read at a random late position of each example."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, vocab, (n, 3), generator=g)
    end = torch.randint(n_pos - 3, n_pos, (n,), generator=g)
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]

        def pick(tokens):
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return pick(a) - pick(b)

    positions = {"end": end}
    return Data(clean, positions), Data(corrupted, positions), Metric("diff", end, fn)


def edge_sample(graph, seed: int, k: int = 10) -> list[list[int]]:
    """Every edge into an MLP or the logits from a random sender, the first and last sender of
    the last layer's key and value inputs, and ``k`` random edges more."""
    g = torch.Generator().manual_seed(seed)

    def some_sender(row: int) -> int:
        return int(torch.randint(0, int(graph.n_senders_of[row]), (1,), generator=g))

    rows = [graph.mlp_row(layer) for layer in range(graph.n_layers)] + [graph.logits_row]
    sample = [[row, some_sender(row)] for row in rows]
    last = graph.attn_rows(graph.n_layers - 1)
    for row in (last.stop - 1, last.stop - 1 - graph.n_kv_heads):
        sample += [[row, 0], [row, int(graph.n_senders_of[row]) - 1]]
    valid = graph.valid.nonzero()
    sample += valid[torch.randperm(len(valid), generator=g)[:k]].tolist()
    return sample


@pytest.mark.parametrize("method, direction, seed", [("eap", "noise", 1), ("eap-ig", "denoise", 2)])
def test_eap_equals_reference_on_a_bridge(bridge, method, direction, seed):
    clean, corrupted, metric = random_pair(bridge, seed=seed)
    graph = ck.Graph.of(bridge)
    fast = ck.edge_attribution_patching(
        bridge, clean, corrupted, metric, method=method, steps=2, direction=direction,
        progress=False,
    )  # fmt: skip
    sample = edge_sample(graph, seed, k=6)
    base, other = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    steps = 2 if method == "eap-ig" else 1
    slow, base_values = attribution_patching._edge_reference(
        bridge, graph, base.tokens, other.tokens, metric, steps, sample, False, ""
    )
    rows, columns = torch.tensor(sample).T
    assert_close(fast.examples[rows, columns], slow[:, rows, columns].T, atol=ATOL, rtol=RTOL)
    assert_close(fast.info["base_examples"], base_values, atol=ATOL, rtol=RTOL)
    mlp_rows = [graph.mlp_row(layer) for layer in range(graph.n_layers)]
    assert slow[:, mlp_rows].std() > 1e-2  # the MLPs' inputs have scores to get wrong
    assert slow[:, rows, columns].std() > 1e-2


def test_eap_ig_against_a_mean_equals_reference_on_a_bridge(bridge):
    """Other outputs of one row for every example (a mean), and a plain callable metric on the
    full logits."""
    clean, corrupted, metric = random_pair(bridge, seed=3, n=4)
    graph = ck.Graph.of(bridge)

    def plain(logits):
        return metric(logits)

    fast = ck.edge_attribution_patching(
        bridge, clean, corrupted, plain, method="eap-ig", steps=2, ablation="mean",
        memory_budget=1, progress=False,
    )  # fmt: skip
    mean = ck.sender_outputs(bridge, corrupted).mean()
    sample = edge_sample(graph, seed=3, k=4)
    slow, _ = attribution_patching._edge_reference(
        bridge, graph, clean.tokens, mean, plain, 2, sample, False, ""
    )
    rows, columns = torch.tensor(sample).T
    assert_close(fast.examples[rows, columns], slow[:, rows, columns].T, atol=ATOL, rtol=RTOL)
    assert slow[:, rows, columns].std() > 1e-2


def random_runs(graph, seed: int):
    """Edge sets of several densities, a circuit evaluated by patching every edge outside it,
    runs that change one late receiver (they start after layer 0) or the logits alone (no block
    to run), and the empty run."""
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(graph.valid.shape, generator=g) < p) & graph.valid for p in (0.05, 0.4)]
    circuit = graph.mask(
        [ck.Edge(ck.Head(0, 1), ck.Head(1, 3).q), ck.Edge(ck.Head(1, 3), "logits")]
        + [ck.Edge(ck.Embed(), ck.Head(0, h).v) for h in range(graph.n_heads)]
    )
    masks.append(graph.valid & ~circuit)
    last_k = graph.attn_rows(graph.n_layers - 1).stop - 1
    for row in (graph.mlp_row(graph.n_layers - 1), last_k, graph.logits_row):
        late = torch.zeros_like(graph.valid)
        late[row] = graph.valid[row] & (torch.rand(graph.valid.shape[1], generator=g) < 0.5)
        late[row, 0] = True
        masks.append(late)
    masks.append(torch.zeros_like(graph.valid))
    return torch.stack(masks)


@pytest.mark.parametrize("seed, n, mean", [(4, 3, False), (5, 1, True), (6, 4, True)])
def test_patch_edges_equals_reference_on_a_bridge(bridge, seed, n, mean):
    clean, corrupted, metric = random_pair(bridge, seed=seed, n=n)
    graph = ck.Graph.of(bridge)
    masks = random_runs(graph, seed)
    replacement = ck.sender_outputs(bridge, corrupted)
    replacement = replacement.mean() if mean else replacement
    kwargs = dict(replacement=replacement, progress=False)
    fast = ck.patch_edges(bridge, clean, masks, metric, max_runs_per_chunk=3, **kwargs)
    slow = ck.patch_edges(bridge, clean, masks, metric, reference=True, **kwargs)
    assert_close(fast, slow, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        plain = metric(bridge(clean.tokens))
    assert_close(fast[-1], plain, atol=ATOL, rtol=RTOL)  # the empty run
    assert (fast[:-1] - plain).abs().amax(dim=1).min() > 1e-3  # every other run changes it
    assert fast.std(0).max() > 1e-2


def test_patch_edges_in_example_groups_with_a_plain_metric_on_a_bridge(bridge):
    """A budget below one run: the examples go in groups, each with its own base run; a plain
    callable metric reads the full logits."""
    clean, corrupted, metric = random_pair(bridge, seed=7, n=3)
    graph = ck.Graph.of(bridge)
    masks = random_runs(graph, seed=7)
    kwargs = dict(replacement=ck.sender_outputs(bridge, corrupted), progress=False)

    def plain(logits):
        return metric(logits)

    with pytest.warns(UserWarning, match=r"^patch_edges: memory_budget of 1 B cannot be met"):
        grouped = ck.patch_edges(bridge, clean, masks, plain, memory_budget=1, **kwargs)
    slow = ck.patch_edges(bridge, clean, masks, plain, reference=True, **kwargs)
    assert_close(grouped, slow, atol=ATOL, rtol=RTOL)
    assert grouped.std(0).max() > 1e-2


def test_the_fast_paths_run_on_a_bridge_and_leave_it_as_found(bridge, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the reference path ran")

    monkeypatch.setattr(attribution_patching, "_edge_reference", refused)
    monkeypatch.setattr(edge_patching, "_patch_edges_reference", refused)
    clean, corrupted, metric = random_pair(bridge, seed=8, n=2)
    graph = ck.Graph.of(bridge)
    flags = (bridge.cfg.use_split_qkv_input, bridge.cfg.use_hook_mlp_in)

    def module_hooks():
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in bridge.modules()
        )

    hooks = module_hooks()
    with torch.no_grad():
        before = bridge(clean.tokens)
    ck.edge_attribution_patching(bridge, clean, corrupted, metric, progress=False)
    replacement = ck.sender_outputs(bridge, corrupted)
    ck.patch_edges(bridge, clean, random_runs(graph, 8), metric, replacement=replacement,
                   progress=False)  # fmt: skip
    assert (bridge.cfg.use_split_qkv_input, bridge.cfg.use_hook_mlp_in) == flags
    assert module_hooks() == hooks
    assert not any(point.has_hooks() for point in bridge.hook_dict.values())
    assert all(p.grad is None for p in bridge.parameters())
    with torch.no_grad():
        assert torch.equal(bridge(clean.tokens), before)


@pytest.mark.parametrize("reference", [False, True])
def test_a_resid_mid_patch_reaches_the_rest_of_the_model_on_a_bridge(bridge, reference):
    """A bridge's ``hook_resid_mid`` is the MLP norm's input hook; a patch there must change the
    residual stream the block passes on too, as on a HookedTransformer. Patching the residual
    stream between attention and MLP with X is patching the attention output with X minus the
    block's input, which the patch leaves as the base run's."""
    from circuitkit.core.components import Attn, Resid
    from circuitkit.core.engine import run_interventions
    from circuitkit.core.interventions import Intervention, Patch

    clean, corrupted, metric = random_pair(bridge, 5)
    _, clean_cache = bridge.run_with_cache(clean.tokens)
    _, base_cache = bridge.run_with_cache(corrupted.tokens)
    mid_runs, attn_runs = [], []
    for layer in range(bridge.cfg.n_layers):
        mid = clean_cache[f"blocks.{layer}.hook_resid_mid"]
        pre = base_cache[f"blocks.{layer}.hook_resid_pre"]
        mid_runs.append([Intervention(Resid(layer, "mid"), Patch(mid))])
        attn_runs.append([Intervention(Attn(layer), Patch(mid - pre))])
    kwargs = dict(positions=corrupted.positions, reference=reference, progress=False)
    at_mid = run_interventions(bridge, corrupted.tokens, mid_runs, metric, **kwargs)
    at_attn = run_interventions(bridge, corrupted.tokens, attn_runs, metric, **kwargs)
    assert_close(at_mid, at_attn, atol=ATOL, rtol=RTOL)
    plain = metric(bridge(corrupted.tokens)).cpu()
    assert (at_mid - plain).abs().max() > 1e-2  # the patches change the metric
    # a hook that only reads resid_mid still sees the residual stream, and changes nothing
    seen = []
    with bridge.hooks(
        fwd_hooks=lens.bridge_hooks(
            bridge, [("blocks.0.hook_resid_mid", lambda a, hook: seen.append(a))]
        )
    ):
        logits = bridge(corrupted.tokens)
    assert_close(seen[0], base_cache["blocks.0.hook_resid_mid"], atol=0, rtol=0)
    assert_close(metric(logits).cpu(), plain, atol=0, rtol=0)
