"""cross_entropy and linear_cross_entropy, Triton (interpreted) and the PyTorch twin, against
torch.nn.functional.cross_entropy on full logits in float64."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import kernels

ce = importlib.import_module("kernels.cross_entropy")  # the module (kernels.cross_entropy is the function)
BACKENDS = ["torch", "triton"]
OPTIONS = [dict(), dict(label_smoothing=0.1, lse_square_scale=1e-2), dict(ignore_index=3, label_smoothing=1.0)]


def _targets(g, n, v, ignore_index=-100):
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = ignore_index
    return t


def _oracle(logits64, target, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0, reduction="mean"):
    """F.cross_entropy in float64 plus the z-loss on non-ignored rows, reduced the same way."""
    rows = F.cross_entropy(logits64, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    valid = target != ignore_index
    rows = rows + lse_square_scale * torch.where(valid, torch.logsumexp(logits64, -1).square(), 0.0)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum().clamp(min=1)


def _grad_output(g, loss):
    return torch.randn(loss.shape, generator=g, dtype=torch.float64)  # checks the backward's scaling too


# ----- cross_entropy -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "smooth+z", "ignore3+smooth1"])
def test_cross_entropy_matches_torch(gen, backend, reduction, opts):
    g = gen
    N, V = 47, 123
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    target = _targets(g, N, V, opts.get("ignore_index", -100))
    x = logits.float().requires_grad_()
    loss = kernels.cross_entropy(x, target, reduction=reduction, backend=backend, **opts)
    ref_x = logits.clone().requires_grad_()
    ref = _oracle(ref_x, target, reduction=reduction, **opts)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    go = _grad_output(g, ref)
    (loss.double() * go).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_logits_at_minus_infinity(gen, backend):
    """Logits masked with -inf (in-batch negatives that are copies of the positive) give the loss and the
    gradient of the unmasked columns alone, not NaN (the label-smoothing term is skipped when it is off)."""
    g = gen
    N, V = 9, 70
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, V, (N,), generator=g)
    masked = torch.rand(N, V, generator=g) < 0.3
    masked[torch.arange(N), target] = False
    logits = logits.masked_fill(masked, float("-inf"))
    x = logits.float().requires_grad_()
    loss = kernels.cross_entropy(x, target, backend=backend)
    ref_x = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, target)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    loss.backward()
    ref.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[masked] == 0).all()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_low_precision_inputs(gen, dtype):
    g = gen
    N, V = 33, 200
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    target = _targets(g, N, V)
    ref_x = logits.double().requires_grad_()
    ref = _oracle(ref_x, target, label_smoothing=0.05, lse_square_scale=1e-3)
    ref.backward()
    for backend in BACKENDS:
        x = logits.clone().requires_grad_()
        loss = kernels.cross_entropy(x, target, label_smoothing=0.05, lse_square_scale=1e-3, backend=backend)
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)  # fp32 arithmetic on exact inputs
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # one ulp of the stored gradient
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-7, rtol=ulp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_used_elsewhere_in_the_graph_are_not_overwritten(gen, backend, layout, reduction):
    """The Triton forward writes its gradient into a buffer of its own, never the caller's logits: with the
    logits also read by another op (before and after the loss), the gradient is the reference's and the
    logits keep their values. (A Triton store bumps no version counter, so autograd could not catch it.)
    Strided logits: the op's contiguous copy takes the gradient in place; the caller's tensor stays as is."""
    g = gen
    N, V = 19, 53
    h = torch.randn(N, 8, generator=g, requires_grad=True)
    w = torch.randn(V if layout == "contiguous" else 2 * V, 8, generator=g)
    target = _targets(g, N, V)
    logits = h @ w.t()  # a non-leaf, as a model makes them
    if layout == "strided":
        logits = logits[:, ::2]
    before = logits.detach().clone()
    square = (logits ** 2).sum()  # saved logits, read by the backward
    ce_loss = kernels.cross_entropy(logits, target, reduction=reduction, backend=backend).sum()
    later = (logits * logits.detach()).sum()  # a later read of the same tensor (values and graph)
    assert torch.equal(logits.detach(), before)
    (ce_loss + 0.1 * square + 0.3 * later).backward()
    h64 = h.detach().double().requires_grad_()
    ref_logits = h64 @ w.double().t()
    if layout == "strided":
        ref_logits = ref_logits[:, ::2]
    ref = (_oracle(ref_logits, target, reduction=reduction).sum() + 0.1 * (ref_logits ** 2).sum()
           + 0.3 * (ref_logits * ref_logits.detach()).sum())
    ref.backward()
    torch.testing.assert_close(later.double(), (ref_logits.detach() ** 2).sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)


def test_strided_logits_gradient_lands_in_the_ops_own_copy(gen):
    """For strided logits the Triton path copies them once and writes the gradient over that copy: the
    gradient handed back is that buffer (no second N x V), and it is the reference's gradient."""
    g = gen
    base = torch.randn(17, 2 * 40, generator=g)
    x = base[:, ::2].requires_grad_()  # a strided leaf
    target = _targets(g, 17, 40)
    loss = kernels.cross_entropy(x, target, reduction="sum", backend="triton")
    fn = loss.grad_fn
    (saved,) = fn.saved_tensors
    assert saved.is_contiguous() and saved.data_ptr() != x.data_ptr()
    loss.backward()
    ref_x = x.detach().double().requires_grad_()
    _oracle(ref_x, target, reduction="sum").backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(x.detach(), base[:, ::2])


