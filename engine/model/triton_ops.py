"""Triton kernels for the CUDA path: each replaces several small torch launches, decode attention reads
the paged KV cache in place instead of gathering it, and a skinny matmul reads a one-row step's weights
faster than cuBLAS does.

Every kernel computes in float32 and rounds where the torch path rounds (HF LLaMA's order of operations),
so norm, rotary and SwiGLU give the torch ops' results; attention accumulates in float32. (Triton's CPU
interpreter truncates float32 to bfloat16 where a GPU rounds to nearest, so there bf16 results may differ
from torch's by one unit in the last place.) Imported only
when Triton is installed; the kernels also run on the CPU under TRITON_INTERPRET=1, which is how the CPU
test suite checks them against the torch ops.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    delta_ptr,
    sum_ptr,
    out_ptr,
    w_ptr,
    n_cols,
    x_stride,
    delta_stride,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_stride + cols, mask=inside, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=inside)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    tl.store(
        out_ptr + row * n_cols + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=inside
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, n] -> weight * normalise(x), normalised in float32 and cast back before the weight."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _norm(x, None, out, out, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass over the row."""
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(summed)
    _norm(x, delta, summed, out, weight, eps)
    return summed, out


def _norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    summed: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
) -> None:
    rows, n = x.shape
    assert x.stride(1) == 1 and (delta is None or delta.stride(1) == 1)
    _rms_norm_kernel[(rows,)](
        x,
        x if delta is None else delta,
        summed,
        out,
        weight,
        n,
        x.stride(0),
        x.stride(0) if delta is None else delta.stride(0),
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n),
    )


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * row_stride + n_cols + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype)
    tl.store(
        out_ptr + row * n_cols + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=inside
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2n] (gate then up) -> silu(gate) * up [T, n]."""
    rows, width = gate_up.shape
    n = width // 2
    assert gate_up.stride(1) == 1
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), BLOCK=block)
    return out


@triton.jit
def _rotary_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    qk_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    qkv_stride,
    num_heads,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
):
    """One program per (token, q or k head): rotate the head; a k head also stores itself and its v head
    into the token's cache slot."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    half = HALF
    lo = tl.arange(0, HALF)
    src = qkv_ptr + t * qkv_stride + head * HEAD_DIM
    x1 = tl.load(src + lo)
    x2 = tl.load(src + half + lo)
    dtype = x1.dtype
    cos1 = tl.load(cos_ptr + t * HEAD_DIM + lo).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * HEAD_DIM + half + lo).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * HEAD_DIM + lo).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * HEAD_DIM + half + lo).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # HF: x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), each product rounded to dtype.
    out1 = ((a1 * cos1).to(dtype).to(tl.float32) + (-a2 * sin1).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * cos2).to(dtype).to(tl.float32) + (a1 * sin2).to(dtype).to(tl.float32)).to(dtype)
    dst = qk_ptr + (t * (num_heads + num_kv_heads) + head) * HEAD_DIM
    tl.store(dst + lo, out1)
    tl.store(dst + half + lo, out2)
    if head >= num_heads:
        kv_head = head - num_heads
        slot = tl.load(slot_ptr + t)
        cache = (slot * num_kv_heads + kv_head) * HEAD_DIM
        tl.store(k_cache_ptr + cache + lo, out1)
        tl.store(k_cache_ptr + cache + half + lo, out2)
        dims = tl.arange(0, HEAD_DIM)
        v = tl.load(src + num_kv_heads * HEAD_DIM + dims)
        tl.store(v_cache_ptr + cache + dims, v)


