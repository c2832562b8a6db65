"""Sentence retrieval without fine-tuning, as XTREME evaluates it, on sentence vectors (pooled hidden states of
one encoder layer, embedded by the engine: engine.evaluate.embed): Tatoeba by nearest neighbour (cosine), BUCC
2018 by margin-based mining (Artetxe & Schwenk 2019: ratio margin over k = 4 neighbours each way, the "max"
candidate set of xtreme's utils_retrieve.py), with the score threshold tuned on the dev (sample) split's gold
pairs and applied to test. XTREME-R's Mewsli-X and LAReQA rank a candidate pool by cosine (`rank`), the encoder
used as a dual encoder (queries and candidates embedded alike).

One simplification against utils_retrieve.py: sentences are kept by id, where it first merges identical
sentences and drops ids whose text repeats; on corpora without repeated sentences the two agree."""
from __future__ import annotations

import torch


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


# mine(): the similarities are found in float32 blocks of `chunk` source rows x all targets (never n x m), and
# the neighbours they select are re-scored in float64, so that scores equal an exact float64 computation.
# `_EXTRA` more neighbours than k are kept from the float32 search and re-ranked in float64: a near-tie at the
# k-th neighbour (closer than float32 resolves) is then decided exactly, as the float64 matrix would.
_EXTRA = 4
_BLOCK_BYTES = 1 << 30  # default chunk: as many source rows as fit 1 GiB of float32 similarities ...
_MAX_CHUNK = 1024  # ... and at most this many (bench.retrieval --sweep: larger blocks gain nothing)
_RESCORE_ROWS = 256  # rows re-scored at a time: their candidates' float64 rows stay in cache


def mine(src: torch.Tensor, tgt: torch.Tensor, k: int = 4, chunk: int | None = None) -> list[tuple[int, int, float]]:
    """Candidate pairs (src index, tgt index, ratio-margin score): each side's best candidate among its k
    nearest neighbours, then greedily by score with every sentence used at most once ("max" retrieval).

    Memory is bounded by one block of `chunk` x len(tgt) float32 similarities (default: 1 GiB, at most
    1024 rows) plus a float32 unit-norm copy of both sides; BUCC's ~400k x 400k fits. The neighbours are
    searched in float32 and re-scored in float64, so pairs and scores equal the exact float64 margin except
    where several neighbours tie closer than float32 resolves (e.g. repeated sentences, whose exact ties no
    implementation orders)."""
    _check_mine_args(src, tgt, k, chunk)
    n, m = src.shape[0], tgt.shape[0]
    if n == 0 or m == 0:
        return []
    chunk = chunk or _default_chunk(m)
    kx, ky = min(k, m), min(k, n)
    fwd_idx, bwd_idx = _knn_both_ways(src, tgt, min(kx + _EXTRA, m), min(ky + _EXTRA, n), chunk)
    fwd_sim, fwd_idx = _rescore(src, tgt, fwd_idx, kx, chunk)
    bwd_sim, bwd_idx = _rescore(tgt, src, bwd_idx, ky, chunk)
    return _select_max(fwd_sim, fwd_idx, bwd_sim, bwd_idx)


