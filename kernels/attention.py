"""Attention for encoders: bidirectional by default, key padding given as per-sequence lengths.

Two layouts, as PyTorch SDPA and flash-attn's varlen API use them:
- padded  `attention(q, k, v, lengths=...)`, q/k/v of shape (B, H, S, D), sequences right-padded;
- packed  `attention_varlen(q, k, v, cu_seqlens, max_seqlen)`, q/k/v of shape (total_tokens, H, D).

Layers, as in DESIGN.md:
- Triton kernels (FlashAttention-2 scheme): `_fwd_kernel` (online softmax over key tiles, saves the
  log-sum-exp per query row), `_bwd_delta_kernel` (delta = rowsum(dO * O)), `_bwd_dkdv_kernel` (one
  program per key tile, looping over query tiles) and `_bwd_dq_kernel` (one program per query tile): no
  atomics, so gradients are deterministic. Every kernel addresses a sequence by (start row, query rows,
  key rows) and per-layout strides, so the padded and packed layouts run the same code without copies.
- host functions `attention_forward` / `attention_backward` and one autograd Function.
- `attention_reference`, the PyTorch twin: the test oracle, written out step by step;
- `attention_torch`, the path taken off the kernels (CPU, backend="torch"): the same function through
  PyTorch SDPA (its fused CPU kernel instead of the twin's separate matmul / mask / softmax steps), and
  the twin itself where SDPA cannot give the same result (seeded dropout, float64) or draws dropout masks
  slower (on CPU SDPA falls back to a math path that draws with `bernoulli_`; bench/results/micro_dropout_cpu.json).

Padded layout: query rows past a sequence's length still attend to that sequence's real keys, in the
twin and in the kernels alike (their outputs are ignored downstream); keys past it get zero gradient;
a length of 0 gives zeros. The log-sum-exp of a row with no visible key is +inf (as flash-attn).

Dropout (Philox): the keep decision for (batch b, head h, query i, key j), with i and j positions inside
the sequence, is a pure function of (seed, b*H + h, i, j) (`_keep`: one Philox call per pair of keys 2g,
2g + 1, its first two outputs), so the forward and backward regenerate the same mask, the padded and packed
layouts draw the same mask, and `dropout_mask` can materialise it for tests. The S x S mask never exists in
the kernels. The twin with a seed draws its own, different, mask from a torch.Generator.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import dispatch
from .dropout_mask import keep_mask

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # one (BLOCK, head_dim) tile of q, k, v, dO and the accumulators must fit on chip


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str) -> None:
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        raise ValueError(f"attention: q, k, v must be {rank}-D {layout}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (self-attention only)")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _check_options(op: str, dropout_p: float, seed, softmax_scale) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"{op}: seed must be an int in [0, 2**63) or None, got {seed!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"{op}: softmax_scale must be a positive number or None, got {softmax_scale!r}")


def _check_triton_inputs(op: str, q: torch.Tensor) -> None:
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}: the Triton kernel takes float32, float16 or bfloat16, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: the Triton kernel takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")


# ----- the twin (oracle) and the CPU path (the same function through SDPA) -----------------------------------
def attention_reference(q, k, v, lengths=None, causal=False, softmax_scale=None, dropout_p=0.0,
                        dropout_mask=None, seed=None, compute_dtype=None):
    """Softmax attention on (B, H, S, D) in fp32 (fp64 for fp64 inputs: the test oracle). Query rows past
    a sequence's length still attend to that sequence's real keys (their outputs are ignored downstream);
    a length of 0 gives zeros. Keys and values may hold more positions than the queries (B, H, S_k, D), e.g.
    one query row per sequence (the encoder's first-token last layer); not with `causal`.

    Dropout, when dropout_p > 0: with `dropout_mask` (bool, broadcastable to (B, H, S, S_k), True = keep)
    that mask; else with `seed` a mask drawn from torch.Generator(seed); else F.dropout.

    `compute_dtype` (bf16 / fp16) computes the scores and probabilities in that dtype instead, autocast off
    inside: the CPU training path under autocast, whose matmuls run in it anyway. Softmax still accumulates in
    fp32 (ATen), so the forward is that of fp32 probabilities rounded for the second matmul; the backward
    reads the rounded probabilities. It saves autocast's casts of the (S, S) tensors (the `xlt-fp32-scores`
    ablation of bench.throughput measures the step with them)."""
    B, H, S, D = q.shape
    S_k = k.shape[2]
    if causal and S_k != S:
        raise ValueError(f"attention_reference: causal needs as many keys as queries, got {S_k} and {S}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if compute_dtype is None:
        return _attention(q, k, v, lengths, causal, scale, dropout_p, dropout_mask, seed,
                          torch.promote_types(q.dtype, torch.float32))
    with torch.autocast(q.device.type, enabled=False):
        return _attention(q, k, v, lengths, causal, scale, dropout_p, dropout_mask, seed, compute_dtype)


# Whether the twin fuses the scale and the key-padding / causal bias into the score matmul (one baddbmm); False
# is bench.throughput's `xlt-unfused-bias` ablation arm, which measures what the fusion saves a training step.
FUSED_BIAS = True


def _attention(q, k, v, lengths, causal, scale, dropout_p, dropout_mask, seed, ct):
    B, H, S, D = q.shape
    S_k = k.shape[2]
    v = v.to(ct)
    # Key padding and causality as an additive bias of 0 / -inf (B or 1, 1, S or 1, S_k), fused with the scale
    # into one baddbmm: one pass over the (S, S) scores instead of a matmul, a scale and a masked_fill (the
    # effect on training steps: bench.throughput's `xlt-unfused-bias` rows). Without a bias the scale goes on q.
    bias, empty = None, None
    if lengths is not None:
        lengths = lengths.to(q.device)[:, None, None, None]
        # a sequence with no key: its keys are not hidden (finite scores, no NaN in the backward) and its
        # output is defined as 0 (the probabilities zeroed; on CPU only where such a sequence exists)
        hidden = (torch.arange(S_k, device=q.device) >= lengths) & (lengths > 0)
        bias = torch.zeros(B, 1, 1, S_k, dtype=ct, device=q.device).masked_fill_(hidden, float("-inf"))
        if q.device.type != "cpu" or bool((lengths == 0).any()):
            empty = lengths == 0
    if causal:
        tri = torch.zeros(S, S, dtype=ct, device=q.device).masked_fill_(
            torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))[None, None]
        bias = tri if bias is None else bias + tri
    q3, k3 = q.to(ct).reshape(B * H, S, D), k.to(ct).reshape(B * H, S_k, D)
    if bias is None:
        scores = torch.bmm(q3 * scale, k3.transpose(1, 2))
    else:
        bias = bias.expand(B, H, bias.shape[2], S_k).reshape(B * H, bias.shape[2], S_k)
        if FUSED_BIAS:
            scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
        else:  # the ablation: a matmul, then the scale and the bias in passes of their own (as before 7caac96)
            scores = torch.bmm(q3, k3.transpose(1, 2)) * scale + bias
    probs = torch.softmax(scores.view(B, H, S, S_k), dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        # dropout's 1 / (1 - p) on v, not on the (S, S) probabilities: the same function, one pass fewer
        if dropout_mask is None and seed is not None:
            g = torch.Generator(device=q.device).manual_seed(seed)
            dropout_mask = torch.rand(probs.shape, generator=g, device=q.device) >= dropout_p
        if dropout_mask is not None:
            probs = probs * dropout_mask.to(q.device, ct)
            v = v / (1.0 - dropout_p)
        else:
            probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v).to(q.dtype)


# The CPU training path under autocast keeps attention's (S, S) tensors in the autocast dtype (compute_dtype
# above); False restores autocast's fp32 softmax (bench.throughput's `xlt-fp32-scores` ablation arm).
CPU_AUTOCAST_SCORES = True


def attention_torch(q, k, v, lengths=None, causal=False, softmax_scale=None, dropout_p=0.0, seed=None):
    """`attention_reference`'s function through F.scaled_dot_product_attention. A seeded dropout mask
    (reproducible from `seed`) and float64 (the oracle's precision) go to the twin itself. So does dropout on
    CPU: there SDPA with dropout falls back to its fp32 math path and draws the mask with `bernoulli_`; the
    twin computes the same (in fp32, or under autocast to q's dtype in that dtype: `compute_dtype`) with the mask from
    `kernels.dropout_mask.keep_mask` (the effect on training steps: the throughput rows in bench/README.md; the
    mask is checked in tests/kernels/test_twins.py)."""
    if (dropout_p > 0.0 and seed is not None) or q.dtype not in TRITON_DTYPES:
        return attention_reference(q, k, v, lengths, causal, softmax_scale, dropout_p, seed=seed)
    if dropout_p > 0.0 and q.device.type == "cpu":
        B, H, S = q.shape[:3]
        keep, keep_prob = keep_mask((B, H, S, k.shape[2]), dropout_p, q.device)
        # the mask's exact drop probability (dropout_p rounded to a multiple of 2^-16) scales the kept ones; under
        # autocast to q's dtype the (S, S) tensors stay in it (its matmuls would run in it anyway)
        low = (q.dtype if CPU_AUTOCAST_SCORES and torch.is_autocast_enabled("cpu")
               and torch.get_autocast_dtype("cpu") == q.dtype else None)
        return attention_reference(q, k, v, lengths, causal, softmax_scale, 1.0 - keep_prob, dropout_mask=keep,
                                   compute_dtype=low)
    S = q.shape[2]
    mask = None
    if lengths is not None:
        mask = (torch.arange(S, device=q.device)[None, :] < lengths[:, None].to(q.device))[:, None, None, :]
    if causal and mask is not None:
        mask = mask & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal and mask is None, scale=softmax_scale)
    if lengths is not None:  # a sequence with no key: zeros, whatever SDPA's backend gives
        out = out.masked_fill((lengths == 0).to(q.device)[:, None, None, None], 0.0)
    return out


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """(total, ...) packed rows -> (B, max_seqlen, ...) zero-padded; differentiable. `index`: padded_index's, when
    the caller pads several tensors of one layout (computed once)."""
    if index is None:
        index = padded_index(cu_seqlens, x.shape[0], max_seqlen)
    B = cu_seqlens.numel() - 1
    out = x.new_zeros((B * max_seqlen,) + tuple(x.shape[1:])).index_copy(0, index, x)
    return out.view((B, max_seqlen) + tuple(x.shape[1:]))


def unpad_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, ...) padded -> (total, ...) packed rows; inverse of `pad_packed` (with the same `index`)."""
    B, S = x.shape[:2]
    if index is None:
        index = padded_index(cu_seqlens, int(cu_seqlens[-1]), S)
    # index_select on the flattened rows: its backward is an index_add, not advanced indexing's accumulating
    # index_put
    return x.reshape((B * S,) + tuple(x.shape[2:])).index_select(0, index)


def padded_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """For each of the `total` packed rows: its row in the (B * max_seqlen) padded layout."""
    cu = cu_seqlens.long()
    rows = torch.arange(total, device=cu.device)
    batch = torch.searchsorted(cu[1:], rows, right=True)
    return rows + batch * max_seqlen - cu[batch]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) autotune may pick on a GPU, per kernel and padded head dim (<= 64,
# 128, 256): bf16 / fp16 dots without and with dropout. BLOCK_M is the query tile, BLOCK_N the key tile (dkdv:
# one program per key tile, looping over query tiles). Chosen from the compiles of bench/kernel_resources.py so
# that none spills registers on sm_80 or sm_90 at head dims 64, 80 and 128 (tests/kernels/test_gpu_build.py).
# What a thread holds grows with tile / warps: d=128 takes 8 warps or half tiles; the dK/dV program (k, v, dk,
# dv held across its loop) and dropout (the Philox rounds) hold the most.
_LOWP_TILES = {
    "fwd": {64: ([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)], None),
            128: ([(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)], None),
            256: ([(64, 64, 8, 2), (64, 32, 8, 2)], None)},
    "dkdv": {64: ([(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)],
                  [(32, 64, 4, 3), (64, 32, 4, 3)]),
             128: ([(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 4, 3)], [(32, 64, 8, 2), (64, 32, 4, 3)]),
             256: ([(64, 32, 8, 2)], None)},
    "dq": {64: ([(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)],
                [(128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)]),
           128: ([(64, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)], [(64, 64, 8, 2)]),
           256: ([(32, 64, 8, 2), (64, 32, 8, 2)], None)},
}
# fp32 runs true fp32 (IEEE) products on FMA units, which hold whole head-dim rows per thread: small tiles, 8 warps.
# It is the path that matches the fp32 twin (tests), not a fast one: one config, nothing to tune.
_FP32_TILES = {"fwd": {64: (32, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 32, 8, 2)},
               "dkdv": {64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)},
               "dq": {64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)}}


