"""The dense feed-forward block of an encoder layer; also the expert shape of models.moe."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class FeedForward(nn.Module):
    """down(gelu(up(x))) with exact (erf) GELU, as BERT and XLM-R. An MoEFeedForward can replace it."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))
