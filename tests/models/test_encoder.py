"""The encoder and heads: shapes, padding invariance, losses, and that attention goes through kernels."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from models import IGNORE, Encoder, TaskModel, lengths_from_mask, make_head, preset


def _cfg(**kw):
    return preset("tiny", vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0, **kw)


@pytest.mark.parametrize("style,pre_ln", [("absolute", False), ("roberta", False), ("roberta", True)])
def test_padding_does_not_change_real_positions(style, pre_ln):
    torch.manual_seed(0)
    cfg = _cfg(position_style=style, pre_layer_norm=pre_ln, pad_token_id=1)
    enc = Encoder(cfg).eval()
    a = torch.randint(2, 50, (1, 7))
    b = torch.randint(2, 50, (1, 4))
    batch = torch.full((2, 7), cfg.pad_token_id)
    batch[0], batch[1, :4] = a[0], b[0]
    mask = (batch != cfg.pad_token_id).long()
    together = enc(batch, attention_mask=mask)
    torch.testing.assert_close(together[0], enc(a)[0])
    torch.testing.assert_close(together[1, :4], enc(b)[0])


def test_hidden_states_and_parameter_count():
    cfg = _cfg()
    enc = Encoder(cfg)
    states = enc(torch.randint(0, 50, (2, 5)), output_hidden_states=True)
    assert len(states) == cfg.num_layers + 1 and states[-1].shape == (2, 5, cfg.hidden_size)
    assert sum(p.numel() for p in enc.parameters()) == cfg.num_parameters()


def test_encoder_runs_unpadded_through_the_varlen_attention_kernel(monkeypatch):
    calls = []
    real = kernels.attention_varlen

    def spy(q, k, v, cu_seqlens, max_seqlen, **kwargs):
        calls.append((q.shape[0], cu_seqlens.tolist(), max_seqlen))
        return real(q, k, v, cu_seqlens, max_seqlen, **kwargs)

    monkeypatch.setattr(kernels, "attention_varlen", spy)
    cfg = _cfg()
    out = Encoder(cfg)(torch.randint(0, 50, (2, 5)), lengths=torch.tensor([5, 3]))
    assert calls == [(8, [0, 5, 8], 5)] * cfg.num_layers  # 8 real tokens, no padding rows
    assert out.shape == (2, 5, cfg.hidden_size) and torch.all(out[1, 3:] == 0)  # padding re-inserted as zeros


@pytest.mark.parametrize("pre_ln", [False, True])
def test_triton_attention_encoder_matches_the_twin_encoder(pre_ln):
    torch.manual_seed(torch.seed() % 2**31)
    cfg = _cfg(pre_layer_norm=pre_ln, hidden_size=64, num_heads=2)  # head_dim 32
    twin = Encoder(cfg).eval()
    fast = twin.with_config(kernel_backend="triton").eval()
    ids, lengths = torch.randint(1, 50, (3, 11)), torch.tensor([11, 4, 1])
    out = fast(ids, lengths=lengths)
    torch.testing.assert_close(out, twin(ids, lengths=lengths), atol=1e-5, rtol=1e-5)
    assert torch.all(out[torch.arange(11)[None, :] >= lengths[:, None]] == 0)


def test_left_padding_is_rejected():
    with pytest.raises(ValueError, match="right-padded"):
        lengths_from_mask(torch.tensor([[0, 1, 1]]))


def test_too_long_input_names_the_limit():
    cfg = _cfg()
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        Encoder(cfg)(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


def test_mlm_loss_is_cross_entropy_on_masked_positions_only():
    torch.manual_seed(1)
    cfg = _cfg()
    enc = Encoder(cfg)
    model = TaskModel(enc, make_head("mlm", cfg, enc))
    ids = torch.randint(5, 50, (3, 6))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 2], labels[2, 5] = 7, 9
    batch = {"input_ids": ids, "labels": labels, "lengths": torch.tensor([6, 6, 6])}
    out = model(batch)
    logits = model.head(enc(ids), {})["logits"]  # full logits when no labels are given
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(out["loss"], expected)
    assert out["num_masked"] == 2
    out["loss"].backward()
    assert enc.embeddings.word.weight.grad is not None  # the decoder is tied to the embeddings


def _labelled_batch(kind, B, S, g):
    """A batch whose labels ignore some terms (-100), and the hidden positions (B, S) that only ignored
    terms read: changing the hidden states there must change neither the loss nor any kept gradient."""
    batch = {"lengths": torch.full((B,), S)}
    ignored = torch.zeros(B, S, dtype=torch.bool)
    if kind == "pair":
        batch["labels"] = torch.tensor([0, IGNORE, 2, 1])
        ignored[1] = True
    elif kind == "tagging":
        labels = torch.randint(0, 3, (B, S), generator=g)
        drop = torch.rand(B, S, generator=g) < 0.4
        drop[:, 0] = True  # first subwords only: the rest are -100, as the data pipeline labels them
        drop[0, 1], drop[0, 2] = False, True
        batch["labels"] = labels.masked_fill(drop, IGNORE)
        ignored = drop
    elif kind == "qa":
        batch["start_positions"] = torch.tensor([1, IGNORE, IGNORE, 3])  # example 2: its end still counts
        batch["end_positions"] = torch.tensor([2, IGNORE, 4, 5])
        ignored[1] = True
    else:
        batch["labels"], batch["num_choices"] = torch.tensor([IGNORE, 1]), 2  # question 0: rows 0 and 1
        ignored[:2] = True
    return batch, ignored


def _kept_reference(kind, out, batch):
    """The loss from the head's logits on the kept terms only (F.cross_entropy, no ignore_index)."""
    def ce(logits, labels):
        keep = labels != IGNORE
        return F.cross_entropy(logits[keep].double(), labels[keep])
    if kind == "qa":
        return 0.5 * (ce(out["start_logits"], batch["start_positions"]) + ce(out["end_logits"], batch["end_positions"]))
    logits = out["logits"]
    return ce(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["pair", "tagging", "qa", "choice"])
