"""The encoder's packed layout and its shortcuts give the full computation's values and gradients:
attention grouped by length on the PyTorch path (sequences sorted longest first), the no-padding view, and
the last layer computed for the first tokens only when the head reads only them (dense, pre-LN, MoE)."""
import itertools
from dataclasses import replace

import pytest
import torch

import kernels
from models import Encoder, TaskModel, make_head, preset
from models import encoder as E
from models.config import moe_variant
from models.heads import DualEncoderHead


def _cfg(**kw):
    return preset("tiny", vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def _cost(lengths, bounds, heads, call_cost):
    return sum(call_cost + (b - a) * lengths[a] ** 2 * heads for a, b in bounds)


def _partitions(n):
    """Every split of range(n) into contiguous [a, b) groups."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        starts = [0] + [i + 1 for i, c in enumerate(cuts) if c]
        yield list(zip(starts, starts[1:] + [n]))


@pytest.mark.parametrize("call_cost", [1, 200, 16384])
def test_length_groups_is_the_cheapest_contiguous_split(gen, call_cost):
    for _ in range(30):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        lengths = sorted(torch.randint(1, 40, (n,), generator=gen).tolist(), reverse=True)
        bounds = E.length_groups(lengths, heads=2, call_cost=call_cost)
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a < b for a, b in bounds)
        assert all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
        best = min(_cost(lengths, p, 2, call_cost) for p in _partitions(n))
        assert _cost(lengths, bounds, 2, call_cost) == best, (lengths, bounds)


def _grads(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_same_grads(got, want):
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:  # fp32 sums in another order: an absolute tolerance on the gradient's own scale
            torch.testing.assert_close(a, b, atol=5e-5 * max(1.0, float(b.abs().max())), rtol=1e-4)


def test_grouped_attention_equals_one_call(seed, gen, monkeypatch):
    """One long sequence and many short ones, out of length order: the PyTorch path calls attention per
    length group over the sorted sequences, and outputs (in batch order) and gradients are the same."""
    torch.manual_seed(seed)
    enc = Encoder(_cfg(kernel_backend="torch")).train()
    lengths = torch.tensor([3, 120, 2, 5, 3, 118, 1])
    ids = torch.randint(2, 50, (len(lengths), 120), generator=gen)
    calls = []
    real = kernels.attention_varlen

    def spy(q, k, v, cu_seqlens, max_seqlen, **kwargs):
        calls.append(max_seqlen)
        return real(q, k, v, cu_seqlens, max_seqlen, **kwargs)

    monkeypatch.setattr(kernels, "attention_varlen", spy)
    grouped = enc(ids, lengths=lengths)
    g_grouped = _grads(enc, (grouped ** 2).sum())
    assert len(calls) == 2 * enc.cfg.num_layers and sorted(set(calls)) == [5, 120]  # two groups a layer
    calls.clear()
    monkeypatch.setattr(Encoder, "_group_heads", lambda self, device: None)
    single = enc(ids, lengths=lengths)
    assert calls == [120] * enc.cfg.num_layers
    torch.testing.assert_close(grouped, single, atol=1e-5, rtol=1e-5)
    _assert_same_grads(g_grouped, _grads(enc, (single ** 2).sum()))
    assert torch.all(grouped[torch.arange(120)[None, :] >= lengths[:, None]] == 0)


def test_grouped_attention_backward_writes_no_whole_size_gradient_per_group(gen, monkeypatch):
    """Each group's q / k / v are pieces of the layer's packed q / k / v: as slices, each piece's backward would
    write its gradient into a zeroed copy of the whole tensor (slice_backward), groups x tokens work per layer;
    as a split, one concatenation gathers them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    enc = Encoder(_cfg(kernel_backend="torch")).train()
    lengths = torch.tensor([3, 120, 2, 5, 3, 118, 1])
    ids = torch.randint(2, 50, (len(lengths), 120), generator=gen)
    seqs = E.Packing.from_lengths(lengths, 120, enc.cfg.num_heads)
    assert len(seqs.groups) > 1  # the case under test
    weight = torch.randn(len(lengths), 120, enc.cfg.hidden_size, generator=gen)
    counts, grads = {}, {}
    for split in (True, False):  # False: bench.throughput's xlt-sliced-groups ablation, the same function
        monkeypatch.setattr(E, "SPLIT_GROUPS", split)
        enc.zero_grad()
        out = enc(ids, lengths=lengths)
        with Ops() as ops:
            (out * weight).sum().backward()
        counts[split] = ops.seen.count("slice_backward")
        grads[split] = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
    assert counts[True] == 0, "a group's q, k or v is a slice of the layer's"
    assert counts[False] >= 3 * len(seqs.groups)  # the ablation does what it says: q, k, v slices per group
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)


