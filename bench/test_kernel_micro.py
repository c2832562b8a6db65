"""Kernel micro-benchmarks with pytest-benchmark, each kernel against the anchors a user would pick instead
(the same implementations as bench.attention / bench.cross_entropy / bench.moe, at one XLM-R-sized shape
each on CUDA and a smoke shape on CPU), forward+backward, CUDA-synchronised inside the timed call.

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Rows that cannot run here (no CUDA for Triton, an anchor not installed) are skipped with the reason.
"""
import pytest
import torch

from bench import attention as attn_bench
from bench import cross_entropy as ce_bench

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 20 if CUDA else 2


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, step):
    """Warm-up (compilation, autotuning) outside the timing, then ROUNDS synchronised calls."""
    def timed():
        step()
        _sync()
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=3 if CUDA else 1, iterations=1)


def _backend(op: str) -> str:
    """What XLT's "auto" runs here: the Triton kernel on CUDA, the PyTorch twin on CPU."""
    from kernels.dispatch import resolve
    return resolve(op, "auto", torch.device(DEVICE))


ATTENTION_SHAPE = ({"name": "xnli_mix_b64_h12", "heads": 12, "head_dim": 64, "lengths": attn_bench._xnli_lengths(64)}
                   if CUDA else {"name": "xnli_mix_b4_h2", "heads": 2, "head_dim": 64,
                                 "lengths": attn_bench._xnli_lengths(4)})


@pytest.mark.parametrize("impl", ["xlt_varlen", "xlt_padded", "sdpa_flash", "sdpa_efficient_mask", "sdpa_cudnn_mask",
                                  "sdpa_math_mask", "varlen_attn", "flash_attn"])
def test_attention_fwd_bwd(benchmark, impl):
    why = attn_bench._why_unavailable(impl, DEVICE)
    if why:
        pytest.skip(why)
    batch = attn_bench.Batch(ATTENTION_SHAPE, DTYPE, DEVICE)
    fn = attn_bench.attention_fn(impl)
    qkv, extra, do = batch.inputs(impl)
    qkv = [t.detach().requires_grad_() for t in qkv]
    benchmark.extra_info.update(shape=ATTENTION_SHAPE["name"], real_tokens=sum(ATTENTION_SHAPE["lengths"]),
                                backend=_backend("attention_varlen") if impl.startswith("xlt") else None)
    _run(benchmark, lambda: attn_bench._call(fn, qkv, extra, do, "fwd_bwd"))


CE_SHAPE = (8192, 768, 250002) if CUDA else (256, 64, 5000)


@pytest.mark.parametrize("impl", list(ce_bench.IMPLS))
def test_linear_cross_entropy_fwd_bwd(benchmark, impl):
    why = ce_bench._why_unavailable(impl, DEVICE)
    if why:
        pytest.skip(why)
    inputs = ce_bench.make_inputs(*CE_SHAPE, DTYPE, DEVICE)
    fn = ce_bench.loss_fn(impl)
    benchmark.extra_info.update(n=CE_SHAPE[0], h=CE_SHAPE[1], v=CE_SHAPE[2],
                                backend=_backend("linear_cross_entropy") if impl == "xlt" else None)
    _run(benchmark, lambda: ce_bench._one_call(fn, inputs))


MOE_SHAPE = {"tokens": 16384, "hidden": 1024, "ffn": 4096, "experts": 8, "top_k": 2} if CUDA else \
    {"tokens": 256, "hidden": 64, "ffn": 128, "experts": 4, "top_k": 2}


def _moe_layer(variant: str):
    from bench.moe import _GroupedMMMoE
    from models.ffn import FeedForward
    from models.moe import MoEFeedForward
    s = MOE_SHAPE
    if variant == "dense_equal_active":
        return FeedForward(s["hidden"], s["top_k"] * s["ffn"])
    if variant == "grouped_mm":
        return _GroupedMMMoE(s["hidden"], s["ffn"], s["experts"], s["top_k"], kernel_backend="torch")
    return MoEFeedForward(s["hidden"], s["ffn"], s["experts"], s["top_k"], kernel_backend=variant.split("_")[1])


@pytest.mark.parametrize("variant", ["xlt_triton", "xlt_torch", "dense_equal_active", "grouped_mm"])
def test_moe_ffn_fwd_bwd(benchmark, variant):
    if variant == "xlt_triton" and not CUDA:
        pytest.skip("Triton kernels need CUDA (the interpreter times Python, not the kernel)")
    layer = _moe_layer(variant).to(device=DEVICE, dtype=DTYPE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MOE_SHAPE["tokens"], MOE_SHAPE["hidden"], generator=g).to(DEVICE, DTYPE).requires_grad_()
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        (layer(x) * dy).sum().backward()
    try:
        step()  # an anchor this torch cannot run (_grouped_mm on CPU or older GPUs) is skipped, not failed
    except (RuntimeError, NotImplementedError) as e:
        if variant != "grouped_mm":
            raise
        pytest.skip(f"torch._grouped_mm: {str(e).splitlines()[0][:160]}")
    benchmark.extra_info.update(MOE_SHAPE)
    _run(benchmark, step)


DROPOUT_SHAPE = (16384, 1024) if CUDA else (1475, 128)  # CPU: one xlt-tiny XNLI-like batch's hidden states


@pytest.mark.parametrize("impl", ["xlt", "nn"])
def test_hidden_dropout_fwd_bwd(benchmark, impl):
    """models.dropout.Dropout (on CPU kernels.dropout_mask's 16-bit draws) against nn.Dropout (bernoulli_)."""
    from models.dropout import Dropout
    layer = (Dropout(0.1) if impl == "xlt" else torch.nn.Dropout(0.1)).train()
    x = torch.randn(DROPOUT_SHAPE, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        layer(x).backward(dy)
    benchmark.extra_info.update(shape=DROPOUT_SHAPE, dtype="bf16")
    _run(benchmark, step)


MASK_SHAPE = (32, 4, 128, 128)  # attention probabilities of one xlt-tiny full-length batch (B, heads, S, S)


@pytest.mark.parametrize("impl", ["keep_mask", "rand_compare", "bernoulli"])
def test_dropout_mask(benchmark, impl):
    """A dropout keep mask of MASK_SHAPE on CPU: kernels.dropout_mask.keep_mask (four 16-bit draws per 64-bit
    generator call) against a float uniform compare (torch.rand >= p) and bernoulli_ (what F.dropout draws)."""
    from kernels.dropout_mask import keep_mask
    draw = {"keep_mask": lambda: keep_mask(MASK_SHAPE, 0.1)[0],
            "rand_compare": lambda: torch.rand(MASK_SHAPE) >= 0.1,
            "bernoulli": lambda: torch.empty(MASK_SHAPE).bernoulli_(0.9)}[impl]
    benchmark.extra_info.update(shape=MASK_SHAPE, p=0.1)
    benchmark.pedantic(draw, rounds=20, warmup_rounds=2, iterations=1)  # a CPU op: cheap enough for 20 rounds
