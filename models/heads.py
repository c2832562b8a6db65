"""Task heads on top of the encoder. Losses go through `kernels.cross_entropy` /
`kernels.linear_cross_entropy`, so the fused kernels serve every head.

Each head maps the encoder's last hidden states (B, S, H) and the batch to {"logits", "loss"?}; the
loss is present when the batch has labels. Label value -100 is ignored everywhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .config import EncoderConfig
from .dropout import Dropout
from .encoder import Encoder

IGNORE = -100


def _ce(logits: torch.Tensor, labels: torch.Tensor, backend: str) -> torch.Tensor:
    return kernels.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE, backend=backend)


class SequenceClassificationHead(nn.Module):
    """RoBERTa-style: dense + tanh on the first token, then the output projection."""

    kind = "pair"
    reads_first_token_only = True  # TaskModel asks the encoder for that row alone

    def __init__(self, cfg: EncoderConfig, num_labels: int):
        super().__init__()
        self.backend = cfg.kernel_backend
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.out = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, hidden, batch):
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))
        logits = self.out(self.dropout(x))
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = _ce(logits, batch["labels"], self.backend)
        return out


class TokenClassificationHead(nn.Module):
    """A label per token; the data pipeline labels first subwords only (others get -100), as XTREME."""

    kind = "tagging"

    def __init__(self, cfg: EncoderConfig, num_labels: int):
        super().__init__()
        self.backend = cfg.kernel_backend
        self.dropout = Dropout(cfg.hidden_dropout)
        self.out = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, hidden, batch):
        logits = self.out(self.dropout(hidden))
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = _ce(logits, batch["labels"], self.backend)
        return out


class SpanQAHead(nn.Module):
    """Start and end logits per token; the loss averages the start and end cross-entropies."""

    kind = "qa"

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.backend = cfg.kernel_backend
        self.out = nn.Linear(cfg.hidden_size, 2)

    def forward(self, hidden, batch):
        start, end = self.out(hidden).unbind(dim=-1)
        out = {"start_logits": start, "end_logits": end}
        if "start_positions" in batch:
            out["loss"] = 0.5 * (_ce(start, batch["start_positions"], self.backend)
                                 + _ce(end, batch["end_positions"], self.backend))
        return out


class PooledClassificationHead(nn.Module):
    """BERT-style: a linear layer on the encoder's pooler output (dense + tanh on the first token). With
    choices=True each (context, ending) pair is encoded separately and scored, softmax over the choices
    (Hugging Face's multiple-choice head, the same for BERT and XLM-R)."""

    reads_first_token_only = True  # the pooler reads the first token alone

    @property
    def kind(self) -> str:
        return "choice" if self.choices else "pair"

    def __init__(self, cfg: EncoderConfig, encoder: Encoder, num_labels: int, choices: bool = False):
        super().__init__()
        self.backend = cfg.kernel_backend
        self.choices = choices
        self._pooler = [encoder.pooler]  # a plain list: the pooler stays owned by the encoder
        self.dropout = Dropout(cfg.hidden_dropout)
        self.out = nn.Linear(cfg.hidden_size, 1 if choices else num_labels)

    def forward(self, hidden, batch):
        logits = self.out(self.dropout(self._pooler[0](hidden)))
        if self.choices:
            logits = logits.view(-1, batch["num_choices"])
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = _ce(logits, batch["labels"], self.backend)
        return out


class MaskedLMHead(nn.Module):
    """dense + GELU + LayerNorm, then the decoder tied to the word embeddings. The loss is computed on
    the masked positions only, gathered before the vocabulary projection (fused linear cross-entropy)."""

    kind = "mlm"

    def __init__(self, cfg: EncoderConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.backend = cfg.kernel_backend
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self._tied = [word_embeddings]  # a plain list: the tied weight stays owned by the encoder

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._tied[0].weight

    def transform(self, hidden):
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden, batch):
        if "labels" not in batch:  # prediction: full logits
            return {"logits": self.transform(hidden) @ self.decoder_weight.t() + self.bias}
        labels = batch["labels"].reshape(-1)
        picked = (labels != IGNORE).nonzero().squeeze(1)
        h = self.transform(hidden.reshape(-1, hidden.shape[-1])[picked])
        loss = kernels.linear_cross_entropy(h, self.decoder_weight, self.bias, labels[picked],
                                            ignore_index=IGNORE, backend=self.backend)
        return {"loss": loss, "num_masked": picked.numel()}


class DualEncoderHead(nn.Module):
    """A dual encoder for retrieval, as the XTREME-R baselines train one for Mewsli-X and LAReQA (xtreme
    third_party/bert.py, BertForRetrieval): queries and candidates go through the same encoder, each is pooled
    into one L2-normalised vector, and each query is trained to pick its own candidate among the batch's
    (in-batch negatives, one direction: softmax over logit_scale * cosine similarities, the scale trainable and
    started at 100 as there). Pooling as engine.evaluate.embed pools: "pooler" (the encoder's dense + tanh on the
    first token, the baseline's choice), "cls" (the first token) or "mean" (all tokens, special ones included).
    The batch holds (query, candidate) pairs flattened as multiple-choice rows are, q0 c0 q1 c1 ...; `labels` name
    each pair's candidate, so a batch that holds one candidate twice does not count the copy as a negative. The
    exported model is the bare encoder: ranking by cosine does not depend on the scale."""

    kind = "dual-encoder"
    POOLINGS = ("pooler", "cls", "mean")

    @property
    def reads_first_token_only(self) -> bool:
        return self.pooling != "mean"

    def __init__(self, cfg: EncoderConfig, encoder: Encoder, pooling: str = "pooler", scale: float = 100.0):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"dual encoder pooling {pooling!r}: expected one of {', '.join(self.POOLINGS)}")
        self.backend, self.pooling = cfg.kernel_backend, pooling
        self._pooler = [encoder.pooler]  # a plain list: the pooler stays owned by the encoder
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))

    def pool(self, hidden, lengths):
        if self.pooling == "pooler":
            return self._pooler[0](hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def forward(self, hidden, batch):
        pooled = F.normalize(self.pool(hidden, batch["lengths"].to(hidden.device)).float(), dim=-1)
        queries, candidates = pooled.view(-1, 2, pooled.shape[-1]).unbind(1)
        logits = self.logit_scale * queries @ candidates.t()
        out = {"logits": logits}
        if "labels" in batch:
            same = batch["labels"][:, None] == batch["labels"][None, :]
            diagonal = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
            logits = logits.masked_fill(same & ~diagonal, float("-inf"))
            out["loss"] = _ce(logits, torch.arange(len(logits), device=logits.device), self.backend)
        return out


HEAD_KINDS = ("pair", "tagging", "qa", "choice", "mlm", "dual-encoder")


def make_head(kind: str, cfg: EncoderConfig, encoder: Encoder, num_labels: int = 0) -> nn.Module:
    """kind: pair | tagging | qa | choice | mlm | dual-encoder (eval.tasks' heads, plus mlm). The head's
    architecture follows the encoder's family, so it maps 1:1 onto the Hugging Face head."""
    if kind == "pair":
        if cfg.family == "bert":
            return PooledClassificationHead(cfg, encoder, num_labels)
        return SequenceClassificationHead(cfg, num_labels)
    if kind == "tagging":
        return TokenClassificationHead(cfg, num_labels)
    if kind == "qa":
        return SpanQAHead(cfg)
    if kind == "choice":
        return PooledClassificationHead(cfg, encoder, 1, choices=True)
    if kind == "mlm":
        return MaskedLMHead(cfg, encoder.embeddings.word)
    if kind == "dual-encoder":
        return DualEncoderHead(cfg, encoder)
    raise ValueError(f"unknown head kind {kind!r}: expected one of {', '.join(HEAD_KINDS)}")


class TaskModel(nn.Module):
    """An encoder with one head. The encoder object is shared, not copied, when handed between phases.
    The head is initialised here (BERT's initialisation) unless `initialise` is false (a view over a head
    that is already trained, e.g. one of a multi-task model's). A head that reads only the first token
    (`reads_first_token_only`) gets the (B, 1, H) first-token states, for which the encoder's last layer
    computes only the rows they need; `first_token_only = False` computes every row (an ablation)."""

    first_token_only = True

    def __init__(self, encoder: Encoder, head: nn.Module, initialise: bool = True):
        super().__init__()
        self.encoder = encoder
        self.head = head
        if initialise:
            head.apply(Encoder._init_weights)

    def forward(self, batch: dict) -> dict:
        first = self.first_token_only and getattr(self.head, "reads_first_token_only", False)
        hidden = self.encoder(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                              lengths=batch["lengths"], first_token_only=first)
        out = self.head(hidden, batch)
        moe = self.encoder.moe_layers()
        if moe and "loss" in out:  # the routers' auxiliary losses join the objective
            cfg = self.encoder.cfg
            out["balance_loss"] = sum(m.last_stats["balance_loss"] for m in moe) / len(moe)
            out["z_loss"] = sum(m.last_stats["z_loss"] for m in moe) / len(moe)
            out["task_loss"] = out["loss"]
            out["loss"] = out["loss"] + cfg.moe_balance_coef * out["balance_loss"] + cfg.moe_z_coef * out["z_loss"]
            for m in moe:  # the losses' graph now lives in `out`; kept on the module it would outlive the step
                # (under FSDP2, whose hooks point back at the module, as a cycle through autograd nodes gc cannot see)
                m.last_stats = m.last_stats | {k: m.last_stats[k].detach() for k in ("balance_loss", "z_loss")}
        return out
