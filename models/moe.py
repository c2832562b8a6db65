"""Sparse Mixture-of-Experts FFN: a drop-in for the dense `FeedForward` of an encoder layer.

router (nn.Linear H -> E, no bias) -> top-k routing -> expert-contiguous permute -> grouped expert FFNs
(up, exact GELU, down; weights stacked (E, F, H) / (E, H, F)) -> weighted combine, plus an optional
shared expert that every token goes through. Dropless unless `capacity_factor` is set (comparison only).
The last call's router statistics stay on the module (`last_stats`) so the trainer can add
`balance_coef * balance_loss + z_coef * z_loss` to its loss and log the rest.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import moe as kmoe

from .ffn import FeedForward


def _check(name: str, ok: bool, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"MoEFeedForward: {name} must be {expected}, got {got!r}")


class MoEFeedForward(nn.Module):
    BIASES = ("b_up", "b_down")  # the experts' biases, stacked per expert (no weight decay, as dense biases)

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 router_mode: str = "topk_softmax", shared_expert: bool = False,
                 capacity_factor: float | None = None, kernel_backend: str = "auto"):
        super().__init__()
        _check("hidden_size", isinstance(hidden_size, int) and hidden_size > 0, "an int > 0", hidden_size)
        _check("intermediate_size", isinstance(intermediate_size, int) and intermediate_size > 0, "an int > 0",
               intermediate_size)
        _check("num_experts", isinstance(num_experts, int) and num_experts > 0, "an int > 0", num_experts)
        _check("top_k", isinstance(top_k, int) and 1 <= top_k <= num_experts, f"an int in [1, {num_experts}]",
               top_k)
        _check("router_mode", router_mode in kmoe.ROUTER_MODES, f"one of {', '.join(kmoe.ROUTER_MODES)}",
               router_mode)
        _check("capacity_factor", capacity_factor is None or capacity_factor > 0, "None (dropless) or > 0",
               capacity_factor)
        _check("kernel_backend", kernel_backend in kernels.BACKENDS, f"one of {', '.join(kernels.BACKENDS)}",
               kernel_backend)
        H, Fd, E = hidden_size, intermediate_size, num_experts
        self.hidden_size, self.intermediate_size, self.num_experts, self.top_k = H, Fd, E, top_k
        self.router_mode, self.capacity_factor, self.kernel_backend = router_mode, capacity_factor, kernel_backend
        self.router = nn.Linear(H, E, bias=False)
        self.w_up = nn.Parameter(torch.empty(E, Fd, H))
        self.b_up = nn.Parameter(torch.empty(E, Fd))
        self.w_down = nn.Parameter(torch.empty(E, H, Fd))
        self.b_down = nn.Parameter(torch.empty(E, H))
        self.shared = FeedForward(H, Fd) if shared_expert else None
        self.last_stats: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=0.02)
        # each expert initialised as nn.Linear initialises itself: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w, b, fan_in in ((self.w_up, self.b_up, self.hidden_size), (self.w_down, self.b_down,
                                                                        self.intermediate_size)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @classmethod
    def from_dense(cls, ffn: nn.Module, num_experts: int, top_k: int, router_mode: str = "topk_softmax",
                   capacity_factor: float | None = None, kernel_backend: str = "auto") -> "MoEFeedForward":
        """Sparse upcycling (Komatsuzaki et al. 2022): every expert a copy of the dense FFN (`up`, `down`
        nn.Linear), the router freshly initialised. With renormalised weights (topk_softmax, sigmoid) and no
        dropping the result computes the dense function exactly at step 0, whatever the router."""
        if not (isinstance(getattr(ffn, "up", None), nn.Linear) and isinstance(getattr(ffn, "down", None), nn.Linear)):
            raise ValueError("MoEFeedForward.from_dense: ffn must have nn.Linear `up` and `down` (a FeedForward)")
        H, Fd = ffn.up.in_features, ffn.up.out_features
        moe = cls(H, Fd, num_experts, top_k, router_mode=router_mode, capacity_factor=capacity_factor,
                  kernel_backend=kernel_backend).to(device=ffn.up.weight.device, dtype=ffn.up.weight.dtype)
        with torch.no_grad():
            moe.w_up.copy_(ffn.up.weight.expand(num_experts, Fd, H))
            moe.w_down.copy_(ffn.down.weight.expand(num_experts, H, Fd))
            moe.b_up.copy_(ffn.up.bias if ffn.up.bias is not None else moe.b_up.new_zeros(Fd))
            moe.b_down.copy_(ffn.down.bias if ffn.down.bias is not None else moe.b_down.new_zeros(H))
        return moe

    @classmethod
    def cut_from_dense(cls, ffn: nn.Module, num_experts: int, top_k: int, router_mode: str = "topk_softmax",
                       capacity_factor: float | None = None, kernel_backend: str = "auto") -> "MoEFeedForward":
        """Experts cut from the dense FFN's neurons (as MoEfication / LLaMA-MoE build them): expert e holds the
        e-th of num_experts equal slices of the hidden units, so the experts together hold the dense FFN's
        parameters once (matched on total parameters). Each expert's down projection is scaled by num_experts:
        with uniform top-k weights (summing to 1) the output is num_experts / top_k times the sum of the chosen
        slices, whose mean over the possible routings is the dense FFN's output. Unlike from_dense this is not
        the dense function at step 0. Every expert keeps the dense output bias (the weights sum to 1)."""
        if not (isinstance(getattr(ffn, "up", None), nn.Linear) and isinstance(getattr(ffn, "down", None), nn.Linear)):
            raise ValueError("MoEFeedForward.cut_from_dense: ffn must have nn.Linear `up` and `down` (a FeedForward)")
        H, Fd = ffn.up.in_features, ffn.up.out_features
        if Fd % num_experts:
            raise ValueError(f"MoEFeedForward.cut_from_dense: {Fd} hidden units do not split into {num_experts} "
                             "experts")
        width = Fd // num_experts
        moe = cls(H, width, num_experts, top_k, router_mode=router_mode, capacity_factor=capacity_factor,
                  kernel_backend=kernel_backend).to(device=ffn.up.weight.device, dtype=ffn.up.weight.dtype)
        with torch.no_grad():
            moe.w_up.copy_(ffn.up.weight.view(num_experts, width, H))
            moe.b_up.copy_(ffn.up.bias.view(num_experts, width) if ffn.up.bias is not None else 0)
            moe.w_down.copy_(num_experts * ffn.down.weight.view(H, num_experts, width).transpose(0, 1))
            moe.b_down.copy_(ffn.down.bias if ffn.down.bias is not None else moe.b_down.new_zeros(H))
        return moe

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert row limit: ceil(capacity_factor * T * k / E), or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, tokens: torch.Tensor) -> kmoe.Routing:
        with torch.autocast(tokens.device.type, enabled=False):  # route in fp32 even under autocast
            logits = F.linear(tokens.float(), self.router.weight.float())
        return kernels.moe_route(logits, self.top_k, mode=self.router_mode, backend=self.kernel_backend)

    def experts(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        params = (self.w_up, self.b_up, self.w_down, self.b_down)
        return kmoe.moe_expert_ffn(*_autocast(x_sorted, tokens_per_expert, *params), backend=self.kernel_backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H) -> (..., H). `mask` (x.shape[:-1], bool), when given, marks the real tokens: only they
        are routed (and counted in the statistics); the other positions get zeros."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoEFeedForward: expected x (..., {self.hidden_size}), got {tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        idx = None
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"MoEFeedForward: mask must have shape {tuple(x.shape[:-1])}, got "
                                 f"{tuple(mask.shape)}")
            idx = mask.reshape(-1).nonzero().squeeze(1)
            flat = flat.index_select(0, idx)
        out = self._moe(flat)
        if idx is not None:
            out = out.new_zeros((x.numel() // self.hidden_size, self.hidden_size)).index_copy(0, idx, out)
        return out.reshape(x.shape)

    def forward_rows(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens (T, H) -> the output of `rows` only (len(rows), H): every token is routed (the statistics and
        the auxiliary losses are those of forward(tokens)), the experts run on the given rows alone. With a
        capacity (which tokens are dropped depends on all of them) the whole layer runs and the rows are taken."""
        if tokens.dim() != 2 or tokens.shape[1] != self.hidden_size:
            raise ValueError(f"MoEFeedForward: expected tokens (T, {self.hidden_size}), got {tuple(tokens.shape)}")
        if self.capacity_factor is not None:
            return self._moe(tokens).index_select(0, rows)  # backward: an index_add, not an index_put
        return self._moe(tokens, rows)

    def _moe(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        r = self.route(tokens)
        ids, weights, x = r.expert_ids, r.weights, tokens
        if rows is not None:  # the routing of every token above; the experts only for these rows
            ids, weights, x = ids[rows], weights[rows], tokens[rows]
        # Under autocast the experts run in the autocast dtype: cast the T rows before they are repeated k times
        # by the permute, not the T*k permuted rows after it (the same values, half the bytes moved).
        xs, plan = kernels.moe_permute(_autocast(x, None)[0], ids, self.num_experts, capacity=self.capacity(len(x)),
                                       backend=self.kernel_backend)
        ys = self.experts(xs, plan.tokens_per_expert)
        out = kernels.moe_unpermute(ys, weights.to(ys.dtype), plan, backend=self.kernel_backend)
        if self.shared is not None:
            out = out + self.shared(x)
        self.record(r, plan.dropped)
        return out

    def record(self, r: kmoe.Routing, dropped: torch.Tensor) -> None:
        # balance_loss and z_loss keep their graph (the task model adds them to the loss, then keeps them detached
        # here); the rest is detached.
        self.last_stats = {"tokens_per_expert": r.tokens_per_expert.detach(), "balance_loss": r.balance_loss,
                           "z_loss": r.z_loss, "dropped": dropped.detach()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters one token uses: the router, its top_k experts and the shared expert."""
        per_expert = (self.w_up[0].numel() + self.b_up[0].numel() + self.w_down[0].numel()
                      + self.b_down[0].numel())
        shared = 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())
        return self.router.weight.numel() + self.top_k * per_expert + shared

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, ffn={self.intermediate_size}, experts={self.num_experts}, "
                f"top_k={self.top_k}, router={self.router_mode}, shared={self.shared is not None}, "
                f"capacity_factor={self.capacity_factor}")


def _autocast(x, counts, *params):
    # Custom kernels are not autocast ops: cast to the autocast dtype ourselves so that the grouped GEMMs
    # run in bf16 under autocast, as nn.Linear would (the casts are differentiable).
    if not torch.is_autocast_enabled(x.device.type):
        return (x, counts) + params
    dt = torch.get_autocast_dtype(x.device.type)
    return (x.to(dt), counts) + tuple(p.to(dt) for p in params)
