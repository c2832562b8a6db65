"""Sentence retrieval without fine-tuning, as XTREME evaluates it: pooled hidden states of one encoder layer,
Tatoeba by nearest neighbour (cosine), BUCC 2018 by margin-based mining (Artetxe & Schwenk 2019: ratio
margin over k = 4 neighbours each way, the "max" candidate set of xtreme's utils_retrieve.py), with the score
threshold tuned on the dev (sample) split's gold pairs and applied to test. XTREME-R's Mewsli-X and LAReQA
rank a candidate pool by cosine (`rank`), the encoder used as a dual encoder (queries and candidates embedded
alike).

One simplification against utils_retrieve.py: sentences are kept by id, where it first merges identical
sentences and drops ids whose text repeats; on corpora without repeated sentences the two agree."""
from __future__ import annotations

import torch

POOLINGS = ("mean", "cls")


@torch.no_grad()
def embed(encoder, tokenizer, sentences: list[str], layer: int, pooling: str = "mean", max_len: int = 128,
          batch_size: int = 32) -> torch.Tensor:
    """(n, hidden) float32 sentence vectors from hidden layer `layer` (0 = embeddings, num_layers = last):
    mean over all tokens, special tokens included (XTREME's choice for XLM-R), or the first token."""
    from engine.data import batches, device_of, to_device

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
        if pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = (torch.arange(states.shape[1], device=device)[None, :] < batch["lengths"][:, None]).float()
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[batch["example"]] = pooled.cpu()
    return out


def nearest(queries: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Index of the most cosine-similar target for each query."""
    q = torch.nn.functional.normalize(queries, dim=-1)
    t = torch.nn.functional.normalize(targets, dim=-1)
    return (q @ t.t()).argmax(dim=1).tolist()


def rank(queries: torch.Tensor, candidates: torch.Tensor, k: int = 20, chunk: int = 64) -> list[list[int]]:
    """Indices of the k most cosine-similar candidates for each query, best first (Mewsli-X, LAReQA; equal
    scores in no set order), `chunk` queries at a time so that a million candidates fit in memory."""
    c = torch.nn.functional.normalize(candidates, dim=-1)
    k = min(k, c.shape[0])
    out = []
    for q in torch.nn.functional.normalize(queries, dim=-1).split(chunk):
        out += (q @ c.t()).topk(k, dim=1).indices.tolist()
    return out


def mine(src: torch.Tensor, tgt: torch.Tensor, k: int = 4) -> list[tuple[int, int, float]]:
    """Candidate pairs (src index, tgt index, ratio-margin score): each side's best candidate among its k
    nearest neighbours, then greedily by score with every sentence used at most once ("max" retrieval)."""
    x = torch.nn.functional.normalize(src.double(), dim=-1)
    y = torch.nn.functional.normalize(tgt.double(), dim=-1)
    sim = x @ y.t()
    kx, ky = min(k, y.shape[0]), min(k, x.shape[0])
    fwd_sim, fwd_idx = sim.topk(kx, dim=1)
    bwd_sim, bwd_idx = sim.t().topk(ky, dim=1)
    fwd_mean, bwd_mean = fwd_sim.mean(1), bwd_sim.mean(1)
    # ratio margin: cos(x, y) / mean of both k-neighbourhood averages
    fwd_scores = fwd_sim / ((fwd_mean[:, None] + bwd_mean[fwd_idx]) / 2)
    bwd_scores = bwd_sim / ((bwd_mean[:, None] + fwd_mean[bwd_idx]) / 2)
    fwd_best = fwd_idx.gather(1, fwd_scores.argmax(1, keepdim=True)).squeeze(1)
    bwd_best = bwd_idx.gather(1, bwd_scores.argmax(1, keepdim=True)).squeeze(1)
    pairs = [(i, int(j), float(s)) for i, (j, s) in enumerate(zip(fwd_best, fwd_scores.max(1).values))]
    pairs += [(int(i), j, float(s)) for j, (i, s) in enumerate(zip(bwd_best, bwd_scores.max(1).values))]
    seen_src, seen_tgt, out = set(), set(), []
    for i, j, s in sorted(pairs, key=lambda p: -p[2]):
        if i not in seen_src and j not in seen_tgt:
            seen_src.add(i)
            seen_tgt.add(j)
            out.append((i, j, s))
    return out


def best_threshold(candidates: dict[tuple[str, str], float], gold: set[tuple[str, str]]) -> float:
    """The score threshold with the best F1 against `gold` (utils_retrieve.bucc_optimize): midway between
    the last kept candidate and the next one, in decreasing score order."""
    items = sorted(candidates.items(), key=lambda kv: -kv[1])
    best_f1, threshold, correct = 0.0, 0.0, 0
    for n, (pair, value) in enumerate(items, 1):
        correct += pair in gold
        if correct:
            p, r = correct / n, correct / len(gold)
            f1 = 2 * p * r / (p + r)
            if f1 > best_f1:
                best_f1 = f1
                # the official code reads items[n] unguarded (an IndexError at the last candidate)
                threshold = (value + items[n][1]) / 2 if n < len(items) else value
    return threshold


def mine_ids(rows: list[dict], src_vecs: torch.Tensor, tgt_vecs: torch.Tensor) -> dict[tuple[str, str], float]:
    """Candidate (source id, target id) -> margin score for BUCC mining rows (eval/tasks.py layout)."""
    src_ids = [r["id"] for r in rows if r["side"] == "source"]
    tgt_ids = [r["id"] for r in rows if r["side"] == "target"]
    return {(src_ids[i], tgt_ids[j]): s for i, j, s in mine(src_vecs, tgt_vecs)}
