"""MoE FFN layer forward+backward: time, tokens/s and peak memory against the dense FFN of equal active
FLOPs (intermediate size top_k * F), the PyTorch twin path, a torch._grouped_mm expert path, and
megablocks' dMoE when installed; plus the routing overhead (router, top-k, permute, combine) as a share
of the layer's time.

    python -m bench.moe [--device cpu|cuda] [--out bench/results/moe_<device>.jsonl] [--tiny]
                        [--tokens N --hidden H --ffn F --experts E --top-k K --dtype fp32|bf16]

Appends one JSONL row per variant with the environment (bench/env.py). Time and memory follow
bench/README.md through bench/timing.py: the median of `--repeats` calls after warm-up calls, timed with
CUDA events on a GPU (perf_counter on CPU); on CUDA, `peak_extra_mib` is the peak allocated during one
forward+backward beyond what was allocated before it (no memory figure on CPU). Defaults are the GPU target
shape (H=1024, F=4096, E=8, k=2, 16k tokens); --tiny is a seconds-long CPU smoke run. A variant that
cannot run here (no CUDA for Triton, no megablocks, an unsupported _grouped_mm) gets a row with `skipped`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from models.ffn import FeedForward
from models.moe import MoEFeedForward

from .env import append_row, environment
from .timing import CUDA_MEMORY_METHOD, cuda_peak_extra_bytes, median_ms

WARMUP = 2  # untimed calls first: Triton compiles, cuBLAS picks its kernels


class _GroupedMMMoE(MoEFeedForward):
    """The same layer with the expert FFN on torch._grouped_mm (an anchor, not a backend)."""

    def experts(self, x_sorted, tokens_per_expert):
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        rows = torch.repeat_interleave(torch.arange(self.num_experts, device=x_sorted.device), tokens_per_expert)
        h = torch._grouped_mm(x_sorted, self.w_up.transpose(1, 2), offs=offs) + self.b_up[rows]
        return torch._grouped_mm(F.gelu(h), self.w_down.transpose(1, 2), offs=offs) + self.b_down[rows]


def _fwd_bwd(layer, x, dy):
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        (layer(x) * dy).sum().backward()
    return step


def _megablocks(args, device, dtype):
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE
    mb_args = Arguments(hidden_size=args.hidden, ffn_hidden_size=args.ffn, moe_num_experts=args.experts,
                        moe_top_k=args.top_k, mlp_impl="grouped", bf16=dtype == torch.bfloat16,
                        fp16=False, device=device)
    layer = dMoE(mb_args)

    class _Wrap(torch.nn.Module):  # dMoE takes (S, B, H) and returns (out, bias)
        def __init__(self):
            super().__init__()
            self.inner = layer

        def forward(self, x):
            return self.inner(x[:, None])[0][:, 0]
    return _Wrap()


def _routing_step(layer, x, dy):
    """The layer without its expert FFN (identity experts): router, top-k, permute, combine."""
    def step():
        x.grad = None
        r = layer.route(x)
        xs, plan = kernels.moe_permute(x, r.expert_ids, layer.num_experts, backend=layer.kernel_backend)
        out = kernels.moe_unpermute(xs, r.weights.to(xs.dtype), plan, backend=layer.kernel_backend)
        (out * dy).sum().backward()
    return step


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    T, H, Fd, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    shape = {"device": device.type, "dtype": args.dtype, "tokens": T, "hidden": H, "ffn": Fd, "experts": E,
             "top_k": k}
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    variants = {"dense_equal_active": lambda: FeedForward(H, k * Fd)}
    for b in backends:
        variants[f"moe_{b}"] = lambda b=b: MoEFeedForward(H, Fd, E, k, kernel_backend=b)
    variants["moe_grouped_mm"] = lambda: _GroupedMMMoE(H, Fd, E, k, kernel_backend="torch")
    variants["megablocks_dmoe"] = lambda: _megablocks(args, device, dtype)
    rows = []
    for name, make in variants.items():
        row = {"bench": "moe", **environment(), **shape, "variant": name}
        try:
            layer = make().to(device=device, dtype=dtype)
            step = _fwd_bwd(layer, x, dy)
            ms = median_ms(step, device, args.repeats, warmup=WARMUP)
            row.update(ms_fwd_bwd=round(ms, 3), tokens_per_s=round(T / (ms * 1e-3), 1), repeats=args.repeats)
            if device.type == "cuda":  # one more call, after the warm-up, from no gradients held
                x.grad = None
                layer.zero_grad(set_to_none=True)
                peak, _ = cuda_peak_extra_bytes(step)
                row.update(peak_extra_mib=round(peak / 2**20, 1), memory_method=CUDA_MEMORY_METHOD)
            if isinstance(layer, MoEFeedForward) and not isinstance(layer, _GroupedMMMoE):
                rms = median_ms(_routing_step(layer, x, dy), device, args.repeats, warmup=WARMUP)
                row.update(routing_ms=round(rms, 3), routing_share=round(rms / ms, 4))
            del layer, step
            x.grad = None
        except Exception as e:  # an anchor that cannot run here is reported, not fatal  # noqa: BLE001
            row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSONL to append to (default bench/results/moe_<device>.jsonl)")
    ap.add_argument("--tiny", action="store_true", help="small CPU-sized shapes (a smoke run)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.tiny:
        args.tokens, args.hidden, args.ffn, args.experts, args.repeats = 256, 64, 128, 4, 3
    if not 1 <= args.top_k <= args.experts:
        ap.error(f"--top-k must be in [1, --experts={args.experts}], got {args.top_k}")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    rows = run(args)
    out = Path(args.out or f"bench/results/moe_{args.device}.jsonl")
    for row in rows:
        append_row(out, row, ("variant", "ms_fwd_bwd", "tokens_per_s", "peak_extra_mib", "routing_share"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
