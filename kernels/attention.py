"""Attention for encoders: bidirectional by default, key padding given as per-sequence lengths.

Two layouts, as PyTorch SDPA and flash-attn's varlen API use them:
- padded  `attention(q, k, v, lengths=...)`, q/k/v of shape (B, H, S, D), sequences right-padded;
- packed  `attention_varlen(q, k, v, cu_seqlens, max_seqlen)`, q/k/v of shape (total_tokens, H, D).

`attention_reference` is the PyTorch twin: the test oracle and the CPU path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dispatch


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str) -> None:
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        raise ValueError(f"attention: q, k, v must be {rank}-D {layout}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (self-attention only)")


def attention_reference(q, k, v, lengths=None, causal=False, softmax_scale=None, dropout_p=0.0):
    """Softmax attention in fp32 on (B, H, S, D). Query rows past a sequence's length still attend to
    that sequence's real keys (their outputs are ignored downstream); a length of 0 gives zeros."""
    B, H, S, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    keep = None
    if lengths is not None:
        key_pos = torch.arange(S, device=q.device)
        keep = (key_pos[None, :] < lengths[:, None].to(q.device))[:, None, None, :]  # (B,1,1,S)
    if causal:
        tri = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[None, None]
        keep = tri if keep is None else keep & tri
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:  # rows with no visible key are all -inf -> NaN; define them as 0
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention(q, k, v, *, lengths=None, causal=False, softmax_scale=None, dropout_p=0.0, backend="auto"):
    """Scaled dot-product self-attention on (B, H, S, D).

    lengths: optional int tensor (B,), the number of real (left-aligned) tokens per sequence; keys past
    it are masked. dropout_p: attention dropout, applied only when > 0 (pass 0.0 in eval mode).
    """
    _check_qkv(q, k, v, 4, "(batch, heads, seq, head_dim)")
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != q.shape[0]):
        raise ValueError(f"attention: lengths must have shape ({q.shape[0]},), got {tuple(lengths.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if dispatch.resolve("attention", backend, q.device) == "triton":
        return dispatch.triton_impl("attention")(q, k, v, lengths=lengths, causal=causal,
                                                 softmax_scale=softmax_scale, dropout_p=dropout_p)
    return attention_reference(q, k, v, lengths, causal, softmax_scale, dropout_p)


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """(total, ...) packed rows -> (B, max_seqlen, ...) zero-padded."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out = x.new_zeros((len(lengths), max_seqlen) + tuple(x.shape[1:]))
    for b, (start, n) in enumerate(zip(cu_seqlens[:-1].tolist(), lengths)):
        out[b, :n] = x[start:start + n]
    return out


def unpad_padded(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) padded -> (total, ...) packed rows; inverse of `pad_packed`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)], dim=0)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, dropout_p=0.0,
                     backend="auto"):
    """Attention on packed variable-length sequences: q/k/v (total_tokens, H, D); sequence b occupies
    rows cu_seqlens[b]:cu_seqlens[b+1] (cu_seqlens int32/int64 of shape (B+1,), starting at 0)."""
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"attention_varlen: cu_seqlens must be (B+1,) ending at total_tokens={q.shape[0]}")
    if dispatch.resolve("attention_varlen", backend, q.device) == "triton":
        return dispatch.triton_impl("attention_varlen")(q, k, v, cu_seqlens, max_seqlen, causal=causal,
                                                        softmax_scale=softmax_scale, dropout_p=dropout_p)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    qp, kp, vp = (pad_packed(t, cu_seqlens, max_seqlen).transpose(1, 2) for t in (q, k, v))
    out = attention_reference(qp, kp, vp, lengths, causal, softmax_scale, dropout_p)
    return unpad_padded(out.transpose(1, 2), cu_seqlens)
