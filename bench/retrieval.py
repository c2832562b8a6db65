"""BUCC-style margin mining at real size on CPU: time and peak memory of eval.retrieval.mine.

    python -m bench.retrieval [--n 100000] [--small 10000] [--dim 768] [--sweep 512,1024,2048,4096]
                              [--methods chunked,exact,faiss] [--out bench/results/retrieval_cpu.jsonl]

Inputs are seeded random float32 embeddings, n sources x n targets, with a tenth of the targets planted as
noisy translations of sources (cosine ~0.9); `planted_recovered` is the share of planted pairs among the
mined pairs above every other. Methods, each in a fresh subprocess:
- `chunked`: eval.retrieval.mine (float32 blocks of `chunk` sources x all targets, float64 re-scoring);
- `exact`: eval.retrieval.mine_reference, the implementation it replaced (the full n x m float64 matrix); at the large
  size it is written as a skipped row (n x m x 8 bytes);
- `faiss`: faiss-cpu IndexFlatIP as the k-NN search (one search each way), then the same float64
  re-scoring and selection as `chunked`: the field's library for the search step, side by side. Written as
  a skipped row where faiss is not installed (`pip install faiss-cpu`).
At the small size every method runs and is compared with `exact` (same pairs, largest score difference);
at the large size `faiss` is compared with `chunked`. `--sweep` first times `chunked` at each chunk size on
the first `--sweep-queries` sources against all n targets (the matmul-bound part), the data for the
default chunk size.

Peak memory is the child's resident high-water mark (VmHWM, reset through /proc/self/clear_refs once the
inputs exist): `peak_extra_bytes` is what mining adds over the inputs, `peak_rss_bytes` the whole process.
`cpu_s` is the child's CPU time (all threads) and `loadavg_1m` the 1-minute load average before and after:
on a shared 2-core machine a load above 2 means other jobs took cores and the wall time is inflated.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .env import append_row, environment

METHODS = ("chunked", "exact", "faiss")
ROOT = Path(__file__).resolve().parent.parent


def mine_faiss(src, tgt, k: int = 4, chunk: int = 1024) -> list[tuple[int, int, float]]:
    """The same mining with faiss IndexFlatIP as the float32 k-NN search (as many extra neighbours as
    eval.retrieval keeps for float64 re-ranking), then eval.retrieval's float64 re-scoring and selection."""
    import faiss
    import torch

    from eval import retrieval

    faiss.omp_set_num_threads(torch.get_num_threads())
    x, y = retrieval._unit32(src, chunk), retrieval._unit32(tgt, chunk)
    kx, ky = min(k, len(y)), min(k, len(x))

    def search(queries, base, kk):
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base.numpy())
        return torch.from_numpy(index.search(queries.numpy(), kk)[1]).long()

    fwd_idx = search(x, y, min(kx + retrieval._EXTRA, len(y)))
    bwd_idx = search(y, x, min(ky + retrieval._EXTRA, len(x)))
    fwd_sim, fwd_idx = retrieval._rescore(src, tgt, fwd_idx, kx, chunk)
    bwd_sim, bwd_idx = retrieval._rescore(tgt, src, bwd_idx, ky, chunk)
    return retrieval._select_max(fwd_sim, fwd_idx, bwd_sim, bwd_idx)