def test_cross_entropy_full_xlmr_vocabulary(gen):
    g = gen
    N, V = 3, 250_002
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    target = torch.tensor([0, V - 1, int(torch.randint(0, V, (1,), generator=g))])
    ref_x = logits.clone().requires_grad_()
    ref = _oracle(ref_x, target, label_smoothing=0.1, lse_square_scale=1e-4)
    ref.backward()
    for backend in BACKENDS:
        x = logits.float().requires_grad_()
        loss = kernels.cross_entropy(x, target, label_smoothing=0.1, lse_square_scale=1e-4, backend=backend)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(gen, backend, reduction):
    g = gen
    x = torch.randn(6, 9, generator=g, requires_grad=True)
    target = torch.full((6,), -100)
    loss = kernels.cross_entropy(x, target, lse_square_scale=1e-2, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(x.grad, torch.zeros_like(x))
    h = torch.randn(6, 5, generator=g, requires_grad=True)
    w = torch.randn(9, 5, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True)
    loss = kernels.linear_cross_entropy(h, w, b, target, label_smoothing=0.2, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    for p in (h, w, b):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_at_all(backend):
    # a batch with no masked token reaches the MLM head as N = 0
    h = torch.zeros(0, 5, requires_grad=True)
    w = torch.randn(9, 5, requires_grad=True)
    loss = kernels.linear_cross_entropy(h, w, None, torch.zeros(0, dtype=torch.long), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == (0, 5)


# ----- linear_cross_entropy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS[:2], ids=["plain", "smooth+z"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_cross_entropy_matches_torch(gen, backend, reduction, opts, with_bias, monkeypatch):
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 8)  # N=47 in chunks of 16: 3 chunks, the last one partial
    monkeypatch.setattr(ce, "MIN_CHUNK_LOGITS", 0)
    g = gen
    N, H, V = 47, 31, 123
    assert ce.chunk_rows(N, H, V) == 16
    h64, w64 = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    b64 = torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    target = _targets(g, N, V)
    ours = [t.float().requires_grad_() for t in (h64, w64, b64) if t is not None]
    refs = [t.clone().requires_grad_() for t in (h64, w64, b64) if t is not None]
    loss = kernels.linear_cross_entropy(*ours[:2], ours[2] if with_bias else None, target, reduction=reduction,
                                        backend=backend, **opts)
    logits = refs[0] @ refs[1].t() + (refs[2] if with_bias else 0.0)
    ref = _oracle(logits, target, reduction=reduction, **opts)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    go = _grad_output(g, ref)
    grads = torch.autograd.grad((loss.double() * go).sum(), ours)
    ref_grads = torch.autograd.grad((ref * go).sum(), refs)
    for ours_g, ref_g in zip(grads, ref_grads):
        assert ours_g.dtype == torch.float32
        torch.testing.assert_close(ours_g.double(), ref_g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_low_precision_inputs(gen, dtype, backend, monkeypatch):
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(ce, "MIN_CHUNK_LOGITS", 0)
    g = gen
    N, H, V = 29, 24, 70
    h, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((N, H), (V, H), (V,)))
    target = _targets(g, N, V)
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    refs = [t.double().requires_grad_() for t in (h, w, b)]
    loss = kernels.linear_cross_entropy(*ours, target, label_smoothing=0.1, backend=backend)
    ref = _oracle(refs[0] @ refs[1].t() + refs[2], target, label_smoothing=0.1)
    # the twin projects in fp32; Triton projects in the input dtype (logits rounded to it: ~|logit| * ulp)
    tol = 1e-5 if backend == "torch" else (2e-2 if dtype == torch.bfloat16 else 3e-3)
    torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
    grads = torch.autograd.grad(loss, ours)
    ref_grads = torch.autograd.grad(ref, refs)
    for ours_g, ref_g, inp in zip(grads, ref_grads, ours):
        assert ours_g.dtype == dtype
        scale = ref_g.abs().max().item()
        torch.testing.assert_close(ours_g.double(), ref_g, atol=(2 * tol + 2.0 ** -7) * scale, rtol=0)


def test_weight_grad_accumulates_in_fp32(gen):
    g = gen
    N, H, V = 12, 8, 20
    h, w = torch.randn(N, H, generator=g).bfloat16(), torch.randn(V, H, generator=g).bfloat16()
    target = _targets(g, N, V)
    scale = torch.ones(())
    for backend in BACKENDS:
        _, dh, dw, db = ce._lce_chunks(h, w, None, target, (-100, 0.0, 0.0), scale, (True, True, False), backend)
        assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32 and db is None


def test_linear_cross_entropy_full_xlmr_vocabulary(gen):
    g = gen
    N, H, V = 4, 16, 250_002
    h64, w64 = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    b64 = torch.randn(V, generator=g, dtype=torch.float64)
    target = torch.tensor([V - 1, -100, 0, int(torch.randint(0, V, (1,), generator=g))])
    refs = [t.clone().requires_grad_() for t in (h64, w64, b64)]
    ref = _oracle(refs[0] @ refs[1].t() + refs[2], target, label_smoothing=0.1, lse_square_scale=1e-4)
    ref_grads = torch.autograd.grad(ref, refs)
    for backend in BACKENDS:
        ours = [t.float().requires_grad_() for t in (h64, w64, b64)]
        loss = kernels.linear_cross_entropy(*ours, target, label_smoothing=0.1, lse_square_scale=1e-4,
                                            backend=backend)
        torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
        for ours_g, ref_g in zip(torch.autograd.grad(loss, ours), ref_grads):
            # fp32 sums over 250k vocabulary rows: an entry that nearly cancels is off by ~1e-4 of the largest
            torch.testing.assert_close(ours_g.double(), ref_g, atol=1e-4 * ref_g.abs().max().item(), rtol=1e-4)


def test_linear_cross_entropy_under_cpu_autocast_like_the_engine(gen):
    g = gen
    N, H, V = 40, 32, 300
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    target = _targets(g, N, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(h.bfloat16(), w, b, target)  # mixed input dtypes, as autocast gives
    grads = torch.autograd.grad(loss, (h, w, b))
    ref = _oracle(h.double() @ w.double().t() + b.double(), target)
    torch.testing.assert_close(loss.double(), ref, atol=5e-2, rtol=2e-2)  # bf16 projection
    assert [x.dtype for x in grads] == [torch.float32] * 3
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    for ours_g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(ours_g.double(), ref_g.double(), atol=0.05 * ref_g.abs().max().item(), rtol=0)


def _peak_cpu_bytes(fn):
    """Peak of live CPU allocator bytes while fn runs, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_twin_never_materialises_the_full_logits(gen, monkeypatch):
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(ce, "MIN_CHUNK_LOGITS", 0)
    g = gen
    N, H, V = 1024, 16, 4096
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    target = _targets(g, N, V)
    logits_bytes = N * V * 4
    fused = _peak_cpu_bytes(lambda: kernels.linear_cross_entropy(h, w, None, target).backward())
    eager = _peak_cpu_bytes(lambda: F.cross_entropy(h @ w.t(), target).backward())
    assert eager > 2 * logits_bytes  # the measurement sees the logits and their gradient
    assert fused < logits_bytes / 8, (fused, eager)


# ----- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_problem(backend):
    logits = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"target\[2\] = 9 is out of range \[0, 5\)"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, 9, 2]), backend=backend)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: target\[0\] = -1 is out of range"):
        kernels.linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 3), None, torch.tensor([-1, 0, 0, 0]),
                                     backend=backend)
    with pytest.raises(ValueError, match="reduction 'avg'"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), label_smoothing=1.5, backend=backend)
    with pytest.raises(ValueError, match="lse_square_scale must be >= 0"):
        kernels.linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 3), None, torch.zeros(4, dtype=torch.long),
                                     lse_square_scale=-1.0, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        kernels.linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 2), None, torch.zeros(4, dtype=torch.long),
                                     backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4),
                                     torch.zeros(4, dtype=torch.long), backend=backend)


def test_unchecked_kernel_path_marks_bad_targets_with_nan():
    # On CUDA without XLT_CHECK_INPUTS there is no host check: the kernel must not read out of bounds and
    # must make the bad row visible (the trainer stops on a non-finite loss).
    x = torch.randn(3, 8)
    loss = ce._ce_rows_triton(x, torch.tensor([1, 8, -5]), -100, 0.0, 0.0, torch.ones(()), None)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


def test_second_backward_through_one_graph_is_refused(gen):
    # the forward's gradient is scaled in place by the first backward; a second one must not reuse it
    g = gen
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    loss = kernels.cross_entropy(x, target, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    w = torch.randn(5, 5, generator=g, requires_grad=True)
    loss = kernels.linear_cross_entropy(x, w, None, target, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
