"""What the Triton kernels need on an NVIDIA GPU, measured on a machine without one.

Triton compiles for NVIDIA targets without a GPU or a driver: `triton.compile` with an `ASTSource` (the
kernel's signature, specialised as a real launch specialises it, and its constexprs) and
`GPUTarget("cuda", 80 | 90, 32)` gives PTX and a cubin. `ptxas -v` on that PTX (the wheel's own ptxas, with
the options Triton gives it: `ptxas` for sm_80, `ptxas-blackwell` for sm_90a) reports registers, spill
stores / loads and stack; the compiled kernel's metadata gives its shared memory.

Jobs: every Triton kernel x every config its autotuner may pick (attention: `kernels.attention.tile_configs`
per padded head dim and dot dtype) or its host code launches (cross-entropy, MoE) x fp32 / bf16 x sm_80 /
sm_90. One place builds each kernel's launch arguments (`_attention_jobs`, `_cross_entropy_jobs`,
`_moe_jobs`): an example launch at XLM-R shapes, every argument by name, so a signature change shows up as
a clear error here rather than a wrong compile.

    python -m bench.kernel_resources [--ops attention,cross_entropy,moe] [--head-dims 64,80,128,256] [--workers N]

prints the Markdown tables of bench/README.md and appends one JSONL row per compile to
bench/results/kernel_resources.jsonl. tests/kernels/test_gpu_build.py runs the same jobs through `compile_all`.

Compiles run in worker processes (spawned, TRITON_INTERPRET=0: the kernels must be `JITFunction`s, not the
interpreter's); Triton's on-disk cache keeps the compiled kernels and, next to each, the ptxas report, so a
second run only reads them back.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OPS = ("attention", "cross_entropy", "moe")
DTYPES = ("fp32", "bf16")
CAPABILITIES = (80, 90)
HEAD_DIMS = (64, 80, 128, 256)
# The presets' head dims (XLM-R base / large: 64; XL: 80, padded to 128 in the kernels; XXL: 128): every
# config autotune may pick must compile without spills there, with and without dropout. 256 (the kernels'
# limit, no preset) is compiled without dropout, for the compile and shared-memory checks.
SPILL_FREE_HEAD_DIMS = (64, 80, 128)
# Shared memory a block may use (opt-in maximum), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
RESULTS = Path(__file__).resolve().parent / "results" / "kernel_resources.jsonl"
LOG2E = 1.4426950408889634


class Ptr:
    """Stands for a tensor argument: Triton's specialiser reads only `dtype` and `data_ptr()` (16-byte
    aligned, as torch allocations are)."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20

    def __repr__(self):
        return f"Ptr({self.dtype})"


@dataclasses.dataclass
class Job:
    op: str             # attention, cross_entropy, moe
    module: str         # where the kernel lives
    kernel: str         # its name there (a JITFunction, or an autotuner over one)
    args: dict          # every argument of one example launch, constexprs included, by name
    num_warps: int
    num_stages: int
    capability: int     # 80 or 90
    dtype: str          # the data dtype the launch is for: fp32, bf16 (or "-": no float data)
    config: str         # the tunable part, for the tables
    head_dim: int | None = None
    variant: str = ""   # the other constexprs that differ between launches of one kernel

    def key(self) -> str:
        return (f"{self.kernel}|d={self.head_dim}|{self.dtype}|{self.variant}|{self.config}|"
                f"sm_{self.capability}")


