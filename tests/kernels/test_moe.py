"""MoE kernels (Triton under the interpreter) and their twins against per-token float64 loops."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import dispatch, moe

BACKENDS = ["torch", "triton"]


def _tie_free(T, E, g, scale=2.0):
    """Router logits with no two entries of a row within 1e-3 (so every top-k is unambiguous)."""
    x = torch.randn(T, E, generator=g) * scale
    while E > 1:
        gaps = x.sort(dim=1).values.diff(dim=1).min(dim=1).values
        bad = gaps < 1e-3
        if not bad.any():
            break
        x[bad] = torch.randn(int(bad.sum()), E, generator=g) * scale
    return x


def _route64(logits, ids, mode):
    """Weights, balance loss and z-loss in float64 from given expert choices, differentiable in logits."""
    T, E = logits.shape
    k = ids.shape[1]
    x = logits.double()
    weights = []
    for t in range(T):
        row, chosen = x[t], ids[t]
        if mode == "softmax_topk":
            weights.append(torch.softmax(row, 0)[chosen])
        elif mode == "topk_softmax":
            weights.append(torch.softmax(row[chosen], 0))
        else:
            s = torch.sigmoid(row[chosen])
            weights.append(s / s.sum())
    probs = torch.sigmoid(x) / torch.sigmoid(x).sum(1, keepdim=True) if mode == "sigmoid" else torch.softmax(x, 1)
    counts = torch.bincount(ids.reshape(-1), minlength=E).double()
    balance = E * (counts / (T * k) * probs.mean(0)).sum()
    z = torch.logsumexp(x, 1).square().mean()
    return torch.stack(weights), balance, z


# ----- router ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (8, 1), (64, 2)])
def test_route_matches_loop_with_gradients(gen, backend, mode, E, k):
    g = gen
    T = 21
    logits = _tie_free(T, E, g)
    if E >= 4:
        logits[:, 2] -= 30.0  # an expert that receives no token
    logits.requires_grad_(True)
    r = kernels.moe_route(logits, k, mode=mode, backend=backend)
    for t in range(T):
        assert r.expert_ids[t].tolist() == logits[t].argsort(descending=True)[:k].tolist()
    assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_ids.reshape(-1), minlength=E))
    if E >= 4:
        assert r.tokens_per_expert[2] == 0
    w64, b64, z64 = _route64(logits, r.expert_ids, mode)
    torch.testing.assert_close(r.weights.double(), w64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.balance_loss.double(), b64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.z_loss.double(), z64, atol=1e-5, rtol=1e-5)
    gw = torch.randn(T, k, generator=g)
    cb, cz = torch.rand(2, generator=g).tolist()
    got = torch.autograd.grad((r.weights * gw).sum() + cb * r.balance_loss + cz * r.z_loss, logits)[0]
    ref = torch.autograd.grad((w64 * gw.double()).sum() + cb * b64 + cz * z64, logits)[0]
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
def test_route_all_tokens_to_one_expert(gen, mode):
    g = gen
    T, E, k = 19, 8, 2
    logits = _tie_free(T, E, g)
    logits[:, 5] += 20.0
    r = kernels.moe_route(logits, k, mode=mode, backend="triton")
    assert (r.expert_ids[:, 0] == 5).all()
    assert r.tokens_per_expert[5] == T
    ref = kernels.moe_route(logits, k, mode=mode, backend="torch")
    assert torch.equal(r.expert_ids, ref.expert_ids)
    torch.testing.assert_close(r.weights, ref.weights)


@pytest.mark.parametrize("mode", ["softmax_topk", "sigmoid"])
def test_route_is_bit_reproducible_and_uses_no_atomics(gen, mode):
    """The balance loss's column sums and the expert counts are per-block partials summed in a fixed order
    (no float atomics, whose addition order varies between GPU runs): repeated calls agree bit for bit and
    equal the twin. On CPU the interpreter runs programs one at a time, so a race cannot show here; the
    kernel source is checked for atomics too (the GPU runs of test_cuda.py repeat the bit-equality)."""
    import inspect
    g = gen
    T, E, k = 100, 8, 2  # 7 blocks of 16 tokens, the last one partial
    logits = _tie_free(T, E, g).requires_grad_()
    runs = []
    for _ in range(3):
        r = kernels.moe_route(logits, k, mode=mode, backend="triton")
        grad = torch.autograd.grad(r.balance_loss + 0.1 * r.z_loss, logits)[0]
        runs.append((r.expert_ids, r.weights, r.tokens_per_expert, r.balance_loss, r.z_loss, grad))
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))
    ref = kernels.moe_route(logits, k, mode=mode, backend="torch")
    assert torch.equal(runs[0][0], ref.expert_ids) and torch.equal(runs[0][2], ref.tokens_per_expert)
    torch.testing.assert_close(runs[0][3], ref.balance_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(runs[0][5], torch.autograd.grad(ref.balance_loss + 0.1 * ref.z_loss, logits)[0],
                               atol=1e-6, rtol=1e-5)
    for kernel in (moe._route_fwd_kernel, moe._route_bwd_kernel, moe._gather_sum_kernel, moe._unpermute_bwd_kernel):
        assert "tl.atomic" not in inspect.getsource(kernel.fn), kernel.fn.__name__


_BIG_OFFSETS = r"""
import sys
import torch
from kernels import dispatch, moe

