"""The attention twin against a float64 loop, and the dispatcher's rules (the other twins are tested with their
kernels in test_cross_entropy.py and test_moe.py)."""
import math

import pytest
import torch

import kernels
from kernels import dispatch


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
def test_attention_matches_reference(gen, causal):
    g = gen
    B, H, S, D = 3, 2, 9, 8
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    lengths = torch.tensor([9, 5, 1])
    out = kernels.attention(q, k, v, lengths=lengths, causal=causal)
    torch.testing.assert_close(out.double(), _attention64(q, k, v, lengths, causal), atol=1e-5, rtol=1e-5)


def test_attention_padding_does_not_leak_and_gradients_flow(gen):
    g = gen
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


def test_twin_zero_length_gives_zero_gradients_not_nan(gen):
    """The twin hides padding keys with a -inf bias; a sequence with no key must not get an all -inf row (its
    softmax would be NaN, and NaN times the zero gradient of its zeroed output is still NaN)."""
    q, k, v = (torch.randn(3, 2, 5, 4, generator=gen, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([5, 0, 2])
    out = kernels.attention_reference(q, k, v, lengths, dropout_p=0.25, seed=3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=gen))
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # nothing of the empty sequence is read
    assert torch.equal(grads[1][2, :, 2:], torch.zeros_like(grads[1][2, :, 2:]))  # nor keys past a length


@pytest.mark.parametrize("causal", [False, True])
def test_the_unfused_bias_ablation_computes_the_same_attention(gen, monkeypatch, causal):
    """bench.throughput's xlt-unfused-bias arm (kernels.attention.FUSED_BIAS off) must time the same function:
    outputs and gradients as the fused baddbmm's, empty and padded sequences included."""
    import sys

    attention = sys.modules["kernels.attention"]  # the module (kernels.attention is also the function's name)
    q, k, v = (torch.randn(4, 2, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    lengths, dout = torch.tensor([6, 0, 3, 1]), torch.randn(4, 2, 6, 8, generator=gen)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(attention, "FUSED_BIAS", fused)
        out = kernels.attention_reference(q, k, v, lengths, causal=causal, softmax_scale=0.3)
        results[fused] = (out,) + torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(b).all()


def test_varlen_one_full_length_sequence_gives_contiguous_outputs_and_gradients(gen):
    """A call holding one sequence at its full length (the encoder's group of the longest sequence) must not
    return strided views: the encoder concatenates the calls' outputs, and its split backward their gradients,
    and torch.cat of a strided piece is several times slower."""
    q, k, v = (torch.randn(7, 2, 4, generator=gen, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7])
    ref = kernels.attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), backend="torch")[0].transpose(0, 1)
    torch.testing.assert_close(kernels.attention_varlen(q, k, v, cu, 7, backend="torch"), ref)
    for p in (0.0, 0.1):  # with dropout the CPU path is the twin's matmuls (without, SDPA's own layout)
        out = kernels.attention_varlen(q, k, v, cu, 7, dropout_p=p, backend="torch")
        assert out.is_contiguous()
        for g in torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=gen)):
            assert g.is_contiguous()


def test_varlen_equals_padded(gen):
    g = gen
    lens = [5, 1, 8]
    total, H, D = sum(lens), 2, 4
    q, k, v = (torch.randn(total, H, D, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 6, 14])
    packed = kernels.attention_varlen(q, k, v, cu, max(lens))
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        one = kernels.attention(*(t[s:s + n].transpose(0, 1)[None] for t in (q, k, v)))
        torch.testing.assert_close(packed[s:s + n], one[0].transpose(0, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_path_equals_the_written_out_twin(gen, causal):
    """The CPU path (SDPA) computes the oracle's function: outputs and gradients, padding, empty sequences."""
    g = gen
    q, k, v = (torch.randn(4, 3, 11, 8, generator=g, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([11, 6, 0, 1])
    grad = torch.randn(4, 3, 11, 8, generator=g)
    fast = kernels.attention_torch(q, k, v, lengths, causal, softmax_scale=0.3)
    ref = kernels.attention_reference(q, k, v, lengths, causal, softmax_scale=0.3)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[2], torch.zeros_like(fast[2]))
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _dropout_probe(B, H, S, lengths, causal):
    """q = 0 (uniform attention over the visible keys) and v = the identity: output [b, h, i, j] is then
    keep[i, j] / (n_visible(i) * (1 - p)) for a visible key j and 0 otherwise, so the mask can be read back."""
    q = k = torch.zeros(B, H, S, S)
    v = torch.eye(S).expand(B, H, S, S).contiguous()
    visible = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :].expand(B, H, S, S)
    if causal:
        visible = visible & torch.ones(S, S, dtype=torch.bool).tril()
    return q, k, v, visible


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seeded", [True, False], ids=["seed", "sdpa"])
def test_dropout_of_the_cpu_path_reads_back_as_a_scaled_bernoulli_mask(gen, causal, seeded):
    """Dropout on the CPU path, both ways it runs: with a seed (the twin, mask from torch.Generator(seed))
    and without (a fresh mask from the global generator). Through the probe above the output shows the mask
    itself: every entry is 0 or exactly 1 / (n (1 - p)) (dropout after the softmax, scaled by 1 / (1 - p)),
    nothing leaks to keys past a length or after the query (causal), the keep rate is 1 - p within 5 sigma, rows are not
    all alike; with a seed, the mask is the generator's draw, the same again for the same seed and not for
    another."""
    p, B, H, S = 0.3, 16, 4, 16
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    lengths[0] = S
    q, k, v, visible = _dropout_probe(B, H, S, lengths, causal)
    seed = int(torch.randint(0, 2**62, (), generator=gen)) if seeded else None
    if not seeded:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    out = kernels.attention_torch(q, k, v, lengths, causal, dropout_p=p, seed=seed)
    n = visible.sum(-1, keepdim=True).double()
    keep = out.double() * n * (1 - p)  # 1 where kept, 0 where dropped or not visible
    assert ((keep - 1).abs() < 1e-5).logical_or(keep.abs() < 1e-6).all(), "entries other than 0 and 1/(n(1-p))"
    kept = (keep - 1).abs() < 1e-5
    assert not kept[~visible].any(), "dropout output on a key that is not visible"
    draws = int(visible.sum())
    rate = kept.sum().item() / draws
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / draws) ** 0.5, (rate, draws)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0, -1], kept[0, 0, -2])
    if seeded:
        drawn = torch.rand(B, H, S, S, generator=torch.Generator().manual_seed(seed)) >= p
        assert torch.equal(kept, drawn & visible)
        assert torch.equal(out, kernels.attention_torch(q, k, v, lengths, causal, dropout_p=p, seed=seed))
        assert not torch.equal(out, kernels.attention_torch(q, k, v, lengths, causal, dropout_p=p, seed=seed + 1))


