"""The Triton FlashAttention kernels (run by the interpreter) against float64 references: outputs and
dQ/dK/dV, padded and packed layouts, head dims 32/64/128, fp32/fp16/bf16, causal, softmax_scale, dropout.

The float64 oracle is `attention_reference` on float64 inputs; tests/kernels/test_twins.py checks the
twin itself against a per-row loop."""
import pytest
import torch

import kernels
from kernels.attention import attention_forward, attention_reference, dropout_mask, padded_seqs

LENGTHS = [1, 63, 64, 65, 200]  # around one 64-tile, and several tiles with a ragged tail
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative error allowed, of the largest reference value: fp32 accumulates in a different order; fp16 and
# bf16 inputs are exact in float64, so the error is the output rounding (one ulp) plus fp32 accumulation.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _qkv(shape, dtype, g):
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _close(actual, expected, dtype, what):
    tol = TOL[dtype] * max(expected.abs().max().item(), 1e-6)
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def _reference64(q, k, v, do, **kw):
    """float64 output and (dq, dk, dv) of the twin on the same (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q64, k64, v64, **kw)
    return out.detach(), torch.autograd.grad(out, (q64, k64, v64), do.double())


def _pack(x, lengths):
    """(B, H, S, D) -> (total, H, D), real rows only."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_padded_forward_backward_match_float64(gen, D, dtype):
    g = gen
    dt = DTYPES[dtype]
    B, H, S = len(LENGTHS), 1, max(LENGTHS)
    q, k, v = _qkv((B, H, S, D), dt, g)
    lengths = torch.tensor(LENGTHS)[torch.randperm(B, generator=g)]  # a batch mixing every length
    out = kernels.attention(q, k, v, lengths=lengths, backend="triton")
    do = torch.randn(out.shape, generator=g).to(dt)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = _reference64(q, k, v, do, lengths=lengths)
    assert out.dtype == dt and all(gr.dtype == dt for gr in grads)
    _close(out, ref, dt, "out")  # every row: padded query rows attend to the real keys, as in the twin
    for name, gr, rg in zip("qkv", grads, ref_grads):
        _close(gr, rg, dt, f"d{name}")
    for b, n in enumerate(lengths.tolist()):  # keys past a length get no gradient at all
        assert not grads[1][b, :, n:].any() and not grads[2][b, :, n:].any()


