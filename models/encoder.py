"""The XLT encoder: BERT / XLM-R compatible, single-device, calling only `kernels` for attention.

Post-layer-norm blocks (BERT, XLM-R base/large) or pre-layer-norm blocks with a final norm (XLM-R XL/XXL).
Self-attention goes through `kernels` only; the last layer's first-token query of `first_token_only` (below),
a single query row per sequence, goes to the attention twin (`kernels.attention_reference`).
Inputs are right-padded batches. The encoder unpads once, before the embeddings, and runs every layer on the
packed real tokens (total_tokens, hidden) with variable-length attention (`kernels.attention_varlen`), so
padding costs no FLOPs in the linear layers, norms and FFNs; outputs are re-padded at the end (padding
positions hold zeros). On CPU in bf16 the packed rows are followed by up to 63 pad rows (`Packing.pad_rows`:
a GEMM row count that changes every step is slow there), which no real row's value or gradient depends on.

Where attention runs on the PyTorch path (CPU, backend "torch"), that path re-pads each call's sequences to
the call's longest one; so the packed layout holds the sequences sorted by decreasing length, and each layer
calls attention once per group of similar lengths (`length_groups`: a cost model of that path), instead of
once over the whole batch padded to its longest sequence. The Triton kernels take the packed layout as it
is, in one call. A batch without padding is packed as a view, without copies.

`first_token_only=True` (TaskModel does it for heads that read only the first token: sequence-pair
classification, multiple choice, the dual encoder's pooler / CLS pooling) returns only the first token's last
hidden state: the last layer then computes its keys and values for every token, but its queries, attention
output, FFN and norms only for the first token of each sequence, the only rows the loss depends on. A
Mixture-of-Experts last layer routes every token (its router losses average over all of them), so it computes
attention for every token, and only its experts and output norm for the first tokens. The values are the same
as the full computation's (up to floating-point rounding); dropout draws fewer random numbers, so a seeded
run's dropout masks differ from a full computation's.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn

import kernels
from kernels.attention import pad_packed, padded_index

from .config import EncoderConfig, upcycled_config
from .dropout import Dropout
from .ffn import FeedForward
from .moe import MoEFeedForward

__all__ = ["Encoder", "FeedForward", "Layer", "MoEFeedForward", "Packing", "Pooler", "length_groups",
           "lengths_from_mask", "make_ffn"]

# The fixed cost of one call of the PyTorch attention path in units of attention-score elements (sequences x
# longest length^2 x heads), chosen with bench.group_cost: of the call costs 4k-262k its policy rows compared on
# XNLI-like and QA-like batches (fp32, xlt-tiny and xlt-small, seeds 0 and 1), 49152 was the best or within 0.03 of
# it in each, and 2-8% faster than the former 16384 (on held-out seed 2: 2-6%); relative least squares of single
# calls put it at 43k-87k (bench/README.md, "The length groups' call cost").
GROUP_CALL_COST = 49152

# Whether the layers run on the packed tokens padded to the GEMM row bucket (Packing.pad_rows); False is
# bench.throughput's `xlt-unpadded-rows` ablation.
PAD_ROWS = True

# Whether the attention of the length groups takes its q / k / v as pieces of one split (True) or as slices;
# False is bench.throughput's `xlt-sliced-groups` ablation arm.
SPLIT_GROUPS = True


def lengths_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask of right-padded sequences -> (B,) lengths; other layouts are rejected."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected):
        raise ValueError("attention_mask must describe right-padded sequences (ones, then zeros); "
                         "tokenize with padding_side='right'")
    return lengths


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.embedding_layer_norm else None
        self.dropout = Dropout(cfg.hidden_dropout)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.position_style == "roberta":  # as HF: real tokens count from pad+1, pads get pad
            real = (input_ids != self.cfg.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.cfg.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids, token_type_ids=None, seqs: "Packing | None" = None):
        """(B, S, H) embeddings; with `seqs`, only the real tokens' rows, packed (total_tokens, H)."""
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                             f"{self.cfg.max_seq_len} (max_position_embeddings)")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        ids, positions, types = input_ids, self.position_ids(input_ids), token_type_ids
        if seqs is not None:
            ids, positions, types = (seqs.pack_ids(t) for t in (ids, positions, types))
        x = self.word(ids) + self.position(positions) + self.token_type(types)
        return self.dropout(self.norm(x) if self.norm is not None else x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x, seqs: "Packing", first_only: bool = False):
        """x: (total_tokens, hidden) packed rows of the sequences described by `seqs`. With first_only, the
        output rows of each sequence's first token only (B, hidden), in packed order."""
        heads, d = self.cfg.num_heads, self.cfg.head_dim
        p = self.cfg.attention_dropout if self.training else 0.0
        if first_only:
            return self.o(self._first_query(x, seqs, p).reshape(-1, heads * d))
        q, k, v = (seqs.real_rows(proj(x)).view(-1, heads, d) for proj in (self.q, self.k, self.v))
        if seqs.groups:  # the PyTorch path: one call per group of similar lengths
            # split, not slices: a slice's backward writes its gradient into a zeroed copy of the whole tensor
            if SPLIT_GROUPS:
                pieces = zip(*(t.split(seqs.group_sizes) for t in (q, k, v)))
            else:  # bench.throughput's `xlt-sliced-groups` ablation arm
                pieces = ((q[a:b], k[a:b], v[a:b]) for a, b, _, _ in seqs.groups)
            out = torch.cat([kernels.attention_varlen(qg, kg, vg, cu, n, dropout_p=p, backend=self.cfg.kernel_backend)
                             for (qg, kg, vg), (_, _, cu, n) in zip(pieces, seqs.groups)])
        else:
            out = kernels.attention_varlen(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, dropout_p=p,
                                           backend=self.cfg.kernel_backend)
        return self.o(seqs.pad_rows(out.reshape(-1, heads * d)))

    def _first_query(self, x, seqs: "Packing", p: float):
        """Attention of each sequence's first token over all of its keys: (B, heads, 1, head_dim). One query
        row against many keys is not the self-attention that the kernels implement (q, k, v of one shape), and
        it is a sliver of the layer's work (B x heads x longest x head_dim): the twin computes it
        (kernels.attention_reference, fp32, no fused kernel whose backward could be non-deterministic on a GPU).
        Keys and values are re-padded to the longest sequence, in packed order."""
        heads, d = self.cfg.num_heads, self.cfg.head_dim
        B, longest = seqs.batch, max(seqs.lengths)
        q = self.q(x[seqs.first_rows]).view(B, 1, heads, d).transpose(1, 2)
        if seqs.index is None:  # no padding: a view
            k, v = (seqs.real_rows(proj(x)).view(B, longest, heads, d).transpose(1, 2) for proj in (self.k, self.v))
            lengths = None
        else:
            index = padded_index(seqs.cu_seqlens, seqs.tokens, longest)
            k, v = (pad_packed(seqs.real_rows(proj(x)).view(-1, heads, d), seqs.cu_seqlens, longest, index)
                    .transpose(1, 2) for proj in (self.k, self.v))
            lengths = seqs.cu_seqlens[1:] - seqs.cu_seqlens[:-1]
        return kernels.attention_reference(q, k, v, lengths, dropout_p=p)


