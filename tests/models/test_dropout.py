"""models.dropout.Dropout: nn.Dropout's function (each element kept with probability 1 - p, scaled by
1 / (1 - p), p rounded to a multiple of 2^-16 as kernels.dropout_mask rounds it; identity in eval mode) with the
gradient of that mask."""
import pytest
import torch

from models.dropout import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_1_minus_p_scaled(seed, p, dtype):
    torch.manual_seed(seed)
    x = (torch.rand(400, 500) + 0.5).to(dtype).requires_grad_()
    y = Dropout(p).train()(x)
    kept = y != 0
    rate = kept.float().mean().item()
    n = x.numel()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 standard errors of 1 - p
    keep_prob = 1 - round(p * 2**16) / 2**16
    assert abs(keep_prob - (1 - p)) < 2**-17
    torch.testing.assert_close(y[kept], (x[kept].float() / keep_prob).to(dtype))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (kept.to(dtype) / keep_prob).to(dtype))
    rows, cols = kept.float().mean(1), kept.float().mean(0)  # no structure: every row and column near 1 - p
    assert (rows - (1 - p)).abs().max() < 6 * (p * (1 - p) / 500) ** 0.5
    assert (cols - (1 - p)).abs().max() < 6 * (p * (1 - p) / 400) ** 0.5


def test_dropout_has_no_inplace_option():
    with pytest.raises(TypeError):
        Dropout(0.1, inplace=True)


def test_dropout_is_the_identity_when_off():
    x = torch.randn(3, 4)
    assert Dropout(0.1).eval()(x) is x
    assert torch.equal(Dropout(0.0).train()(x), x)
    big = torch.randn(1000)
    assert not torch.equal(Dropout(0.5).train()(big), Dropout(0.5).train()(big))  # fresh masks
