"""Expert parallelism: an MoEFeedForward's experts sharded across the ranks of a process group.

Every rank keeps the router (and the shared expert) replicated and experts [r*E/W, (r+1)*E/W) locally.
A forward routes the rank's own tokens, sorts them by expert (which also sorts them by owning rank), and
exchanges rows with `all_to_all_single` using variable splits (gloo supports uneven and empty splits; so
does NCCL); each rank regroups what it received by local expert, runs its grouped expert FFN and sends
the results back along the reverse splits. The exchange is an autograd Function whose backward is the
reverse exchange, so expert weights receive the gradient of every rank's tokens.

Gradients of replicated parameters (router, shared expert) hold only the rank's own tokens' share:
call `reduce_replicated_grads` after backward (or let DDP reduce them, ignoring the expert parameters,
which differ per rank). Router statistics and aux losses are per rank (its own tokens).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from models.moe import MoEFeedForward


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return out

    @staticmethod
    def backward(ctx, dout):
        send_splits, recv_splits = ctx.splits
        dout = dout.contiguous()
        dx = dout.new_empty((sum(send_splits),) + tuple(dout.shape[1:]))
        dist.all_to_all_single(dx, dout, send_splits, recv_splits, group=ctx.group)
        return dx, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Rows of x split by send_splits to ranks 0..W-1; returns the rows received, ordered by source rank."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


class ExpertParallelMoE(MoEFeedForward):
    """The rank's shard of `moe` (same routing, same function, experts split across `group`)."""

    def __init__(self, moe: MoEFeedForward, group=None):
        if not dist.is_initialized():
            raise ValueError("ExpertParallelMoE: torch.distributed is not initialised (init_process_group first)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if moe.num_experts % world:
            raise ValueError(f"ExpertParallelMoE: num_experts ({moe.num_experts}) must be divisible by the "
                             f"world size ({world})")
        if moe.capacity_factor is not None:
            raise ValueError("ExpertParallelMoE: capacity_factor must be None (expert parallelism is dropless)")
        nn.Module.__init__(self)  # not MoEFeedForward.__init__: never allocate all experts' weights twice
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "router_mode",
                     "capacity_factor", "kernel_backend"):
            setattr(self, name, getattr(moe, name))
        self.group, self.world, self.rank = group, world, rank
        self.local_experts = moe.num_experts // world
        lo, hi = rank * self.local_experts, (rank + 1) * self.local_experts
        self.first_expert = lo
        self.router = copy.deepcopy(moe.router)
        self.shared = copy.deepcopy(moe.shared)
        for name in ("w_up", "b_up", "w_down", "b_down"):
            setattr(self, name, nn.Parameter(getattr(moe, name).detach()[lo:hi].clone()))
        self.last_stats = {}

    def experts(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        W, El = self.world, self.local_experts
        send_counts = tokens_per_expert.reshape(W, El).contiguous()  # rows for each rank's experts
        recv_counts = torch.empty_like(send_counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        counts_cpu = torch.stack([send_counts, recv_counts]).cpu()  # one host sync for both split lists
        send_splits, recv_splits = counts_cpu[0].sum(1).tolist(), counts_cpu[1].sum(1).tolist()
        received = all_to_all(x_sorted, send_splits, recv_splits, self.group)
        # received rows are grouped by source rank, then local expert: regroup by local expert (stable)
        local_ids = torch.repeat_interleave(torch.arange(El, device=x_sorted.device).repeat(W),
                                            recv_counts.reshape(-1))
        order = torch.argsort(local_ids, stable=True)
        y_local = super().experts(received[order], recv_counts.sum(0))  # the local experts' grouped FFN
        y_received = y_local[torch.argsort(order)]
        return all_to_all(y_received, recv_splits, send_splits, self.group)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.w_up, self.b_up, self.w_down, self.b_down]

    def replicated_parameters(self) -> list[nn.Parameter]:
        experts = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in experts]


def reduce_replicated_grads(module: nn.Module, group=None) -> None:
    """Sum the router's and shared experts' gradients over ranks for every ExpertParallelMoE in `module`,
    so that, with a loss summed over all ranks' tokens, every gradient equals the 1-rank gradient."""
    for m in module.modules():
        if isinstance(m, ExpertParallelMoE):
            for p in m.replicated_parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group if group is not None else m.group)