# ----- the jobs: one example launch per kernel and variant --------------------------------------------------
def attention_choices(kind: str, head_dim: int, dtype: str, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) autotune may pick on a GPU for attention kernel `kind`."""
    from kernels.attention import tile_configs
    return tile_configs(kind, _block_d(head_dim), dtype != "fp32", dropout)


def autotune_picks(cases) -> dict:
    """For each (kind, head_dim, dtype, dropout): the configs the attention autotuner itself keeps after
    pruning, asked in a worker (the interpreter's autotuners hold one config)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init) as pool:
        return pool.submit(_autotune_picks, list(cases)).result()


def _autotune_picks(cases) -> dict:
    import importlib
    att = importlib.import_module("kernels.attention")  # `kernels.attention` is also the function's name
    out = {}
    for kind, d, dt, drop in cases:
        tuner = getattr(att, {"fwd": "_fwd", "dkdv": "_bwd_dkdv", "dq": "_bwd_dq"}[kind])
        lowp = dt != "fp32"
        tuner.nargs = {}
        configs = tuner.prune_configs(dict(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=False, DROPOUT=drop, LOWP=lowp,
                                           IEEE=not lowp))
        tuner.nargs = None
        out[(kind, d, dt, drop)] = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                    for c in configs]
    return out


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def attention_cases(head_dims, dtypes) -> list[tuple[int, str, tuple[bool, ...]]]:
    """(head_dim, dtype, dropout variants) compiled. fp32 at 80 is left out: the same tiles and code as at 128
    but for the head-dim mask, and fp32 is the tests' path (run at 32 / 64 / 128), not the presets'."""
    return [(d, dt, (False, True) if d in SPILL_FREE_HEAD_DIMS else (False,)) for d in head_dims for dt in dtypes
            if not (dt == "fp32" and d == 80)]


def _attention_jobs(head_dims, dtypes, capabilities) -> list[Job]:
    """Packed layout (total, H, D), as the encoder runs it: 8 sequences of up to 512 tokens, 16 heads."""
    H, T = 16, 4096
    out = []
    for d, dt, dropout in attention_cases(head_dims, dtypes):
        bd, lowp = _block_d(d), dt != "fp32"
        strides = {f"s{p}{a}": v for p in "qkvodg" for a, v in zip("bhtd", (0, d, H * d, 1))}
        for drop in dropout:
            flags = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=False, DROPOUT=drop, LOWP=lowp, IEEE=not lowp)
            seqs = dict(START=Ptr("i32"), QLEN=Ptr("i32"), KLEN=Ptr("i32"), slb=0, slh=T, H=H,
                        qk_scale=LOG2E / d ** 0.5, seed=2**61 + 12345 if drop else 0,  # as `_new_seed`
                        p_drop=0.1 if drop else 0.0, seq_bucket=512)
            fwd = dict(Q=Ptr(dt), K=Ptr(dt), V=Ptr(dt), OUT=Ptr(dt), LSE=Ptr("fp32"), **seqs,
                       **{k: v for k, v in strides.items() if k[1] in "qkvo"})
            bwd = dict(Q=Ptr(dt), K=Ptr(dt), V=Ptr(dt), DO=Ptr(dt), LSE=Ptr("fp32"), DELTA=Ptr("fp32"), **seqs,
                       sm_scale=1 / d ** 0.5, **{k: v for k, v in strides.items() if k[1] in "qkvdg"})
            launches = {"fwd": ("_fwd", fwd), "dkdv": ("_bwd_dkdv", dict(bwd, DK=Ptr(dt), DV=Ptr(dt))),
                        "dq": ("_bwd_dq", dict(bwd, DQ=Ptr(dt)))}
            for kind, (name, args) in launches.items():
                for bm, bn, w, s in attention_choices(kind, d, dt, drop):
                    out += [Job("attention", "kernels.attention", name, dict(args, BLOCK_M=bm, BLOCK_N=bn, **flags),
                                w, s, cap, dt, f"{bm}x{bn} w{w} s{s}", d, "dropout" if drop else "")
                            for cap in capabilities]
        delta = dict(OUT=Ptr(dt), DO=Ptr(dt), DELTA=Ptr("fp32"), START=Ptr("i32"), QLEN=Ptr("i32"), slb=0, slh=T,
                     H=H, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=64, **{k: v for k, v in strides.items() if k[1] in "od"})
        out += [Job("attention", "kernels.attention", "_bwd_delta_kernel", delta, 4, 3, cap, dt, "64 w4", d)
                for cap in capabilities]
    mask = dict(OUT=Ptr("i8"), seed=2**61 + 12345, p_drop=0.1, S=512, BLOCK=64)
    out += [Job("attention", "kernels.attention", "_dropout_mask_kernel", mask, 4, 3, cap, "-", "64 w4")
            for cap in capabilities]
    return out


