"""Dropout keep masks for the CPU paths, drawn as 16-bit random integers.

On CPU, `bernoulli_` (F.dropout) and a float `torch.rand` compare draw the generator once per element; here one
64-bit draw gives four elements' 16-bit uniforms (`random_` over the whole int64 range: every bit random), and
the mask is a compare against a threshold. The drop probability is thereby rounded to a multiple of 2^-16 (an
error below 8e-6); the keep probability returned is the exact one, so callers that scale kept values by its
inverse keep the expectation exact. Uses the default CPU generator: seeded runs repeat. The speed: the
dropout rows of `pytest bench/test_kernel_micro.py -k dropout --benchmark-only` (bench/README.md).
"""
from __future__ import annotations

import math

import torch

_LEVELS = 1 << 16


def keep_mask(shape, p: float, device=None) -> tuple[torch.Tensor, float]:
    """(mask, keep_prob): a bool tensor of `shape`, each element True independently with probability
    keep_prob = 1 - round(p * 2^16) / 2^16, for 0 <= p <= 1."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"keep_mask: p must be in [0, 1], got {p!r}")
    shape = tuple(shape)
    n = math.prod(shape)
    drop = round(p * _LEVELS)
    if drop == _LEVELS:  # never kept (and the threshold 2^15 would not fit int16)
        return torch.zeros(shape, dtype=torch.bool, device=device), 0.0
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return draws >= drop - _LEVELS // 2, 1.0 - drop / _LEVELS
