"""The compiled Triton kernels on CUDA tensors, fp32 / fp16 / bf16, against the PyTorch twins and float64
references, three seeds each (`rep`; the `seed` fixture derives each test's seed from the run seed and the
node id). Marked `cuda`: skipped without a CUDA device and under TRITON_INTERPRET=1 (tests/conftest.py);
bench/gpu_check.sh runs them as `pytest -m cuda tests/kernels`.

Tolerances are dtype-appropriate, of the largest reference value: where the kernel computes in fp32 from
exact inputs (cross-entropy, router), the output rounding (one or two ulps of the stored dtype); where it
multiplies in the input dtype on tensor cores (attention, expert GEMMs), at most twice the error of the
same function computed by PyTorch in that dtype, plus a floor. Inputs are built on the CPU from a seeded
torch.Generator and moved to the GPU, so a failure is reproducible from the seed it reports.

Kept to what an older stack has too (torch 2.11, triton 3.6, no `datasets`). Shapes and lengths are the
same for every seed, so the kernels compile (and attention autotunes) once per dtype.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import dispatch

ce = importlib.import_module("kernels.cross_entropy")  # the module (kernels.cross_entropy is the function)

pytestmark = pytest.mark.cuda
DEV = "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REPS = [0, 1, 2]  # three seeds per case
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# Floor of the allowed error (relative to the largest reference value) where the kernel multiplies in the
# input dtype: the rounding of a few stored intermediates.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _err(actual, expected):
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def _within_twice_baseline(name, ours, base, ref, dtype):
    """Error of `ours` against the float64 `ref`: at most 2x that of `base` (the function in the same dtype
    through PyTorch) plus FLOOR[dtype] of the largest reference value."""
    scale = max(ref.abs().max().item(), 1e-6)
    e, eb = _err(ours, ref), _err(base, ref)
    bound = 2 * eb + FLOOR[dtype] * scale
    assert e <= bound, f"{name}: max error {e:.3g} > {bound:.3g} (PyTorch in {dtype}: {eb:.3g}, scale {scale:.3g})"


def _within_ulps(name, ours, ref, dtype, ulps=2, floor=1e-6):
    """fp32 arithmetic on exact inputs, rounded once to `dtype` on store: a few ulps of the largest value."""
    scale = max(ref.abs().max().item(), 1e-6)
    bound = (ulps * max(ULP[dtype], 2.0 ** -20) + floor) * scale
    e = _err(ours, ref)
    assert e <= bound, f"{name}: max error {e:.3g} > {bound:.3g} ({ulps} ulps of {dtype}, scale {scale:.3g})"


def _triton(op):
    assert dispatch.resolve(op, "auto", torch.device(DEV)) == "triton"  # auto picks the kernel on CUDA


# ----- attention ---------------------------------------------------------------------------------------------
LENGTHS = [1, 63, 64, 65, 200]  # around one 64-tile, several tiles with a ragged tail


def _attention_lowp(q, k, v, lengths, causal):
    """The twin's function with the products in the inputs' dtype (as a PyTorch user would compute it):
    the baseline error for the kernel's tensor-core dots. fp32 inputs give the fp32 function."""
    S, D = q.shape[2], q.shape[3]
    scores = (q @ k.transpose(-1, -2)) * D ** -0.5
    keep = (torch.arange(S, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    if causal:
        keep = keep & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(scores.float().masked_fill(~keep, float("-inf")), dim=-1)
    return p.to(q.dtype) @ v


def _attention_case(gen, dtype, causal):
    B, H, S, D = len(LENGTHS), 2, max(LENGTHS), 64
    lengths = torch.tensor(LENGTHS)[torch.randperm(len(LENGTHS), generator=gen)]
    qkv = [torch.randn(B, H, S, D, generator=gen).to(dtype) for _ in range(3)]
    do = torch.randn(B, H, S, D, generator=gen).to(dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in qkv)
    ref = kernels.attention_reference(q64, k64, v64, lengths, causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    return lengths, qkv, do, ref.detach(), ref_grads


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype,causal", [("fp32", False), ("fp16", False), ("bf16", False), ("bf16", True)])
def test_attention_padded_forward_backward(gen, dtype, causal, rep):
    dt = DTYPES[dtype]
    _triton("attention")
    lengths, qkv, do, ref, ref_grads = _attention_case(gen, dt, causal)
    q, k, v = (t.to(DEV).requires_grad_() for t in qkv)
    lens, do_d = lengths.to(DEV), do.to(DEV)
    out = kernels.attention(q, k, v, lengths=lens, causal=causal, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do_d)
    bq, bk, bv = (t.to(DEV).requires_grad_() for t in qkv)
    base = _attention_lowp(bq, bk, bv, lens, causal)
    base_grads = torch.autograd.grad(base, (bq, bk, bv), do_d)
    assert out.dtype == dt and all(g.dtype == dt for g in grads)
    _within_twice_baseline("out", out, base, ref, dt)
    for name, g, bg, rg in zip("qkv", grads, base_grads, ref_grads):
        _within_twice_baseline(f"d{name}", g, bg, rg, dt)
    for b, n in enumerate(lengths.tolist()):  # keys past a length get no gradient at all
        assert not grads[1][b, :, n:].any() and not grads[2][b, :, n:].any()
    again = kernels.attention(q, k, v, lengths=lens, causal=causal, backend="triton")
    assert torch.equal(out, again) and all(torch.equal(a, b) for a, b in zip(
        grads, torch.autograd.grad(again, (q, k, v), do_d)))  # no atomics: bit-reproducible


def _pack(x, lengths):
    """(B, H, S, D) -> (total, H, D), real rows only."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_attention_varlen_forward_backward(gen, dtype, rep):
    dt = DTYPES[dtype]
    _triton("attention_varlen")
    lengths, qkv, do, _, _ = _attention_case(gen, dt, False)
    lens = lengths.tolist()
    real = (torch.arange(max(lens))[None, :] < lengths[:, None])[:, None, :, None]
    do = do * real  # only real rows exist packed: padded rows' output gradient is zero
    q64, k64, v64 = (t.double().requires_grad_() for t in qkv)
    ref = kernels.attention_reference(q64, k64, v64, lengths, False)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(DEV)
    # the packed inputs as slices of one (total, 3, H, D) projection: non-contiguous, as an encoder has them
    packed = torch.stack([_pack(t, lens) for t in qkv], dim=1).to(DEV).requires_grad_()
    out = kernels.attention_varlen(*packed.unbind(1), cu, max(lens), backend="triton")
    grads = torch.autograd.grad(out, packed, _pack(do, lens).to(DEV))[0].unbind(1)
    bq, bk, bv = (t.to(DEV).requires_grad_() for t in qkv)
    base = _attention_lowp(bq, bk, bv, lengths.to(DEV), False)
    base_grads = torch.autograd.grad(base, (bq, bk, bv), do.to(DEV))
    _within_twice_baseline("packed out", out, _pack(base, lens), _pack(ref.detach(), lens), dt)
    for name, g, bg, rg in zip("qkv", grads, base_grads, ref_grads):
        _within_twice_baseline(f"packed d{name}", g, _pack(bg, lens), _pack(rg, lens), dt)
    padded = kernels.attention(*(t.to(DEV) for t in qkv), lengths=lengths.to(DEV), backend="triton")
    _within_ulps("packed vs padded", out, _pack(padded, lens), dt, ulps=1, floor=0)  # one kernel, two layouts


# ----- cross-entropy -----------------------------------------------------------------------------------------
def _targets(g, n, v, ignore_index=-100):
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = ignore_index
    return t


def _ce_oracle(logits64, target, label_smoothing=0.0, lse_square_scale=0.0):
    rows = F.cross_entropy(logits64, target, label_smoothing=label_smoothing, reduction="none")
    valid = target != -100
    rows = rows + lse_square_scale * torch.where(valid, torch.logsumexp(logits64, -1).square(), 0.0)
    return rows.sum() / valid.sum().clamp(min=1)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cross_entropy(gen, dtype, rep):
    dt = DTYPES[dtype]
    _triton("cross_entropy")
    N, V = 37, 5000  # two vocabulary tiles of 4096, the second partial
    logits = (torch.randn(N, V, generator=gen) * 4).to(dt)
    target = _targets(gen, N, V)
    opts = dict(label_smoothing=0.05, lse_square_scale=1e-3)
    ref_x = logits.double().requires_grad_()
    ref = _ce_oracle(ref_x, target, **opts)
    ref.backward()
    x = logits.to(DEV).requires_grad_()
    loss = kernels.cross_entropy(x, target.to(DEV), backend="triton", **opts)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dt
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), atol=2e-5, rtol=2e-5)  # fp32 on exact inputs
    _within_ulps("dlogits", x.grad, ref_x.grad, dt)
    assert torch.equal(x.detach().cpu(), logits)  # the caller's logits are not overwritten


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_cross_entropy(gen, dtype, rep, monkeypatch):
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 64)  # N=300 in chunks of 64: five chunks, the last partial
    monkeypatch.setattr(ce, "MIN_CHUNK_LOGITS", 0)
    dt = DTYPES[dtype]
    _triton("linear_cross_entropy")
    N, H, V = 300, 64, 5000
    assert ce.chunk_rows(N, H, V) == 64
    h = torch.randn(N, H, generator=gen).to(dt)
    w = (torch.randn(V, H, generator=gen) * H ** -0.5).to(dt)
    b = (torch.randn(V, generator=gen) * 0.1).to(dt)
    target = _targets(gen, N, V)
    refs = [t.double().requires_grad_() for t in (h, w, b)]
    ref = _ce_oracle(refs[0] @ refs[1].t() + refs[2], target, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref, refs)
    ours = [t.to(DEV).requires_grad_() for t in (h, w, b)]
    loss = kernels.linear_cross_entropy(*ours, target.to(DEV), label_smoothing=0.1, backend="triton")
    grads = torch.autograd.grad(loss, ours)
    # fp32 projects in fp32; bf16 / fp16 project in the input dtype (logits rounded to it: ~|logit| * ulp)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dt]
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), atol=tol, rtol=tol)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dt
        scale = rg.abs().max().item()
        err = _err(g, rg)
        assert err <= (2 * tol + (ULP[dt] if dt != torch.float32 else 1e-5)) * scale, (name, err, scale)


# ----- MoE ---------------------------------------------------------------------------------------------------
def _tie_free(T, E, g, dtype, scale=2.0):
    """Router logits, rounded to `dtype`, with no two entries of a row within 1e-3: every top-k is the
    same in the kernel (fp32 of the rounded values) and the twin."""
    x = (torch.randn(T, E, generator=g) * scale).to(dtype)
    while True:
        gaps = x.float().sort(dim=1).values.diff(dim=1).min(dim=1).values
        bad = gaps < 1e-3
        if not bad.any():
            return x
        x[bad] = (torch.randn(int(bad.sum()), E, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype,mode", [("fp32", "softmax_topk"), ("fp32", "topk_softmax"), ("fp32", "sigmoid"),
                                        ("fp16", "topk_softmax"), ("bf16", "topk_softmax")])
def test_moe_route(gen, dtype, mode, rep):
    dt = DTYPES[dtype]
    _triton("moe_route")
    T, E, k = 300, 8, 2  # 19 blocks of 16 tokens, the last one partial
    logits = _tie_free(T, E, gen, dt)
    logits[:, 2] -= 30.0  # an expert that receives no token
    gw = torch.randn(T, k, generator=gen)
    ref_x = logits.clone().requires_grad_()
    ref = kernels.moe_route(ref_x, k, mode=mode, backend="torch")
    ref_grad = torch.autograd.grad((ref.weights.float() * gw).sum() + 0.3 * ref.balance_loss + 0.1 * ref.z_loss,
                                   ref_x)[0]

    def run():
        x = logits.to(DEV).requires_grad_()
        r = kernels.moe_route(x, k, mode=mode, backend="triton")
        grad = torch.autograd.grad((r.weights.float() * gw.to(DEV)).sum() + 0.3 * r.balance_loss + 0.1 * r.z_loss,
                                   x)[0]
        return r, grad

    r, grad = run()
    assert torch.equal(r.expert_ids.cpu(), ref.expert_ids) and torch.equal(r.tokens_per_expert.cpu(),
                                                                           ref.tokens_per_expert)
    assert int(r.tokens_per_expert[2]) == 0 and r.weights.dtype == dt
    _within_ulps("weights", r.weights, ref.weights.float(), dt)
    torch.testing.assert_close(r.balance_loss.cpu(), ref.balance_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.z_loss.cpu(), ref.z_loss, atol=1e-4, rtol=1e-5)
    _within_ulps("dlogits", grad, ref_grad.float(), dt, ulps=4, floor=1e-5)
    r2, grad2 = run()  # no float atomics: the balance loss and its gradient are bit-reproducible
    for a, b in ((r.expert_ids, r2.expert_ids), (r.weights, r2.weights), (r.tokens_per_expert, r2.tokens_per_expert),
                 (r.balance_loss, r2.balance_loss), (r.z_loss, r2.z_loss), (grad, grad2)):
        assert torch.equal(a, b)


def _expert_ids(T, E, g):
    first = torch.randint(0, E, (T, 1), generator=g)
    other = (first + 1 + torch.randint(0, E - 1, (T, 1), generator=g)) % E
    return torch.cat([first, other], 1)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_moe_permute_unpermute(gen, dtype, rep):
    dt = DTYPES[dtype]
    _triton("moe_permute")
    T, H, E, k = 300, 96, 8, 2  # H: one full 64-column block and a partial one
    ids = _expert_ids(T, E, gen)
    x = torch.randn(T, H, generator=gen).to(dt)
    w = torch.rand(T, k, generator=gen).to(dt)
    scale = torch.randn(E, generator=gen).to(dt)
    go = torch.randn(T, H, generator=gen).to(dt)
    ref_xs, ref_plan = kernels.moe_permute(x, ids, E, backend="torch")

    def run():
        xd, wd = x.to(DEV).requires_grad_(), w.to(DEV).requires_grad_()
        xs, plan = kernels.moe_permute(xd, ids.to(DEV), E, backend="triton")
        rows_expert = torch.repeat_interleave(torch.arange(E, device=DEV), plan.tokens_per_expert)
        out = kernels.moe_unpermute(xs * scale.to(DEV)[rows_expert][:, None], wd, plan, backend="triton")
        return (xs, plan, out, *torch.autograd.grad(out, (xd, wd), go.to(DEV)))

    xs, plan, out, dx, dw = run()
    assert torch.equal(plan.order.cpu(), ref_plan.order) and torch.equal(plan.positions.cpu(), ref_plan.positions)
    assert torch.equal(plan.tokens_per_expert.cpu(), ref_plan.tokens_per_expert) and int(plan.dropped) == 0
    assert torch.equal(xs.cpu(), ref_xs)  # a gather: exact
    # float64 chain on the same (rounded) inputs: out[t] = sum_j w[t, j] * scale[e_tj] * x[t]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ys64 = (x64[ref_plan.order // k] * scale.double()[ids.reshape(-1)[ref_plan.order]][:, None]).to(dt).double()
    ref = torch.zeros(T, H, dtype=torch.float64).index_add(
        0, ref_plan.order // k, ys64 * w64.reshape(-1)[ref_plan.order][:, None])
    rdx, rdw = torch.autograd.grad(ref, (x64, w64), go.double())
    _within_ulps("combine", out, ref, dt, ulps=2, floor=1e-6)
    _within_ulps("dx", dx, rdx, dt, ulps=4, floor=1e-6)
    _within_ulps("dw", dw, rdw, dt, ulps=4, floor=1e-5)
    again = run()
    for a, b in zip((xs, plan.order, out, dx, dw), (again[0], again[1].order, *again[2:])):
        assert torch.equal(a, b)


def _ffn64(x, counts, w_up, b_up, w_down, b_down):
    """Row groups in float64: down_e(gelu(up_e(x))) for each expert's rows."""
    outs = []
    for e, xe in enumerate(x.split(counts.tolist())):
        h = F.linear(xe, w_up[e], b_up[e])
        outs.append(F.linear(F.gelu(h), w_down[e], b_down[e]))
    return torch.cat(outs)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_moe_expert_ffn(gen, dtype, rep):
    dt = DTYPES[dtype]
    _triton("moe_expert_ffn")
    R, H, Fd, E = 300, 96, 160, 8  # H, F not multiples of the 32-wide tiles
    counts = torch.bincount(torch.randint(0, E, (R,), generator=gen), minlength=E)
    counts[1] += counts[2]
    counts[2] = 0  # an empty expert
    x = torch.randn(R, H, generator=gen).to(dt)
    w_up = (torch.randn(E, Fd, H, generator=gen) * H ** -0.5).to(dt)
    w_down = (torch.randn(E, H, Fd, generator=gen) * Fd ** -0.5).to(dt)
    b_up = (torch.randn(E, Fd, generator=gen) * 0.1).to(dt)
    b_down = (torch.randn(E, H, generator=gen) * 0.1).to(dt)
    gy = torch.randn(R, H, generator=gen).to(dt)
    inputs = (x, w_up, b_up, w_down, b_down)
    refs = [t.double().requires_grad_() for t in inputs]
    ref = _ffn64(refs[0], counts, *refs[1:])
    ref_grads = torch.autograd.grad(ref, refs, gy.double())

    def run(backend):
        ts = [t.to(DEV).requires_grad_() for t in inputs]
        y = kernels.moe_expert_ffn(ts[0], counts.to(DEV), *ts[1:], backend=backend)
        return (y, *torch.autograd.grad(y, ts, gy.to(DEV)))

    ours, base = run("triton"), run("torch")  # base: the twin on the GPU in the same dtype
    names = ("y", "dx", "dw_up", "db_up", "dw_down", "db_down")
    for name, o, b, r in zip(names, ours, base, (ref.detach(), *ref_grads)):
        assert o.dtype == dt, name
        _within_twice_baseline(name, o, b, r, dt)
    assert all(torch.equal(a, b) for a, b in zip(ours, run("triton")))  # no atomics: bit-reproducible
