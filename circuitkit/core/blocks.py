"""Transformer blocks computed as TransformerLens computes them, in fewer passes over memory.

The engine runs the same blocks thousands of times on large batches. TransformerLens writes
each block for reading, not speed: its LayerNorm takes five passes over the residual stream (and
runs three times per block, once each for the query, key and value inputs), GPT-2's GELU takes
eight, and attention materialises the scores, a mask and the pattern. On a GPU those passes,
not the matrix products, then set the time.

``block_forward`` computes the same function with fused kernels: one ``F.layer_norm``, one
matrix product for the query, key and value projections together, one
``F.scaled_dot_product_attention``, one activation kernel. It calls the block's hook points
at the same places TransformerLens does (``hook_resid_pre``, ``hook_q``/``k``/``v``,
``hook_rot_q``/``k``, ``hook_z``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_in``,
``hook_pre``, ``hook_pre_linear``, ``hook_post``, ``hook_mlp_out``, ``hook_resid_post``), so
interventions and user hooks on them act as they would in ``block(...)``. The hook points it
does not pass through (the norms' ``hook_scale`` / ``hook_normalized``, ``hook_attn_scores``,
``hook_pattern``) must carry no hook: ``fusable`` and ``skipped_hooks_free`` say when a block
qualifies, and the engine runs every other block through TransformerLens's own forward.

Results agree with TransformerLens to rounding (the order of floating-point operations
differs); the engine's tests compare both against its plain reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from circuitkit.core.lens import (
    MLP,
    POST_NORM_ARCHITECTURES,
    Attention,
    GatedMLP,
    GroupedQueryAttention,
    HookPoint,
    LayerNorm,
    LayerNormPre,
    RMSNorm,
    RMSNormPre,
    TransformerBlock,
    softcap_enabled,
)

_ACTIVATIONS = {
    # TransformerLens's name: the same function as one kernel
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, nn.Identity)
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


@dataclass(frozen=True)
class BlockWeights:
    """A block's attention weights laid out for one matrix product each."""

    qkv: Tensor  # [(n_heads + 2 * n_kv_heads) * d_head, d_model]
    qkv_bias: Tensor  # [(n_heads + 2 * n_kv_heads) * d_head]
    out: Tensor  # [d_model, n_heads * d_head]


def block_weights(block: TransformerBlock) -> BlockWeights:
    """The stacked query/key/value and the flattened output projection of ``block``."""
    attn = block.attn
    grouped = isinstance(attn, GroupedQueryAttention)
    w_k, b_k = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
    w_v, b_v = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)

    def rows(w: Tensor) -> Tensor:  # [head, d_model, d_head] -> [(head d_head), d_model]
        return w.permute(0, 2, 1).reshape(-1, w.shape[1])

    return BlockWeights(
        qkv=torch.cat([rows(attn.W_Q), rows(w_k), rows(w_v)]).contiguous(),
        qkv_bias=torch.cat([attn.b_Q.reshape(-1), b_k.reshape(-1), b_v.reshape(-1)]),
        out=attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[2], -1).contiguous(),
    )


def fusable(block: nn.Module) -> bool:
    """Whether ``block_forward`` reproduces this block's architecture (its hooks aside)."""
    if type(block) is not TransformerBlock:
        return False
    cfg = block.cfg
    attn = block.attn
    flags_off = not any(
        getattr(cfg, name, False)
        for name in (
            "use_attn_in",
            "use_split_qkv_input",
            "use_attn_result",
            "use_normalization_before_and_after",
            "parallel_attn_mlp",
            "use_qk_norm",
            "use_logn_attn",
            "use_attention_sinks",
            "use_dynamic_ntk_rope",
            "load_in_4bit",
            "ungroup_grouped_query_attention",
        )
    )
    attention_ok = (
        type(attn) in (Attention, GroupedQueryAttention)
        and cfg.positional_embedding_type in ("standard", "rotary")
        and (attn._attention_dir_override or cfg.attention_dir) == "causal"
        and attn.attn_type == "global"
        and not softcap_enabled(cfg.attn_scores_soft_cap)
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.original_architecture not in (*POST_NORM_ARCHITECTURES, *_QK_NORM_ARCHITECTURES)
    )
    norms_ok = type(block.ln1) in _NORMS and (cfg.attn_only or type(block.ln2) in _NORMS)
    mlp_ok = cfg.attn_only or (
        type(block.mlp) in (MLP, GatedMLP)
        and not cfg.is_layer_norm_activation()
        and cfg.act_fn in _ACTIVATIONS
    )
    return flags_off and attention_ok and norms_ok and mlp_ok