def tile_configs(kind: str, block_d: int, lowp: bool, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) that autotune may pick on a GPU for kernel `kind` ("fwd",
    "dkdv", "dq") at padded head dim `block_d` (a power of two <= MAX_HEAD_DIM), with bf16/fp16 dots
    (`lowp`) or fp32 ones, with or without dropout."""
    if kind not in _LOWP_TILES or block_d > MAX_HEAD_DIM:
        raise ValueError(f"tile_configs: kind must be one of {', '.join(_LOWP_TILES)} and block_d <= "
                         f"{MAX_HEAD_DIM}, got {kind!r}, {block_d}")
    bucket = 64 if block_d <= 64 else block_d
    if not lowp:
        return [_FP32_TILES[kind][bucket]]
    plain, with_dropout = _LOWP_TILES[kind][bucket]
    return list(with_dropout if dropout and with_dropout is not None else plain)


# ----- Triton kernels ----------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    from triton.runtime import driver
except ImportError:  # CPU-only installs without triton run the twins
    triton = None

LOG2E = 1.4426950408889634

if triton is not None:
    @triton.jit
    def _keep(seed, bh, rows, col0, N: tl.constexpr, p_drop):
        """Dropout keep mask (len(rows), N) for query positions `rows` x key positions col0..col0+N (col0 even)
        of sequence-head `bh`. One Philox call per two keys: counter (key // 2, query, batch*head, 0), its first
        output for the even key, its second for the odd one; unique per element, independent of layout and
        tiles. Half the Philox calls of one call per element; joining the
        pair added no shared memory and no spills in bench/kernel_resources.py's compiles (its speed on a GPU
        is not measured)."""
        g = col0 // 2 + tl.arange(0, N // 2)
        c0 = (g[None, :] + rows[:, None] * 0).to(tl.uint32)
        c1 = (rows[:, None] + g[None, :] * 0).to(tl.uint32)
        c2 = c0 * 0 + bh.to(tl.uint32)
        r0, r1, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
        even = tl.uint_to_uniform_float(r0) >= p_drop
        odd = tl.uint_to_uniform_float(r1) >= p_drop
        return tl.reshape(tl.join(even, odd), (rows.shape[0], N))

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        # fp32 inputs: true fp32 products (not TF32), to match the fp32 twin
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _load_tile(base, offs_t, stride_t, offs_d, stride_d, n_rows, HEAD_DIM: tl.constexpr, LOWP: tl.constexpr):
        """(len(offs_t), BLOCK_D) tile of rows < n_rows; fp32 unless the dot runs in the input dtype."""
        mask = (offs_t[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        return x if LOWP else x.to(tl.float32)

    @triton.jit
    def _load_tile_t(base, offs_t, stride_t, offs_d, stride_d, n_rows, HEAD_DIM: tl.constexpr, LOWP: tl.constexpr):
        """The transposed tile (BLOCK_D, len(offs_t))."""
        mask = (offs_t[None, :] < n_rows) & (offs_d[:, None] < HEAD_DIM)
        x = tl.load(base + offs_t[None, :] * stride_t + offs_d[:, None] * stride_d, mask=mask, other=0.0)
        return x if LOWP else x.to(tl.float32)

    @triton.jit
    def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                   lo, hi, k_len, qk_scale, seed, bh, p_drop,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   DROPOUT: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax over key tiles [lo, hi); MASK: mask keys >= k_len (and the causal triangle)."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = _load_tile_t(k_base, offs_n, stride_kt, offs_d, stride_kd, k_len, HEAD_DIM, LOWP)
            s = _mm(q, kt, IEEE) * qk_scale  # log2 units
            if MASK:
                visible = offs_n[None, :] < k_len
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None])
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:  # the normaliser uses every probability; the values see only the kept ones
                p = tl.where(_keep(seed, bh, offs_m, start_n, BLOCK_N, p_drop), p, 0.0)
            v = _load_tile(v_base, offs_n, stride_vt, offs_d, stride_vd, k_len, HEAD_DIM, LOWP)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["seed"])  # one compilation for every seed
    def _fwd_kernel(Q, K, V, OUT, LSE, START, QLEN, KLEN,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, slb, slh,
                    H, qk_scale, seed, p_drop, seq_bucket,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_len = tl.load(QLEN + b)
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        k_len = tl.load(KLEN + b)
        start = tl.load(START + b).to(tl.int64)
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_tile(Q + b64 * sqb + h64 * sqh + start * sqt, offs_m, sqt, offs_d, sqd, q_len, HEAD_DIM, LOWP)
        k_base = K + b64 * skb + h64 * skh + start * skt
        v_base = V + b64 * svb + h64 * svh + start * svt
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        # tiles every row of this block sees whole run unmasked; the rest (tail, diagonal) masked
        hi = tl.minimum(k_len, m0 + BLOCK_M) if CAUSAL else k_len
        full = (tl.minimum(k_len, m0) if CAUSAL else k_len) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, offs_m, offs_d, 0, full,
                                   k_len, qk_scale, seed, bh, p_drop, HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT,
                                   LOWP, IEEE)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, offs_m, offs_d, full, hi,
                                   k_len, qk_scale, seed, bh, p_drop, HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT,
                                   LOWP, IEEE)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - p_drop))
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        row_ok = offs_m < q_len
        tl.store(LSE + b64 * slb + h64 * slh + start + offs_m, lse, mask=row_ok)
        o_ptrs = OUT + b64 * sob + h64 * soh + (start + offs_m)[:, None] * sot + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))

    @triton.jit
    def _bwd_delta_kernel(OUT, DO, DELTA, START, QLEN, sob, soh, sot, sod, sdb, sdh, sdt, sdd, slb, slh, H,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta_i = sum_d dO_id * O_id (= rowsum(P * dP), with or without dropout)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_len = tl.load(QLEN + b)
        if pid_m * BLOCK_M >= q_len:
            return
        start = tl.load(START + b).to(tl.int64)
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_tile(OUT + b64 * sob + h64 * soh + start * sot, offs_m, sot, offs_d, sod, q_len, HEAD_DIM, False)
        do = _load_tile(DO + b64 * sdb + h64 * sdh + start * sdt, offs_m, sdt, offs_d, sdd, q_len, HEAD_DIM, False)
        tl.store(DELTA + b64 * slb + h64 * slh + start + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)

    @triton.jit
    def _dkdv_tiles(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd, sdt, sdd, n0, offs_n, offs_d, lo, hi,
                    q_len, qk_scale, seed, bh, p_drop,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                    DROPOUT: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
        """Accumulate dK, dV of one key tile over query tiles [lo, hi); MASK: the causal triangle.
        Query rows >= q_len load as zeros with lse = +inf, so they add nothing without a mask."""
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qt = _load_tile_t(q_base, offs_m, sqt, offs_d, sqd, q_len, HEAD_DIM, LOWP)
            lse = tl.load(l_base + offs_m, mask=offs_m < q_len, other=float("inf"))
            delta = tl.load(d_base + offs_m, mask=offs_m < q_len, other=0.0)
            pt = tl.exp2(_mm(k, qt, IEEE) * qk_scale - lse[None, :] * 1.4426950408889634)  # P^T (BLOCK_N, BLOCK_M)
            if MASK:
                pt = tl.where(offs_n[:, None] <= offs_m[None, :], pt, 0.0)
            do = _load_tile(do_base, offs_m, sdt, offs_d, sdd, q_len, HEAD_DIM, LOWP)
            dpt = _mm(v, tl.trans(do), IEEE)  # (dO V^T)^T
            if DROPOUT:
                keep = tl.trans(_keep(seed, bh, offs_m, n0, BLOCK_N, p_drop))  # (BLOCK_N, BLOCK_M)
                scale = 1.0 / (1.0 - p_drop)
                dv += _mm(tl.where(keep, pt * scale, 0.0).to(do.dtype), do, IEEE)
                dpt = tl.where(keep, dpt * scale, 0.0)
            else:
                dv += _mm(pt.to(do.dtype), do, IEEE)
            dst = pt * (dpt - delta[None, :])
            dk += _mm(dst.to(qt.dtype), tl.trans(qt), IEEE)
        return dk, dv

    @triton.jit(do_not_specialize=["seed"])  # one compilation for every seed
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, START, QLEN, KLEN,
                         sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd, slb, slh,
                         sgb, sgh, sgt, sgd, H, qk_scale, sm_scale, seed, p_drop, seq_bucket,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr,
                         IEEE: tl.constexpr):
        """One key tile: dV = sum_i P^T dO, dK = scale * sum_i dS^T Q. DK and DV have strides sg*."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        k_len = tl.load(KLEN + b)
        n0 = pid_n * BLOCK_N
        if n0 >= k_len:
            return
        q_len = tl.load(QLEN + b)
        start = tl.load(START + b).to(tl.int64)
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_tile(K + b64 * skb + h64 * skh + start * skt, offs_n, skt, offs_d, skd, k_len, HEAD_DIM, LOWP)
        v = _load_tile(V + b64 * svb + h64 * svh + start * svt, offs_n, svt, offs_d, svd, k_len, HEAD_DIM, LOWP)
        q_base = Q + b64 * sqb + h64 * sqh + start * sqt
        do_base = DO + b64 * sdb + h64 * sdh + start * sdt
        l_base = LSE + b64 * slb + h64 * slh + start
        d_base = DELTA + b64 * slb + h64 * slh + start
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = n0 // BLOCK_M * BLOCK_M if CAUSAL else 0  # earlier queries see none of these keys
        # causal: query tiles below the diagonal (start >= n0 + BLOCK_N) see every key of the tile
        mid = tl.minimum(q_len, tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M) if CAUSAL else lo
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd, sdt, sdd, n0, offs_n, offs_d,
                             lo, mid, q_len, qk_scale, seed, bh, p_drop, HEAD_DIM, BLOCK_M, BLOCK_N, True, DROPOUT,
                             LOWP, IEEE)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd, sdt, sdd, n0, offs_n, offs_d,
                             mid, q_len, q_len, qk_scale, seed, bh, p_drop, HEAD_DIM, BLOCK_M, BLOCK_N, False, DROPOUT,
                             LOWP, IEEE)
        mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
        rows = b64 * sgb + h64 * sgh + (start + offs_n)[:, None] * sgt + offs_d[None, :] * sgd
        tl.store(DK + rows, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd, offs_m, offs_d, lo, hi, k_len,
                  qk_scale, seed, bh, p_drop,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
                  LOWP: tl.constexpr, IEEE: tl.constexpr):
        """Accumulate dQ of one query tile over key tiles [lo, hi); MASK: the causal triangle.
        Keys >= k_len load as zeros, so their dS multiplies a zero row of K: no key mask needed."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = _load_tile_t(k_base, offs_n, skt, offs_d, skd, k_len, HEAD_DIM, LOWP)
            p = tl.exp2(_mm(q, kt, IEEE) * qk_scale - lse2[:, None])
            if MASK:
                p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
            vt = _load_tile_t(v_base, offs_n, svt, offs_d, svd, k_len, HEAD_DIM, LOWP)
            dp = _mm(do, vt, IEEE)
            if DROPOUT:
                keep = _keep(seed, bh, offs_m, start_n, BLOCK_N, p_drop)
                dp = tl.where(keep, dp * (1.0 / (1.0 - p_drop)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(kt.dtype), tl.trans(kt), IEEE)
        return dq

    @triton.jit(do_not_specialize=["seed"])  # one compilation for every seed
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, START, QLEN, KLEN,
                       sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd, slb, slh,
                       sgb, sgh, sgt, sgd, H, qk_scale, sm_scale, seed, p_drop, seq_bucket,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
        """One query tile: dQ = scale * sum_j dS K. DQ has strides sg*."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_len = tl.load(QLEN + b)
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        k_len = tl.load(KLEN + b)
        start = tl.load(START + b).to(tl.int64)
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_tile(Q + b64 * sqb + h64 * sqh + start * sqt, offs_m, sqt, offs_d, sqd, q_len, HEAD_DIM, LOWP)
        do = _load_tile(DO + b64 * sdb + h64 * sdh + start * sdt, offs_m, sdt, offs_d, sdd, q_len, HEAD_DIM, LOWP)
        rows_ok = offs_m < q_len
        lse2 = tl.load(LSE + b64 * slb + h64 * slh + start + offs_m, mask=rows_ok, other=float("inf"))
        lse2 = lse2 * 1.4426950408889634
        delta = tl.load(DELTA + b64 * slb + h64 * slh + start + offs_m, mask=rows_ok, other=0.0)
        k_base = K + b64 * skb + h64 * skh + start * skt
        v_base = V + b64 * svb + h64 * svh + start * svt
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum(k_len, m0 + BLOCK_M) if CAUSAL else k_len
        full = tl.minimum(k_len, m0) // BLOCK_N * BLOCK_N if CAUSAL else hi
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd, offs_m, offs_d, 0, full, k_len,
                       qk_scale, seed, bh, p_drop, HEAD_DIM, BLOCK_N, False, DROPOUT, LOWP, IEEE)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd, offs_m, offs_d, full, hi, k_len,
                       qk_scale, seed, bh, p_drop, HEAD_DIM, BLOCK_N, True, DROPOUT, LOWP, IEEE)
        ptrs = DQ + b64 * sgb + h64 * sgh + (start + offs_m)[:, None] * sgt + offs_d[None, :] * sgd
        tl.store(ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM))

    @triton.jit
    def _dropout_mask_kernel(OUT, seed, p_drop, S, BLOCK: tl.constexpr):
        """OUT (BH, S, S) int8: the keep mask the attention kernels draw (tests only)."""
        bh = tl.program_id(2)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = _keep(seed, bh, rows, tl.program_id(1) * BLOCK, BLOCK, p_drop)
        ptrs = OUT + bh.to(tl.int64) * S * S + rows[:, None] * S + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < S) & (cols[None, :] < S))

    def _tile_configs(kind: str):
        """One config in the interpreter (autotune needs a GPU); on a GPU every shape of `tile_configs(kind,
        ...)`, of which `_prune(kind)` keeps those for the launch's head dim, dtype and dropout."""
        if dispatch.interpreting():
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
        shapes = dict.fromkeys(t for bd in (64, 128, 256) for lowp in (False, True) for drop in (False, True)
                               for t in tile_configs(kind, bd, lowp, drop))
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    def _prune(kind: str):
        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
            return [by_shape[t] for t in tile_configs(kind, args["BLOCK_D"], args["LOWP"], args["DROPOUT"])]
        return prune

    def _autotuned(kind: str, kernel):
        prune = None if dispatch.interpreting() else {"early_config_prune": _prune(kind)}
        return triton.autotune(_tile_configs(kind), key=_KEY, prune_configs_by=prune)(kernel)

    _KEY = ["HEAD_DIM", "seq_bucket", "CAUSAL", "DROPOUT", "LOWP"]
    _fwd = _autotuned("fwd", _fwd_kernel)
    _bwd_dkdv = _autotuned("dkdv", _bwd_dkdv_kernel)
    _bwd_dq = _autotuned("dq", _bwd_dq_kernel)


