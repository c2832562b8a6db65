"""Expert parallelism on 2 gloo ranks (CPU) gives the 1-rank module's outputs and gradients."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.expert_parallel import ExpertParallelMoE, reduce_replicated_grads
from models.moe import MoEFeedForward

H, FD, E, K = 16, 24, 4, 2
TOKENS = (11, 6)  # uneven shards


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, seed, backend):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(seed)  # same seed on every rank: same module (its init) and same global batch
        g = torch.Generator().manual_seed(seed)
        moe = MoEFeedForward(H, FD, E, K, shared_expert=True, kernel_backend=backend)
        with torch.no_grad():
            moe.router.weight.copy_(torch.randn(E, H, generator=g))
            moe.router.weight[E - 1] -= 10.0  # the last expert (rank 1's) gets few or no tokens
        x = torch.randn(sum(TOKENS), H, generator=g, requires_grad=True)
        gy = torch.randn(sum(TOKENS), H, generator=g)
        y_ref = moe(x)
        params = [x] + [moe.router.weight, moe.w_up, moe.b_up, moe.w_down, moe.b_down] + list(moe.shared.parameters())
        ref = torch.autograd.grad((y_ref * gy).sum(), params)

        ep = ExpertParallelMoE(moe, group=None)
        lo = sum(TOKENS[:rank])
        rows = slice(lo, lo + TOKENS[rank])
        x_local = x.detach()[rows].clone().requires_grad_()
        y = ep(x_local)
        (y * gy[rows]).sum().backward()
        reduce_replicated_grads(ep)
        torch.testing.assert_close(y, y_ref[rows].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_local.grad, ref[0][rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ep.router.weight.grad, ref[1], atol=1e-5, rtol=1e-4)
        experts = slice(ep.first_expert, ep.first_expert + ep.local_experts)
        for p, r in zip(ep.expert_parameters(), ref[2:6]):
            torch.testing.assert_close(p.grad, r[experts], atol=1e-5, rtol=1e-4)
        for p, r in zip(ep.shared.parameters(), ref[6:]):
            torch.testing.assert_close(p.grad, r, atol=1e-5, rtol=1e-4)
        assert ep.w_up.shape[0] == E // world
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_ranks_match_one_rank(backend):
    seed = torch.seed() % 2**31
    mp.spawn(_rank, args=(2, _free_port(), seed, backend), nprocs=2, join=True)


def test_needs_divisible_experts_and_an_initialised_group():
    with pytest.raises(ValueError, match="not initialised"):
        ExpertParallelMoE(MoEFeedForward(H, FD, 3, 1))
