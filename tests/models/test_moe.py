"""MoEFeedForward: equals the dense FFN when it should (E=1, upcycling), and a per-token float64 loop always."""
import pytest
import torch
import torch.nn.functional as F

from models.ffn import FeedForward
from models.moe import MoEFeedForward

BACKENDS = ["torch", "triton"]
H, FD = 24, 40


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run


def _dense(g):
    ffn = FeedForward(H, FD)
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ffn


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
def test_one_expert_equals_dense(backend, mode):
    g = _gen()
    dense = _dense(g)
    moe = MoEFeedForward(H, FD, 1, 1, router_mode=mode, kernel_backend=backend)
    with torch.no_grad():
        moe.w_up[0].copy_(dense.up.weight)
        moe.b_up[0].copy_(dense.up.bias)
        moe.w_down[0].copy_(dense.down.weight)
        moe.b_down[0].copy_(dense.down.bias)
    x = torch.randn(3, 7, H, generator=g, requires_grad=True)
    y, ref = moe(x), dense(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=g)
    got = _grads((y * gy).sum(), [x, moe.w_up, moe.b_up, moe.w_down, moe.b_down])
    want = _grads((ref * gy).sum(), [x, dense.up.weight, dense.up.bias, dense.down.weight, dense.down.bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,E,k", [("topk_softmax", 8, 2), ("sigmoid", 4, 2), ("topk_softmax", 64, 1)])
def test_upcycled_equals_dense_at_step_0(backend, mode, E, k):
    g = _gen()
    dense = _dense(g)
    moe = MoEFeedForward.from_dense(dense, E, k, router_mode=mode, kernel_backend=backend)
    assert moe.num_experts == E and moe.router.weight.abs().max() > 0  # a real, fresh router
    x = torch.randn(2, 9, H, generator=g, requires_grad=True)
    y, ref = moe(x), dense(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=g)
    (gx,) = _grads((y * gy).sum(), [x])
    gx_ref, gw_ref = _grads((ref * gy).sum(), [x, dense.up.weight])
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    # the combine weights of a token sum to 1, so the experts' gradients add up to the dense gradient
    gw = _grads((moe(x) * gy).sum(), [moe.w_up])[0].sum(0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-4)


def _loop_reference(moe, x):
    """Per token in float64: route, run each chosen expert, weight, add the shared expert."""
    x64 = x.double()
    out = []
    for t in range(x.shape[0]):
        logits = moe.router.weight.double() @ x64[t]
        top = logits.topk(moe.top_k).indices
        w = torch.softmax(logits[top], 0)  # topk_softmax
        y = 0
        for j, e in enumerate(top.tolist()):
            h = moe.w_up[e].double() @ x64[t] + moe.b_up[e].double()
            y = y + w[j] * (moe.w_down[e].double() @ F.gelu(h) + moe.b_down[e].double())
        if moe.shared is not None:
            s = moe.shared
            y = y + s.down.weight.double() @ F.gelu(s.up.weight.double() @ x64[t] + s.up.bias.double()) \
                + s.down.bias.double()
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,k,shared", [(4, 2, True), (8, 1, False)])
def test_moe_matches_per_token_loop_with_all_gradients(backend, E, k, shared):
    g = _gen()
    moe = MoEFeedForward(H, FD, E, k, shared_expert=shared, kernel_backend=backend)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(E, H, generator=g))  # spread logits: no near-ties
    T = 19
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gaps = (moe.router.weight @ x.detach().T).T.sort(1).values.diff(1).min()
    assert gaps > 1e-4, "near-tie in routing: draw again"
    y = moe(x)
    ref = _loop_reference(moe, x)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(T, H, generator=g)
    params = [x] + list(moe.parameters())
    got = _grads((y * gy).sum(), params)
    want = _grads((ref * gy.double()).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_stats_aux_losses_mask_and_counts():
    g = _gen()
    E, k = 4, 2
    moe = MoEFeedForward(H, FD, E, k, shared_expert=True)
    x = torch.randn(2, 5, H, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y = moe(x, mask)
    stats = moe.last_stats
    assert int(stats["tokens_per_expert"].sum()) == 8 * k and int(stats["dropped"]) == 0
    assert (y[1, 3:] == 0).all()
    torch.testing.assert_close(y[mask], moe(x[mask]))  # padding does not change real tokens
    loss = moe.last_stats["balance_loss"] + moe.last_stats["z_loss"]
    (gr,) = torch.autograd.grad(loss, [moe.router.weight])
    assert gr.abs().sum() > 0  # the aux losses train the router
    per_expert = 2 * H * FD + H + FD
    assert moe.num_parameters() == E * per_expert + E * H + per_expert
    assert moe.active_parameters() == k * per_expert + E * H + per_expert


def test_capacity_factor_drops_and_reports():
    g = _gen()
    moe = MoEFeedForward(H, FD, 4, 1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
    x = torch.randn(16, H, generator=g).abs()  # every token prefers expert 2
    y = moe(x)
    assert moe.capacity(16) == 2
    assert int(moe.last_stats["dropped"]) == 14
    assert (y[2:] == 0).all() and (y[:2] != 0).any()  # the first two tokens kept, in token order


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="top_k must be an int in \\[1, 4\\]"):
        MoEFeedForward(H, FD, 4, 5)
    with pytest.raises(ValueError, match="router_mode must be one of"):
        MoEFeedForward(H, FD, 4, 1, router_mode="argmax")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEFeedForward(H, FD, 4, 1, capacity_factor=0)
    with pytest.raises(ValueError, match="kernel_backend"):
        MoEFeedForward(H, FD, 4, 1, kernel_backend="cuda")
    with pytest.raises(ValueError, match="expected x"):
        MoEFeedForward(H, FD, 4, 1)(torch.zeros(3, H + 1))


def test_bf16_autocast_runs_experts_in_bf16():
    g = _gen()
    moe = MoEFeedForward(H, FD, 4, 2)
    x = torch.randn(9, H, generator=g, requires_grad=True)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert moe.w_up.grad.dtype == torch.float32 and x.grad is not None