H, N, BH = 1 << 28, 9, 64  # int8 rows of 2**28 elements: row 8 starts at element 2**31
# Tensors of N * H elements are allocated but never touched beyond the first BH columns of each row (one
# column block in the grid), so they stay virtual: a few MiB resident.
src = torch.empty((2, H), dtype=torch.int8)
src[0, :BH], src[1, :BH] = 3, 5
order = torch.tensor([1, 0] * 4 + [1])  # k = 1: row r gathers token order[r]
out = torch.empty((N, H), dtype=torch.int8)
out[:, :BH] = 0
moe._gather_rows_kernel[(1, 1)](src, order, out, N, H, K=1, BLOCK_R=16, BLOCK_H=BH)
assert out[:, :BH].tolist() == [[5 if r % 2 == 0 else 3] * BH for r in range(N)], out[:, :4]
out[:, :BH] = 0
moe._gather_sum_kernel[(1, 1)](src, order, torch.full((N, 1), 2.0), out, N, H, K=1, HAS_W=True, BLOCK_T=16,
                               BLOCK_H=BH)
assert out[:, :BH].tolist() == [[10 if t % 2 == 0 else 6] * BH for t in range(N)], out[:, :4]
del out
dout = torch.empty((N, H), dtype=torch.int8)
dout[:, :BH] = torch.arange(1, N + 1, dtype=torch.int8)[:, None]
dy = torch.empty((2, H), dtype=torch.int8)
dy[:, :BH] = 0
dw = torch.zeros((1, N, 1))
pos = torch.tensor([-1] * 8 + [1])  # only token 8, whose dout row starts at element 2**31, is live
moe._unpermute_bwd_kernel[(1, 1)](dout, src, pos, torch.ones(N, 1), dy, dw, N, H, K=1, BLOCK_T=16, BLOCK_H=BH)
assert dy[1, :BH].tolist() == [9] * BH and dy[0, :BH].tolist() == [0] * BH, dy[:, :4]
assert dw[0, :, 0].tolist() == [0.0] * 8 + [9.0 * 5 * BH], dw[0, :, 0]
print("ok")
"""


def test_gather_scatter_row_offsets_past_2_to_the_31():
    """The permute (gather), combine / permute-backward (gather-sum) and combine-backward kernels on rows
    whose element offset row * H is >= 2**31 (row 8 of H = 2**28), where int32 offsets wrap negative and
    read or write 2 GiB before the buffer (a segfault, hence a subprocess). The tensors hold 9 x 2**28
    int8 elements but only one 64-column block of each row is launched and touched, so little memory is
    resident. Not covered: the router and grouped-GEMM kernels (their row offsets are cast the same way,
    or index tensors far below 2**31 elements)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _BIG_OFFSETS], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


# ----- dispatch ----------------------------------------------------------------------------------------------
def _expert_ids(T, E, k, g, case):
    if case == "one_expert":
        first = torch.full((T, 1), E - 1)
    else:
        first = torch.randint(0, E, (T, 1), generator=g)
        if case == "empty" and E > 1:
            first[first == 0] = 1  # expert 0 gets nothing (as first choice; below, nothing at all)
    if k == 1:
        return first
    other = (first + 1 + torch.randint(0, max(E - 1, 1), (T, 1), generator=g) % max(E - 1, 1)) % E
    if case == "empty":
        other[other == 0] = torch.where(first[other == 0] == 1, 2, 1) % E
    return torch.cat([first, other], 1)


def _combine_loop(x, ids, weights, expert_scale, kept=None):
    """out[t] = sum_j w[t, j] * scale[e] * x[t] over kept assignments, in float64."""
    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if kept is None or kept[t * k + j]:
                out[t] += weights[t, j].double() * expert_scale[ids[t, j]].double() * x[t].double()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (8, 1), (64, 2)])
