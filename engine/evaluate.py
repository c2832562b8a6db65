"""Run a model over task rows, decode predictions in each task's native form, and score them with
`eval.metrics` (the XTREME metrics). Retrieval uses the encoder alone: pooled hidden states of one layer
(`embed`; XTREME's choice for XLM-R: mean pooling), nearest neighbour by cosine similarity; a dual encoder
(ranking tasks) ranks a candidate pool with the pooling it was trained with."""
from __future__ import annotations

import functools
import math

import torch

from eval import metrics
from eval.run import rank_queries
from eval.tasks import TaskSpec
from models import Encoder, TaskModel

from .data import batches, device_of, featurize, to_device

MAX_ANSWER_TOKENS = 30  # SQuAD's usual bound on predicted answer length, in subwords
TOP_SPANS = 20
POOLINGS = ("mean", "cls", "pooler")  # how `embed` turns a layer's hidden states into one sentence vector


@torch.no_grad()
def predict(model: TaskModel, task: TaskSpec, rows: list[dict], feats: list[dict], batch_size: int, pad_id: int):
    """Predictions for `rows`: label ids (pair, choice), tag lists (tagging), {id: answer} (qa)."""
    model.eval()
    device = device_of(model)
    if task.format in ("pair", "choice"):
        preds = [0] * len(rows)
        for batch in batches(feats, batch_size, pad_id):
            for ex, p in zip(batch["example"], model(to_device(batch, device))["logits"].argmax(-1).tolist()):
                preds[ex] = p
        return preds
    if task.format == "tagging":
        tags: list[list[str | None]] = [[None] * len(r["tokens"]) for r in rows]
        for batch in batches(feats, batch_size, pad_id):
            best = model(to_device(batch, device))["logits"].argmax(-1).tolist()
            for ex, words, labels in zip(batch["example"], batch["word_index"], best):
                for w, label in zip(words, labels):
                    if w >= 0:
                        tags[ex][w] = task.labels[label]
        # A word whose subwords were all cut (cannot happen with word-aligned chunks) would score as O.
        return [[t or "O" for t in sent] for sent in tags]
    if task.format == "qa":
        best: dict[int, tuple[float, str]] = {}
        null: dict[int, float] = {}  # SQuAD v2.0: the lowest "no answer" score (first token) over the windows
        for batch in batches(feats, batch_size, pad_id):
            out = model(to_device(batch, device))
            for ex, offsets, s_log, e_log in zip(batch["example"], batch["offsets"], out["start_logits"].cpu(),
                                                 out["end_logits"].cpu()):
                null[ex] = min(null.get(ex, math.inf), float(s_log[0] + e_log[0]))
                span = _best_span(offsets, s_log, e_log)
                if span is not None and (ex not in best or span[0] > best[ex][0]):
                    context = rows[ex]["context"]
                    best[ex] = (span[0], context[span[1]:span[2]])
        if task.metric == "squad_v2":  # answer "" where no span beats the null score (threshold 0)
            best = {ex: b for ex, b in best.items() if b[0] > null[ex]}
        return {row["id"]: best.get(i, (0.0, ""))[1] for i, row in enumerate(rows)}
    raise ValueError(f"{task.name}: no predictions for format {task.format}")