def skipped_hooks_free(block: TransformerBlock) -> bool:
    """No hook on a hook point that ``block_forward`` does not pass through."""
    skipped = [block.attn.hook_attn_scores, block.attn.hook_pattern]
    for norm in (block.ln1, getattr(block, "ln2", None)):
        skipped += [getattr(norm, "hook_scale", None), getattr(norm, "hook_normalized", None)]
    return not any(is_hooked(point) for point in skipped if point is not None)


def hooks_free(block: TransformerBlock) -> bool:
    """No hook anywhere in ``block``: ``block_forward`` may then compute a subset of positions."""
    if _global_hooks():
        return False
    return not any(is_hooked(module) for module in block.modules() if isinstance(module, HookPoint))


@dataclass(frozen=True)
class Past:
    """The keys (rotated, in a rotary model) and values of the positions before a batch's first
    one, once per prompt: row ``r`` of a batch continues prompt ``r % n``. Made once per block
    and position (``past``), it serves a batch of any number of runs on those prompts."""

    keys: Tensor  # [n, n_past, kv_head, d_head]
    values: Tensor  # [n, n_past, kv_head, d_head]

    def joined(
        self,
        keys: Float[Tensor, "batch new kv_head d_head"],
        values: Float[Tensor, "batch new kv_head d_head"],
    ) -> tuple[Tensor, Tensor]:
        """The keys and values of every row of a batch, the earlier positions' then the batch's
        own (``keys``, ``values``): ``[batch, n_past + new, kv_head, d_head]`` each, in one copy
        (the earlier positions' are read once per row, never repeated into a tensor of their
        own)."""
        n = self.keys.shape[0]
        copies = keys.shape[0] // n

        def join(past: Tensor, new: Tensor) -> Tensor:
            past = past.expand(copies, *past.shape)  # a view: row r continues prompt r % n
            return torch.cat([past, new.view(copies, n, *new.shape[1:])], dim=2).flatten(0, 1)

        return join(self.keys, keys), join(self.values, values)


def past(
    block: TransformerBlock,
    keys: Float[Tensor, "n past kv_head d_head"],
    values: Float[Tensor, "n past kv_head d_head"],
) -> Past:
    """The earlier positions' keys and values of ``n`` prompts, as ``block_forward`` takes
    them (from a ``TransformerLensKeyValueCacheEntry``: keys before rotary)."""
    if block.cfg.positional_embedding_type == "rotary":
        keys = block.attn.apply_rotary(keys, 0, None)
    return Past(keys, values)


def causal_mask(n_query: int, n_past: int, device: torch.device) -> Tensor:
    """[n_query, n_past + n_query]: query i, at position n_past + i, sees keys up to there."""
    return torch.ones(n_query, n_past + n_query, dtype=torch.bool, device=device).tril(n_past)


def read_mask(read: Int[Tensor, " batch"], n_past: int, n_keys: int) -> Tensor:
    """[batch, 1, 1, n_keys]: each row's one query, at position n_past + read, sees keys up to
    there."""
    keys = torch.arange(n_keys, device=read.device)
    return (keys[None, :] <= (n_past + read)[:, None])[:, None, None, :]