def rotary_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) D]; cos/sin [T, 1, D] -> rotated q|k [T, H + Hkv, D]; k and v stored in the
    caches [slots, Hkv, D] at each token's slot."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous()
    qk = torch.empty(tokens, num_heads + num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rotary_store_kernel[(tokens, num_heads + num_kv_heads)](
        qkv,
        cos,
        sin,
        qk,
        k_cache,
        v_cache,
        slot_mapping,
        qkv.stride(0),
        num_heads,
        num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=head_dim // 2,
    )
    return qk


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    table_stride,
    scale,
    num_heads,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (sequence, query head): online softmax over the sequence's keys, read in place
    from their cache slots, BLOCK_N positions at a time."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // (num_heads // num_kv_heads)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (seq * num_heads + head) * HEAD_DIM + dims).to(tl.float32) * scale
    context_len = tl.load(lens_ptr + seq)
    offsets = tl.arange(0, BLOCK_N)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(0, context_len, BLOCK_N):
        pos = start + offsets
        valid = pos < context_len
        block = tl.load(tables_ptr + seq * table_stride + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        where = (slot * num_kv_heads + kv_head)[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_cache_ptr + where, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_cache_ptr + where, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    keys_per_step: int = 64,
) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last position; caches [slots, Hkv, D]; block_tables
    [B, nb]; context_lens [B] (the query's own key included) -> [B, H, D]. A row of length 0 gives zeros.
    `keys_per_step`: positions each program reads per loop step (a power of two; 8 warps from 128)."""
    batch, num_heads, head_dim = q.shape
    assert q.is_contiguous() and k_cache.is_contiguous() and block_tables.stride(1) == 1
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, num_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        block_tables.stride(0),
        head_dim**-0.5,
        num_heads,
        k_cache.shape[1],
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_N=keys_per_step,
        num_warps=4 if keys_per_step <= 64 else 8,
    )
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for values widened to float32: bf16/fp16 fit tf32's mantissa exactly, so
    tf32 loses nothing; float32 inputs keep full precision."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _skinny_matmul_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rows,
    n_out,
    n_in,
    x_stride,
    w_stride,
    y_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y [rows, n_out] = x [rows, n_in] @ w [n_out, n_in]^T for a few rows: one program per BLOCK_N output
    columns streams its slice of w once, so the weight read spreads over every multiprocessor. With
    USE_DOT the rows (padded to BLOCK_M >= 16) go through tl.dot; else BLOCK_M is 1 and the products
    accumulate elementwise, reduced once at the end."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + cols[:, None].to(tl.int64) * w_stride
    if USE_DOT:
        ms = tl.arange(0, BLOCK_M)
        row_ok = ms < rows
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < n_in
            if EVEN_K:
                k_ok = kk >= 0
            x = tl.load(
                x_ptr + ms[:, None] * x_stride + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(w_base + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + ms[:, None] * y_stride + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            kk = k0 + ks
            if EVEN_K:
                x = tl.load(x_ptr + kk)
                w = tl.load(w_base + kk[None, :], mask=col_ok[:, None], other=0.0)
            else:
                k_ok = kk < n_in
                x = tl.load(x_ptr + kk, mask=k_ok, other=0.0)
                w = tl.load(w_base + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out1 = tl.sum(acc2, 1).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + cols, out1, mask=col_ok)


def skinny_settings(rows: int, n_out: int, n_in: int) -> tuple[int, int, int, int] | None:
    """(BLOCK_N, BLOCK_K, warps, stages) for skinny_matmul, or None where cuBLAS is as fast or faster.

    From one H200 sweep over LLaMA-7B's projections (bench/README.md): at one row each shape's fastest
    setting, by its width ratio (o and down, q/k/v, gate/up, the LM head), where the kernel read 3.3-4.4
    TB/s and cuBLAS 2.6-4.0; at 2-16 rows it won only on the wide LM head."""
    if rows == 1:
        # A quarter of n_in to spare: the LoRA rows under a weight (a few hundred) keep it in its class.
        if 4 * n_out <= 5 * n_in:
            return (16, 1024, 8, 2)
        if 4 * n_out <= 13 * n_in:
            return (16, 256, 4, 2)
        if n_out < 8 * n_in:
            return (8, 512, 4, 2)
        return (16, 512, 4, 2)
    if 2 <= rows <= 16 and n_out >= 8 * n_in:
        return (64, 256, 4, 3)
    return None


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, settings: tuple[int, int, int, int]) -> torch.Tensor:
    """x [M, in] @ weight [out, in]^T for M <= 16, accumulated in float32, rounded once to x's dtype;
    `settings` as skinny_settings gives them."""
    rows, n_in = x.shape
    n_out = weight.shape[0]
    assert 1 <= rows <= 16 and weight.shape[1] == n_in and x.stride(1) == 1 and weight.stride(1) == 1
    use_dot = rows > 1
    block_n, block_k, num_warps, num_stages = settings
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    _skinny_matmul_kernel[(triton.cdiv(n_out, block_n),)](
        x,
        weight,
        y,
        rows,
        n_out,
        n_in,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        BLOCK_M=16 if use_dot else 1,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_K=n_in % block_k == 0,
        USE_DOT=use_dot,
        PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y


@triton.jit
def _lora_expand_kernel(
    y_ptr,
    out_ptr,
    low_ptr,
    b_t_ptr,
    row_adapter_ptr,
    owner_ptr,
    b_index_ptr,
    rows,
    n_out,
    rank,
    y_stride,
    out_stride,
    low_stride,
    b_t_stride,
    MASKED: tl.constexpr,
    INDEXED: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out [rows, n_out] = y + (low [rows, rank], kept where the row's adapter owns the rank column if
    MASKED) @ b_t [rank, n_out]: the products summed in float32 and rounded once, as addmm does. INDEXED:
    rank column r multiplies b_t's row b_index[r] (none where it is -1). WIDE widens the inputs to
    float32 first (exact for bf16/fp16 under tf32)."""
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = ms < rows, ns < n_out
    if MASKED:
        adapter = tl.load(row_adapter_ptr + ms, mask=row_ok, other=-1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rank_ok = rs < rank
        low = tl.load(
            low_ptr + ms[:, None] * low_stride + rs[None, :],
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if MASKED:
            owner = tl.load(owner_ptr + rs, mask=rank_ok, other=-2)
            low = tl.where(adapter[:, None] == owner[None, :], low, tl.zeros_like(low))
        if INDEXED:
            b_rows = tl.load(b_index_ptr + rs, mask=rank_ok, other=-1)
            b_t = tl.load(
                b_t_ptr + b_rows[:, None] * b_t_stride + ns[None, :],
                mask=(b_rows >= 0)[:, None] & col_ok[None, :],
                other=0.0,
            )
        else:
            b_t = tl.load(
                b_t_ptr + rs[:, None] * b_t_stride + ns[None, :],
                mask=rank_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
        if WIDE:
            acc += tl.dot(low.to(tl.float32), b_t.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(low, b_t)
    inside = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptr + ms[:, None] * y_stride + ns[None, :], mask=inside, other=0.0)
    tl.store(
        out_ptr + ms[:, None] * out_stride + ns[None, :], (y.to(tl.float32) + acc).to(y.dtype), mask=inside
    )


def lora_expand(
    y: torch.Tensor,
    low: torch.Tensor,
    b_t: torch.Tensor,
    row_adapter: torch.Tensor | None = None,
    owners: torch.Tensor | None = None,
    b_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, out] + low [M, r] @ b_t [r, out] as a new contiguous tensor, in one launch; y and low may be
    column ranges of one matmul's output (LoraRows). With `row_adapter` [M] and `owners` [r], a row keeps
    only the rank columns its adapter owns. With `b_index` [r], column r multiplies b_t's row b_index[r]
    (nothing where -1), and b_t may have fewer rows than low has columns."""
    rows, n_out = y.shape
    rank = low.shape[1]
    assert y.stride(1) == 1 and low.stride(1) == 1 and b_t.stride(1) == 1 and b_t.shape[1] == n_out
    assert b_t.shape[0] == rank if b_index is None else b_index.shape == (rank,)
    out = torch.empty(rows, n_out, dtype=y.dtype, device=y.device)
    if rows == 0:
        return out
    masked = row_adapter is not None and owners is not None
    # From an H200 sweep over LLaMA-7B's stacked shapes at 1, 64 and 256 rows (bench/README.md): the rank
    # in blocks of 32, taller and wider tiles for more rows and wider outputs.
    block_m = 16 if rows <= 64 else 32
    block_n = 64 if n_out <= 4096 else 128 if rows <= 64 else 256
    _lora_expand_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n_out, block_n))](
        y,
        out,
        low,
        b_t,
        row_adapter if masked else low,
        owners if masked else low,
        b_index if b_index is not None else low,
        rows,
        n_out,
        rank,
        y.stride(0),
        out.stride(0),
        low.stride(0),
        b_t.stride(0),
        MASKED=masked,
        INDEXED=b_index is not None,
        # Triton's interpreter (the CPU tests) gets bf16 dots wrong; the GPU multiplies them natively.
        WIDE=y.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=32,
        PRECISION=_dot_precision(y.dtype),
        num_warps=4,
    )
    return out