@pytest.mark.parametrize("D", [32, 40, 64, 128])  # 40: a head dim that is not a power of two
def test_causal_and_softmax_scale_match_float64(gen, D):
    g = gen
    B, H, S = 3, 2, 130
    q, k, v = _qkv((B, H, S, D), torch.float32, g)
    lengths = torch.tensor([130, 65, 1])
    scale = 0.3
    out = kernels.attention(q, k, v, lengths=lengths, causal=True, softmax_scale=scale, backend="triton")
    do = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = _reference64(q, k, v, do, lengths=lengths, causal=True, softmax_scale=scale)
    _close(out, ref, torch.float32, "out")
    for name, gr, rg in zip("qkv", grads, ref_grads):
        _close(gr, rg, torch.float32, f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_packed_matches_float64_and_the_padded_layout(gen, causal):
    g = gen
    lengths = [65, 0, 200, 1, 64, 63]  # a length 0 gives no rows and must not disturb its neighbours
    B, H, S, D = len(lengths), 2, max(lengths), 64
    q, k, v = _qkv((B, H, S, D), torch.float32, g)
    do = torch.randn(B, H, S, D, generator=g)
    lens = torch.tensor(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    # the packed inputs as slices of one (total, 3, H, D) projection: non-contiguous, as an encoder has them
    qkv = torch.stack([_pack(t.detach(), lengths) for t in (q, k, v)], dim=1).requires_grad_()
    pq, pk, pv = qkv.unbind(1)
    packed = kernels.attention_varlen(pq, pk, pv, cu, S, causal=causal, backend="triton")
    packed_grad = torch.autograd.grad(packed, qkv, _pack(do, lengths))[0].unbind(1)
    padded = kernels.attention(q, k, v, lengths=lens, causal=causal, backend="triton")
    padded_grads = torch.autograd.grad(padded, (q, k, v), do * (torch.arange(S) < lens[:, None])[:, None, :, None])
    ref, ref_grads = _reference64(q, k, v, do, lengths=lens, causal=causal)
    _close(packed, _pack(ref, lengths), torch.float32, "packed out")
    torch.testing.assert_close(packed, _pack(padded.detach(), lengths), rtol=1e-6, atol=1e-6)
    for name, pg, dg in zip("qkv", packed_grad, padded_grads):
        torch.testing.assert_close(pg, _pack(dg, lengths), rtol=1e-6, atol=1e-6, msg=f"d{name} packed vs padded")
    # reference gradients of the real rows only: do of padded rows set to zero
    _, ref_grads = _reference64(q, k, v, do * (torch.arange(S) < lens[:, None])[:, None, :, None],
                                lengths=lens, causal=causal)
    for name, pg, rg in zip("qkv", packed_grad, ref_grads):
        _close(pg, _pack(rg, lengths), torch.float32, f"packed d{name}")


def test_zero_lengths_give_zeros_and_no_nan(gen):
    g = gen
    q, k, v = _qkv((2, 2, 40, 32), torch.float32, g)
    out = kernels.attention(q, k, v, lengths=torch.tensor([0, 0]), backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g))
    assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)
    empty = kernels.attention_varlen(*(t.new_zeros(0, 2, 32) for t in (q, k, v)), torch.tensor([0, 0]), 0,
                                     backend="triton")
    assert empty.shape == (0, 2, 32)


def test_log_sum_exp_is_saved_and_strided_inputs_work(gen):
    g = gen
    B, H, S, D = 3, 2, 40, 32
    # q, k, v as views of one (B, S, 3, H, D) projection, as an encoder makes them: not contiguous
    qkv = torch.randn(B, S, 3, H, D, generator=g).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    lengths = torch.tensor([40, 17, 0])
    scale = 0.2
    out, lse = attention_forward(q, k, v, padded_seqs(lengths, B, S, q.device), False, scale, 0.0, 0)
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(
        (torch.arange(S) >= lengths[:, None])[:, None, None, :], float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)  # -inf where no key is visible; the kernel saves +inf there
    torch.testing.assert_close(lse[:2].double(), expected[:2], rtol=1e-6, atol=1e-5)
    assert torch.isinf(lse[2]).all() and (lse[2] > 0).all()
    # strided inputs and a stride-0 gradient (from .sum()) give the contiguous inputs' results
    out = kernels.attention(q, k, v, lengths=lengths, softmax_scale=scale, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    ref, ref_grads = _reference64(q, k, v, torch.ones(B, H, S, D), lengths=lengths, softmax_scale=scale)
    _close(out, ref, torch.float32, "out")
    for name, gr, rg in zip("qkv", grad.permute(2, 0, 3, 1, 4).unbind(0), ref_grads):
        _close(gr, rg, torch.float32, f"d{name}")


# ----- dropout -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(gen, p):
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    B, H, S = 2, 3, 200
    mask = dropout_mask(seed, B, H, S, p)
    n = mask[0, 0].numel()
    sigma = (p * (1 - p) / n) ** 0.5
    rates = mask.double().mean(dim=(2, 3))  # per sequence and head: 40000 draws each
    assert ((rates - (1 - p)).abs() < 5 * sigma).all(), rates
    assert abs(mask.double().mean().item() - (1 - p)) < 5 * sigma / (B * H) ** 0.5
    # rows, columns and heads are different streams (a counter collision would repeat them)
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1]) and not torch.equal(mask[0, 0, :, 0], mask[0, 0, :, 1])
    assert not torch.equal(mask, dropout_mask(seed + 1, B, H, S, p))