# ----- host functions and autograd ---------------------------------------------------------------------------
class Launch(NamedTuple):
    """One launch of an autotuned kernel: `kernel[grid](*args, **kwargs)`."""
    kernel: object
    grid: object
    args: tuple
    kwargs: dict


# Whether `_launch` compiles a new autotune key's configs at once (off: autotune compiles them one by one, as
# it times them; bench/compile_at_once.py measures both).
COMPILE_AT_ONCE = True
# (kernel, autotune key, device) whose configs `_launch` compiled at once; each autotuner keeps its own choices.
_COMPILED_AT_ONCE: set = set()


def _tune_key(launch: Launch) -> tuple:
    """What the autotuner keys its choice on (its `key` arguments and every tensor argument's dtype), and the
    device: Triton compiles per device."""
    kernel = launch.kernel
    named = dict(zip(kernel.arg_names, launch.args)) | launch.kwargs
    return (kernel.base_fn.__name__, *(named[k] for k in kernel.keys if k in named),
            *(str(a.dtype) for a in launch.args if hasattr(a, "dtype")), driver.active.get_current_device())


def _compile_at_once(launches: list[Launch]) -> None:
    """Compile every config the autotuners of `launches` may benchmark, all at once in threads, into Triton's
    kernel caches: left to itself an autotuner compiles its configs one by one as it times them (medians of 2 to
    5 s a bf16 attention config on a CPU core, `compile_s` in bench/results/kernel_resources.jsonl; 14 configs
    a key at head dim 64). Triton compiles with the GIL released, so the threads run in parallel
    (tests/kernels/test_compile_at_once.py; bench/compile_at_once.py times both ways). Best effort: on a
    failure here, autotune compiles as before."""
    async_mode = getattr(triton, "AsyncCompileMode", None)  # triton >= 3.4
    if async_mode is None:
        return
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="xlt-compile") as pool, \
                async_mode(pool, ignore_errors=True):  # a config that fails to build is autotune's to skip
            for launch in launches:
                launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    except Exception as e:  # e.g. another AsyncCompileMode is active, or a Triton whose warm-up differs
        warnings.warn(f"kernels.attention: configs not compiled at once ({type(e).__name__}: {e}); autotune "
                      "compiles them one by one", stacklevel=3)


