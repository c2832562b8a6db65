"""What a CPU GEMM of a new shape costs: why row counts that change every step are padded on CPU in bf16
(kernels.dispatch.CPU_ROW_BUCKET): the encoder's packed tokens and the MoE twin's expert groups.

    python -m bench.cpu_gemm_shapes [--threads 2] [--rows 300,1000] [--calls 50] [--rounds 4] [--results PATH]

An expert's up projection, rows x H=256 -> F=512 (xlt-small-moe8's expert shape), timed per call in three
orders, interleaved by rounds of --calls calls so the ratios are side by side:
- `same`: one row count over and over (what a fixed batch shape sees);
- `fresh`: a row count not used before on every call (what the MoE's changing expert group sizes see);
- `bucketed`: the fresh row counts rounded up to a multiple of CPU_ROW_BUCKET, after one pass over them (what
  the padded twin sees), timed per real row, so the padding's extra rows are counted against it.
In bf16 the GEMMs go to oneDNN, which builds and caches a primitive per shape; in fp32 to MKL. One row per
(dtype, row count) goes to bench/results/cpu_gemm_shapes.jsonl: median microseconds per real row per order.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from .env import append_row, environment

H, F_OUT = 256, 512
SHOW = ("dtype", "rows", "us_per_row_same", "us_per_row_fresh", "us_per_row_bucketed", "fresh_vs_same",
        "bucketed_vs_same")


def _time_call(x: torch.Tensor, w: torch.Tensor, rows: int, real: int) -> float:
    t = time.perf_counter()
    torch.nn.functional.linear(x[:rows], w)
    return (time.perf_counter() - t) / real * 1e6


def measure(dtype: torch.dtype, base: int, calls: int, rounds: int, bucket: int) -> dict:
    g = torch.Generator().manual_seed(0)
    span = 2 * calls * rounds
    x = torch.randn(base + span + bucket, H, generator=g).to(dtype)
    w = torch.randn(F_OUT, H, generator=g).to(dtype)
    fresh = [base + 2 * i + 1 for i in range(calls * rounds)]  # odd offsets: never a multiple of the bucket
    padded = [-(-n // bucket) * bucket for n in fresh]
    for n in padded + [base]:  # warm the shapes `same` and `bucketed` reuse
        torch.nn.functional.linear(x[:n], w)
    times = {"same": [], "fresh": [], "bucketed": []}
    for r in range(rounds):  # the orders interleaved by rounds of `calls` calls (a fresh shape's build
        part = slice(r * calls, (r + 1) * calls)  # disturbs the call after it, so not call by call)
        times["same"] += [_time_call(x, w, base, base) for _ in fresh[part]]
        times["fresh"] += [_time_call(x, w, n, n) for n in fresh[part]]
        times["bucketed"] += [_time_call(x, w, p, n) for n, p in zip(fresh[part], padded[part])]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "rows": base, "H": H, "F": F_OUT, "calls": calls,
            "rounds": rounds, "row_bucket": bucket, **{f"us_per_row_{k}": round(v, 4) for k, v in med.items()},
            "fresh_vs_same": round(med["fresh"] / med["same"], 3),
            "bucketed_vs_same": round(med["bucketed"] / med["same"], 3)}


def main(argv=None) -> int:
    from kernels.dispatch import CPU_ROW_BUCKET

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="300,1000", help="comma-separated base row counts")
    ap.add_argument("--calls", type=int, default=50, help="calls per order per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--results", default="bench/results/cpu_gemm_shapes.jsonl")
    args = ap.parse_args(argv)
    try:
        bases = [int(r) for r in args.rows.split(",")]
    except ValueError:
        print(f"--rows: expected comma-separated integers, got {args.rows!r}", file=sys.stderr)
        return 2
    if args.calls < 1 or args.rounds < 1 or args.threads < 1 or any(b < 1 for b in bases):
        print("--calls, --rounds, --threads and every --rows value must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    env = environment()
    for dtype in (torch.bfloat16, torch.float32):
        for base in bases:
            row = env | measure(dtype, base, args.calls, args.rounds, CPU_ROW_BUCKET)
            append_row(Path(args.results), row, SHOW)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
