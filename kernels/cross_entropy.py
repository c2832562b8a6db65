"""Cross-entropy on logits, and the projection fused with it (`linear_cross_entropy`).

The PyTorch twins compute in fp32 whatever the input dtype; they are the test oracle and the CPU path.
Options follow torch.nn.functional.cross_entropy: ignore_index, label_smoothing, reduction, plus the
z-loss `lse_square_scale * logsumexp(logits)**2` per token. With reduction="mean" the loss is averaged
over non-ignored targets, and a batch where every target is ignored gives 0 (not NaN).
"""
from __future__ import annotations

import torch

from . import dispatch

REDUCTIONS = ("mean", "sum", "none")


def _check_options(op, logits_shape, target, ignore_index, label_smoothing, lse_square_scale, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if lse_square_scale < 0.0:
        raise ValueError(f"{op}: lse_square_scale must be >= 0, got {lse_square_scale}")
    if target.dim() != 1 or target.shape[0] != logits_shape[0]:
        raise ValueError(f"{op}: target must have shape ({logits_shape[0]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: target must be int64 or int32, got {target.dtype}")


def _check_target_range(op: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # Host sync: done on the CPU twin path only (the GPU path must not sync per call).
    valid = target != ignore_index
    if valid.any():
        bad = valid & ((target < 0) | (target >= vocab))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: target[{i}] = {int(target[i])} is out of range [0, {vocab}) "
                             f"and is not ignore_index ({ignore_index})")


def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                            reduction="mean"):
    """Loss from (N, V) logits in fp32; differentiable by autograd."""
    logits = logits.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, safe_target[:, None]).squeeze(1)
    loss = nll
    if label_smoothing > 0.0:
        smooth = lse - logits.mean(dim=-1)  # -mean_j log p_j
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if lse_square_scale > 0.0:
        loss = loss + lse_square_scale * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                  reduction="mean", backend="auto"):
    """Cross-entropy from logits (N, V) and int targets (N,); see module docstring for options."""
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D (N, V), got {tuple(logits.shape)}")
    _check_options("cross_entropy", logits.shape, target, ignore_index, label_smoothing, lse_square_scale,
                   reduction)
    if dispatch.resolve("cross_entropy", backend, logits.device) == "triton":
        return dispatch.triton_impl("cross_entropy")(logits, target, ignore_index=ignore_index,
                                                     label_smoothing=label_smoothing,
                                                     lse_square_scale=lse_square_scale, reduction=reduction)
    _check_target_range("cross_entropy", target, logits.shape[1], ignore_index)
    return cross_entropy_reference(logits, target, ignore_index, label_smoothing, lse_square_scale, reduction)


def linear_cross_entropy_reference(hidden, weight, bias, target, ignore_index=-100, label_smoothing=0.0,
                                   lse_square_scale=0.0, reduction="mean"):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return cross_entropy_reference(logits, target, ignore_index, label_smoothing, lse_square_scale, reduction)


def linear_cross_entropy(hidden, weight, bias, target, *, ignore_index=-100, label_smoothing=0.0,
                         lse_square_scale=0.0, reduction="mean", backend="auto"):
    """cross_entropy(hidden @ weight.T + bias, target): hidden (N, H), weight (V, H), bias (V,) or None."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected hidden (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    _check_options("linear_cross_entropy", hidden.shape, target, ignore_index, label_smoothing,
                   lse_square_scale, reduction)
    if dispatch.resolve("linear_cross_entropy", backend, hidden.device) == "triton":
        return dispatch.triton_impl("linear_cross_entropy")(
            hidden, weight, bias, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, reduction=reduction)
    _check_target_range("linear_cross_entropy", target, weight.shape[0], ignore_index)
    return linear_cross_entropy_reference(hidden, weight, bias, target, ignore_index, label_smoothing,
                                          lse_square_scale, reduction)