@pytest.mark.parametrize("case", ["random", "empty", "one_expert"])
def test_permute_unpermute_match_loop(gen, backend, E, k, case):
    if E < 3 and case == "empty":
        pytest.skip("needs 3 experts to leave one empty with k=2")
    g = gen
    T, H = 23, 24
    ids = _expert_ids(T, E, k, g, case)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w = torch.rand(T, k, generator=g, requires_grad=True)
    scale = torch.randn(E, generator=g)
    xs, plan = kernels.moe_permute(x, ids, E, backend=backend)
    assert torch.equal(plan.tokens_per_expert, torch.bincount(ids.reshape(-1), minlength=E))
    assert int(plan.dropped) == 0 and xs.shape[0] == T * k
    if case == "empty":
        assert plan.tokens_per_expert[0] == 0
    # expert-contiguous and stable: rows of expert e are its tokens in increasing order
    flat_tokens = (plan.order // k).tolist()
    rows_expert = torch.repeat_interleave(torch.arange(E), plan.tokens_per_expert)
    assert torch.equal(ids.reshape(-1)[plan.order], rows_expert)
    for e in range(E):
        toks = [t for t, re in zip(flat_tokens, rows_expert.tolist()) if re == e]
        assert toks == sorted(toks)
    assert torch.equal(xs, x[plan.order // k])
    ys = xs * scale[rows_expert][:, None]
    out = kernels.moe_unpermute(ys, w, plan, backend=backend)
    ref = _combine_loop(x, ids, w, scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(T, H, generator=g)
    gx, gw = torch.autograd.grad((out * go).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * go.double()).sum(), (x, w))
    torch.testing.assert_close(gx.double(), rx.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_drops_the_latest_assignments(gen, backend):
    g = gen
    T, H, E, k, cap = 27, 16, 4, 2, 9
    ids = _expert_ids(T, E, k, g, "random")
    ids[:, 0] = torch.where(torch.arange(T) % 3 == 0, 2, ids[:, 0])  # overload expert 2
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1])
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w = torch.rand(T, k, generator=g)
    xs, plan = kernels.moe_permute(x, ids, E, capacity=cap, backend=backend)
    seen = [0] * E
    kept = []
    for a, e in enumerate(ids.reshape(-1).tolist()):  # token order, then rank order within a token
        kept.append(seen[e] < cap)
        seen[e] += 1
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert torch.equal(plan.tokens_per_expert, counts.clamp(max=cap))
    assert int(plan.dropped) == int((counts - cap).clamp(min=0).sum()) > 0
    assert sorted(plan.order.tolist()) == [a for a in range(T * k) if kept[a]]
    scale = torch.randn(E, generator=g)
    rows_expert = torch.repeat_interleave(torch.arange(E), plan.tokens_per_expert)
    out = kernels.moe_unpermute(xs * scale[rows_expert][:, None], w, plan, backend=backend)
    ref = _combine_loop(x, ids, w, scale, kept)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    gx = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(gx.double(), torch.autograd.grad(ref.sum(), x)[0].double(), atol=1e-5, rtol=1e-5)


def test_dispatch_errors():
    x, ids = torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="capacity must be None"):
        kernels.moe_permute(x, ids, 2, capacity=-1)
    with pytest.raises(ValueError, match="expected x"):
        kernels.moe_permute(x, torch.zeros(2, 1, dtype=torch.long), 2)
    xs, plan = kernels.moe_permute(x, ids, 2)
    with pytest.raises(ValueError, match="weights must be"):
        kernels.moe_unpermute(xs, torch.ones(3, 2), plan)


# ----- grouped expert FFN ------------------------------------------------------------------------------------
def _ffn_loop(x, counts, w_up, b_up, w_down, b_down):
    """Row by row in float64: down_e(gelu(up_e(x_r))) with e the row's group."""
    rows = []
    experts = torch.repeat_interleave(torch.arange(len(counts)), counts)
    for r in range(x.shape[0]):
        e = int(experts[r])
        h = w_up[e].double() @ x[r].double() + (0 if b_up is None else b_up[e].double())
        rows.append(w_down[e].double() @ F.gelu(h) + (0 if b_down is None else b_down[e].double()))
    return torch.stack(rows) if rows else torch.zeros(0, w_down.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,case,bias", [(1, "random", True), (4, "empty", True), (8, "one_expert", False),
                                         (64, "random", True)])
