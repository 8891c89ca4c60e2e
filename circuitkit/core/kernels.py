"""Attention over short prompts with shared earlier positions, as one GPU kernel (Triton).

The engine runs thousands of patched copies of a few short prompts. The positions before a
chunk's first patched position are the unpatched run's, the same for every copy of a prompt,
so their keys and values are kept once per prompt (``[n, n_past, kv_head, d_head]``), not once
per row. ``torch.nn.functional.scaled_dot_product_attention`` needs them repeated for every row
and joined to the new positions' keys and values (three copies of the largest tensors of a
block), and in float32 it runs as several kernels. ``attention`` reads each row's prompt's
earlier keys and values where they lie, and the new positions' from the query/key/value
projection's output, in one kernel: query ``i`` of row ``r`` sees every earlier position of
prompt ``r % n`` and the new positions up to ``i``.

It computes in float32 with plain (IEEE) products and sums whatever the inputs' dtype, and
writes the output in the inputs' dtype; ``attention_reference`` is the same function written
with PyTorch operations, which the tests compare it against. In use, the first output of each
configuration in a process is also compared with PyTorch's attention (``confirm``), and a
kernel that fails to build or disagrees is set aside for PyTorch's, with a warning.

Triton compiles for NVIDIA GPUs; ``available`` says whether a tensor's device can run it (with
``TRITON_INTERPRET=1`` set before this module is imported, Triton's interpreter runs it on the
CPU, slowly: that is how the tests check it on a machine without a GPU).
"""

from __future__ import annotations

import os
import warnings

import torch
from jaxtyping import Float, Int
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the engine uses PyTorch's attention
    triton = None

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
# queries per program: a power of two of at least 2; the key blocks' length
_BLOCK_Q, _BLOCK_K = 4, 16
# why the kernel failed to compile or launch in this process, if it did (``set_aside``)
_failure: str | None = None
# the configurations (device, dtype, heads, d_head, read or not) whose first output agreed with
# PyTorch's attention in this process (``confirm``)
_confirmed: set[tuple] = set()


def available(device: torch.device) -> bool:
    """Whether ``attention`` runs on ``device``: a CUDA GPU with Triton installed, or any
    device under Triton's interpreter, unless it has failed in this process."""
    return triton is not None and _failure is None and (device.type == "cuda" or INTERPRETED)


def set_aside(error: Exception) -> None:
    """Stop using the kernel in this process after ``error`` (a Triton that cannot compile or
    launch it here), saying so once: PyTorch's attention computes the same function."""
    global _failure
    _failure = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"circuitkit: the attention kernel failed ({_failure[:300]}); attention runs on "
        "PyTorch's kernels from now on in this process, with the same results and more time",
        RuntimeWarning,
        stacklevel=3,
    )


def configuration(q: Tensor, k: Tensor, read: Tensor | None) -> tuple:
    """What the kernel is compiled for: one check by ``confirm`` covers every call with it."""
    return (q.device, q.dtype, q.shape[2], k.shape[2], q.shape[3], read is None)


def confirmed(q: Tensor, k: Tensor, read: Tensor | None) -> bool:
    return configuration(q, k, read) in _confirmed


def confirm(q: Tensor, k: Tensor, read: Tensor | None, got: Tensor, expected: Tensor) -> Tensor:
    """The kernel's first output of a configuration, checked against PyTorch's attention on the
    same inputs (``expected``): a Triton or GPU on which the kernel compiles but computes
    something else must not change a result. Agreement to rounding (float32 inside the kernel;
    TF32 or bfloat16 in PyTorch's) confirms the configuration; otherwise the kernel is set
    aside and ``expected`` is returned. Reading the difference waits for the device, once per
    configuration and process."""
    scale = float(expected.abs().max()) + 1e-3
    error = float((got.float() - expected.float()).abs().max())
    if error <= 0.05 * scale:  # wrong indexing or masking gives errors of the outputs' size
        _confirmed.add(configuration(q, k, read))
        return got
    set_aside(
        ValueError(
            f"its output differs from PyTorch's attention by {error:.3g} (outputs up to "
            f"{scale:.3g}) for {tuple(q.shape)} queries in {q.dtype} on {q.device}"
        )
    )
    return expected