def block_forward(
    block: TransformerBlock,
    resid_pre: Float[Tensor, "batch pos d_model"],
    past: Past | None,
    weights: BlockWeights,
    *,
    mask: Tensor | None = None,
    read: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``block`` on ``resid_pre``, whose positions may follow earlier ones.

    ``past`` holds the earlier positions' keys and values of the prompts the rows continue
    (``past``; the batch is a whole number of copies of them), or is None when there are
    none. ``mask`` says which keys each query sees (``causal_mask``; None without ``past``:
    plainly causal).

    With ``read`` (one index into ``resid_pre``'s positions per row) the block computes its
    keys and values at every position but everything else at the read positions alone, and
    returns ``[batch, 1, d_model]``: what a metric that reads one position needs from the last
    block. ``mask`` is then ``read_mask(read, ...)``, and the block must carry no hook
    (``hooks_free``).
    """
    cfg = block.cfg
    attn = block.attn
    batch, n_query, _ = resid_pre.shape
    n_past = 0 if past is None else past.keys.shape[1]
    n_heads, d_head = cfg.n_heads, cfg.d_head
    n_kv = (weights.qkv.shape[0] // d_head - n_heads) // 2

    resid_pre = _hook(block.hook_resid_pre, resid_pre)
    qkv = F.linear(_norm(block.ln1, resid_pre), weights.qkv, weights.qkv_bias)
    q, k, v = qkv.split([n_heads * d_head, n_kv * d_head, n_kv * d_head], dim=-1)
    q = _hook(attn.hook_q, q.unflatten(-1, (n_heads, d_head)))
    k = _hook(attn.hook_k, k.unflatten(-1, (n_kv, d_head)))
    v = _hook(attn.hook_v, v.unflatten(-1, (n_kv, d_head)))

    rotary = cfg.positional_embedding_type == "rotary"
    if rotary:
        q = _hook(attn.hook_rot_q, attn.apply_rotary(q, n_past, None))
        k = attn.apply_rotary(k, n_past, None)
    if past is not None:
        k, v = past.joined(k, v)
    if rotary:
        k = _hook(attn.hook_rot_k, k)
    if n_kv != n_heads:
        k = k.repeat_interleave(n_heads // n_kv, dim=2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
    if read is not None:
        rows = torch.arange(batch, device=q.device)
        q, resid_pre, n_query = q[rows, read][:, None], resid_pre[rows, read][:, None], 1

    z = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        scale=1.0 / attn.attn_scale,
    )
    z = _hook(attn.hook_z, z.transpose(1, 2))
    attn_out = F.linear(z.reshape(batch, n_query, n_heads * d_head), weights.out, attn.b_O)
    attn_out = _hook(block.hook_attn_out, attn_out)

    if cfg.attn_only:
        return _hook(block.hook_resid_post, resid_pre + attn_out)
    resid_mid = _hook(block.hook_resid_mid, resid_pre + attn_out)
    mlp_in = _hook(block.hook_mlp_in, resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
    mlp_out = _hook(block.hook_mlp_out, _mlp(block.mlp, _norm(block.ln2, mlp_in)))
    return _hook(block.hook_resid_post, resid_mid + mlp_out)


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    if isinstance(norm, nn.Identity):
        return x
    shape = (x.shape[-1],)
    if isinstance(norm, LayerNorm):
        return F.layer_norm(x, shape, norm.w, norm.b, norm.eps)
    if isinstance(norm, LayerNormPre):
        return F.layer_norm(x, shape, None, None, norm.eps)
    # RMSNorm, as TransformerLens computes it: in float32, then back to the model's dtype
    xf = x.float()
    normalized = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    return normalized * norm.w if isinstance(norm, RMSNorm) else normalized


def _mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    act_fn = _ACTIVATIONS[mlp.cfg.act_fn]
    if isinstance(mlp, GatedMLP):
        pre = _hook(mlp.hook_pre, x @ mlp.W_gate)
        pre_linear = _hook(mlp.hook_pre_linear, x @ mlp.W_in)
        post = _hook(mlp.hook_post, act_fn(pre).mul_(pre_linear).add_(mlp.b_in))
    else:
        pre = torch.addmm(mlp.b_in, x.reshape(-1, x.shape[-1]), mlp.W_in)
        pre = _hook(mlp.hook_pre, pre.view(*x.shape[:-1], -1))
        post = _hook(mlp.hook_post, act_fn(pre))
    out = torch.addmm(mlp.b_out, post.reshape(-1, post.shape[-1]), mlp.W_out)
    return out.view(*x.shape[:-1], -1)


def is_hooked(point: nn.Module) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks)


def _hook(point: HookPoint, x: Tensor) -> Tensor:
    """``point(x)``, as TransformerLens calls it; without a hook on it, ``x`` itself (the same
    result, without the cost of a module call)."""
    if is_hooked(point) or _global_hooks():
        return point(x)
    return x


def _global_hooks() -> bool:
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)
