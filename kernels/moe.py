"""Sparse Mixture-of-Experts routing: top-k gating, dispatch (permute) and weighted combine (unpermute).

`moe_route` turns router logits into expert choices and combine weights plus the auxiliary losses;
`moe_permute` gathers token rows into expert-contiguous order; `moe_unpermute` scatters expert outputs
back, weighting each by its combine weight. Dropless: every assignment is kept. The PyTorch twins here
are the oracle and the CPU path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dispatch

ROUTER_MODES = ("softmax_topk", "topk_softmax", "sigmoid")


@dataclass
class Routing:
    expert_ids: torch.Tensor  # (T, k) int64, the chosen experts per token, best first
    weights: torch.Tensor  # (T, k) combine weights, in the logits' dtype
    tokens_per_expert: torch.Tensor  # (E,) int64
    balance_loss: torch.Tensor  # scalar: Switch/GShard load-balancing loss, E * sum_e f_e * P_e
    z_loss: torch.Tensor  # scalar: mean over tokens of logsumexp(logits)^2


def moe_route_reference(logits: torch.Tensor, top_k: int, mode: str = "topk_softmax") -> Routing:
    T, E = logits.shape
    x = logits.float()
    probs = torch.softmax(x, dim=-1)
    if mode == "softmax_topk":  # softmax over all experts, keep the top-k probabilities as they are
        weights, ids = probs.topk(top_k, dim=-1)
    elif mode == "topk_softmax":  # top-k logits, softmax over just those (renormalised)
        top, ids = x.topk(top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:  # sigmoid scores, top-k, renormalised to sum to 1
        scores = torch.sigmoid(x)
        top, ids = scores.topk(top_k, dim=-1)
        weights = top / top.sum(dim=-1, keepdim=True)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    fraction = counts.float() / max(T * top_k, 1)  # share of assignments per expert (not differentiable)
    balance = E * (fraction * probs.mean(dim=0)).sum()
    z = torch.logsumexp(x, dim=-1).square().mean()
    return Routing(ids, weights.to(logits.dtype), counts, balance, z)


def moe_route(logits: torch.Tensor, top_k: int, *, mode: str = "topk_softmax", backend: str = "auto") -> Routing:
    """Route T tokens among E experts from router logits (T, E)."""
    if logits.dim() != 2:
        raise ValueError(f"moe_route: logits must be (tokens, experts), got {tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"moe_route: top_k must be in [1, {logits.shape[1]}], got {top_k}")
    if mode not in ROUTER_MODES:
        raise ValueError(f"moe_route: mode {mode!r}: expected one of {', '.join(ROUTER_MODES)}")
    if dispatch.resolve("moe_route", backend, logits.device) == "triton":
        return dispatch.triton_impl("moe_route")(logits, top_k, mode=mode)
    return moe_route_reference(logits, top_k, mode)


@dataclass
class Dispatch:
    order: torch.Tensor  # (T*k,) assignment indices sorted by expert (stable), into the flattened (T, k)
    tokens_per_expert: torch.Tensor  # (E,) int64
    num_tokens: int
    top_k: int


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, backend: str = "auto"):
    """Rows of x (T, H) repeated per assignment and grouped by expert: returns (x_sorted (T*k, H), Dispatch).
    Within an expert, tokens keep their original order (stable sort), so results are deterministic."""
    if x.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute: expected x (T, H) and expert_ids (T, k), got {tuple(x.shape)} "
                         f"and {tuple(expert_ids.shape)}")
    if dispatch.resolve("moe_permute", backend, x.device) == "triton":
        return dispatch.triton_impl("moe_permute")(x, expert_ids, num_experts)
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return x[order // k], Dispatch(order, counts, T, k)


def moe_unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, plan: Dispatch, *, backend: str = "auto"):
    """Inverse of moe_permute with the weighted sum over each token's k experts: returns (T, H)."""
    if y_sorted.shape[0] != plan.order.shape[0]:
        raise ValueError(f"moe_unpermute: expected {plan.order.shape[0]} rows, got {y_sorted.shape[0]}")
    if dispatch.resolve("moe_unpermute", backend, y_sorted.device) == "triton":
        return dispatch.triton_impl("moe_unpermute")(y_sorted, weights, plan)
    w = weights.reshape(-1)[plan.order].to(y_sorted.dtype)
    out = y_sorted.new_zeros((plan.num_tokens, y_sorted.shape[1]))
    return out.index_add(0, plan.order // plan.top_k, y_sorted * w[:, None])
