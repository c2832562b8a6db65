"""The PyTorch twins against straightforward float64 references, and the dispatcher's rules."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import dispatch


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run


# ----- dispatch ----------------------------------------------------------------------------------------------
def test_dispatch_rules():
    cpu = torch.device("cpu")
    assert dispatch.resolve("some_op", "auto", cpu) == "torch"
    assert dispatch.resolve("some_op", "torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        dispatch.resolve("some_op", "fast", cpu)
    with pytest.raises(ValueError, match="no Triton kernel is registered"):
        dispatch.resolve("some_op", "triton", cpu)
    dispatch.register_triton("test_only_op", lambda: None)
    try:
        assert dispatch.resolve("test_only_op", "auto", cpu) == "torch"  # CPU never picks Triton by itself
        assert dispatch.resolve("test_only_op", "auto", torch.device("cuda")) == "triton"
        assert dispatch.resolve("test_only_op", "triton", cpu) == "triton"  # TRITON_INTERPRET=1 in tests
    finally:
        dispatch._TRITON_OPS.pop("test_only_op")


# ----- attention ---------------------------------------------------------------------------------------------
def _attention64(q, k, v, lengths, causal):
    B, H, S, D = q.shape
    out = torch.zeros(B, H, S, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for i in range(S):
            keys = [j for j in range(n) if not causal or j <= i]
            if not keys:
                continue
            s = torch.einsum("hd,khd->hk", q[b, :, i].double(), k[b, :, keys].double().transpose(0, 1))
            p = torch.softmax(s / math.sqrt(D), dim=-1)
            out[b, :, i] = torch.einsum("hk,khd->hd", p, v[b, :, keys].double().transpose(0, 1))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(causal):
    g = _gen()
    B, H, S, D = 3, 2, 9, 8
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    lengths = torch.tensor([9, 5, 1])
    out = kernels.attention(q, k, v, lengths=lengths, causal=causal)
    torch.testing.assert_close(out.double(), _attention64(q, k, v, lengths, causal), atol=1e-5, rtol=1e-5)


def test_attention_padding_does_not_leak_and_gradients_flow():
    g = _gen()
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([7, 4])
    out = kernels.attention(q, k, v, lengths=lengths)
    out[1, :, :4].sum().backward()
    assert k.grad[1, :, 4:].abs().max() == 0 and v.grad[1, :, 4:].abs().max() == 0
    assert k.grad[1, :, :4].abs().max() > 0


def test_attention_zero_length_gives_zeros_not_nan():
    q = k = v = torch.randn(1, 1, 3, 4)
    out = kernels.attention(q, k, v, lengths=torch.tensor([0]))
    assert torch.equal(out, torch.zeros_like(out))


def test_varlen_equals_padded():
    g = _gen()
    lens = [5, 1, 8]
    total, H, D = sum(lens), 2, 4
    q, k, v = (torch.randn(total, H, D, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 6, 14])
    packed = kernels.attention_varlen(q, k, v, cu, max(lens))
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        one = kernels.attention(*(t[s:s + n].transpose(0, 1)[None] for t in (q, k, v)))
        torch.testing.assert_close(packed[s:s + n], one[0].transpose(0, 1))


def test_attention_shape_errors():
    x = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match="lengths must have shape"):
        kernels.attention(x, x, x, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="must be 4-D"):
        kernels.attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attention(x, x, x, dropout_p=1.0)


# ----- cross-entropy -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(reduction, smoothing):
    g = _gen()
    N, V = 47, 123
    logits = torch.randn(N, V, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    ours = kernels.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction=reduction)
    ref = F.cross_entropy(logits, target, ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    x = logits.detach().float().requires_grad_()
    kernels.cross_entropy(x, target, label_smoothing=smoothing, reduction=reduction).sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), logits.grad, atol=1e-6, rtol=1e-5)


def test_z_loss_and_all_ignored():
    g = _gen()
    logits = torch.randn(10, 7, generator=g, requires_grad=True)
    target = torch.randint(0, 7, (10,), generator=g)
    loss = kernels.cross_entropy(logits, target, lse_square_scale=1e-2)
    expected = F.cross_entropy(logits, target) + 1e-2 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(loss, expected)
    ignored = torch.full((10,), -100)
    loss = kernels.cross_entropy(logits, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_linear_cross_entropy_matches_composition():
    g = _gen()
    N, H, V = 31, 16, 53
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    ours = kernels.linear_cross_entropy(h, w, b, t)
    grads = torch.autograd.grad(ours, (h, w, b))
    ref = F.cross_entropy(h.double() @ w.double().t() + b.double(), t)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r.float(), atol=1e-5, rtol=1e-4)


def test_cross_entropy_errors_name_the_problem():
    logits = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"target\[2\] = 9 is out of range \[0, 5\)"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match="reduction 'avg'"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        kernels.linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 2), None, torch.zeros(4, dtype=torch.long))


# ----- MoE routing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (8, 1), (64, 2)])
def test_route_matches_per_token_loop(mode, E, k):
    g = _gen()
    T = 37
    logits = torch.randn(T, E, generator=g)  # continuous: ties have probability zero
    r = kernels.moe_route(logits, k, mode=mode)
    for t in range(T):
        row = logits[t].double()
        order = sorted(range(E), key=lambda e: -row[e].item())[:k]
        assert r.expert_ids[t].tolist() == order
        if mode == "softmax_topk":
            w = torch.softmax(row, 0)[order]
        elif mode == "topk_softmax":
            w = torch.softmax(row[order], 0)
        else:
            s = torch.sigmoid(row[order])
            w = s / s.sum()
        torch.testing.assert_close(r.weights[t].double(), w, atol=1e-6, rtol=1e-5)
    counts = torch.zeros(E, dtype=torch.long)
    for e in r.expert_ids.flatten().tolist():
        counts[e] += 1
    assert torch.equal(r.tokens_per_expert, counts)
    if mode != "sigmoid":
        probs = torch.softmax(logits.double(), -1).mean(0)
        balance = E * ((counts.double() / (T * k)) * probs).sum()
        torch.testing.assert_close(r.balance_loss.double(), balance, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.z_loss.double(), torch.logsumexp(logits.double(), -1).square().mean(),
                               atol=1e-5, rtol=1e-5)


def test_permute_unpermute_is_the_weighted_expert_sum():
    g = _gen()
    T, H, E, k = 29, 6, 5, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g)
    logits[:, 3] = -1e4  # an expert that receives no token
    r = kernels.moe_route(logits, k)
    scale = torch.randn(E, generator=g)
    xs, plan = kernels.moe_permute(x, r.expert_ids, E)
    experts_of_rows = torch.repeat_interleave(torch.arange(E), plan.tokens_per_expert)
    ys = xs * scale[experts_of_rows][:, None]  # a toy expert per group
    out = kernels.moe_unpermute(ys, r.weights, plan)
    ref = torch.stack([sum(r.weights[t, j] * scale[r.expert_ids[t, j]] * x[t] for j in range(k)) for t in range(T)])
    torch.testing.assert_close(out, ref)
    assert plan.tokens_per_expert[3] == 0
    g1 = torch.autograd.grad(out.sum(), x)[0]
    g2 = torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(g1, g2)


def test_route_errors():
    with pytest.raises(ValueError, match="top_k must be in"):
        kernels.moe_route(torch.zeros(3, 4), 5)
    with pytest.raises(ValueError, match="mode 'best'"):
        kernels.moe_route(torch.zeros(3, 4), 1, mode="best")