def make_ffn(cfg: EncoderConfig, index: int) -> nn.Module:
    """Layer `index`'s FFN: dense, or a Mixture-of-Experts where the config makes that layer sparse."""
    if not cfg.is_sparse(index):
        return FeedForward(cfg.hidden_size, cfg.intermediate_size)
    return MoEFeedForward(cfg.hidden_size, cfg.expert_size, cfg.num_experts, cfg.moe_top_k,
                          router_mode=cfg.moe_router, shared_expert=cfg.moe_shared_expert,
                          capacity_factor=cfg.moe_capacity_factor or None, kernel_backend=cfg.kernel_backend)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig, index: int = 0):
        super().__init__()
        self.pre_norm = cfg.pre_layer_norm
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = make_ffn(cfg, index)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, x, seqs: "Packing", first_only: bool = False):
        """x: (seqs.rows, hidden), the packed real tokens and their pad rows (Packing.pad_rows). With first_only
        the output holds only each sequence's first token (B, hidden), in packed order."""
        moe = isinstance(self.ffn, MoEFeedForward)
        if first_only and moe:  # its router sees every token: full attention
            first = seqs.first_rows
            if self.pre_norm:
                x = x + self.dropout(self.attn(self.attn_norm(x), seqs))
                return x[first] + self.dropout(self.ffn.forward_rows(self.ffn_norm(seqs.real_rows(x)), first))
            x = self.attn_norm(x + self.dropout(self.attn(x, seqs)))
            return self.ffn_norm(x[first] + self.dropout(self.ffn.forward_rows(seqs.real_rows(x), first)))
        # first_only: the B first rows, no pad rows; an MoE routes the real tokens only (pad rows would enter
        # its statistics and auxiliary losses)
        ffn = self.ffn if first_only or not moe else (lambda h: seqs.pad_rows(self.ffn(seqs.real_rows(h))))
        if self.pre_norm:
            h = self.attn_norm(x)
            x = (x[seqs.first_rows] if first_only else x) + self.dropout(self.attn(h, seqs, first_only))
            return x + self.dropout(ffn(self.ffn_norm(x)))
        x = self.attn_norm((x[seqs.first_rows] if first_only else x) + self.dropout(self.attn(x, seqs, first_only)))
        return self.ffn_norm(x + self.dropout(ffn(x)))


