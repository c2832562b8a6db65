"""The dual-encoder head (Mewsli-X, LAReQA): in-batch negatives over scaled cosine similarities, duplicates of
a pair's candidate not counted as negatives, pooling as engine.evaluate.embed pools."""
import pytest
import torch
import torch.nn.functional as F

from models import Encoder, TaskModel, make_head, preset


def _batch(g, pairs=4, length=7, vocab=50):
    lengths = torch.randint(3, length + 1, (2 * pairs,), generator=g)
    ids = torch.randint(5, vocab, (2 * pairs, length), generator=g)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([3, 1, 3, 2][:pairs])}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_is_in_batch_softmax_with_duplicates_masked(backend):
    g = torch.Generator().manual_seed(0)
    cfg = preset("tiny", vocab_size=50, kernel_backend=backend)
    encoder = Encoder(cfg)
    model = TaskModel(encoder, make_head("dual-encoder", cfg, encoder)).eval()  # no dropout: comparable
    assert model.head.logit_scale.item() == 100.0 and model.head.pooling == "pooler"
    batch = _batch(g)
    out = model(batch)
    hidden = encoder(batch["input_ids"], lengths=batch["lengths"])
    pooled = F.normalize(encoder.pooler(hidden), dim=-1)
    q, c = pooled[0::2], pooled[1::2]  # pairs are flattened q0 c0 q1 c1 ...
    logits = 100.0 * q @ c.t()
    torch.testing.assert_close(out["logits"], logits, atol=1e-4, rtol=1e-4)
    # pairs 0 and 2 share candidate 3: neither counts the other's copy as a negative
    masked = logits.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")
    torch.testing.assert_close(out["loss"], F.cross_entropy(masked, torch.arange(4)), atol=1e-4, rtol=1e-4)
    out["loss"].backward()
    assert torch.isfinite(model.head.logit_scale.grad) and encoder.pooler.dense.weight.grad.abs().sum() > 0


def test_mean_pooling_counts_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    cfg = preset("tiny", vocab_size=50)
    encoder = Encoder(cfg).eval()
    head = make_head("dual-encoder", cfg, encoder)
    head.pooling = "mean"
    batch = _batch(g, pairs=2)
    hidden = encoder(batch["input_ids"], lengths=batch["lengths"])
    n = int(batch["lengths"][0])
    torch.testing.assert_close(head.pool(hidden, batch["lengths"])[0], hidden[0, :n].mean(0))
    with pytest.raises(ValueError, match="pooling 'max'"):
        type(head)(cfg, encoder, pooling="max")