def _cross_entropy_jobs(dtypes, capabilities) -> list[Job]:
    """`_ce_rows_triton`: BLOCK_V = min(next_pow2(V), 4096), 8 warps. V = 250,002 (XLM-R) gives 4096; the tiny
    presets' vocabularies (1000-8000) give 1024-4096, so 1024 stands for the small blocks."""
    out = []
    for dt in dtypes:
        for variant, grad, stride_scale, block_v, V in (("loss", False, 0, 4096, 250002),
                                                         ("grad", True, 0, 4096, 250002),
                                                         ("grad, per-row scale", True, 1, 4096, 250002),
                                                         ("grad", True, 0, 1024, 1000)):
            args = dict(X=Ptr(dt), stride_x=V, T=Ptr("i64"), LOSS=Ptr("fp32"), DX=Ptr(dt), stride_dx=V,
                        SCALE=Ptr("fp32"), stride_scale=stride_scale, V=V, ignore_index=-100, eps=0.1, z=1e-4,
                        HAS_GRAD=grad, BLOCK_V=block_v)
            out += [Job("cross_entropy", "kernels.cross_entropy", "_ce_rows_kernel", args, 8, 3, cap, dt,
                        f"BLOCK_V={block_v} w8", variant=variant) for cap in capabilities]
    return out


def _moe_jobs(dtypes, capabilities) -> list[Job]:
    """The launches of kernels/moe.py's host code at H=1024, F=4096 (FFN per expert), 16k tokens. Every value of
    every constexpr appears in some launch (router mode, top-k 1 / 2, E = 8 / 64, bias, epilogue), not every
    combination."""
    Hd, F, T, E = 1024, 4096, 16384, 8
    launches = []  # (kernel, args, num_warps, config, variant, float data?)
    for n_exp, k, mode in ((8, 2, 0), (8, 1, 1), (64, 2, 2)):
        common = dict(T=T, E=n_exp, K=k, MODE=mode, BLOCK_T=16, BLOCK_E=1 << (n_exp - 1).bit_length())
        v = f"E={n_exp} k={k} mode={mode}"
        launches.append(("_route_fwd_kernel", lambda dt, c=common: dict(
            x_ptr=Ptr(dt), ids_ptr=Ptr("i64"), w_ptr=Ptr("fp32"), probsum_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"),
            counts_ptr=Ptr("i32"), **c), 4, "BLOCK_T=16", v, True))
        launches.append(("_route_bwd_kernel", lambda dt, c=common: dict(
            x_ptr=Ptr(dt), ids_ptr=Ptr("i64"), w_ptr=Ptr("fp32"), dw_ptr=Ptr("fp32"), c_ptr=Ptr("fp32"),
            dlse_ptr=Ptr("fp32"), dx_ptr=Ptr("fp32"), **c), 4, "BLOCK_T=16", v, True))
    for n_exp in (8, 64):
        be = 1 << (n_exp - 1).bit_length()
        launches.append(("_hist_kernel", lambda dt, n=n_exp, b=be: dict(
            ids_ptr=Ptr("i64"), block_counts_ptr=Ptr("i64"), N=2 * T, E=n, BLOCK=64, BLOCK_E=b), 4, "BLOCK=64",
            f"E={n_exp}", False))
    launches.append(("_positions_kernel", lambda dt: dict(
        ids_ptr=Ptr("i64"), rank_base_ptr=Ptr("i64"), starts_ptr=Ptr("i64"), pos_ptr=Ptr("i64"), order_ptr=Ptr("i64"),
        N=2 * T, E=E, capacity=2 * T + 1, BLOCK=64), 4, "BLOCK=64", "", False))
    for k, has_w in ((1, False), (2, True)):
        launches.append(("_gather_rows_kernel", lambda dt, k=k: dict(
            src_ptr=Ptr(dt), order_ptr=Ptr("i64"), out_ptr=Ptr(dt), R=k * T, H=Hd, K=k, BLOCK_R=32, BLOCK_H=64),
            4, "32x64", f"k={k}", True))
        launches.append(("_gather_sum_kernel", lambda dt, k=k, w=has_w: dict(
            src_ptr=Ptr(dt), pos_ptr=Ptr("i64"), w_ptr=Ptr(dt), out_ptr=Ptr(dt), T=T, H=Hd, K=k, HAS_W=w,
            BLOCK_T=32, BLOCK_H=64), 4, "32x64", f"k={k}{' weighted' if has_w else ''}", True))
        launches.append(("_unpermute_bwd_kernel", lambda dt, k=k: dict(
            dout_ptr=Ptr(dt), y_ptr=Ptr(dt), pos_ptr=Ptr("i64"), w_ptr=Ptr(dt), dy_ptr=Ptr(dt), dw_ptr=Ptr("fp32"),
            T=T, H=Hd, K=k, BLOCK_T=32, BLOCK_H=64), 4, "32x64", f"k={k}", True))
    # grouped GEMMs of one expert FFN (name, N, K, stride_bk, stride_bn, bias, epilogue); "dx" is "down" with B
    # transposed and no bias
    for v, n_out, kk, sbk, sbn, bias, epi in (("up + gelu", F, Hd, 1, Hd, True, 1), ("down", Hd, F, 1, F, True, 0),
                                              ("dh * gelu'", F, Hd, F, 1, False, 2)):
        launches.append(("_grouped_mm_kernel", lambda dt, n=n_out, kk=kk, sbk=sbk, sbn=sbn, bias=bias, epi=epi: dict(
            a_ptr=Ptr(dt), b_ptr=Ptr(dt), bias_ptr=Ptr(dt), c_ptr=Ptr(dt), aux_ptr=Ptr(dt), group_ptr=Ptr("i32"),
            tile_ptr=Ptr("i32"), N=n, K=kk, E=E, stride_am=kk, stride_be=F * Hd, stride_bk=sbk, stride_bn=sbn,
            stride_bias=n if bias else 0, HAS_BIAS=bias, EPILOGUE=epi, **_moe_mm_flags(dt), BLOCK_M=32, BLOCK_N=32,
            BLOCK_K=32, BLOCK_E=8), 4, "32x32x32", v, True))
    for bias in (False, True):
        launches.append(("_grouped_wgrad_kernel", lambda dt, bias=bias: dict(
            g_ptr=Ptr(dt), a_ptr=Ptr(dt), dw_ptr=Ptr("fp32"), db_ptr=Ptr("fp32"), group_ptr=Ptr("i32"), M=Hd, N=F,
            HAS_BIAS=bias, **_moe_mm_flags(dt), BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), 4, "32x32x32",
            "bias" if bias else "", True))
    out = []
    for name, make, warps, config, variant, floats in launches:
        for dt in (dtypes if floats else ("-",)):
            out += [Job("moe", "kernels.moe", name, make(dt if floats else "fp32"), warps, 3, cap, dt, config,
                        variant=variant) for cap in capabilities]
    return out