def attention(
    q: Float[Tensor, "batch n_new head d_head"],
    k: Float[Tensor, "batch n_new kv_head d_head"],
    v: Float[Tensor, "batch n_new kv_head d_head"],
    past_keys: Float[Tensor, "n n_past kv_head d_head"] | None,
    past_values: Float[Tensor, "n n_past kv_head d_head"] | None,
    scale: float,
    read: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch n_out head d_head"]:
    """Causal attention of ``batch`` rows, each continuing prompt ``row % n`` after its
    ``n_past`` earlier positions (none when ``past_keys`` is None).

    Head ``h`` reads key/value head ``h // (head / kv_head)`` (grouped-query attention without
    repeating the keys). Scores are ``q . k * scale``. With ``read`` ([batch] indices into the
    new positions) each row computes one query, at its read position, and the output has one
    position (``n_out`` = 1); else every new position is a query (``n_out`` = ``n_new``).
    The last dimension of every input must be contiguous; other strides are free (views of
    the projection's output need no copy).
    """
    batch, n_new, n_heads, d_head = q.shape
    n_kv = k.shape[2]
    if past_keys is None or past_keys.shape[1] == 0:
        # no earlier positions: any tensor of the right rank stands in, never read
        past_keys = past_values = k[:1, :0]
    n_prompts, n_past = past_keys.shape[0], past_keys.shape[1]
    tensors = [q, k, v, past_keys, past_values]
    if any(t.stride(-1) != 1 for t in tensors):
        q, k, v, past_keys, past_values = (t.contiguous() for t in tensors)
    n_out = n_new if read is None else 1
    out = torch.empty(batch, n_out, n_heads, d_head, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    read_index = read if read is not None else out  # a placeholder pointer when unused
    grid = (batch * n_heads, triton.cdiv(n_out, _BLOCK_Q))
    _attention_kernel[grid](
        q, k, v, past_keys, past_values, out, read_index,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *past_keys.stride()[:3], *past_values.stride()[:3], *out.stride()[:3],
        n_prompts, n_new, n_out, n_past, n_heads, n_heads // n_kv, scale,
        D=d_head,
        BLOCK_D=triton.next_power_of_2(d_head),
        BLOCK_Q=_BLOCK_Q,
        BLOCK_K=_BLOCK_K,
        HAS_READ=read is not None,
    )  # fmt: skip
    return out


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_keys: Tensor | None,
    past_values: Tensor | None,
    scale: float,
    read: Tensor | None = None,
) -> Tensor:
    """``attention`` written with PyTorch operations, in float32 (the tests' reference)."""
    batch, n_new, n_heads, _ = q.shape
    group = n_heads // k.shape[2]
    keys, values = k.float(), v.float()
    n_past = 0
    if past_keys is not None and past_keys.shape[1]:
        copies = batch // past_keys.shape[0]
        n_past = past_keys.shape[1]
        keys = torch.cat([past_keys.float().repeat(copies, 1, 1, 1), keys], dim=1)
        values = torch.cat([past_values.float().repeat(copies, 1, 1, 1), values], dim=1)
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys) * scale
    query = torch.arange(n_new, device=q.device)
    if read is not None:
        query = read[:, None]  # [batch, 1]
    visible = torch.arange(n_past + n_new, device=q.device) <= n_past + query[..., None]
    scores = scores.masked_fill(~visible.unsqueeze(-3), float("-inf"))
    if read is not None:
        rows = torch.arange(batch, device=q.device)
        scores = scores[rows, :, read][:, :, None]  # [batch, head, 1, keys]
    z = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values)
    return z.to(q.dtype)


if triton is not None:

    @triton.jit
    def _attention_kernel(
        q, k, v, past_k, past_v, out, read,
        q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh,
        pk_sb, pk_ss, pk_sh, pv_sb, pv_ss, pv_sh, o_sb, o_ss, o_sh,
        n_prompts, n_new, n_out, n_past, n_heads, group, scale,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_READ: tl.constexpr,
    ):  # fmt: skip
        # one program: BLOCK_Q queries of one (row, head)
        row_head = tl.program_id(0)
        row = row_head // n_heads
        head = row_head % n_heads
        kv_head = head // group
        prompt = row % n_prompts
        outputs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        if HAS_READ:
            last = tl.load(read + row)  # the row's one query, at its read position
            queries = last + 0 * outputs
        else:
            queries = outputs
            last = tl.minimum(n_new, tl.program_id(1) * BLOCK_Q + BLOCK_Q) - 1
        dims = tl.arange(0, BLOCK_D)
        in_head = dims < D
        valid = outputs < n_out
        q_rows = tl.load(
            q + row * q_sb + queries[:, None] * q_ss + head * q_sh + dims[None, :],
            mask=valid[:, None] & in_head[None, :],
            other=0.0,
        ).to(tl.float32)

        # online softmax over the earlier positions, then the new ones
        m_i = tl.zeros([BLOCK_Q], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for start in range(0, n_past, BLOCK_K):
            keys_at = start + tl.arange(0, BLOCK_K)
            present = keys_at < n_past
            where = keys_at[:, None] * pk_ss + kv_head * pk_sh + dims[None, :]
            both = present[:, None] & in_head[None, :]
            keys = tl.load(past_k + prompt * pk_sb + where, mask=both, other=0.0).to(tl.float32)
            scores = tl.sum(q_rows[:, None, :] * keys[None, :, :], 2) * scale
            scores = tl.where(present[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            where = keys_at[:, None] * pv_ss + kv_head * pv_sh + dims[None, :]
            values = tl.load(past_v + prompt * pv_sb + where, mask=both, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], 1)
            m_i = m_new
        for start in range(0, last + 1, BLOCK_K):
            keys_at = start + tl.arange(0, BLOCK_K)
            present = keys_at < n_new
            where = keys_at[:, None] * k_ss + kv_head * k_sh + dims[None, :]
            both = present[:, None] & in_head[None, :]
            keys = tl.load(k + row * k_sb + where, mask=both, other=0.0).to(tl.float32)
            scores = tl.sum(q_rows[:, None, :] * keys[None, :, :], 2) * scale
            seen = present[None, :] & (keys_at[None, :] <= queries[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            where = keys_at[:, None] * v_ss + kv_head * v_sh + dims[None, :]
            values = tl.load(v + row * v_sb + where, mask=both, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], 1)
            m_i = m_new

        z = acc / l_i[:, None]
        tl.store(
            out + row * o_sb + outputs[:, None] * o_ss + head * o_sh + dims[None, :],
            z.to(out.dtype.element_ty),
            mask=valid[:, None] & in_head[None, :],
        )