def test_a_batch_without_padding_is_packed_as_a_view():
    seqs = E.Packing.from_lengths(torch.tensor([4, 4, 4]), 4, group_heads=2)
    assert seqs.index is None and seqs.order is None and seqs.cu_seqlens.tolist() == [0, 4, 8, 12]
    ids, x = torch.randint(0, 9, (3, 4)), torch.randn(12, 6)
    assert seqs.pack_ids(ids).data_ptr() == ids.data_ptr() and seqs.unpack(x).data_ptr() == x.data_ptr()


def _models(kind, gen):
    if kind.startswith("moe"):
        cfg = moe_variant(_cfg(kernel_backend="torch", pre_layer_norm=kind == "moe-pre-ln"), num_experts=4,
                          top_k=2, match="active", every=1)
        if kind == "moe-capacity":  # tokens over an expert's capacity are dropped: the whole last layer runs
            cfg = replace(cfg, moe_capacity_factor=1.0)
    else:
        cfg = _cfg(kernel_backend="triton" if kind == "triton" else "torch", pre_layer_norm=kind == "pre-ln")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    enc = Encoder(cfg)
    return cfg, enc


LAYOUTS = {"padded": [9, 3, 7, 9], "no-padding": [9, 9, 9, 9], "an-empty-sequence": [9, 0, 7, 9]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["post-ln", "pre-ln", "moe", "moe-pre-ln", "moe-capacity", "triton"])
@pytest.mark.parametrize("head", ["pair", "choice"])
def test_first_token_only_gives_the_full_loss_and_gradients(gen, kind, head, layout):
    if kind == "triton" and layout != "padded":
        pytest.skip("the interpreter is slow: the Triton path once, padded")
    cfg, enc = _models(kind, gen)
    model = TaskModel(enc, make_head(head, cfg, enc, num_labels=3)).train()
    lengths = torch.tensor(LAYOUTS[layout]) if kind != "triton" else torch.tensor([5, 2, 4, 5])
    ids = torch.randint(2, 50, (4, int(lengths.max())), generator=gen)
    batch = {"input_ids": ids, "lengths": lengths,
             "labels": torch.tensor([0, 1]) if head == "choice" else torch.tensor([0, 2, 1, 1])}
    if head == "choice":
        batch["num_choices"] = 2
    assert model.head.reads_first_token_only
    calls = []
    real = enc.forward
    monkeypatch_forward = lambda *a, **kw: calls.append(kw.get("first_token_only")) or real(*a, **kw)  # noqa: E731
    enc.forward = monkeypatch_forward
    short = model(batch)
    g_short = _grads(model, short["loss"] + short.get("balance_loss", 0) * len(enc.moe_layers()))
    model.first_token_only = False
    full = model(batch)
    g_full = _grads(model, full["loss"] + full.get("balance_loss", 0) * len(enc.moe_layers()))
    assert calls == [True, False]
    torch.testing.assert_close(short["loss"], full["loss"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(short["logits"], full["logits"], atol=1e-5, rtol=1e-5)
    _assert_same_grads(g_short, g_full)
    assert sum(g.abs().sum() for g in g_short if g is not None) > 0


def test_an_input_without_columns_gives_an_empty_output():
    enc = Encoder(_cfg()).eval()
    assert enc(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, enc.cfg.hidden_size)


def test_first_token_only_with_moe_routes_every_token(gen):
    """The last MoE layer still routes (and counts) every real token, so the balance loss is the full one."""
    cfg, enc = _models("moe", gen)
    ids, lengths = torch.randint(2, 50, (3, 8), generator=gen), torch.tensor([8, 5, 2])
    full = enc(ids, lengths=lengths)[:, :1]
    stats = [m.last_stats["tokens_per_expert"].clone() for m in enc.moe_layers()]
    short = enc(ids, lengths=lengths, first_token_only=True)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    for m, want in zip(enc.moe_layers(), stats):
        assert int(m.last_stats["tokens_per_expert"].sum()) == 15 * cfg.moe_top_k
        torch.testing.assert_close(m.last_stats["tokens_per_expert"], want)


def test_mean_pooling_dual_encoder_reads_every_token():
    cfg = _cfg()
    enc = Encoder(cfg)
    assert not DualEncoderHead(cfg, enc, pooling="mean").reads_first_token_only
    assert DualEncoderHead(cfg, enc, pooling="cls").reads_first_token_only
    assert make_head("dual-encoder", cfg, enc).reads_first_token_only  # the pooler


def test_first_token_only_refuses_hidden_states():
    enc = Encoder(_cfg())
    with pytest.raises(ValueError, match="first_token_only"):
        enc(torch.randint(2, 50, (2, 4)), first_token_only=True, output_hidden_states=True)


def test_packing_pads_rows_to_the_multiple():
    seqs = E.Packing.from_lengths(torch.tensor([9, 3, 7]), 9, group_heads=2, row_multiple=8)
    assert (seqs.tokens, seqs.rows) == (19, 24)
    x = torch.randn(19, 5)
    padded = seqs.pad_rows(x)
    assert padded.shape == (24, 5) and torch.equal(padded[:19], x) and not padded[19:].any()
    assert torch.equal(seqs.real_rows(padded), x) and seqs.real_rows(padded).data_ptr() == padded.data_ptr()
    whole = E.Packing.from_lengths(torch.tensor([4, 4]), 4, row_multiple=8)  # a full bucket: no pad rows
    eight = x[:8]
    assert whole.index is None and (whole.tokens, whole.rows, whole.pad) == (8, 8, 0)
    assert whole.pad_rows(eight) is eight and whole.real_rows(eight) is eight
    view = E.Packing.from_lengths(torch.tensor([4, 4, 4]), 4, row_multiple=8)  # no padding, yet pad rows
    assert view.index is None and (view.tokens, view.rows) == (12, 16)
    assert E.Packing.from_lengths(torch.tensor([9, 3, 7]), 9).rows == 19  # no multiple: the tokens


def test_the_encoder_pads_rows_on_cpu_in_bf16_only(monkeypatch):
    enc = Encoder(_cfg())
    seen = []
    real = E.Packing.from_lengths.__func__
    monkeypatch.setattr(E.Packing, "from_lengths",
                        classmethod(lambda cls, *a, **kw: seen.append(real(cls, *a, **kw)) or seen[-1]))
    ids, lengths = torch.randint(2, 50, (3, 9)), torch.tensor([9, 3, 7])
    enc(ids, lengths=lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc(ids, lengths=lengths)
    assert [(s.tokens, s.rows) for s in seen] == [(19, 19), (19, kernels.dispatch.CPU_ROW_BUCKET)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["post-ln", "pre-ln", "moe", "moe-pre-ln", "moe-capacity"])
def test_pad_rows_change_no_value_gradient_or_routing(gen, kind, layout, monkeypatch):
    """The layers on the packed tokens plus pad rows (here in fp32, with a bucket of 16 forced: the same code as
    CPU bf16's 64) against the same encoder without pad rows: every output, hidden state, first-token state and
    gradient, and an MoE's routing (only real tokens routed: as many assignments as tokens x top-k)."""
    cfg, enc = _models(kind, gen)
    lengths = torch.tensor(LAYOUTS[layout])
    ids = torch.randint(2, 50, (4, int(lengths.max())), generator=gen)
    tokens = int(lengths.sum())
    monkeypatch.setattr(kernels.dispatch, "row_bucket", lambda x: 16)

    def run(pad: bool):
        monkeypatch.setattr(E, "PAD_ROWS", pad)
        states = enc(ids, lengths=lengths, output_hidden_states=True)
        aux = sum(m.last_stats["balance_loss"] + m.last_stats["z_loss"] for m in enc.moe_layers())
        routed = [m.last_stats["tokens_per_expert"].clone() for m in enc.moe_layers()]
        first = enc(ids, lengths=lengths, first_token_only=True)
        loss = sum((s ** 2).sum() for s in states) + (first ** 3).sum() + aux
        return states, first, routed, _grads(enc, loss)

    seen = []
    real = E.Packing.from_lengths.__func__
    monkeypatch.setattr(E.Packing, "from_lengths",
                        classmethod(lambda cls, *a, **kw: seen.append(real(cls, *a, **kw)) or seen[-1]))
    padded, plain = run(True), run(False)
    assert seen[0].rows == -(-tokens // 16) * 16 and seen[-1].rows == tokens
    for a, b in zip(padded[0] + [padded[1]], plain[0] + [plain[1]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(padded[2], plain[2]):
        assert torch.equal(a, b) and int(a.sum()) == tokens * cfg.moe_top_k
    _assert_same_grads(padded[3], plain[3])