def _moe_mm_flags(dt: str) -> dict:
    upcast = dt == "fp32"  # kernels/moe.py `_mm_flags` on a GPU
    return dict(UPCAST=upcast, PRECISION="ieee" if upcast else "tf32")


def jobs(ops=OPS, head_dims=HEAD_DIMS, dtypes=DTYPES, capabilities=CAPABILITIES) -> list[Job]:
    out = []
    if "attention" in ops:
        out += _attention_jobs(head_dims, dtypes, capabilities)
    if "cross_entropy" in ops:
        out += _cross_entropy_jobs(dtypes, capabilities)
    if "moe" in ops:
        out += _moe_jobs(dtypes, capabilities)
    return out


# ----- compiling (in the workers) ---------------------------------------------------------------------------
def toolchain_missing() -> str | None:
    """Why this machine cannot compile for NVIDIA targets, or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton (with triton.compiler / triton.backends.compiler) is not importable: {e}"
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return f"triton {triton.__version__} has no NVIDIA backend (triton.backends.nvidia)"
    bin_dir = Path(nv.__file__).parent / "bin"
    for tool in ("ptxas", "ptxas-blackwell"):
        if not os.access(bin_dir / tool, os.X_OK):
            return f"triton {triton.__version__} ships no {tool} in {bin_dir}"
    return None


def _worker_init() -> None:
    # The kernels must be JITFunctions: the interpreter's stand-ins do not compile. Set before any kernel import.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated: silences its warning


def _print_ptxas_reports() -> None:
    """Have Triton print the report of the ptxas -v run that makes the cubin (Triton >= 3.4 knobs); without
    it, `compile_job` runs ptxas itself."""
    try:
        from triton import knobs
        knobs.nvidia.dump_ptxas_log = True
    except (ImportError, AttributeError):
        pass


def _jit_function(job: Job):
    import importlib

    from triton.runtime.jit import JITFunction
    fn = getattr(importlib.import_module(job.module), job.kernel)
    while not isinstance(fn, JITFunction):  # autotuner / heuristics wrappers
        fn = fn.fn
    return fn


def specialize(fn, args: dict, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compile`, as `JITFunction.run` derives them from a launch
    with `args`: Triton's own specialiser (ints equal to 1 become constexprs, multiples of 16 and aligned
    pointers get divisibility hints, `do_not_specialize` respected)."""
    from triton._C.libtriton import native_specialize_impl
    names = [p.name for p in fn.params]
    missing, unknown = [n for n in names if n not in args], [n for n in args if n not in names]
    if missing or unknown:
        raise TypeError(f"{fn.__name__}: the example launch in bench/kernel_resources.py does not match the "
                        f"kernel's signature: missing {missing}, unknown {unknown}")
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(backend, value, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", spec
            continue
        signature[p.name] = ty
        if isinstance(spec, str) and backend.parse_attr(spec):
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, capability: int) -> str:
    """`ptxas -v` on the PTX with the options Triton's NVIDIA backend passes (make_cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(src.with_suffix(".o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stderr


def compile_job(job: Job) -> dict:
    """Compile one job; its row (resources, or the error)."""
    row = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("args", "module")}
    row["target"] = f"sm_{job.capability}"
    row["shared_limit"] = SHARED_LIMIT[job.capability]
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.cache import get_cache_manager

        fn = _jit_function(job)
        row["jit"] = fn.__name__
        target = GPUTarget("cuda", job.capability, 32)
        signature, constexprs, attrs = specialize(fn, job.args, make_backend(target))
        _print_ptxas_reports()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                               options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        log = printed.getvalue()
        cache = get_cache_manager(k.hash)  # the compiled kernel's own cache folder keeps the report
        log_name = f"{k.name[:150]}.ptxas-v.log"
        if _PTXAS_INFO.search(log):
            cache.put(log, log_name, binary=False)
        elif cache.get_file(log_name):  # a cache hit: Triton ran no ptxas
            log = Path(cache.get_file(log_name)).read_text()
        else:
            log = ptxas_report(k.asm["ptx"], job.capability)
            cache.put(log, log_name, binary=False)
        regs, spill = _PTXAS_INFO.search(log), _PTXAS_SPILL.search(log)
        ptx = k.asm["ptx"]
        row |= dict(registers=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                    spill_loads=int(spill.group(3)), shared=int(k.metadata.shared), cubin_bytes=len(k.asm["cubin"]),
                    mma="wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none")
    except Exception as e:  # a row that says why, never a missing row
        row["error"] = f"{type(e).__name__}: {str(e)[-3000:]}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def workers_default() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def compile_all(job_list: list[Job], workers: int | None = None, progress: bool = False) -> list[dict]:
    """Rows for every job, in order; compiled by `workers` spawned processes (TRITON_INTERPRET=0 there)."""
    workers = workers or workers_default()
    ctx = multiprocessing.get_context("spawn")
    # biggest first: the kernels with most work (attention) do not end up alone at the tail
    order = sorted(range(len(job_list)), key=lambda i: job_list[i].op != "attention")
    rows = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        for i, row in zip(order, pool.map(compile_job, [job_list[i] for i in order], chunksize=1)):
            rows[i] = row
            if progress:
                print(f"[{len(rows)}/{len(job_list)}] {row['kernel']} d={row['head_dim']} {row['dtype']} "
                      f"{row['variant']} {row['config']} sm_{row['capability']}: {row['compile_s']} s",
                      file=sys.stderr, flush=True)
    return [rows[i] for i in range(len(job_list))]


# ----- reports ----------------------------------------------------------------------------------------------
def spills(row: dict) -> bool:
    return bool(row.get("spill_stores") or row.get("spill_loads"))


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "**error**"
    kib = row["shared"] / 1024
    s = f"{row['registers']} · {row['spill_stores']}/{row['spill_loads']} · {row['stack']} · {kib:.0f}"
    return f"**{s}**" if spills(row) or row["shared"] > row["shared_limit"] else s


def markdown(rows: list[dict]) -> str:
    """The attention table (one line per kernel, head dim, dtype, variant, config) and a summary per kernel
    for cross-entropy and MoE. Cells: registers · spill stores/loads (B) · stack (B) · shared memory (KiB)."""
    by_key = {}
    for r in rows:
        by_key[(r["kernel"], r["head_dim"], r["dtype"], r["variant"], r["config"], r["capability"])] = r
    lines = ["| kernel | d | dtype | dropout | config (BLOCK_M x BLOCK_N, warps, stages) | sm_80 (A100) | "
             "sm_90a (H100) |", "|---|---|---|---|---|---|---|"]
    seen = []
    for r in rows:
        k = (r["kernel"], r["head_dim"], r["dtype"], r["variant"], r["config"])
        if r["op"] == "attention" and r["kernel"] in ("_fwd", "_bwd_dkdv", "_bwd_dq") and k not in seen:
            seen.append(k)
    for k in seen:
        kernel, d, dt, variant, config = k
        lines.append(f"| `{kernel}` | {d} | {dt} | {'yes' if variant else 'no'} | {config} | "
                     f"{_cell(by_key.get(k + (80,)))} | {_cell(by_key.get(k + (90,)))} |")
    lines += ["", "| op | kernel | variants | sm_80: max registers · spills · max shared KiB | "
              "sm_90a: max registers · spills · max shared KiB |", "|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        if r["op"] != "attention" or r["kernel"] not in ("_fwd", "_bwd_dkdv", "_bwd_dq"):
            groups.setdefault((r["op"], r["kernel"]), []).append(r)
    for (op, kernel), rs in groups.items():
        cells = []
        for cap in CAPABILITIES:
            ok = [r for r in rs if r["capability"] == cap and "error" not in r]
            bad = sum(1 for r in rs if r["capability"] == cap and "error" in r)
            if not ok:
                cells.append(f"{bad} errors" if bad else "-")
                continue
            n_spill = sum(map(spills, ok))
            cells.append(f"{max(r['registers'] for r in ok)} · {n_spill or 'none'} · "
                         f"{max(r['shared'] for r in ok) / 1024:.0f}" + (f" · **{bad} errors**" if bad else ""))
        n = len({(r["dtype"], r["variant"], r["config"]) for r in rs})
        lines.append(f"| {op} | `{kernel}` | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="attention head dims")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: usable CPUs, <= 8)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSONL file the rows are appended to")
    ap.add_argument("--no-rows", action="store_true", help="print the tables only")
    a = ap.parse_args(argv)
    why = toolchain_missing()
    if why:
        print(f"kernel_resources: cannot compile for NVIDIA targets here: {why}")
        return 1
    ops = [o for o in a.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"--ops: unknown {unknown}; expected a subset of {', '.join(OPS)}")
    job_list = jobs(ops, tuple(int(d) for d in a.head_dims.split(",")), tuple(a.dtypes.split(",")))
    t0 = time.perf_counter()
    rows = compile_all(job_list, a.workers, progress=True)
    wall = time.perf_counter() - t0
    if not a.no_rows:
        from bench.env import environment
        env = environment()
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "kernel_resources", **env, **r}) + "\n")
    print(markdown(rows))
    errors = [r for r in rows if "error" in r]
    over = [r for r in rows if "error" not in r and r["shared"] > r["shared_limit"]]
    print(f"\n{len(rows)} compiles in {wall:.0f} s ({a.workers or workers_default()} workers): {len(errors)} errors, "
          f"{sum(map(spills, rows))} spill, {len(over)} over the shared-memory limit")
    for r in errors:
        print(f"error: {r['kernel']} {r['dtype']} {r['variant']} {r['config']} sm_{r['capability']}: "
              f"{r['error'].splitlines()[0] if r['error'] else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