def _launch(*launches: Launch) -> None:
    """Launch each of `launches` in order; on a GPU, an autotune key not met before first has its configs, of
    all `launches` together, compiled at once (`_compile_at_once`)."""
    if COMPILE_AT_ONCE and not dispatch.interpreting():
        new = {key: launch for launch in launches if (key := _tune_key(launch)) not in _COMPILED_AT_ONCE}
        if new:
            _compile_at_once(list(new.values()))
            _COMPILED_AT_ONCE.update(new)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


class Seqs(NamedTuple):
    """Where each sequence lives: rows start..start+q_len of query (q_len >= k_len: padded query rows),
    keys start..start+k_len; int32 tensors of shape (B,) on the inputs' device."""
    start: torch.Tensor
    q_len: torch.Tensor
    k_len: torch.Tensor
    max_q: int
    max_k: int
    packed: bool  # (total, H, D) tensors; else (B, H, S, D)


def padded_seqs(lengths: torch.Tensor | None, B: int, S: int, device) -> Seqs:
    k_len = (torch.full((B,), S, dtype=torch.int32, device=device) if lengths is None
             else lengths.to(device=device, dtype=torch.int32).clamp(0, S))
    full = torch.full((B,), S, dtype=torch.int32, device=device)
    return Seqs(torch.zeros(B, dtype=torch.int32, device=device), full, k_len, S, S, False)


