"""Hidden dropout: nn.Dropout, with a faster mask on CPU.

On CPU, F.dropout draws its mask with `bernoulli_`, one generator call per element; here the mask comes from
`kernels.dropout_mask.keep_mask` (16-bit draws, four per generator call; p rounded to a multiple of 2^-16):
each element kept with that probability, kept ones scaled by its inverse (tested in tests/models/test_dropout.py).
The speed: the dropout rows of `pytest bench/test_kernel_micro.py -k dropout --benchmark-only`
(bench/README.md). On GPU F.dropout's fused kernel is kept.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels.dropout_mask import keep_mask


class Dropout(nn.Dropout):
    def __init__(self, p: float = 0.5):  # no `inplace`: the CPU path returns a new tensor
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p >= 1.0:
            return super().forward(x)
        keep, keep_prob = keep_mask(x.shape, self.p, x.device)
        return x * keep.to(x.dtype).mul_(1.0 / keep_prob)
