"""The XLT encoder: BERT / XLM-R compatible, single-device, calling only `kernels` for attention.

Post-layer-norm blocks (BERT, XLM-R base/large) or pre-layer-norm blocks with a final norm (XLM-R XL/XXL).
Inputs are right-padded batches. The encoder unpads once after the embeddings and runs every layer on the
packed real tokens (total_tokens, hidden) with variable-length attention (`kernels.attention_varlen`), so
padding costs no FLOPs anywhere; outputs are re-padded at the end (padding positions hold zeros).
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn

import kernels

from .config import EncoderConfig, upcycled_config
from .ffn import FeedForward
from .moe import MoEFeedForward

__all__ = ["Encoder", "FeedForward", "Layer", "MoEFeedForward", "Pooler", "lengths_from_mask", "make_ffn"]


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
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.position_style == "roberta":  # as HF: real tokens count from pad+1, pads get pad
            real = (input_ids != self.cfg.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.cfg.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids, token_type_ids=None):
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                             f"{self.cfg.max_seq_len} (max_position_embeddings)")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(self.position_ids(input_ids)) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x) if self.norm is not None else x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x, seqs: "Packing"):
        """x: (total_tokens, hidden) packed rows of the sequences described by `seqs`."""
        heads, d = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = (proj(x).view(-1, heads, d) for proj in (self.q, self.k, self.v))
        p = self.cfg.attention_dropout if self.training else 0.0
        out = kernels.attention_varlen(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, dropout_p=p,
                                       backend=self.cfg.kernel_backend)
        return self.o(out.reshape(-1, heads * d))


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
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, seqs: "Packing"):
        """x: (total_tokens, hidden), real tokens only (so an MoE FFN routes no padding)."""
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), seqs))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, seqs)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Packing(NamedTuple):
    """Where the real tokens of a right-padded (B, S) batch sit: flat indices into B*S, and the
    flash-attn-style cu_seqlens (B+1,) / max_seqlen of the packed layout."""
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, seq_len: int) -> "Packing":
        lengths = lengths.to(torch.int32)
        real = torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]
        cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return cls(real.reshape(-1).nonzero().squeeze(1), cu, seq_len, lengths.shape[0])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[self.index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((self.batch * self.max_seqlen, x.shape[-1])).index_copy(0, self.index, x)
        return out.view(self.batch, self.max_seqlen, x.shape[-1])


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

    def router_stats(self) -> dict:
        """The last forward's routing, summed over sparse layers: tokens per expert (per layer), the largest
        expert load relative to a perfectly even one, and dropped assignments (capacity runs only)."""
        moe = self.moe_layers()
        if not moe:
            return {}
        counts = torch.stack([m.last_stats["tokens_per_expert"] for m in moe]).float()  # (layers, E)
        even = counts.sum(dim=1, keepdim=True).clamp(min=1) / counts.shape[1]
        return {"tokens_per_expert": counts.long().tolist(),
                "max_load": float((counts / even).max()),
                "dropped": int(sum(int(m.last_stats["dropped"]) for m in moe))}

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
                output_hidden_states=False, output_layer: int | None = None):
        """Returns the last hidden states (B, S, H); with output_hidden_states the list of the embeddings
        output and every layer's output (HF's `hidden_states`, the last one normed if pre-LN); with
        output_layer=i only entry i of that list, computing no layer above it (retrieval reads a middle layer)."""
        B, S = input_ids.shape
        if lengths is None:
            lengths = (lengths_from_mask(attention_mask) if attention_mask is not None
                       else torch.full((B,), S, device=input_ids.device))
        elif lengths.shape != (B,) or (kernels.dispatch.host_checks(lengths) and bool((lengths > S).any())):
            raise ValueError(f"lengths must be ({B},) values <= {S}")
        depth = self.cfg.num_layers if output_layer is None else output_layer
        if not 0 <= depth <= self.cfg.num_layers:
            raise ValueError(f"output_layer {output_layer}: expected 0..{self.cfg.num_layers} (0 = embeddings)")
        seqs = Packing.from_lengths(lengths, S)
        x = seqs.pack(self.embeddings(input_ids, token_type_ids))  # unpadded from here on
        states = [x]
        for layer in self.layers[:depth]:
            x = layer(x, seqs)
            states.append(x)
        if self.final_norm is not None and depth == self.cfg.num_layers:
            states[-1] = self.final_norm(x)
        if output_hidden_states:
            return [seqs.unpack(s) for s in states]
        return seqs.unpack(states[-1])
