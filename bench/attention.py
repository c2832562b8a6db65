"""Forward and forward+backward throughput of encoder self-attention, per implementation.

    python -m bench.attention [--device cuda|cpu] [--impls xlt_varlen sdpa_flash ...] [--dtype bf16|fp16|fp32]
                              [--repeats R] [--out bench/results/attention_<device>.jsonl]

Shapes (head_dim 64, non-causal): BERT-like batches of one length (128, 256, 512; 12 and 16 heads, 16k
tokens a batch) and an XNLI-like mix (64 sentence pairs with lengths from a seeded log-normal, median ~50
tokens, clipped to [8, 256], padded to the longest). `--device cpu` runs tiny versions of the same
shapes: a smoke run, not a measurement.

Implementations (those that cannot run here are reported as skipped rows, never substituted):
- `xlt_varlen`: kernels.attention_varlen on the packed real tokens (backend "auto": Triton on CUDA);
- `xlt_padded`: kernels.attention on (B, H, S, D) with per-sequence lengths;
- `sdpa_flash`: SDPA, flash backend, no mask: it attends over padding (right for one-length batches);
- `sdpa_efficient_mask`, `sdpa_cudnn_mask`: SDPA, memory-efficient / cuDNN backend, with the key mask;
- `sdpa_math_mask`: SDPA, math backend, with the key mask (CPU smoke only: it materialises S x S);
- `varlen_attn`: torch.nn.attention.varlen.varlen_attn, when this torch has it (CUDA);
- `flash_attn`: flash_attn_varlen_func, when flash-attn is installed (CUDA).

TFLOP/s count only real tokens: forward 4 * n^2 * d FLOPs per sequence and head (QK^T and PV), backward
2.5x the forward (five matmuls to two), as flash-attn's benchmarks count. Each row also records the
largest error of the implementation's output on real rows against the fp32 twin (`max_err`).
Timing: CUDA events, median of `--repeats` calls after warm-up calls (Triton compiles and autotunes then);
CPU: perf_counter.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from .env import append_row, environment
from .timing import timed_calls

IMPLS = ("xlt_varlen", "xlt_padded", "sdpa_flash", "sdpa_efficient_mask", "sdpa_cudnn_mask", "sdpa_math_mask",
         "varlen_attn", "flash_attn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd_bwd")
PACKED = {"xlt_varlen", "varlen_attn", "flash_attn"}


def shapes(device: str) -> list[dict]:
    """name, heads, head_dim and the list of sequence lengths of one batch."""
    if device == "cpu":  # smoke sizes
        return [{"name": "uniform_s64_h2", "heads": 2, "head_dim": 64, "lengths": [64, 64]},
                {"name": "xnli_mix_b4", "heads": 2, "head_dim": 64, "lengths": _xnli_lengths(4)}]
    out = [{"name": f"uniform_s{s}_h{h}", "heads": h, "head_dim": 64, "lengths": [s] * (16384 // s)}
           for h in (12, 16) for s in (128, 256, 512)]
    return out + [{"name": f"xnli_mix_b64_h{h}", "heads": h, "head_dim": 64, "lengths": _xnli_lengths(64)}
                  for h in (12, 16)]


def _xnli_lengths(batch: int) -> list[int]:
    # premise + hypothesis in XLM-R tokens: a long right tail; seeded so every run benches the same batch
    g = torch.Generator().manual_seed(0)
    lens = torch.exp(math.log(50.0) + 0.5 * torch.randn(batch, generator=g)).round().clamp(8, 256)
    return [int(x) for x in lens]


def flops(lengths: list[int], heads: int, head_dim: int, mode: str) -> float:
    fwd = sum(4.0 * n * n * head_dim * heads for n in lengths)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def _why_unavailable(impl: str, device: str) -> str | None:
    if impl in ("sdpa_efficient_mask", "sdpa_cudnn_mask", "varlen_attn", "flash_attn") and device != "cuda":
        return f"{impl} runs on CUDA only"
    if impl == "sdpa_math_mask" and device == "cuda":
        return "the math backend materialises S x S in fp32: a CPU smoke reference only"
    if impl == "varlen_attn":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if impl == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed"
    return None


def _sdpa(backend_name: str, masked: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v, mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None)
    return fn


def attention_fn(impl: str):
    """A callable (q, k, v, extra) -> out; extra is the key mask (padded) or (cu_seqlens, max_seqlen)."""
    import kernels
    if impl == "xlt_varlen":
        return lambda q, k, v, x: kernels.attention_varlen(q, k, v, x[0], x[1])
    if impl == "xlt_padded":
        return lambda q, k, v, x: kernels.attention(q, k, v, lengths=x)
    if impl == "sdpa_flash":
        return _sdpa("FLASH_ATTENTION", masked=False)
    if impl == "sdpa_efficient_mask":
        return _sdpa("EFFICIENT_ATTENTION", masked=True)
    if impl == "sdpa_cudnn_mask":
        return _sdpa("CUDNN_ATTENTION", masked=True)
    if impl == "sdpa_math_mask":
        return _sdpa("MATH", masked=True)
    if impl == "varlen_attn":
        from torch.nn.attention.varlen import varlen_attn
        return lambda q, k, v, x: varlen_attn(q, k, v, x[0], x[0], x[1], x[1])
    if impl == "flash_attn":
        from flash_attn import flash_attn_varlen_func
        return lambda q, k, v, x: flash_attn_varlen_func(q, k, v, x[0], x[0], x[1], x[1])
    raise ValueError(f"--impls {impl!r}: expected one of {', '.join(IMPLS)}")


class Batch:
    """One batch in both layouts, from the same values."""

    def __init__(self, shape: dict, dtype: torch.dtype, device: str):
        lengths, H, D = shape["lengths"], shape["heads"], shape["head_dim"]
        B, S = len(lengths), max(lengths)
        g = torch.Generator(device=device).manual_seed(0)
        self.lengths = torch.tensor(lengths, device=device)
        real = torch.arange(S, device=device)[None, :] < self.lengths[:, None]  # (B, S)
        self.padded = [torch.randn(B, H, S, D, generator=g, device=device).to(dtype) for _ in range(3)]
        self.packed = [t.transpose(1, 2)[real].contiguous() for t in self.padded]  # (total, H, D)
        self.real = real
        self.key_mask = real[:, None, None, :]  # (B, 1, 1, S), True = attend
        self.cu = torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0)).to(torch.int32)
        self.max_len = S
        self.do_padded = torch.randn(B, H, S, D, generator=g, device=device).to(dtype)
        self.do_packed = self.do_padded.transpose(1, 2)[real].contiguous()

    def inputs(self, impl: str):
        if impl in PACKED:
            return self.packed, (self.cu, self.max_len), self.do_packed
        return self.padded, (self.lengths if impl == "xlt_padded" else self.key_mask), self.do_padded

    def real_rows(self, impl: str, out: torch.Tensor) -> torch.Tensor:
        return out if impl in PACKED else out.transpose(1, 2)[self.real]


def _call(fn, qkv, extra, do, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(*qkv, extra)
    for t in qkv:
        t.grad = None
    out = fn(*qkv, extra)
    out.backward(do)
    return out


def measure(impl: str, batch: Batch, mode: str, device: str, repeats: int, warmup: int) -> dict:
    fn = attention_fn(impl)
    qkv, extra, do = batch.inputs(impl)
    qkv = [t.detach().requires_grad_(mode == "fwd_bwd") for t in qkv]
    times, out = timed_calls(lambda: _call(fn, qkv, extra, do, mode), device, repeats, warmup)
    from kernels import attention_reference
    q, k, v = (t.detach().float() for t in batch.padded)
    ref = batch.real_rows("xlt_padded", attention_reference(q, k, v, batch.lengths))
    err = (batch.real_rows(impl, out.detach()).float() - ref).abs().max().item()
    row = {"time_ms": round(statistics.median(times), 4), "repeats": repeats, "max_err": err}
    if impl.startswith("xlt"):
        from kernels.dispatch import resolve
        row["backend"] = resolve(impl.replace("xlt_padded", "attention").replace("xlt_varlen", "attention_varlen"),
                                 "auto", torch.device(device))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), help=f"any of {', '.join(IMPLS)}")
    ap.add_argument("--modes", nargs="+", default=list(MODES), help=f"any of {', '.join(MODES)}")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--repeats", type=int, help="timed calls (default: 20 cuda, 1 cpu)")
    ap.add_argument("--out", help="JSONL file to append to (default: bench/results/attention_<device>.jsonl)")
    args = ap.parse_args(argv)
    for impl in args.impls:
        if impl not in IMPLS:
            ap.error(f"--impls {impl!r}: expected one of {', '.join(IMPLS)}")
    for mode in args.modes:
        if mode not in MODES:
            ap.error(f"--modes {mode!r}: expected one of {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here; use --device cpu")
    repeats = args.repeats if args.repeats is not None else (20 if args.device == "cuda" else 1)
    if repeats < 1:
        ap.error(f"--repeats must be >= 1, got {repeats}")
    warmup = 3 if args.device == "cuda" else 1
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    out = Path(args.out or f"bench/results/attention_{args.device}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    for shape in shapes(args.device):
        batch = Batch(shape, DTYPES[dtype_name], args.device)
        lengths = shape["lengths"]
        for mode in args.modes:
            for impl in args.impls:
                row = {"bench": "attention", **env, "device": args.device, "impl": impl, "shape": shape["name"],
                       "mode": mode, "dtype": dtype_name, "batch": len(lengths), "heads": shape["heads"],
                       "head_dim": shape["head_dim"], "max_len": max(lengths), "real_tokens": sum(lengths),
                       "padded_tokens": len(lengths) * max(lengths), "causal": False,
                       "attends_padding": impl == "sdpa_flash"}  # then max_err is large on mixed lengths
                why = _why_unavailable(impl, args.device)
                if why:
                    row["skipped"] = why
                else:
                    try:
                        row.update(measure(impl, batch, mode, args.device, repeats, warmup))
                        row["tflops"] = round(flops(lengths, shape["heads"], shape["head_dim"], mode)
                                              / (row["time_ms"] * 1e-3) / 1e12, 4)
                    except (RuntimeError, ValueError) as e:  # e.g. no SDPA kernel for this backend and input
                        row["error"] = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                append_row(out, row, ("impl", "shape", "mode", "time_ms", "tflops", "max_err"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