def inputs(n: int, dim: int, seed: int = 0):
    """n x dim sources and targets, float32; target perm[i] is a noisy translation of source i, i < n // 10."""
    import torch

    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    planted = n // 10
    perm = torch.randperm(n, generator=g)[:planted]
    tgt[perm] = src[:planted] + 0.5 * torch.randn(planted, dim, generator=g)
    return src, tgt, {(i, int(j)) for i, j in enumerate(perm.tolist())}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: dict) -> None:
    """Runs in the subprocess: build the inputs, reset the peak, mine once, report."""
    import torch

    from eval import retrieval

    src, tgt, planted = inputs(spec["n"], spec["dim"])
    if spec.get("queries"):
        src = src[:spec["queries"]].clone()
        planted = {p for p in planted if p[0] < spec["queries"]}
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    if spec["method"] == "chunked":
        pairs = retrieval.mine(src, tgt, spec["k"], chunk=spec["chunk"])
    elif spec["method"] == "exact":
        pairs = retrieval.mine_reference(src, tgt, spec["k"])
    else:
        pairs = mine_faiss(src, tgt, spec["k"])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_bytes("VmHWM")
    chunk = (spec["chunk"] or retrieval._default_chunk(len(tgt))) if spec["method"] == "chunked" else None
    top = {(i, j) for i, j, _ in pairs[:len(planted)]}
    if spec.get("pairs_out"):
        torch.save(pairs, spec["pairs_out"])
    recovered = round(len(top & planted) / max(1, len(planted)), 4)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    versions = {"faiss": sys.modules["faiss"].__version__} if "faiss" in sys.modules else {}
    print(json.dumps({"chunk": chunk, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "loadavg_1m": load,
                      "peak_rss_bytes": peak,
                      "peak_extra_bytes": peak - before, "pairs": len(pairs), "planted_recovered": recovered}
                     | versions))


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.retrieval", "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: str, b: str) -> dict:
    """Same pairs in the same order, and the largest score difference, between two saved pair lists."""
    import torch

    pa, pb = torch.load(a), torch.load(b)
    same = [(i, j) for i, j, _ in pa] == [(i, j) for i, j, _ in pb]
    diff = max((abs(x[2] - y[2]) for x, y in zip(pa, pb)), default=0.0)
    agree = len({(i, j) for i, j, _ in pa} & {(i, j) for i, j, _ in pb}) / max(1, len(pa))
    return {"same_pairs": same, "pair_agreement": round(agree, 6), "max_score_diff": diff}


def _faiss_missing() -> str | None:
    proc = subprocess.run([sys.executable, "-c", "import faiss"], capture_output=True, text=True)
    return None if proc.returncode == 0 else "faiss not installed (pip install faiss-cpu)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="sentences per side at the large size")
    ap.add_argument("--small", type=int, default=10_000, help="size at which the exact path runs too (0: none)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=None, help="chunk for `chunked` (default: mine's own)")
    ap.add_argument("--sweep", default="", help="comma-separated chunk sizes to time first (empty: none)")
    ap.add_argument("--sweep-queries", type=int, default=8192)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="bench/results/retrieval_cpu.jsonl")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(METHODS)}")
    env = environment()
    show = ("method", "n_src", "n_tgt", "chunk", "wall_s", "peak_extra_bytes", "planted_recovered",
            "same_pairs_as_exact", "max_score_diff_vs_exact", "time_vs_exact", "peak_vs_exact")
    faiss_missing = _faiss_missing() if "faiss" in methods else None

    def row(**fields) -> dict:
        return env | {"bench": "retrieval", "dim": args.dim, "k": args.k} | fields

    for chunk in [int(c) for c in args.sweep.split(",") if c]:
        spec = {"method": "chunked", "n": args.n, "dim": args.dim, "k": args.k, "chunk": chunk,
                "queries": args.sweep_queries}
        append_row(Path(args.out), row(method="chunked", sweep=True, n_src=args.sweep_queries, n_tgt=args.n,
                                       chunk=chunk) | run(spec), show)

    with tempfile.TemporaryDirectory() as tmp:
        for n in [s for s in (args.small, args.n) if s]:
            results = {}
            for method in methods:
                fields = {"method": method, "n_src": n, "n_tgt": n,
                          "chunk": args.chunk if method == "chunked" else None}
                if method == "exact" and n > args.small:
                    gib = n * n * 8 / 2**30
                    results[method] = row(**fields, skipped=f"the exact path holds n x m float64: {gib:.1f} GiB")
                elif method == "faiss" and faiss_missing:
                    results[method] = row(**fields, skipped=faiss_missing)
                else:
                    spec = {"method": method, "n": n, "dim": args.dim, "k": args.k, "chunk": args.chunk,
                            "pairs_out": f"{tmp}/{method}-{n}.pt"}
                    results[method] = row(**fields) | run(spec)
            ref = "exact" if "wall_s" in results.get("exact", {}) else "chunked"
            for method, r in results.items():
                if method != ref and "wall_s" in r and "wall_s" in results.get(ref, {}):
                    cmp = compare(f"{tmp}/{method}-{n}.pt", f"{tmp}/{ref}-{n}.pt")
                    r |= {f"{key}_{'as' if key == 'same_pairs' else 'vs'}_{ref}": v for key, v in cmp.items()}
                    r[f"time_vs_{ref}"] = round(r["wall_s"] / results[ref]["wall_s"], 3)
                    r[f"peak_vs_{ref}"] = round(r["peak_extra_bytes"] / results[ref]["peak_extra_bytes"], 3)
                append_row(Path(args.out), r, show + ("same_pairs_as_chunked", "time_vs_chunked"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
