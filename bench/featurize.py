"""Featurization throughput per task format, cold (tokenize + write the cache file) vs warm (read it back).

    python -m bench.featurize [--cases pair,qa-384,qa-128,tagging,choice] [--scale 1.0]
        [--out bench/results/featurize_cpu.jsonl]

Synthetic English rows at realistic sizes (`--scale` multiplies them), tokenized with the WordPiece
tokenizer of `engine.pretrain.train_tokenizer` (vocabulary 2000, trained on the synthetic corpus):
- pair:    50,000 syn-mnli premise / hypothesis pairs, max_len 128;
- qa-384:  10,000 syn-squad questions over 4-story contexts (~SQuAD paragraph length), max_len 384,
           doc stride 128;
- qa-128:  the same at max_len 128, doc stride 128 (64 effective: at most half the window): several windows
           per context;
- tagging: 10,000 syn-panx sentences, max_len 128;
- choice:  5,000 syn-swag rows with 4 endings each, max_len 128.
Per case: `cold_s` is one FeatureCache.get on an empty folder (key digests, tokenizing: `tokenize_s`, and
writing the file); `warm_s` the median of three gets from a fresh FeatureCache on the same folder (key
digests and reading: `rows_digest_s` of it hashes the rows), checked equal to the made features. Examples/s
count rows (not windows or chunks). Appends one JSONL row per case.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine import data
from engine.featcache import FeatureCache, rows_digest, tokenizer_digest
from engine.pretrain import train_tokenizer
from eval.synthetic import SyntheticWorld

from .env import append_row, environment

# case: (task, rows, max_len, doc_stride)
CASES = {"pair": ("syn-mnli", 50_000, 128, 128), "qa-384": ("syn-squad", 10_000, 384, 128),
         "qa-128": ("syn-squad", 10_000, 128, 128), "tagging": ("syn-panx", 10_000, 128, 128),
         "choice": ("syn-swag", 5_000, 128, 128)}
QA_STORIES = 4  # stories per context: ~SQuAD paragraph length


def long_contexts(rows: list[dict], join: int = QA_STORIES) -> list[dict]:
    """Each question over its own story followed by the next join-1 stories (answer offsets unchanged)."""
    return [row | {"context": " ".join([row["context"]] + [rows[(i + j) % len(rows)]["context"]
                                                          for j in range(1, join)])}
            for i, row in enumerate(rows)]


def measure(case: str, world: SyntheticWorld, tokenizer, n: int, root: Path) -> dict:
    task_name, _, max_len, stride = CASES[case]
    task = world.tasks[task_name]
    rows = world.load(task_name, "train", "en")[:n]
    if task.format == "qa":
        rows = long_contexts(rows)
    tokenize_s = []

    def make():
        t = time.perf_counter()
        feats = data.featurize(task, rows, tokenizer, max_len, stride)
        tokenize_s.append(time.perf_counter() - t)
        return feats

    tokenizer_digest(tokenizer)  # memoised once per process, as in a run: not part of any timing
    cache = FeatureCache(root)
    t = time.perf_counter()
    made = cache.get(task, "train", "en", rows, tokenizer, max_len, stride, make)
    cold_s = time.perf_counter() - t
    assert cache.misses == 1
    warm = []
    for _ in range(3):
        reader = FeatureCache(root)
        t = time.perf_counter()
        loaded = reader.get(task, "train", "en", rows, tokenizer, max_len, stride, make)
        warm.append(time.perf_counter() - t)
        assert reader.hits == 1 and loaded == made, f"{case}: the cache did not give back the made features"
    t = time.perf_counter()
    rows_digest(rows)
    digest_s = time.perf_counter() - t
    warm_s = statistics.median(warm)
    (path,) = root.glob("*.safetensors")
    tokens = sum(len(c["input_ids"]) for f in made for c in f.get("choices", [f]))
    return {"bench": "featurize", "case": case, "task": task_name, "format": task.format, "rows": len(rows),
            "features": len(made), "tokens": tokens, "max_len": max_len,
            "doc_stride": stride if task.format == "qa" else None, "tokenize_s": round(tokenize_s[0], 3),
            "cold_s": round(cold_s, 3), "warm_s": round(warm_s, 3), "rows_digest_s": round(digest_s, 3),
            "cold_examples_per_s": round(len(rows) / cold_s), "warm_examples_per_s": round(len(rows) / warm_s),
            "speedup": round(cold_s / warm_s, 1), "file_bytes": path.stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every case's number of rows")
    ap.add_argument("--out", default="bench/results/featurize_cpu.jsonl")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(CASES)}")
    if args.scale <= 0:
        ap.error(f"--scale must be > 0, got {args.scale}")
    sizes = {c: max(2, round(CASES[c][1] * args.scale)) for c in cases}
    tasks = {}
    for c in cases:
        tasks[CASES[c][0]] = max(tasks.get(CASES[c][0], 0), sizes[c])
    world = SyntheticWorld(0, ("en",), sizes={t: (n, 1, 1 if t == "syn-panx" else 0) for t, n in tasks.items()})
    tokenizer = train_tokenizer(world.corpus("en", 4000), vocab_size=2000)
    env = environment() | {"tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset")}
    for c in cases:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(c, world, tokenizer, sizes[c], Path(tmp))
        append_row(Path(args.out), env | row, ("case", "rows", "features", "tokenize_s", "cold_s", "warm_s",
                                               "cold_examples_per_s", "warm_examples_per_s", "speedup"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
