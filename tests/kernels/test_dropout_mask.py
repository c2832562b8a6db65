"""kernels.dropout_mask.keep_mask: independent Bernoulli(keep_prob) elements from 16-bit draws, keep_prob the
exact 1 - round(p * 2^16) / 2^16, reproducible from the default generator's seed."""
import pytest
import torch

from kernels.dropout_mask import keep_mask


@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
def test_rate_and_independence(seed, p):
    torch.manual_seed(seed)
    mask, keep_prob = keep_mask((1000, 997), p)  # odd sizes: the last 64-bit draw is used in part
    assert mask.dtype == torch.bool and mask.shape == (1000, 997)
    assert keep_prob == 1 - round(p * 2**16) / 2**16
    m = mask.reshape(-1).double()
    n = m.numel()
    se = (keep_prob * (1 - keep_prob) / n) ** 0.5
    assert abs(m.mean().item() - keep_prob) < 5 * se
    # the four 16-bit lanes of one draw, and neighbours across draws, are uncorrelated
    centred = m - m.mean()
    for lag in (1, 2, 3, 4, 5):
        corr = (centred[:-lag] * centred[lag:]).mean() / centred.var()
        assert abs(corr.item()) < 5 / n**0.5, f"lag {lag}: correlation {corr.item():.4f}"
    lanes = m[: n - n % 4].view(-1, 4).mean(0)  # each lane position alone keeps at the same rate
    assert (lanes - keep_prob).abs().max() < 5 * (keep_prob * (1 - keep_prob) / (n // 4)) ** 0.5


def test_edges_and_errors():
    mask, keep_prob = keep_mask((3, 5), 0.0)
    assert mask.all() and keep_prob == 1.0
    mask, keep_prob = keep_mask((3, 5), 1.0)
    assert not mask.any() and keep_prob == 0.0
    assert keep_mask((0, 4), 0.5)[0].shape == (0, 4)
    mask, keep_prob = keep_mask((4000,), 2**-18)  # rounds to no dropout: nothing dropped
    assert mask.all() and keep_prob == 1.0
    with pytest.raises(ValueError, match="p must be in"):
        keep_mask((2,), 1.5)


def test_seeded_draws_repeat():
    torch.manual_seed(3)
    a = keep_mask((257,), 0.5)[0]
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((257,), 0.5)[0])
    assert not torch.equal(a, keep_mask((257,), 0.5)[0])