def test_dropout_same_seed_same_result_and_seed_matters(gen):
    g = gen
    q, k, v = _qkv((2, 2, 70, 32), torch.float32, g)
    lengths = torch.tensor([70, 33])
    do = torch.randn(2, 2, 70, 32, generator=g)

    def run(seed):
        out = kernels.attention(q, k, v, lengths=lengths, dropout_p=0.3, seed=seed, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    first, again, other = run(1234), run(1234), run(1235)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(7)  # without a seed: drawn from torch's generator, so manual_seed reproduces it
    a = kernels.attention(q, k, v, lengths=lengths, dropout_p=0.3, backend="triton")
    torch.manual_seed(7)
    assert torch.equal(a, kernels.attention(q, k, v, lengths=lengths, dropout_p=0.3, backend="triton"))


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_output_and_gradients_match_float64_with_the_same_mask(gen, causal):
    g = gen
    p, seed = 0.2, int(torch.randint(0, 2**62, (), generator=g))
    lengths = [65, 130, 1]
    B, H, S, D = len(lengths), 2, max(lengths), 32
    q, k, v = _qkv((B, H, S, D), torch.float32, g)
    lens = torch.tensor(lengths)
    do = torch.randn(B, H, S, D, generator=g)
    mask = dropout_mask(seed, B, H, S, p)
    out = kernels.attention(q, k, v, lengths=lens, causal=causal, dropout_p=p, seed=seed, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = _reference64(q, k, v, do, lengths=lens, causal=causal, dropout_p=p, dropout_mask=mask)
    _close(out, ref, torch.float32, "out")
    for name, gr, rg in zip("qkv", grads, ref_grads):
        _close(gr, rg, torch.float32, f"d{name}")
    # the packed layout draws the same mask: sequence b of length n uses mask[b, :, :n, :n]
    cu = torch.tensor([0] + lengths).cumsum(0)
    packed = kernels.attention_varlen(*(_pack(t.detach(), lengths) for t in (q, k, v)), cu, S, causal=causal,
                                      dropout_p=p, seed=seed, backend="triton")
    torch.testing.assert_close(packed, _pack(out.detach(), lengths), rtol=1e-6, atol=1e-6)
    # and the dropout did something: without it the output differs
    assert not torch.allclose(out, kernels.attention(q, k, v, lengths=lens, causal=causal, backend="triton"))


def test_twin_dropout_with_seed_is_reproducible(gen):
    g = gen
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    a = kernels.attention(q, k, v, dropout_p=0.5, seed=3)
    assert torch.equal(a, kernels.attention(q, k, v, dropout_p=0.5, seed=3))
    assert not torch.equal(a, kernels.attention(q, k, v, dropout_p=0.5, seed=4))


# ----- input errors ------------------------------------------------------------------------------------------
def test_input_errors_name_the_option():
    x = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match="dtypes differ"):
        kernels.attention(x, x, x.half())
    with pytest.raises(ValueError, match="seed must be an int"):
        kernels.attention(x, x, x, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="softmax_scale must be a positive number"):
        kernels.attention(x, x, x, softmax_scale=0.0)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 3\]"):
        kernels.attention(x, x, x, lengths=torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        kernels.attention(x, x, x, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.attention(x.double(), x.double(), x.double(), backend="triton")
    p = torch.zeros(5, 2, 4)
    with pytest.raises(ValueError, match="no sequence longer than max_seqlen=2"):
        kernels.attention_varlen(p, p, p, torch.tensor([0, 2, 5]), 2)
    with pytest.raises(ValueError, match="end at total_tokens=5"):
        kernels.attention_varlen(p, p, p, torch.tensor([0, 2, 4]), 4)
    with pytest.raises(ValueError, match="never decrease"):
        kernels.attention_varlen(p, p, p, torch.tensor([0, 3, 2, 5]), 4)
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        kernels.attention_varlen(p, p, p, torch.tensor([0.0, 5.0]), 5)
    with pytest.raises(ValueError, match="max_seqlen must be an int"):
        kernels.attention_varlen(p, p, p, torch.tensor([0, 5]), 5.0)