def length_groups(lengths: list[int], heads: int, call_cost: int | None = None) -> list[tuple[int, int]]:
    """Contiguous groups [start, end) of sequences sorted by decreasing length that minimise the cost of the
    PyTorch attention path: per group, call_cost (default GROUP_CALL_COST) + size * longest^2 * heads. Dynamic
    programming over the runs of equal lengths (at most one run per distinct length)."""
    call_cost = GROUP_CALL_COST if call_cost is None else call_cost
    runs: list[list[int]] = []  # [length, count], lengths decreasing
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    best, cut = [0.0] + [math.inf] * len(runs), [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):  # the last group ends after run j - 1
        count = 0
        for i in range(j, 0, -1):  # ... and starts at run i - 1, its longest
            count += runs[i - 1][1]
            group = count * runs[i - 1][0] ** 2 * heads
            if group >= best[j]:  # only grows with earlier starts
                break
            if best[i - 1] + call_cost + group < best[j]:
                best[j], cut[j] = best[i - 1] + call_cost + group, i - 1
    starts, j = [], len(runs)
    while j > 0:
        starts.append(cut[j])
        j = cut[j]
    firsts = [0]
    for n, c in runs:
        firsts.append(firsts[-1] + c)
    bounds = [firsts[r] for r in reversed(starts)] + [len(lengths)]
    return list(zip(bounds[:-1], bounds[1:]))


