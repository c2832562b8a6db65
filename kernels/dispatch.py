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
