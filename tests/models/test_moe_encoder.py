"""MoE encoders: exact parameter counts, E=1/k=1 and sparse upcycling equal the dense encoder, padding is
neither routed nor able to change real positions, the routers' losses join the objective."""
import pytest
import torch

from models import Encoder, TaskModel, hf, make_head, preset
from models.config import moe_variant
from models.moe import MoEFeedForward


def _dense_cfg(**kw):
    return preset("tiny", vocab_size=60, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def _batch(cfg, g):
    ids = torch.randint(2, cfg.vocab_size, (3, 9), generator=g)
    lengths = torch.tensor([9, 6, 2])
    ids[torch.arange(9)[None, :] >= lengths[:, None]] = cfg.pad_token_id
    return ids, lengths


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.mark.parametrize("every,shared,match", [(1, False, "active"), (2, True, "total"), (1, True, "active")])
def test_parameter_counts_are_exact(every, shared, match):
    cfg = moe_variant(_dense_cfg(), num_experts=4, top_k=2, match=match, every=every)
    cfg = cfg.__class__(**{**cfg.to_dict(), "moe_shared_expert": shared})
    enc = Encoder(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in enc.parameters())
    moe = enc.moe_layers()
    assert len(moe) == cfg.num_sparse_layers == (cfg.num_layers if every == 1 else cfg.num_layers // 2)
    dense_ffn = sum(p.numel() for p in Encoder(_dense_cfg()).layers[0].ffn.parameters())
    inactive = sum(m.num_parameters() - m.active_parameters() for m in moe)
    assert cfg.active_parameters() == cfg.num_parameters() - inactive
    if match == "active" and not shared:  # experts of width F/k: a token uses as many FFN weights as dense
        per_layer_active = moe[0].active_parameters() - moe[0].router.weight.numel()
        assert abs(per_layer_active - dense_ffn) <= cfg.hidden_size  # only the extra output bias differs


@pytest.mark.parametrize("experts,top_k,every,match", [(1, 1, 1, "active"), (8, 2, 1, "none"), (4, 1, 2, "active")])
def test_upcycled_encoder_equals_its_dense_source(experts, top_k, every, match):
    g = _gen()
    dense = Encoder(_dense_cfg()).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sparse = dense.upcycled(experts, top_k, every, match=match).eval()
    if match == "active":  # top-1 copies: a token uses the dense FFN's parameters, plus the router
        router = sparse.cfg.hidden_size * experts * sparse.cfg.num_sparse_layers
        assert sparse.cfg.active_parameters() == dense.cfg.num_parameters() + router
    assert sparse.cfg.num_sparse_layers == len(sparse.moe_layers()) > 0
    ids, lengths = _batch(dense.cfg, g)
    with torch.no_grad():
        want, got = dense(ids, lengths=lengths), sparse(ids, lengths=lengths)
    real = torch.arange(9)[None, :] < lengths[:, None]
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    stats = sparse.router_stats()
    assert [sum(c) for c in stats["tokens_per_expert"]] == [int(lengths.sum()) * top_k] * len(sparse.moe_layers())


def test_padding_is_not_routed_and_does_not_change_real_positions():
    g = _gen()
    cfg = moe_variant(_dense_cfg(), num_experts=4, top_k=2)
    enc = Encoder(cfg).eval()
    ids, lengths = _batch(cfg, g)
    with torch.no_grad():
        together = enc(ids, lengths=lengths)
        alone = enc(ids[1:2, :6], lengths=lengths[1:2])
    torch.testing.assert_close(together[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_router_losses_join_the_task_loss_and_get_gradients():
    g = _gen()
    cfg = moe_variant(_dense_cfg(moe_balance_coef=0.5, moe_z_coef=0.25), num_experts=4, top_k=2)
    enc = Encoder(cfg)
    model = TaskModel(enc, make_head("pair", cfg, enc, num_labels=3))
    ids, lengths = _batch(cfg, g)
    out = model({"input_ids": ids, "lengths": lengths, "labels": torch.tensor([0, 2, 1])})
    assert torch.allclose(out["loss"], out["task_loss"] + 0.5 * out["balance_loss"] + 0.25 * out["z_loss"])
    assert out["balance_loss"] > 0 and out["z_loss"] > 0
    out["loss"].backward()
    routers = [m.router.weight.grad for m in enc.modules() if isinstance(m, MoEFeedForward)]
    assert routers and all(r is not None and r.abs().sum() > 0 for r in routers)


def test_moe_encoders_refuse_hf_export_with_a_clear_error(tmp_path):
    enc = Encoder(moe_variant(_dense_cfg(), num_experts=2, top_k=1))
    with pytest.raises(hf.ModelLoadError, match="Mixture-of-Experts"):
        hf.export(enc, tmp_path / "x")


def test_upcycling_an_moe_encoder_is_refused():
    with pytest.raises(ValueError, match="already a Mixture-of-Experts"):
        Encoder(moe_variant(_dense_cfg(), num_experts=2, top_k=1)).upcycled(2, 1)


def test_upcycling_matched_as_asked_or_refused():
    g = _gen()
    dense = Encoder(_dense_cfg()).eval()
    with pytest.raises(ValueError, match="match 'active' needs top_k 1"):
        dense.upcycled(4, 2)
    total = dense.upcycled(4, 2, match="total").eval()
    cfg = total.cfg
    # the experts hold the dense FFN once: only the routers and the extra output biases are added
    extra = cfg.num_sparse_layers * (cfg.hidden_size * 4 + 3 * cfg.hidden_size)
    assert cfg.num_parameters() == dense.cfg.num_parameters() + extra
    assert cfg.expert_size == dense.cfg.intermediate_size // 4 and cfg.active_parameters() < dense.cfg.num_parameters()
    ffn, moe = dense.layers[0].ffn, total.layers[0].ffn
    x = torch.randn(5, cfg.hidden_size, generator=g)
    # all experts chosen with weight 1/E each reproduces the dense FFN exactly (the cut is a partition)
    parts = [torch.nn.functional.gelu(x @ moe.w_up[e].t() + moe.b_up[e]) @ moe.w_down[e].t() for e in range(4)]
    torch.testing.assert_close(sum(parts) / 4 + moe.b_down[0], ffn(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divide evenly"):
        dense.upcycled(5, 1, match="total")