class Packing(NamedTuple):
    """Where the real tokens of a right-padded (B, S) batch sit in the packed layout: `index`, their flat
    indices into B*S (None: no padding, every position in order); `order`, the batch row of each packed
    sequence (None: batch order); the flash-attn-style cu_seqlens (B+1,) and max_seqlen; the host copy of the
    lengths in packed order; `groups`, the (first row, end row, cu_seqlens, longest) of each attention call on
    the PyTorch path (empty: one call over all); and `pad`, the zero rows that follow the packed tokens in the
    layers (`pad_rows`: 0, or up to the GEMM row bucket on CPU in bf16)."""
    index: torch.Tensor | None
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    lengths: tuple[int, ...]
    order: torch.Tensor | None = None
    groups: tuple = ()
    pad: int = 0

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, seq_len: int, group_heads: int | None = None,
                     row_multiple: int = 1) -> "Packing":
        """With group_heads (the attention path re-pads: heads of the layers), sequences are sorted by
        decreasing length and grouped for attention (length_groups). With row_multiple > 1 the layers run on
        the real tokens' rows followed by pad rows up to a multiple of it (`pad_rows`)."""
        device = lengths.device
        lengths = lengths.to(torch.int32)
        host = [int(n) for n in lengths.tolist()]  # one host sync, as the packing index needs anyway
        B, pad = len(host), -sum(host) % row_multiple
        if all(n == seq_len for n in host):
            cu = torch.arange(B + 1, dtype=torch.int32, device=device) * seq_len
            return cls(None, cu, seq_len, B, tuple(host), pad=pad)
        order = None
        if group_heads:
            perm = sorted(range(B), key=lambda b: -host[b])  # stable: equal lengths keep their batch order
            if perm != list(range(B)):
                order = torch.tensor(perm, device=device)
                lengths, host = lengths[order], [host[b] for b in perm]
        real = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
        rows, positions = real.nonzero(as_tuple=True)
        index = (rows if order is None else order[rows]) * seq_len + positions
        cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        groups = ()
        if group_heads:
            bounds = length_groups(host, group_heads)
            if len(bounds) > 1:
                offsets = [0]
                for n in host:
                    offsets.append(offsets[-1] + n)
                groups = tuple((offsets[a], offsets[b], cu[a:b + 1] - offsets[a], host[a]) for a, b in bounds)
        return cls(index, cu, seq_len, B, tuple(host), order, groups, pad)

    @property
    def tokens(self) -> int:
        """The real tokens: the packed rows."""
        return sum(self.lengths)

    @property
    def group_sizes(self) -> list[int]:
        """The packed rows of each attention group (`groups`), for a split of the packed tokens."""
        return [b - a for a, b, _, _ in self.groups]

    @property
    def rows(self) -> int:
        """The rows the layers run on: the real tokens, then `pad` zero rows."""
        return self.tokens + self.pad

    def pad_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (rows, ...): zero rows appended. On CPU in bf16 a GEMM of a row count not seen before
        builds a new oneDNN primitive (kernels.dispatch.CPU_ROW_BUCKET), and the packed token count changes
        every step: the layers run on a row count rounded up to the bucket instead (bench.throughput's
        `xlt-unpadded-rows` ablation measures the step without). Every op but attention is row-wise, and
        attention, the MoE router and the outputs read the real rows only (`real_rows`): pad rows change no real
        row's value and, as nothing reads their outputs, add nothing to any gradient."""
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, self.pad)) if self.pad else x

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> the real tokens' (tokens, ...) rows: a view."""
        return x[:self.tokens] if self.pad else x

    @property
    def first_rows(self) -> torch.Tensor:
        """The packed row of each sequence's first token, in packed order."""
        return self.cu_seqlens[:-1].long()

    def pack_ids(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (total_tokens,) values of the real tokens."""
        return t.reshape(-1) if self.index is None else t.reshape(-1)[self.index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        x = self.real_rows(x)
        if self.index is None:
            return x.view(self.batch, self.max_seqlen, x.shape[-1])
        out = x.new_zeros((self.batch * self.max_seqlen, x.shape[-1])).index_copy(0, self.index, x)
        return out.view(self.batch, self.max_seqlen, x.shape[-1])

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) rows in packed order -> batch order."""
        if self.order is None:
            return x
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(len(self.order), device=self.order.device)
        return x[inverse]


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first token. BERT-family classification and every multiple-choice
    head read it; XLM-R checkpoints carry it too, so it belongs to the encoder as in Hugging Face."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layer_norm else None
        self.pooler = Pooler(cfg)
        self.apply(self._init_weights)

    def with_config(self, **changes) -> "Encoder":
        """A copy with some config fields changed (dropout, kernel backend) and the same weights."""
        other = Encoder(replace(self.cfg, **changes))
        other.load_state_dict(self.state_dict())
        return other

    def moe_layers(self) -> list[MoEFeedForward]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoEFeedForward)]

    def router_stats(self, reduce=None) -> dict:
        """The last forward's routing, summed over sparse layers: tokens per expert (per layer), the largest
        expert load relative to a perfectly even one, and dropped assignments (capacity runs only); {} before
        any forward. `reduce` (a tensor -> tensor function, e.g. a sum over data-parallel ranks) is applied
        to the counts first."""
        moe = self.moe_layers()
        if not moe or any(not m.last_stats for m in moe):
            return {}
        reduce = reduce or (lambda t: t)
        counts = reduce(torch.stack([m.last_stats["tokens_per_expert"] for m in moe]).float())  # (layers, E)
        dropped = reduce(torch.stack([m.last_stats["dropped"] for m in moe]).sum().float())
        even = counts.sum(dim=1, keepdim=True).clamp(min=1) / counts.shape[1]
        return {"tokens_per_expert": counts.long().tolist(),
                "max_load": float((counts / even).max()),
                "dropped": int(dropped)}

    def upcycled(self, num_experts: int, top_k: int, every: int = 1, router: str = "topk_softmax",
                 match: str = "active") -> "Encoder":
        """Sparse upcycling (Komatsuzaki et al. 2022): a copy whose sparse layers (every `every`-th) are
        Mixture-of-Experts FFNs made from this encoder's dense FFN, with fresh routers, matched to the dense
        encoder as asked:
        - match "active": every expert a full copy of the dense FFN, top-1 routing, so a token uses the dense
          FFN's parameters (plus the router) and the copy computes exactly this encoder's function until
          trained. Top-k copies with k > 1 would use k times the dense FFN: refused, not silently unmatched.
        - match "total": experts cut from the dense FFN's neurons (MoEFeedForward.cut_from_dense), so the model
          holds the dense parameters once (plus routers) and a token uses top_k / num_experts of the FFN.
        - match "none": full copies with any top_k (Komatsuzaki et al.'s recipe, top-2): the dense function at
          step 0, but a token uses top_k times the dense FFN; matched on neither count, and recorded as such."""
        if self.cfg.num_experts:
            raise ValueError("upcycled: the encoder is already a Mixture-of-Experts")
        if match not in ("active", "total", "none"):
            raise ValueError(f"upcycled: match {match!r}: expected active, total or none")
        if match == "active" and top_k != 1:
            raise ValueError(f"upcycled: match 'active' needs top_k 1 (each expert is a full copy of the dense FFN, "
                             f"so top-{top_k} would use {top_k}x its parameters per token); use top_k 1, or match "
                             "'total' (experts cut from the dense FFN's neurons), or match 'none' (top-k copies, "
                             "unmatched)")
        if match == "total" and self.cfg.intermediate_size % num_experts:
            raise ValueError(f"upcycled: match 'total' cuts the FFN's {self.cfg.intermediate_size} hidden units into "
                             f"{num_experts} experts: they must divide evenly")
        cfg = upcycled_config(self.cfg, num_experts, top_k, every, router, match)
        other = Encoder(cfg)
        state = {k: v for k, v in self.state_dict().items()
                 if not any(k.startswith(f"layers.{i}.ffn.") for i in range(cfg.num_layers) if cfg.is_sparse(i))}
        missing, unexpected = other.load_state_dict(state, strict=False)
        assert not unexpected and all(".ffn." in k for k in missing), (missing, unexpected)
        make = MoEFeedForward.cut_from_dense if match == "total" else MoEFeedForward.from_dense
        for i, layer in enumerate(other.layers):
            if cfg.is_sparse(i):
                layer.ffn = make(self.layers[i].ffn, num_experts, top_k, router_mode=router,
                                 kernel_backend=cfg.kernel_backend)
        return other

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit layer norms.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
        if isinstance(m, MoEFeedForward):  # experts as the dense FFN would be initialised
            for w in (m.w_up, m.w_down):
                nn.init.normal_(w, std=0.02)
            for b in (m.b_up, m.b_down):
                nn.init.zeros_(b)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, lengths=None,
                output_hidden_states=False, output_layer: int | None = None, first_token_only: bool = False):
        """Returns the last hidden states (B, S, H); with output_hidden_states the list of the embeddings
        output and every layer's output (HF's `hidden_states`, the last one normed if pre-LN); with
        output_layer=i only entry i of that list, computing no layer above it (retrieval reads a middle layer);
        with first_token_only the first token's last hidden state (B, 1, H), its last layer computing only the
        rows that it needs (see the module docstring)."""
        B, S = input_ids.shape
        if lengths is None:
            lengths = (lengths_from_mask(attention_mask) if attention_mask is not None
                       else torch.full((B,), S, device=input_ids.device))
        elif lengths.shape != (B,) or (kernels.dispatch.host_checks(lengths) and bool((lengths > S).any())):
            raise ValueError(f"lengths must be ({B},) values <= {S}")
        depth = self.cfg.num_layers if output_layer is None else output_layer
        if not 0 <= depth <= self.cfg.num_layers:
            raise ValueError(f"output_layer {output_layer}: expected 0..{self.cfg.num_layers} (0 = embeddings)")
        if first_token_only and (output_hidden_states or output_layer is not None):
            raise ValueError("first_token_only returns the last layer's first token only: it cannot be combined "
                             "with output_hidden_states or output_layer")
        seqs = Packing.from_lengths(lengths, S, self._group_heads(input_ids.device),
                                    kernels.dispatch.row_bucket(self.embeddings.word.weight) if PAD_ROWS else 1)
        x = seqs.pad_rows(self.embeddings(input_ids, token_type_ids, seqs))  # unpadded from here on
        # the last layer on first tokens only (not for a sequence without tokens: it has no first row)
        short = first_token_only and depth > 0 and seqs.batch > 0 and min(seqs.lengths) > 0
        states = [x]
        for i, layer in enumerate(self.layers[:depth]):
            x = layer(x, seqs, first_only=short and i == depth - 1)
            states.append(x)
        if self.final_norm is not None and depth == self.cfg.num_layers:
            states[-1] = self.final_norm(x)
        if short:
            return seqs.unsort(states[-1])[:, None]
        if output_hidden_states:
            return [seqs.unpack(s) for s in states]
        if first_token_only:
            return seqs.unpack(states[-1])[:, :1]
        return seqs.unpack(states[-1])

    def _group_heads(self, device: torch.device) -> int | None:
        """The head count that Packing groups attention calls by, where attention runs on the PyTorch path;
        None where the Triton kernel takes the packed layout in one call, or where the token order must stay
        the batch's (capacity-limited MoE layers keep each expert's first tokens in that order)."""
        if self.cfg.moe_capacity_factor or kernels.dispatch.resolve("attention_varlen", self.cfg.kernel_backend,
                                                                     device) != "torch":
            return None
        return self.cfg.num_heads