def _default_chunk(m: int) -> int:
    return max(1, min(_MAX_CHUNK, _BLOCK_BYTES // (4 * m)))


def _check_mine_args(src, tgt, k, chunk) -> None:
    for name, v in (("src", src), ("tgt", tgt)):
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or not v.is_floating_point():
            raise ValueError(f"mine: {name} must be a 2-D floating-point tensor (sentences x hidden), got "
                             f"{type(v).__name__} {tuple(getattr(v, 'shape', ()))}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"mine: {name} holds non-finite values (NaN or inf)")
    if src.shape[1] != tgt.shape[1]:
        raise ValueError(f"mine: src and tgt hidden sizes differ ({src.shape[1]} vs {tgt.shape[1]})")
    if src.device != tgt.device:
        raise ValueError(f"mine: src and tgt are on different devices ({src.device} vs {tgt.device})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"mine: k must be a positive integer, got {k!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"mine: chunk must be a positive integer or None, got {chunk!r}")


def _unit32(v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Rows normalised in float64 (as the exact path does), stored as float32, `chunk` rows at a time."""
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for s in range(0, v.shape[0], chunk):
        out[s:s + chunk] = torch.nn.functional.normalize(v[s:s + chunk].double(), dim=-1)
    return out


@torch.no_grad()
def _knn_both_ways(src: torch.Tensor, tgt: torch.Tensor, kf: int, kb: int, chunk: int):
    """Indices of the kf most cosine-similar targets of each source row (n x kf) and of the kb most similar
    sources of each target row (m x kb), from one float32 pass over blocks of `chunk` sources x all targets:
    each block gives its rows' forward neighbours whole, and updates a running top-kb per target, only for
    the targets that the block holds something better for than their current kb-th neighbour."""
    x, y = _unit32(src, chunk), _unit32(tgt, chunk)
    n, m = x.shape[0], y.shape[0]
    fwd_idx = torch.empty(n, kf, dtype=torch.long, device=x.device)
    bwd_val = torch.full((kb, m), -torch.inf, device=x.device)  # sorted best first along dim 0
    bwd_idx = torch.zeros(kb, m, dtype=torch.long, device=x.device)
    buf = torch.empty(min(chunk, n), m, device=x.device)
    for s in range(0, n, chunk):
        block = buf[:min(chunk, n - s)]
        torch.mm(x[s:s + chunk], y.t(), out=block)
        fwd_idx[s:s + block.shape[0]] = block.topk(kf, dim=1).indices
        cols = (block.amax(0) > bwd_val[-1]).nonzero().squeeze(1)
        if cols.numel() == 0:
            continue
        if 4 * cols.numel() > m:  # most targets: take the block as it is rather than copy their columns
            cols, sub = slice(None), block
        else:
            sub = block.index_select(1, cols)
        top = sub.topk(min(kb, sub.shape[0]), dim=0)
        vals = torch.cat([bwd_val[:, cols], top.values])
        best = vals.topk(kb, dim=0)
        bwd_idx[:, cols] = torch.cat([bwd_idx[:, cols], top.indices + s]).gather(0, best.indices)
        bwd_val[:, cols] = best.values
    return fwd_idx, bwd_idx.t().contiguous()


def _inverse_norms(v: torch.Tensor, chunk: int) -> torch.Tensor:
    """1 / max(|row|, 1e-12) in float64 (torch.nn.functional.normalize's scaling), `chunk` rows at a time."""
    out = torch.empty(v.shape[0], dtype=torch.float64, device=v.device)
    for s in range(0, v.shape[0], chunk):
        out[s:s + chunk] = v[s:s + chunk].double().norm(dim=1).clamp_min(1e-12).reciprocal()
    return out


@torch.no_grad()
def _rescore(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, keep: int, chunk: int):
    """Float64 cosines of each row of `a` with its candidate rows idx of `b`, best first (stable on ties), the
    `keep` best: (len(a) x keep) similarities and indices, as topk over the exact float64 matrix gives them.
    Dot products of the float64 rows times both inverse norms: the normalised vectors' dot product to ~1e-16
    (a pair scored from either side came out bitwise equal where measured; nothing relies on it)."""
    inv_a, inv_b = _inverse_norms(a, chunk), _inverse_norms(b, chunk)
    sims = torch.empty(idx.shape, dtype=torch.float64, device=a.device)
    rows = min(chunk, _RESCORE_ROWS)
    for s in range(0, a.shape[0], rows):
        cand = idx[s:s + rows]
        dots = torch.bmm(b[cand.reshape(-1)].double().view(*cand.shape, -1), a[s:s + rows].double()[:, :, None])
        sims[s:s + rows] = dots.squeeze(2) * (inv_a[s:s + rows, None] * inv_b[cand])
    sims, order = sims.sort(dim=1, descending=True, stable=True)
    return sims[:, :keep].contiguous(), idx.gather(1, order[:, :keep])


def _select_max(fwd_sim, fwd_idx, bwd_sim, bwd_idx) -> list[tuple[int, int, float]]:
    """Ratio margin over both neighbourhoods, each side's best candidate ("max" set), greedy one-to-one."""
    fwd_mean, bwd_mean = fwd_sim.mean(1), bwd_sim.mean(1)
    # ratio margin: cos(x, y) / mean of both k-neighbourhood averages
    fwd_scores = fwd_sim / ((fwd_mean[:, None] + bwd_mean[fwd_idx]) / 2)
    bwd_scores = bwd_sim / ((bwd_mean[:, None] + fwd_mean[bwd_idx]) / 2)
    fwd_best = fwd_idx.gather(1, fwd_scores.argmax(1, keepdim=True)).squeeze(1).tolist()
    bwd_best = bwd_idx.gather(1, bwd_scores.argmax(1, keepdim=True)).squeeze(1).tolist()
    pairs = [(i, j, s) for i, (j, s) in enumerate(zip(fwd_best, fwd_scores.max(1).values.tolist()))]
    pairs += [(i, j, s) for j, (i, s) in enumerate(zip(bwd_best, bwd_scores.max(1).values.tolist()))]
    seen_src, seen_tgt, out = set(), set(), []
    for i, j, s in sorted(pairs, key=lambda p: -p[2]):
        if i not in seen_src and j not in seen_tgt:
            seen_src.add(i)
            seen_tgt.add(j)
            out.append((i, j, s))
    return out


@torch.no_grad()
def mine_reference(src: torch.Tensor, tgt: torch.Tensor, k: int = 4) -> list[tuple[int, int, float]]:
    """The oracle of `mine`: the full float64 similarity matrix (n x m x 8 bytes: small inputs only), each
    side's k nearest neighbours from it, the same selection. `mine` before its bounded-memory rewrite."""
    x = torch.nn.functional.normalize(src.double(), dim=-1)
    y = torch.nn.functional.normalize(tgt.double(), dim=-1)
    sim = x @ y.t()
    fwd_sim, fwd_idx = sim.topk(min(k, y.shape[0]), dim=1)
    bwd_sim, bwd_idx = sim.t().topk(min(k, x.shape[0]), dim=1)
    return _select_max(fwd_sim, fwd_idx, bwd_sim, bwd_idx)


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
