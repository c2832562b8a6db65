"""Forward+backward time and peak extra memory of the vocabulary head's loss, per implementation.

    python -m bench.cross_entropy [--device cpu|cuda] [--sizes N:H:V ...] [--impls xlt eager ...]
                                  [--dtype fp32|bf16|fp16] [--repeats R] [--threads T]
                                  [--out bench/results/cross_entropy_<device>.jsonl]

Implementations (those that cannot run here are reported as skipped rows, never substituted):
- `xlt`: kernels.linear_cross_entropy, backend "auto" (Triton on CUDA, the chunked PyTorch twin on CPU);
- `eager`: F.cross_entropy(F.linear(h, w, b), t), the full N x V logits;
- `torch_lce`: torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (chunked), when
  this torch has it;
- `liger`: liger-kernel's fused linear cross-entropy, when installed (CUDA only).

One call is loss = f(hidden, weight, bias, target) followed by loss.backward(), with grads for hidden,
weight and bias. Each row records the median time per call over `--repeats` timed calls and the loss.

Peak extra memory, the bytes a call needs beyond its inputs (gradients included):
- CUDA: torch.cuda.max_memory_allocated() during the first call minus torch.cuda.memory_allocated()
  before it (the caching allocator's own counters; after a warm-up call with grads set to None).
- CPU: there is no allocator counter, so each (implementation, size) runs in a fresh subprocess that
  builds its inputs, resets the kernel's resident-set high-water mark (writing 5 to
  /proc/self/clear_refs, Linux >= 4.0) and measures VmHWM minus VmRSS around its first call, before any
  warm-up can leave freed memory cached in the process. Resident pages, not allocations: pages allocated
  but never touched do not count. A child killed for memory is reported as an error row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .env import append_row, environment
from .timing import CUDA_MEMORY_METHOD, cuda_peak_extra_bytes, timed_calls

IMPLS = ("xlt", "eager", "torch_lce", "liger")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
XLMR_VOCAB = 250_002
# CPU default: only N=4096, H=768 (eager needs ~3 x N x V x 4 bytes, 12 GB there; 16k tokens do not fit).
DEFAULT_SIZES = {"cuda": [f"{n}:{h}:{XLMR_VOCAB}" for h in (768, 1024) for n in (4096, 16384)],
                 "cpu": [f"4096:768:{XLMR_VOCAB}"]}


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--sizes {text!r}: expected N:H:V with three integers, e.g. 4096:768:250002") from None
    if min(n, h, v) < 1:
        raise ValueError(f"--sizes {text!r}: N, H and V must be >= 1")
    return n, h, v


def _why_unavailable(impl: str, device: str) -> str | None:
    if impl == "torch_lce" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if impl == "liger":
        if device != "cuda":
            return "liger-kernel runs on CUDA only"
        try:
            import liger_kernel.transformers.functional  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    return None


def loss_fn(impl: str):
    if impl == "xlt":
        import kernels
        return lambda h, w, b, t: kernels.linear_cross_entropy(h, w, b, t)
    if impl == "eager":
        return lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b).float(), t)
    if impl == "torch_lce":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, b, t: F.linear_cross_entropy(h, w, t, linear_bias=b, options=options)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, b, t):
            out = liger_fused_linear_cross_entropy(h, w, t, bias=b)
            return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        return liger
    raise ValueError(f"--impls {impl!r}: expected one of {', '.join(IMPLS)}")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) * h ** -0.5).to(dtype).requires_grad_()
    bias = torch.zeros(v, device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, bias, target


def _one_call(fn, inputs) -> float:
    hidden, weight, bias, target = inputs
    for p in (hidden, weight, bias):
        p.grad = None
    loss = fn(hidden, weight, bias, target)
    loss.backward()
    return float(loss.detach())


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def measure(impl: str, size: tuple[int, int, int], dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Run in this process: memory of the first call (see module docstring), then timed calls."""
    fn = loss_fn(impl)
    inputs = make_inputs(*size, dtype, device)
    if device == "cuda":
        _one_call(fn, inputs)  # warm-up: Triton compiles, cuBLAS picks its kernels
        for p in inputs[:3]:
            p.grad = None
        peak, loss = cuda_peak_extra_bytes(lambda: _one_call(fn, inputs))
        method = CUDA_MEMORY_METHOD
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _proc_status_kib("VmRSS")
        loss = _one_call(fn, inputs)
        peak = (_proc_status_kib("VmHWM") - base) * 1024
        method = "fresh process: VmHWM - VmRSS around the first call (clear_refs reset)"
    times, _ = timed_calls(lambda: _one_call(fn, inputs), device, repeats)
    row = {"time_ms": round(statistics.median(times), 3) if times else None, "repeats": repeats,
           "peak_extra_mib": round(peak / 2**20, 2), "memory_method": method, "loss": loss}
    if impl == "xlt":
        from kernels.dispatch import resolve
        from kernels.cross_entropy import chunk_rows
        row["chunk_rows"] = chunk_rows(*size)
        row["backend"] = resolve("linear_cross_entropy", "auto", torch.device(device))
    return row


def run_child(impl: str, size: tuple[int, int, int], dtype_name: str, repeats: int, threads: int | None) -> dict:
    """measure() in a fresh Python process (CPU memory needs a process of its own)."""
    cmd = [sys.executable, "-m", "bench.cross_entropy", "--_child", "--device", "cpu", "--impls", impl,
           "--sizes", ":".join(map(str, size)), "--dtype", dtype_name, "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"child exited with code {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", help="N:H:V triples (default: XLM-R shapes for the device)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), help=f"any of {', '.join(IMPLS)}")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--repeats", type=int, help="timed calls after the memory call (default: 10 cuda, 1 cpu)")
    ap.add_argument("--threads", type=int, help="torch threads on cpu")
    ap.add_argument("--out", help="JSONL file to append to (default: bench/results/cross_entropy_<device>.jsonl)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    repeats = args.repeats if args.repeats is not None else (10 if args.device == "cuda" else 1)
    if repeats < 0:
        ap.error(f"--repeats must be >= 0, got {repeats}")
    try:
        sizes = [parse_size(s) for s in (args.sizes or DEFAULT_SIZES[args.device])]
    except ValueError as e:
        ap.error(str(e))
    for impl in args.impls:
        if impl not in IMPLS:
            ap.error(f"--impls {impl!r}: expected one of {', '.join(IMPLS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(measure(args.impls[0], sizes[0], DTYPES[dtype_name], "cpu", repeats)))
        return 0
    out = Path(args.out or f"bench/results/cross_entropy_{args.device}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    for n, h, v in sizes:
        for impl in args.impls:
            row = {"bench": "cross_entropy", **env, "device": args.device, "impl": impl, "n": n, "h": h, "v": v,
                   "dtype": dtype_name}
            why = _why_unavailable(impl, args.device)
            if why:
                row["skipped"] = why
            elif args.device == "cpu":
                row.update(run_child(impl, (n, h, v), dtype_name, repeats, args.threads))
            else:
                try:
                    row.update(measure(impl, (n, h, v), DTYPES[dtype_name], "cuda", repeats))
                except torch.cuda.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
            append_row(out, row, ("impl", "n", "h", "v", "time_ms", "peak_extra_mib", "loss"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