def test_heads_ignore_labels_of_minus_100(kind, backend):
    """Per head: the loss equals F.cross_entropy on the kept terms alone, and hidden states read only by
    ignored terms (a -100 example, token or question) can be anything: the loss, the head's gradients and
    the kept positions' gradients stay the same, and the ignored positions get zero gradient. The full
    model also gives a finite loss with gradients on every head parameter."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    cfg = _cfg(kernel_backend=backend)
    enc = Encoder(cfg)
    model = TaskModel(enc, make_head(kind, cfg, enc, num_labels=3))
    B, S = 4, 6
    batch, ignored = _labelled_batch(kind, B, S, g)
    head = model.head

    def run(hidden):
        hidden = hidden.clone().requires_grad_()
        out = head(hidden, batch)
        params = list(head.parameters())
        grads = torch.autograd.grad(out["loss"], [hidden, *params])
        return out, grads[0], grads[1:]

    hidden = torch.randn(B, S, cfg.hidden_size, generator=g)
    out, dh, dparams = run(hidden)
    torch.testing.assert_close(out["loss"].double(), _kept_reference(kind, out, batch), atol=1e-6, rtol=1e-5)
    assert (dh[ignored] == 0).all() and dh[~ignored].abs().sum() > 0
    changed = hidden.masked_scatter(ignored[..., None].expand_as(hidden),
                                    10 * torch.randn(int(ignored.sum()) * cfg.hidden_size, generator=g))
    out2, dh2, dparams2 = run(changed)
    torch.testing.assert_close(out2["loss"], out["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh2, dh, atol=1e-6, rtol=1e-5)
    for a, b in zip(dparams2, dparams):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    full = model({"input_ids": torch.randint(0, 50, (B, S), generator=g), **batch})
    assert torch.isfinite(full["loss"]) and full["loss"] > 0
    full["loss"].backward()
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("pre_ln", [False, True])
def test_output_layer_equals_that_hidden_state(pre_ln):
    enc = Encoder(_cfg(pre_layer_norm=pre_ln)).eval()
    ids, lengths = torch.randint(1, 50, (2, 6)), torch.tensor([6, 3])
    states = enc(ids, lengths=lengths, output_hidden_states=True)
    for i, want in enumerate(states):
        torch.testing.assert_close(enc(ids, lengths=lengths, output_layer=i), want)
    with pytest.raises(ValueError, match="output_layer 3: expected 0..2"):
        enc(ids, lengths=lengths, output_layer=3)