def test_varlen_full_length_batch_equals_padded(gen):
    """All sequences full (MLM pretraining) take a copy-free path; it must equal the padded layout."""
    g = gen
    B, S, H, D = 3, 6, 2, 4
    q, k, v = (torch.randn(B * S, H, D, generator=g) for _ in range(3))
    cu = torch.arange(0, B * S + 1, S)
    packed = kernels.attention_varlen(q, k, v, cu, S)
    padded = kernels.attention(*(t.view(B, S, H, D).transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(packed, padded.transpose(1, 2).reshape(B * S, H, D))
    ragged = kernels.attention_varlen(q, k, v, cu, S + 2)  # same sequences, max_seqlen larger than any
    torch.testing.assert_close(ragged, packed)


def test_attention_shape_errors():
    x = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match="lengths must have shape"):
        kernels.attention(x, x, x, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="must be 4-D"):
        kernels.attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attention(x, x, x, dropout_p=1.0)


def test_twin_with_fewer_queries_than_keys_is_the_full_computations_rows(gen):
    """One query row per sequence against all its keys (the encoder's first-token last layer) gives the first
    row of the full self-attention, with padding masked, in values and gradients."""
    B, H, S, D = 3, 2, 7, 8
    lengths = torch.tensor([7, 4, 1])
    q, k, v = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = kernels.attention_reference(q, k, v, lengths)[:, :, :1]
    first = kernels.attention_reference(q[:, :, :1], k, v, lengths)
    torch.testing.assert_close(first, full)
    g = torch.randn(first.shape, generator=gen, dtype=torch.float64)
    got, want = (torch.autograd.grad((out * g).sum(), (q, k, v)) for out in (first, full))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="causal needs as many keys as queries"):
        kernels.attention_reference(q[:, :, :1], k, v, lengths, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_twin_equals_the_autocast_fp32_softmax_path(gen, causal):
    """compute_dtype=bf16 (the CPU training path under autocast) keeps the (S, S) scores and probabilities in
    bf16 instead of autocast's fp32 softmax and casts. The matmuls are bf16 either way and softmax accumulates
    in fp32 inside, so outputs and gradients must match the autocast path to bf16 rounding (on the machine this
    was written on they are bit-identical), and stay as close to the float64 oracle."""
    B, H, S, D, p = 4, 2, 37, 16, 0.1
    q, k, v = (torch.randn(B, H, S, D, generator=gen).bfloat16() for _ in range(3))
    lengths = torch.tensor([S, 20, 5, 30])
    keep = torch.rand(B, H, S, S, generator=gen) >= p
    go = torch.randn(B, H, S, D, generator=gen)

    def run(dtype=None, compute_dtype=None, autocast=True):
        args = [t.to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = kernels.attention_reference(*args, lengths, causal, None, p, dropout_mask=keep,
                                              compute_dtype=compute_dtype)
        return (out,) + torch.autograd.grad((out.double() * go.double()).sum(), args)

    low, old = run(compute_dtype=torch.bfloat16), run()
    ref = run(torch.float64, autocast=False)
    assert low[0].dtype == torch.bfloat16
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), low, old, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)
        err_low, err_old = ((t.double() - r).abs().max().item() for t in (a, b))
        assert err_low <= 1.25 * err_old + 1e-3, (name, err_low, err_old)


def test_cpu_dropout_path_keeps_bf16_scores_only_under_autocast(gen, monkeypatch):
    """attention_torch's CPU dropout path asks the twin for bf16 scores only under autocast to q's dtype (its
    matmuls would be bf16 anyway); bf16 inputs without autocast keep the twin's fp32 computation."""
    import sys

    attention = sys.modules["kernels.attention"]
    asked = []
    real = attention.attention_reference

    def spy(*args, compute_dtype=None, **kw):
        asked.append(compute_dtype)
        return real(*args, compute_dtype=compute_dtype, **kw)

    monkeypatch.setattr(attention, "attention_reference", spy)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=gen).bfloat16() for _ in range(3))
    kernels.attention_torch(q, k, v, dropout_p=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.attention_torch(q, k, v, dropout_p=0.1)
    monkeypatch.setattr(attention, "CPU_AUTOCAST_SCORES", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.attention_torch(q, k, v, dropout_p=0.1)
    assert asked == [None, torch.bfloat16, None]