def test_expert_ffn_matches_loop_with_gradients(gen, backend, E, case, bias):
    g = gen
    R, H, Fd = 37 if E < 64 else 23, 24, 40  # odd row counts; H, F not multiples of the 32-wide tiles
    if case == "one_expert":
        counts = torch.zeros(E, dtype=torch.long)
        counts[E // 2] = R
    else:
        counts = torch.bincount(torch.randint(0, E, (R,), generator=g), minlength=E)
        if case == "empty":
            counts[1] += counts[2]
            counts[2] = 0
    x = torch.randn(R, H, generator=g, requires_grad=True)
    w_up = (torch.randn(E, Fd, H, generator=g) / H**0.5).requires_grad_()
    w_down = (torch.randn(E, H, Fd, generator=g) / Fd**0.5).requires_grad_()
    b_up = torch.randn(E, Fd, generator=g).requires_grad_() if bias else None
    b_down = torch.randn(E, H, generator=g).requires_grad_() if bias else None
    y = moe.moe_expert_ffn(x, counts, w_up, b_up, w_down, b_down, backend=backend)
    ref = _ffn_loop(x, counts, w_up, b_up, w_down, b_down)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(R, H, generator=g)
    params = [t for t in (x, w_up, b_up, w_down, b_down) if t is not None]
    got = torch.autograd.grad((y * gy).sum(), params)
    want = torch.autograd.grad((ref * gy.double()).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_expert_ffn_errors():
    w_up, w_down = torch.zeros(2, 8, 4), torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="w_down must be"):
        moe.moe_expert_ffn(torch.zeros(3, 4), torch.tensor([1, 2]), w_up, None, torch.zeros(2, 4, 7), None)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        moe.moe_expert_ffn(torch.zeros(3, 4), torch.tensor([3]), w_up, None, w_down, None)
    with pytest.raises(ValueError, match="b_up must be"):
        moe.moe_expert_ffn(torch.zeros(3, 4), torch.tensor([1, 2]), w_up, torch.zeros(8), w_down, None)


def test_triton_ops_registered():
    assert {"moe_route", "moe_permute", "moe_unpermute", "moe_expert_ffn"} <= set(kernels.triton_ops())
    assert moe.triton is not None


def test_cpu_expert_groups_padded_to_the_row_bucket(gen, monkeypatch):
    """On CPU in bf16 the twin pads each expert's group to a multiple of dispatch.CPU_ROW_BUCKET rows (oneDNN caches a
    GEMM per shape). The pad rows must change nothing: outputs and every gradient equal the unpadded loop's."""
    g = gen
    E, H, Fd = 4, 32, 48
    counts = torch.tensor([70, 0, 5, dispatch.CPU_ROW_BUCKET])  # a partial bucket, an empty group, a full one
    R = int(counts.sum())
    x = torch.randn(R, H, generator=g).bfloat16().requires_grad_()
    w_up = (torch.randn(E, Fd, H, generator=g) / H**0.5).bfloat16().requires_grad_()
    w_down = (torch.randn(E, H, Fd, generator=g) / Fd**0.5).bfloat16().requires_grad_()
    b_up = torch.randn(E, Fd, generator=g).bfloat16().requires_grad_()  # biases: pad rows' outputs are not 0
    b_down = torch.randn(E, H, generator=g).bfloat16().requires_grad_()
    params = (x, w_up, b_up, w_down, b_down)
    gy = torch.randn(R, H, generator=g).bfloat16()
    assert dispatch.row_bucket(x) == dispatch.CPU_ROW_BUCKET and dispatch.row_bucket(x.detach().float()) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 rows whose GEMMs autocast runs in bf16
        assert dispatch.row_bucket(x.detach().float()) == dispatch.CPU_ROW_BUCKET

    def run():
        y = moe.moe_expert_ffn(x, counts, w_up, b_up, w_down, b_down, backend="torch")
        return (y,) + torch.autograd.grad((y.float() * gy.float()).sum(), params)

    padded = run()
    monkeypatch.setattr(moe, "PAD_EXPERT_GROUPS", False)
    plain = run()
    for name, a, b in zip(("y", "dx", "dw_up", "db_up", "dw_down", "db_down"), padded, plain):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)
    ref = _ffn_loop(x.detach().double(), counts, w_up.detach(), b_up.detach(), w_down.detach(), b_down.detach())
    torch.testing.assert_close(padded[0].double(), ref, atol=6e-2, rtol=3e-2)