def packed_seqs(cu_seqlens: torch.Tensor, max_seqlen: int, device) -> Seqs:
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    lens = cu[1:] - cu[:-1]
    return Seqs(cu[:-1].contiguous(), lens, lens, max_seqlen, max_seqlen, True)


def _strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides; packed tensors address sequences by start row, not batch."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if packed else tuple(t.stride())


def _row_stats(q: torch.Tensor, seqs: Seqs) -> tuple[torch.Tensor, tuple[int, int]]:
    """An fp32 buffer for one value per (sequence, head, query row), and its (batch, head) strides."""
    if seqs.packed:
        T, H = q.shape[0], q.shape[1]
        return torch.empty(H, T, dtype=torch.float32, device=q.device), (0, T)
    B, H, S = q.shape[:3]
    return torch.empty(B, H, S, dtype=torch.float32, device=q.device), (H * S, S)


def _flags(q: torch.Tensor, causal: bool, dropout_p: float) -> dict:
    lowp = q.dtype != torch.float32 and not dispatch.interpreting()  # bf16/fp16 dots are GPU-only
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal, DROPOUT=dropout_p > 0.0,
                LOWP=lowp, IEEE=not lowp)


def attention_forward(q, k, v, seqs: Seqs, causal: bool, softmax_scale: float, dropout_p: float, seed: int):
    """(out, lse): out like q; lse fp32, (H, total) packed or (B, H, S) padded, natural log."""
    H = q.shape[1]  # (B, H, S, D) and (total, H, D) alike
    B = seqs.start.shape[0]
    out = torch.empty_like(q)
    lse, (slb, slh) = _row_stats(q, seqs)
    if q.numel() == 0 or B == 0:
        return out, lse.fill_(float("inf"))
    bucket = triton.next_power_of_2(max(seqs.max_q, 1))
    grid = lambda meta: (triton.cdiv(seqs.max_q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(Launch(_fwd, grid, (q, k, v, out, lse, seqs.start, seqs.q_len, seqs.k_len,
                                *_strides(q, seqs.packed), *_strides(k, seqs.packed), *_strides(v, seqs.packed),
                                *_strides(out, seqs.packed), slb, slh, H, softmax_scale * LOG2E, seed, dropout_p,
                                bucket), _flags(q, causal, dropout_p)))
    return out, lse


def attention_backward(do, q, k, v, out, lse, seqs: Seqs, causal: bool, softmax_scale: float, dropout_p: float,
                       seed: int):
    """(dq, dk, dv), contiguous, dtypes of q, k, v; keys past a padded sequence's length get zeros."""
    H = q.shape[1]  # (B, H, S, D) and (total, H, D) alike
    B = seqs.start.shape[0]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    new = torch.empty if seqs.packed else torch.zeros  # the kernel writes only real keys of padded rows
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or B == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta, (slb, slh) = _row_stats(q, seqs)
    flags = _flags(q, causal, dropout_p)
    _bwd_delta_kernel[(triton.cdiv(seqs.max_q, 64), B * H)](
        out, do, delta, seqs.start, seqs.q_len, *_strides(out, seqs.packed), *_strides(do, seqs.packed), slb, slh,
        H, HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], BLOCK_M=64)
    bucket = triton.next_power_of_2(max(seqs.max_q, 1))
    inputs = (*_strides(q, seqs.packed), *_strides(k, seqs.packed), *_strides(v, seqs.packed),
              *_strides(do, seqs.packed), slb, slh)
    scalars = (H, softmax_scale * LOG2E, softmax_scale, seed, dropout_p, bucket)
    kv_grid = lambda meta: (triton.cdiv(seqs.max_k, meta["BLOCK_N"]), B * H)  # noqa: E731
    q_grid = lambda meta: (triton.cdiv(seqs.max_q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(Launch(_bwd_dkdv, kv_grid, (q, k, v, do, dk, dv, lse, delta, seqs.start, seqs.q_len, seqs.k_len,
                                        *inputs, *_strides(dk, seqs.packed), *scalars), flags),
            Launch(_bwd_dq, q_grid, (q, k, v, do, dq, lse, delta, seqs.start, seqs.q_len, seqs.k_len, *inputs,
                                     *_strides(dq, seqs.packed), *scalars), flags))
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Both layouts: `seqs` says which. Saves q, k, v, out and the log-sum-exp; the dropout mask is
    regenerated from the seed in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, seqs, causal, softmax_scale, dropout_p, seed):
        out, lse = attention_forward(q, k, v, seqs, causal, softmax_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (seqs, causal, softmax_scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _new_seed(dropout_p: float, seed: int | None) -> int:
    """A dropout seed from torch's default CPU generator (so torch.manual_seed reproduces it); no host sync."""
    if dropout_p == 0.0:
        return 0
    return seed if seed is not None else int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _attention_triton(q, k, v, *, lengths=None, causal=False, softmax_scale=None, dropout_p=0.0, seed=None):
    _check_triton_inputs("attention", q)
    B, H, S, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    seqs = padded_seqs(lengths, B, S, q.device)
    return AttentionFunction.apply(q, k, v, seqs, causal, float(scale), float(dropout_p), _new_seed(dropout_p, seed))


def _attention_varlen_triton(q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, dropout_p=0.0,
                             seed=None):
    _check_triton_inputs("attention_varlen", q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seqs = packed_seqs(cu_seqlens, max_seqlen, q.device)
    return AttentionFunction.apply(q, k, v, seqs, causal, float(scale), float(dropout_p), _new_seed(dropout_p, seed))


def dropout_mask(seed: int, batch: int, heads: int, seq_len: int, dropout_p: float, device="cpu") -> torch.Tensor:
    """The keep mask (batch, heads, seq_len, seq_len), bool, that the Triton kernels draw for `seed`; for a
    packed sequence b of length n it is [b, :, :n, :n]. Materialises S x S: for tests and small shapes."""
    if triton is None:
        raise RuntimeError("dropout_mask needs triton")
    out = torch.empty(batch, heads, seq_len, seq_len, dtype=torch.int8, device=device)
    if out.numel():
        block = 64
        grid = (triton.cdiv(seq_len, block), triton.cdiv(seq_len, block), batch * heads)
        _dropout_mask_kernel[grid](out, seed, float(dropout_p), seq_len, BLOCK=block)
    return out.bool()


if triton is not None:
    dispatch.register_triton("attention", _attention_triton)
    dispatch.register_triton("attention_varlen", _attention_varlen_triton)


# ----- public entries ----------------------------------------------------------------------------------------
def attention(q, k, v, *, lengths=None, causal=False, softmax_scale=None, dropout_p=0.0, seed=None, backend="auto"):
    """Scaled dot-product self-attention on (B, H, S, D).

    lengths: optional int tensor (B,), the number of real (left-aligned) tokens per sequence; keys past
    it are masked, query rows past it attend to the real keys (ignore them), keys past it get zero
    gradient. softmax_scale: default 1/sqrt(D). dropout_p: attention dropout, applied only when > 0
    (pass 0.0 in eval mode); seed: its Philox seed (default: drawn from torch's default generator, so
    torch.manual_seed reproduces it). The Triton kernel takes fp32/fp16/bf16 and head_dim <= 256.
    """
    _check_qkv(q, k, v, 4, "(batch, heads, seq, head_dim)")
    _check_options("attention", dropout_p, seed, softmax_scale)
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != q.shape[0]:
            raise ValueError(f"attention: lengths must have shape ({q.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"attention: lengths must be an integer tensor, got {lengths.dtype}")
        if not lengths.is_cuda and lengths.numel() and not 0 <= int(lengths.min()) <= int(lengths.max()) <= q.shape[2]:
            raise ValueError(f"attention: lengths must be in [0, {q.shape[2]}] (the seq dimension), got "
                             f"{lengths.tolist()}")
    if dispatch.resolve("attention", backend, q.device) == "triton":
        return dispatch.triton_impl("attention")(q, k, v, lengths=lengths, causal=causal,
                                                 softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed)
    return attention_torch(q, k, v, lengths, causal, softmax_scale, dropout_p, seed=seed)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen, total: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"attention_varlen: cu_seqlens must be (B+1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention_varlen: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be an int >= 0, got {max_seqlen!r}")
    if not dispatch.host_checks(cu_seqlens):
        return
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != total) | (lens < 0).any() | (lens > max_seqlen).any()
    if bool(bad):  # one host sync for all the checks
        raise ValueError(f"attention_varlen: cu_seqlens must start at 0, never decrease, end at total_tokens="
                         f"{total}, with no sequence longer than max_seqlen={max_seqlen}; got "
                         f"{cu_seqlens.tolist()}")


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, dropout_p=0.0,
                     seed=None, backend="auto"):
    """Attention on packed variable-length sequences: q/k/v (total_tokens, H, D); sequence b occupies
    rows cu_seqlens[b]:cu_seqlens[b+1] (cu_seqlens int32/int64 of shape (B+1,), starting at 0) and
    max_seqlen >= every length. Other options as `attention`."""
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    _check_options("attention_varlen", dropout_p, seed, softmax_scale)
    _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    if dispatch.resolve("attention_varlen", backend, q.device) == "triton":
        return dispatch.triton_impl("attention_varlen")(q, k, v, cu_seqlens, max_seqlen, causal=causal,
                                                        softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    batch = lengths.numel()
    # every sequence full length (MLM pretraining): a view, no copies. Not for one sequence: there the views
    # and their gradients stay non-contiguous (B = 1 merges into the heads without a copy), and the encoder's
    # torch.cat of its groups' outputs (its split's backward: of their gradients) then takes a strided copy
    # (tests/kernels/test_twins.py::test_varlen_one_full_length_sequence_gives_contiguous_outputs_and_gradients)
    if q.shape[0] == batch * max_seqlen and batch > 1:
        qp, kp, vp = (t.view(batch, max_seqlen, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = attention_torch(qp, kp, vp, None, causal, softmax_scale, dropout_p, seed=seed)
        return out.transpose(1, 2).reshape(q.shape)
    index = padded_index(cu_seqlens, q.shape[0], max_seqlen)  # once for q, k, v and the output
    qp, kp, vp = (pad_packed(t, cu_seqlens, max_seqlen, index).transpose(1, 2) for t in (q, k, v))
    out = attention_torch(qp, kp, vp, lengths, causal, softmax_scale, dropout_p, seed=seed)
    return unpad_padded(out.transpose(1, 2), cu_seqlens, index)
