"""Choose, per call, between an op's Triton kernel and its PyTorch twin.

Rules (DESIGN.md): Triton on CUDA tensors; Triton on CPU only when asked for explicitly and the
interpreter is on (`TRITON_INTERPRET=1`, the tests); the PyTorch twin on CPU otherwise. Third-party
kernels are never chosen here: they are benchmark anchors, not substitutes.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton")

# op name -> Triton implementation. Each kernel module registers itself on import, so an op without a
# Triton kernel yet simply runs its twin under "auto" and says so under "triton".
_TRITON_OPS: dict[str, Callable] = {}


def register_triton(op: str, fn: Callable) -> None:
    _TRITON_OPS[op] = fn


def triton_ops() -> tuple[str, ...]:
    return tuple(sorted(_TRITON_OPS))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Return "torch" or "triton" for `op` on `device`; raise ValueError for an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} for {op}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    has_triton = op in _TRITON_OPS
    if backend == "auto":
        return "triton" if has_triton and device.type == "cuda" else "torch"
    # backend == "triton": explicit request, so fail loudly instead of quietly using the twin.
    if not has_triton:
        raise ValueError(f"{op}: no Triton kernel is registered (have: {', '.join(triton_ops()) or 'none'});"
                         " use backend='torch' or 'auto'")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{op}: backend='triton' on {device.type} needs TRITON_INTERPRET=1 set before "
                         "kernels are imported (or a CUDA device)")
    return "triton"


def host_checks(t: torch.Tensor) -> bool:
    """Whether to run input checks that read tensor values back to the host: always for CPU tensors; on a
    GPU only with XLT_CHECK_INPUTS=1, since they would synchronise every call."""
    return t.device.type == "cpu" or os.environ.get("XLT_CHECK_INPUTS", "0") == "1"


def triton_impl(op: str) -> Callable:
    return _TRITON_OPS[op]


# On CPU, bf16 / fp16 GEMMs go to oneDNN, which builds a primitive for every new shape and caches it: a GEMM
# of a row count not seen before costs 1.9-2.7x per row one seen before (bench/results/cpu_gemm_shapes.jsonl,
# `python -m bench.cpu_gemm_shapes`). Row counts that change every step (the packed tokens of a batch, each
# expert's group of rows) are therefore rounded up to a multiple of this many rows on that path: the
# encoder's packed rows (models.encoder.Packing) and the MoE twin's expert groups (kernels.moe).
CPU_ROW_BUCKET = 64


def row_bucket(x: torch.Tensor) -> int:
    """The multiple that row counts of GEMMs on this tensor's path are rounded up to: CPU_ROW_BUCKET where they
    run in bf16 / fp16 on CPU (its dtype, or CPU autocast's: oneDNN), 1 otherwise (fp32 goes to MKL, GPUs to
    cuBLAS: neither pays for a new shape)."""
    if x.device.type != "cpu":
        return 1
    low = (torch.bfloat16, torch.float16)
    if x.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low):
        return CPU_ROW_BUCKET
    return 1
