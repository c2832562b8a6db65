"""BUCC mining (eval.retrieval.mine) in bounded memory: the chunked float32 k-NN search with float64
re-scoring gives the pairs and scores of the exact float64 implementation it replaced (kept as the oracle,
eval.retrieval.mine_reference), whatever the chunk size, and never holds an n x m tensor."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eval import retrieval


_mine_exact = retrieval.mine_reference  # the exact float64 path `mine` replaced


def _assert_same(got, want, tol=1e-12):
    assert [(i, j) for i, j, _ in got] == [(i, j) for i, j, _ in want]
    assert max((abs(a[2] - b[2]) for a, b in zip(got, want)), default=0.0) <= tol


SHAPES = [(37, 53, 16, 4), (200, 150, 32, 4), (1, 5, 8, 4), (5, 1, 8, 4), (3, 2, 8, 4), (60, 40, 24, 1),
          (50, 70, 12, 10)]


@pytest.mark.parametrize("n,m,d,k", SHAPES)
def test_equals_the_exact_float64_path(n, m, d, k):
    g = torch.Generator().manual_seed(n * 1000 + m)
    src, tgt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    _assert_same(retrieval.mine(src, tgt, k), _mine_exact(src, tgt, k))
    _assert_same(retrieval.mine(src.double(), tgt.double(), k, chunk=3), _mine_exact(src, tgt, k))


@pytest.mark.parametrize("n,m", [(37, 53), (200, 150), (1, 5)])
def test_result_does_not_depend_on_the_chunk_size(n, m):
    g = torch.Generator().manual_seed(7)
    src, tgt = torch.randn(n, 16, generator=g), torch.randn(m, 16, generator=g)
    results = [retrieval.mine(src, tgt, chunk=c) for c in (1, 7, 10**6)]
    for other in results[1:]:
        _assert_same(other, results[0], tol=1e-15)


def test_planted_translations_are_recovered_first():
    g = torch.Generator().manual_seed(0)
    n, d, planted = 300, 64, 100
    src, tgt = torch.randn(n, d, generator=g), torch.randn(n + 50, d, generator=g)
    perm = torch.randperm(n + 50, generator=g)[:planted]
    tgt[perm] = src[:planted] + 0.3 * torch.randn(planted, d, generator=g)  # target perm[i] translates source i
    top = retrieval.mine(src, tgt, chunk=32)[:planted]
    assert {(i, j) for i, j, _ in top} == {(i, int(perm[i])) for i in range(planted)}
    assert all(s > 1.0 for *_, s in top)


def test_near_ties_below_float32_resolution_are_ranked_in_float64():
    # Six targets whose cosines with source 0 differ by 1e-10: one float32 value for all six. The float64
    # best four are the highest-numbered ones, so a float32 top-4 without re-ranking would likely pick others.
    d, n_tied = 16, 6
    src = torch.zeros(3, d, dtype=torch.float64)
    src[0, 0] = 1.0
    src[1:, 1:3] = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    cos = 0.9 + 1e-10 * torch.arange(n_tied, dtype=torch.float64)
    tgt = torch.zeros(n_tied + 2, d, dtype=torch.float64)
    tgt[:n_tied, 0] = cos
    tgt[torch.arange(n_tied), 3 + torch.arange(n_tied)] = (1 - cos**2).sqrt()
    tgt[n_tied:, 1:3] = torch.tensor([[1.0, 0.4], [0.4, 1.0]], dtype=torch.float64)
    assert len(set((tgt[:n_tied] @ src[0]).float().tolist())) == 1  # float32 cannot tell them apart
    for chunk in (1, 2, None):
        _assert_same(retrieval.mine(src, tgt, chunk=chunk), _mine_exact(src, tgt))


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns (allocations included: empty, mm's output, copies)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_m_tensor_is_ever_built():
    n, m, d, chunk = 400, 300, 8, 16
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    with _LargestOutput() as exact:
        _mine_exact(src, tgt)
    assert exact.largest >= n * m  # the spy sees the exact path's matrix
    with _LargestOutput() as chunked:
        got = retrieval.mine(src, tgt, chunk=chunk)
    assert chunked.largest <= max(chunk * m, n * d, m * d, (n + m) * (4 + retrieval._EXTRA)) < n * m // 10
    _assert_same(got, _mine_exact(src, tgt))


def test_bad_arguments_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        retrieval.mine(x, torch.randn(4, 6))
    with pytest.raises(ValueError, match="src must be a 2-D"):
        retrieval.mine(torch.randn(4), x)
    with pytest.raises(ValueError, match="tgt holds non-finite"):
        retrieval.mine(x, torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retrieval.mine(x, x, k=0)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        retrieval.mine(x, x, chunk=0)
    assert retrieval.mine(x[:0], x) == [] and retrieval.mine(x, x[:0]) == []


def test_mining_and_threshold_on_planted_vectors():
    src = torch.eye(4)
    tgt = torch.eye(4)[[2, 0, 3, 1]] + 0.01  # target j is the translation of source [2, 0, 3, 1][j]
    pairs = {(i, j) for i, j, _ in retrieval.mine(src, tgt)}
    assert pairs == {(2, 0), (0, 1), (3, 2), (1, 3)}
    cands = {("a", "x"): 3.0, ("b", "y"): 2.0, ("c", "z"): 1.0}
    assert retrieval.best_threshold(cands, {("a", "x"), ("b", "y")}) == 1.5
    assert retrieval.best_threshold(cands, {("a", "x"), ("b", "y"), ("c", "z")}) == 1.0  # last candidate kept