def _best_span(offsets, start_logits, end_logits):
    """Highest start+end logit over valid context spans: (score, char_start, char_end) or None. The
    candidates are the TOP_SPANS best starts x best ends, scored as one matrix."""
    n = len(offsets)
    s_top = start_logits[:n].topk(min(TOP_SPANS, n)).indices
    e_top = end_logits[:n].topk(min(TOP_SPANS, n)).indices
    in_context = torch.tensor([o is not None for o in offsets])
    length = e_top[None, :] - s_top[:, None] + 1
    valid = in_context[s_top][:, None] & in_context[e_top][None, :] & (length >= 1) & (length <= MAX_ANSWER_TOKENS)
    if not bool(valid.any()):
        return None
    scores = (start_logits[s_top][:, None] + end_logits[e_top][None, :]).masked_fill(~valid, float("-inf"))
    best = int(scores.argmax())  # the first maximum in (start rank, end rank) order, as the loop it replaced
    s, e = int(s_top[best // len(e_top)]), int(e_top[best % len(e_top)])
    return float(scores.view(-1)[best]), offsets[s][0], offsets[e][1]


def gold(task: TaskSpec, rows: list[dict]):
    """The references in the form eval.metrics expects for this task's format."""
    if task.format in ("pair", "choice"):
        return [r["label"] for r in rows]
    if task.format == "tagging":
        return [r["tags"] for r in rows]
    if task.format == "qa":
        return {r["id"]: list(r["answers"]["text"]) for r in rows}
    raise ValueError(f"{task.name}: no references for format {task.format}")


def evaluate_task(model: TaskModel, task: TaskSpec, rows: list[dict], tokenizer, max_len: int,
                  batch_size: int, lang: str | None = None, feats: list[dict] | None = None,
                  doc_stride: int = 128) -> tuple[dict, object]:
    """(scores, predictions) of `model` on `rows`; scores holds "score" (0-100) and the metric's parts.
    Pass `feats` (from engine.data.featurize) to skip tokenizing again, e.g. for repeated dev evaluations."""
    if feats is None:
        feats = featurize(task, rows, tokenizer, max_len, doc_stride)
    preds = predict(model, task, rows, feats, batch_size, tokenizer.pad_token_id)
    return metrics.score(task.metric, preds, gold(task, rows), lang=lang), preds


@torch.no_grad()
def embed(encoder: Encoder, tokenizer, sentences: list[str], layer: int, pooling: str = "mean", max_len: int = 128,
          batch_size: int = 32) -> torch.Tensor:
    """(n, hidden) float32 sentence vectors from hidden layer `layer` (0 = embeddings, num_layers = last):
    mean over all tokens, special tokens included (XTREME's choice for XLM-R), the first token, or the encoder's
    pooler (dense + tanh) on the first token (the XTREME-R dual-encoder baselines, at the last layer)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    if not 0 <= layer <= encoder.cfg.num_layers:
        raise ValueError(f"layer {layer}: expected 0..{encoder.cfg.num_layers} (0 = embeddings)")
    encoder.eval()
    out = torch.empty(len(sentences), encoder.cfg.hidden_size)
    enc = tokenizer(sentences, truncation=True, max_length=max_len)
    feats = [{"input_ids": ids, "example": i} for i, ids in enumerate(enc["input_ids"])]
    device = device_of(encoder)
    for batch in batches(feats, batch_size, tokenizer.pad_token_id):
        batch = to_device(batch, device)
        states = encoder(batch["input_ids"], lengths=batch["lengths"], output_layer=layer).float()
        if pooling == "pooler":
            pooled = encoder.pooler(states).float()
        elif pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = (torch.arange(states.shape[1], device=device)[None, :] < batch["lengths"][:, None]).float()
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[batch["example"]] = pooled.cpu()
    return out


def embedder(encoder: Encoder, tokenizer, layer: int, pooling: str, max_len: int, batch_size: int):
    """sentences -> (n, hidden) vectors: `pooling` of hidden layer `layer` (`embed`)."""
    return functools.partial(embed, encoder, tokenizer, layer=layer, pooling=pooling, max_len=max_len,
                             batch_size=batch_size)


def dual_encoder_embedders(model: TaskModel, tokenizer, max_len: int, query_max_len: int, batch_size: int):
    """(candidates, queries) embedders of a dual encoder: its own pooling of the last layer, queries cut at
    query_max_len (0 = max_len)."""
    layer, pooling = model.encoder.cfg.num_layers, model.head.pooling
    return (embedder(model.encoder, tokenizer, layer, pooling, max_len, batch_size),
            embedder(model.encoder, tokenizer, layer, pooling, query_max_len or max_len, batch_size))


def evaluate_ranking(model: TaskModel, rows: list[dict], tokenizer, max_len: int, query_max_len: int,
                     batch_size: int) -> dict:
    """mAP@20 (0-100) of a dual encoder ranking the rows' candidate pool for their queries (dev selection)."""
    candidates, queries = dual_encoder_embedders(model, tokenizer, max_len, query_max_len, batch_size)
    predictions, gold = rank_queries(candidates, rows, {}, queries)
    return metrics.score("map@20", predictions, gold)
