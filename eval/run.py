"""Leaderboard files from a model's outputs, for XTREME / XTREME-R's zero-shot tasks: no model is run here.

- Retrieval and ranking tasks take `embed`, a callable mapping sentences to an (n, hidden) tensor (the engine
  builds it from an encoder: engine.evaluate.embedder): Tatoeba nearest-neighbour indices (`run_tatoeba`),
  BUCC mining with the ratio margin and the threshold tuned on the dev (sample) split, applied to test
  (`run_bucc`), Mewsli-X / LAReQA rankings of a candidate pool by cosine, the top 20 ids per query, scored by
  mAP@20 (`rank_queries`, `run_ranking`).
- Fine-tuned tasks (XNLI, PAWS-X, UD-POS, PAN-X, XQuAD, MLQA, TyDiQA, XCOPA) take the predictions of
  engine.evaluate.predict (`finetuned_files`).

Each returns (prediction text, label text) in the layout `python -m eval.score` reads. The command that runs
checkpoints and writes a whole evaluation folder is `python -m engine.zero_shot`.
"""
from __future__ import annotations

import json
import sys

import torch

from . import loaders, retrieval

RETRIEVAL = ("tatoeba", "bucc2018")
RANKING = ("mewslix", "lareqa")  # the encoder as a zero-shot dual encoder over a candidate pool
TOP_K = 20  # candidates kept per query: mAP@20 reads no further
POOL_CHUNK = 65536  # candidates tokenized and embedded at a time (Mewsli-X has about a million)


class RunError(ValueError):
    pass


# ----- retrieval and ranking: `embed` maps sentences to an (n, hidden) tensor --------------------------------
def run_tatoeba(embed, rows: list[dict]) -> tuple[str, str]:
    """(prediction lines, label lines) as XTREME writes Tatoeba: indices into the sorted English file."""
    src, tgt = embed([r["source"] for r in rows]), embed([r["target"] for r in rows])
    position = loaders.tatoeba_sorted_positions([r["target"] for r in rows])
    preds = [position[j] for j in retrieval.nearest(src, tgt)]
    return "".join(f"{p}\n" for p in preds), "".join(f"{position[i]}\n" for i in range(len(rows)))


def run_bucc(embed, dev: list[dict], test: list[dict]) -> tuple[str, str]:
    def candidates(rows):
        vecs = {side: embed([r["text"] for r in rows if r["side"] == side]) for side in ("source", "target")}
        return retrieval.mine_ids(rows, vecs["source"], vecs["target"])

    gold_dev = {tuple(r["id"].split("\t")) for r in dev if r["side"] == "gold"}
    if not gold_dev:
        raise RunError("bucc2018: the dev (sample) split has no gold pairs to tune the threshold on")
    threshold = retrieval.best_threshold(candidates(dev), gold_dev)
    mined = [f"{s}\t{t}\n" for (s, t), value in candidates(test).items() if value >= threshold]
    gold = [f"{r['id']}\n" for r in test if r["side"] == "gold"]
    if not gold:
        raise RunError("bucc2018: the test split has no gold pairs (.gold file) to score against")
    return "".join(mined), "".join(gold)


def rank_queries(embed, rows: list[dict], pool: dict, embed_queries=None) -> tuple[dict, dict]:
    """(predictions, gold): query id -> the TOP_K candidate ids by cosine / its gold ids, for ranking rows
    (eval/tasks.py layout). `pool` keeps the embedded candidates: a task's languages share them. Queries are
    embedded with `embed_queries` (default: `embed`), e.g. at a shorter maximum length."""
    queries = [r for r in rows if "query" in r]
    candidates = [r for r in rows if "candidate" in r]
    ids = [r["id"] for r in candidates]
    if pool.get("ids") != ids:
        texts = [r["candidate"] for r in candidates]
        pool.update(ids=ids, vectors=torch.cat([embed(texts[i:i + POOL_CHUNK])
                                                for i in range(0, len(texts), POOL_CHUNK)]))
    ranked = retrieval.rank((embed_queries or embed)([r["query"] for r in queries]), pool["vectors"], TOP_K)
    return {r["id"]: [ids[j] for j in top] for r, top in zip(queries, ranked)}, {r["id"]: r["answers"] for r in queries}


def run_ranking(embed, rows: list[dict], pool: dict, embed_queries=None) -> tuple[str, str]:
    """(predictions, labels) as JSON objects, query id -> ranked candidate ids / gold ids (see rank_queries)."""
    predictions, gold = rank_queries(embed, rows, pool, embed_queries)
    return json.dumps(predictions, ensure_ascii=False), json.dumps(gold, ensure_ascii=False)


# ----- fine-tuned tasks -------------------------------------------------------------------------------------
def finetuned_files(task, rows: list[dict], preds, gold_names: tuple[str, ...] | None = None) -> tuple[str, str]:
    """(prediction text, label text) of a fine-tuned task in the leaderboard layout, from `engine.evaluate.predict`
    output: label names per line (pair), tags per line with blank lines between sentences (tagging), {"label"}
    lines (choice), id -> answer JSON and SQuAD-format gold (qa). Pair predictions index `task.labels`, the rows'
    labels index `gold_names` (default: the same)."""
    gold_names = gold_names or task.labels
    if task.format == "pair":
        return ("".join(f"{task.labels[p]}\n" for p in preds),
                "".join(f"{gold_names[r['label']]}\n" for r in rows))
    if task.format == "tagging":
        return ("".join("".join(f"{t}\n" for t in s) + "\n" for s in preds),
                "".join("".join(f"{t}\n" for t in r["tags"]) + "\n" for r in rows))
    if task.format == "choice":
        return ("".join(json.dumps({"label": p}) + "\n" for p in preds),
                "".join(json.dumps({"label": r["label"]}) + "\n" for r in rows))
    if task.format != "qa":
        raise ValueError(f"{task.name}: format {task.format} has no fine-tuned leaderboard files")
    paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"], "answers": [
        {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in rows]
    return (json.dumps(preds, ensure_ascii=False), json.dumps({"data": [{"paragraphs": paragraphs}]},
                                                               ensure_ascii=False))


if __name__ == "__main__":
    print("eval.run: the zero-shot evaluation command is now `python -m engine.zero_shot` (same options)",
          file=sys.stderr)
    sys.exit(2)
