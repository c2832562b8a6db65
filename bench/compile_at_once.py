"""What the first training step of a new attention key spends compiling, with the autotuned configs compiled at
once (`kernels.attention._launch`, threads) or one by one as the autotuner times them
(`kernels.attention.COMPILE_AT_ONCE` off), measured on a machine without a GPU.

    python -m bench.compile_at_once [--repeats 3] [--dtype bf16|fp16|fp32] [--head-dim 64] [--causal]
                                    [--dropout P] [--results bench/results/compile_at_once_cpu.jsonl]

Each measurement is a child process with the interpreter off, a fresh Triton cache and a stand-in driver that
reports an sm_90 target: the kernels compile for real (as bench/kernel_resources.py's do: PTX, ptxas, cubin)
and nothing is launched. Where the autotuner would time each config, the child compiles (or finds compiled)
each config it may pick, as the real autotuner's first launch of it would, and launches nothing. The child
calls `attention_forward` and then `attention_backward` once on CPU tensors of the asked dtype (B=2, H=2,
S=100) and records every compile: kernel, thread, start and end. The two modes alternate, so each pair of
rows shares the machine's load. A row: mode, seconds in the forward and in the backward, compiles, threads,
and the CPUs the child could use. A GPU machine compiles the same kernels on its own CPUs; its figure is the
GPU run's (bench/gpu_check.sh), not this one.

tests/kernels/test_compile_at_once.py asserts, through `run_child`, which kernels compile where and when.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compile_at_once_cpu.jsonl"


def child(at_once: bool, dtype: str, head_dim: int, causal: bool, dropout: float) -> dict:
    """Run in the child process (TRITON_INTERPRET=0, its own TRITON_CACHE_DIR): the compiles and launches of
    one forward and one backward, by step."""
    import importlib
    import threading
    import time

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner, driver, jit

    class StandIn:  # what JITFunction.run and its binder ask of the driver when nothing is launched
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandIn())
    compiles, launches = [], []
    real_compile, real_run = triton.compiler.compile, jit.JITFunction.run

    def timed_compile(src, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_compile(src, *args, **kwargs)
        compiles.append(dict(kernel=src.fn.__name__, thread=threading.current_thread().name, t0=t0,
                             t1=time.perf_counter()))
        return out

    def run(self, *args, grid, warmup, **kwargs):  # a plain launch: recorded, not run
        if warmup:
            return real_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(self.fn.__name__)

    def tuned_run(self, *args, grid, warmup, **kwargs):  # where autotune times each config: compiled or compiles
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        before = len(compiles)
        for c in configs:
            real_run(self.fn, *args, grid=grid, warmup=True, **kwargs, **c.all_kwargs())
        self.nargs = None
        launches.append((self.base_fn.__name__, len(configs), len(compiles) - before))

    triton.compiler.compile = timed_compile  # JITFunction binds it on its first run
    jit.JITFunction.run = run
    autotuner.Autotuner.run = tuned_run
    A = importlib.import_module("kernels.attention")
    A.COMPILE_AT_ONCE = at_once
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    B, H, S = 2, 2, 100
    q, k, v, do = (torch.randn(B, H, S, head_dim).to(dt) for _ in range(4))
    seqs = A.padded_seqs(torch.tensor([S, 37]), B, S, "cpu")
    scale = head_dim ** -0.5
    steps = {}

    def step(name, fn):
        n, m, t0 = len(compiles), len(launches), time.perf_counter()
        out = fn()
        steps[name] = dict(seconds=time.perf_counter() - t0, compiles=compiles[n:], launches=launches[m:])
        return out

    out, lse = step("forward", lambda: A.attention_forward(q, k, v, seqs, causal, scale, dropout, 1))
    step("backward", lambda: A.attention_backward(do, q, k, v, out, lse, seqs, causal, scale, dropout, 1))
    step("forward again", lambda: A.attention_forward(q, k, v, seqs, causal, scale, dropout, 1))
    lowp = dt != torch.float32
    picks = {kind: len(A.tile_configs(kind, triton.next_power_of_2(head_dim), lowp, dropout > 0))
             for kind in ("fwd", "dkdv", "dq")}
    return dict(steps=steps, picks=picks, cpus=len(os.sched_getaffinity(0)))


def run_child(at_once: bool, cache_dir: str | Path, dtype: str = "bf16", head_dim: int = 64, causal: bool = False,
              dropout: float = 0.0, timeout: float = 900) -> dict:
    """`child(...)` in a fresh process with the interpreter off and Triton's cache in `cache_dir`."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    spec = json.dumps(dict(at_once=at_once, dtype=dtype, head_dim=head_dim, causal=causal, dropout=dropout))
    proc = subprocess.run([sys.executable, "-m", "bench.compile_at_once", "--child", spec], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench.compile_at_once child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _overlapping(compiles: list[dict]) -> bool:
    spans = sorted((c["t0"], c["t1"]) for c in compiles)
    return any(b0 < a1 for (_, a1), (b0, _) in zip(spans, spans[1:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of measurements (one each way)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats: at least 1 pair, got {args.repeats}")
    if not 1 <= args.head_dim <= 256:
        ap.error(f"--head-dim: the kernels take 1 to 256, got {args.head_dim}")
    if not 0.0 <= args.dropout < 1.0:
        ap.error(f"--dropout: a probability in [0, 1), got {args.dropout}")
    if args.child:
        print("RESULT " + json.dumps(child(**json.loads(args.child))), flush=True)
        return 0
    from bench.env import append_row, environment
    from bench.kernel_resources import toolchain_missing

    if (why := toolchain_missing()) is not None:
        ap.exit(2, f"bench.compile_at_once: cannot compile for NVIDIA targets here: {why}\n")
    env = environment()
    for r in range(args.repeats):
        for at_once in (r % 2 == 0, r % 2 == 1):  # alternate which way goes first
            with tempfile.TemporaryDirectory() as cache:
                got = run_child(at_once, cache, args.dtype, args.head_dim, args.causal, args.dropout)
            fwd, bwd = got["steps"]["forward"], got["steps"]["backward"]
            row = env | {"bench": "compile_at_once", "target": "sm_90 (stand-in driver, nothing launched)",
                         "dtype": args.dtype, "head_dim": args.head_dim, "causal": args.causal,
                         "dropout": args.dropout, "repeat": r, "mode": "at_once" if at_once else "one_by_one",
                         "child_cpus": got["cpus"], "forward_s": round(fwd["seconds"], 2),
                         "backward_s": round(bwd["seconds"], 2),
                         "compiles": len(fwd["compiles"]) + len(bwd["compiles"]),
                         "threads": len({c["thread"] for c in fwd["compiles"] + bwd["compiles"]}),
                         "overlapping": _overlapping(fwd["compiles"]) or _overlapping(bwd["compiles"]),
                         "configs": got["picks"]}
            append_row(args.results, row, ("mode", "repeat", "forward_s", "backward_s", "compiles", "threads"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
