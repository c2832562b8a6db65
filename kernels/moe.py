"""Sparse Mixture-of-Experts: top-k gating, dispatch (permute), grouped expert FFN, weighted combine.

`moe_route` turns router logits into expert choices and combine weights plus the auxiliary losses;
`moe_permute` gathers token rows into expert-contiguous order; `moe_expert_ffn` runs every expert's
FFN (up, exact GELU, down) over its contiguous group of rows; `moe_unpermute` scatters expert outputs
back, weighting each by its combine weight. Dropless by default: every assignment is kept; a per-expert
`capacity` (dropping, for comparison only) keeps each expert's first `capacity` assignments in token
order. The PyTorch twins here are the oracle and the CPU path; the Triton kernels (below the twins)
run on CUDA, or under TRITON_INTERPRET=1 when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    order: torch.Tensor  # (R,) kept assignment indices sorted by expert (stable), into the flattened (T, k)
    tokens_per_expert: torch.Tensor  # (E,) int64, kept rows per expert (R = their sum)
    num_tokens: int
    top_k: int
    positions: torch.Tensor | None = None  # (T*k,) int64: row of each assignment in the sorted order, -1 if dropped
    dropped: torch.Tensor | None = None  # scalar int64: assignments dropped by the capacity (0 when dropless)


def _check_capacity(capacity):
    if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"moe_permute: capacity must be None (dropless) or an int >= 0, got {capacity!r}")


def moe_permute_reference(x, expert_ids, num_experts, capacity=None):
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    dropped = counts.new_zeros(())
    if capacity is not None:  # keep each expert's first `capacity` assignments, in token order
        starts = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=flat.device) - starts[flat[order]]
        order = order[rank < capacity]
        kept = counts.clamp(max=capacity)
        dropped = (counts - kept).sum()
        counts = kept
    positions = torch.full_like(flat, -1)
    positions[order] = torch.arange(order.numel(), device=flat.device)
    # index_select, not x[...]: its backward is an index_add, not indexing's accumulating index_put
    return x.index_select(0, order // k), Dispatch(order, counts, T, k, positions, dropped)


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, capacity: int | None = None,
                backend: str = "auto"):
    """Rows of x (T, H) repeated per assignment and grouped by expert: returns (x_sorted (R, H), Dispatch).
    Within an expert, tokens keep their original order (stable sort), so results are deterministic.
    R = T*k when dropless (capacity None); with a capacity, each expert keeps at most `capacity` rows."""
    if x.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute: expected x (T, H) and expert_ids (T, k), got {tuple(x.shape)} "
                         f"and {tuple(expert_ids.shape)}")
    _check_capacity(capacity)
    if dispatch.resolve("moe_permute", backend, x.device) == "triton":
        return dispatch.triton_impl("moe_permute")(x, expert_ids, num_experts, capacity)
    return moe_permute_reference(x, expert_ids, num_experts, capacity)


def moe_unpermute_reference(y_sorted, weights, plan):
    w = weights.reshape(-1)[plan.order].to(y_sorted.dtype)
    out = y_sorted.new_zeros((plan.num_tokens, y_sorted.shape[1]))
    return out.index_add(0, plan.order // plan.top_k, y_sorted * w[:, None])


def moe_unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, plan: Dispatch, *, backend: str = "auto"):
    """Inverse of moe_permute with the weighted sum over each token's k experts: returns (T, H).
    Dropped assignments contribute nothing."""
    if y_sorted.shape[0] != plan.order.shape[0]:
        raise ValueError(f"moe_unpermute: expected {plan.order.shape[0]} rows, got {y_sorted.shape[0]}")
    if tuple(weights.shape) != (plan.num_tokens, plan.top_k):
        raise ValueError(f"moe_unpermute: weights must be ({plan.num_tokens}, {plan.top_k}), "
                         f"got {tuple(weights.shape)}")
    if dispatch.resolve("moe_unpermute", backend, y_sorted.device) == "triton":
        return dispatch.triton_impl("moe_unpermute")(y_sorted, weights, plan)
    return moe_unpermute_reference(y_sorted, weights, plan)


# Whether the twin pads expert groups to the GEMM row bucket (kernels.dispatch.CPU_ROW_BUCKET: group sizes change
# every step); False is bench.throughput's `xlt-unbucketed` ablation.
PAD_EXPERT_GROUPS = True


def moe_expert_ffn_reference(x_sorted, tokens_per_expert, w_up, b_up, w_down, b_down):
    """Loop over experts: down_e(gelu(up_e(rows of expert e))). One host sync (the group sizes). The stacked
    weights are unbound once, not indexed per expert: indexing's backward writes each expert's gradient into
    a zeroed copy of the whole stack (E full-size buffers), unbind's stacks them once. Each group is padded to
    a multiple of `dispatch.row_bucket(x_sorted)` rows (expert group sizes change every step); the pad rows are
    zeros whose outputs are dropped (their gradients are exactly zero), so the result is unchanged."""
    E = w_up.shape[0]
    ups, downs = w_up.unbind(0), w_down.unbind(0)
    b_ups = [None] * E if b_up is None else b_up.unbind(0)
    b_downs = [None] * E if b_down is None else b_down.unbind(0)
    bucket = dispatch.row_bucket(x_sorted) if PAD_EXPERT_GROUPS else 1
    outs = []
    for e, xe in enumerate(x_sorted.split(tokens_per_expert.tolist())):
        n = xe.shape[0]
        pad = -n % bucket
        if pad:
            xe = F.pad(xe, (0, 0, 0, pad))
        ye = F.linear(F.gelu(F.linear(xe, ups[e], b_ups[e])), downs[e], b_downs[e])
        outs.append(ye[:n] if pad else ye)
    return torch.cat(outs) if outs else x_sorted.new_zeros((0, w_down.shape[1]))


def moe_expert_ffn(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, w_up: torch.Tensor,
                   b_up: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None, *,
                   backend: str = "auto"):
    """Each expert's FFN over its contiguous rows of x_sorted (R, H): w_up (E, F, H), b_up (E, F) or None,
    w_down (E, H, F), b_down (E, H) or None, exact (erf) GELU between; returns (R, H)."""
    if w_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"moe_expert_ffn: w_up must be (E, F, H) and w_down (E, H, F), got "
                         f"{tuple(w_up.shape)} and {tuple(w_down.shape)}")
    E, Fd, H = w_up.shape
    if tuple(w_down.shape) != (E, H, Fd):
        raise ValueError(f"moe_expert_ffn: w_down must be {(E, H, Fd)} to match w_up {tuple(w_up.shape)}, "
                         f"got {tuple(w_down.shape)}")
    if x_sorted.dim() != 2 or x_sorted.shape[1] != H:
        raise ValueError(f"moe_expert_ffn: x_sorted must be (rows, {H}), got {tuple(x_sorted.shape)}")
    if tuple(tokens_per_expert.shape) != (E,):
        raise ValueError(f"moe_expert_ffn: tokens_per_expert must be ({E},), got {tuple(tokens_per_expert.shape)}")
    for name, b, n in (("b_up", b_up, Fd), ("b_down", b_down, H)):
        if b is not None and tuple(b.shape) != (E, n):
            raise ValueError(f"moe_expert_ffn: {name} must be ({E}, {n}) or None, got {tuple(b.shape)}")
    if dispatch.resolve("moe_expert_ffn", backend, x_sorted.device) == "triton":
        return dispatch.triton_impl("moe_expert_ffn")(x_sorted, tokens_per_expert, w_up, b_up, w_down, b_down)
    return moe_expert_ffn_reference(x_sorted, tokens_per_expert, w_up, b_up, w_down, b_down)


# ----- Triton ------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the twins above are the only path
    triton = None

if triton is not None:
    _MODE_ID = {m: i for i, m in enumerate(ROUTER_MODES)}
    _INV_SQRT2 = 0.7071067811865476
    _INV_SQRT_2PI = 0.3989422804014327

    @triton.jit
    def _route_fwd_kernel(x_ptr, ids_ptr, w_ptr, probsum_ptr, lse_ptr, counts_ptr, T, E,
                          K: tl.constexpr, MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # Column sums of probs and expert counts go to this block's row of (blocks, E) partials, which the
        # host sums in a fixed order: no float atomics, so the balance loss is bit-reproducible on a GPU.
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        mx = tl.max(x, 1)
        ex = tl.exp(x - mx[:, None])
        ssum = tl.sum(ex, 1)
        tl.store(lse_ptr + rows, mx + tl.log(ssum), mask=rmask)
        if MODE == 2:
            s = tl.where(m2, tl.sigmoid(x), 0.0)
            probs = s / tl.where(rmask, tl.sum(s, 1), 1.0)[:, None]  # padding rows: 0, not 0/0
            score = s
        else:
            probs = ex / ssum[:, None]
            score = probs
        tl.store(probsum_ptr + pid * E + cols, tl.sum(tl.where(m2, probs, 0.0), 0), mask=cmask)
        # Top-k by repeated argmax (ties go to the lower index); `chosen` marks the k picks per row.
        sel = tl.where(cmask[None, :], score, float("-inf"))
        chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
        for j in tl.static_range(K):
            best = tl.argmax(sel, 1)
            hit = cols[None, :] == best[:, None]
            chosen = chosen | hit
            sel = tl.where(hit, float("-inf"), sel)
            tl.store(ids_ptr + rows * K + j, best.to(tl.int64), mask=rmask)
        tl.store(counts_ptr + pid * E + cols, tl.sum((chosen & rmask[:, None]).to(tl.int32), 0), mask=cmask)
        if MODE == 0:
            wmat = probs
        elif MODE == 1:  # softmax over the chosen logits only; mx is the top-1 logit
            top = tl.where(chosen, ex, 0.0)
            wmat = top / tl.sum(top, 1)[:, None]
        else:
            top = tl.where(chosen, s, 0.0)
            wmat = top / tl.where(rmask, tl.sum(top, 1), 1.0)[:, None]
        sel = tl.where(cmask[None, :], score, float("-inf"))
        for j in tl.static_range(K):  # the same picks again, now to write their weights in rank order
            best = tl.argmax(sel, 1)
            hit = cols[None, :] == best[:, None]
            sel = tl.where(hit, float("-inf"), sel)
            tl.store(w_ptr + rows * K + j, tl.sum(tl.where(hit, wmat, 0.0), 1), mask=rmask)

    @triton.jit
    def _route_bwd_kernel(x_ptr, ids_ptr, w_ptr, dw_ptr, c_ptr, dlse_ptr, dx_ptr, T, E,
                          K: tl.constexpr, MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # dx from three upstream grads: dw (T, k) on the weights, c (E,) on the column sums of probs
        # (the balance loss), dlse (T,) on logsumexp (the z-loss).
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        mx = tl.max(x, 1)
        ex = tl.exp(x - mx[:, None])
        p = ex / tl.sum(ex, 1)[:, None]
        dwm = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        wm = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
        for j in tl.static_range(K):
            e = tl.load(ids_ptr + rows * K + j, mask=rmask, other=-1)
            hit = cols[None, :] == e[:, None]
            chosen = chosen | hit
            dwm += tl.where(hit, tl.load(dw_ptr + rows * K + j, mask=rmask, other=0.0)[:, None], 0.0)
            wm += tl.where(hit, tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0)[:, None], 0.0)
        c = tl.load(c_ptr + cols, mask=cmask, other=0.0)[None, :]
        dlse = tl.load(dlse_ptr + rows, mask=rmask, other=0.0)[:, None]
        dx = dlse * p
        wdw = tl.sum(wm * dwm, 1)[:, None]
        if MODE == 2:
            s = tl.where(m2, tl.sigmoid(x), 0.0)
            ds_dx = s * (1.0 - s)
            stop = tl.where(rmask, tl.sum(tl.where(chosen, s, 0.0), 1), 1.0)[:, None]
            dx += tl.where(chosen, (dwm - wdw) / stop, 0.0) * ds_dx
            sall = tl.where(rmask, tl.sum(s, 1), 1.0)[:, None]
            pn = s / sall
            dx += (c - tl.sum(pn * c, 1)[:, None]) / sall * ds_dx
        else:
            if MODE == 0:  # weights are softmax entries: their grad joins the balance grad on probs
                g = c + dwm
            else:  # weights are a softmax over the chosen logits
                g = c + tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
                dx += wm * (dwm - wdw)
            dx += p * (g - tl.sum(p * g, 1)[:, None])
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dx, mask=m2)

    _ROUTE_BLOCK_T = 16

    def _route_grid(T):
        return (triton.cdiv(max(T, 1), _ROUTE_BLOCK_T),)

    class _RouteFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, top_k, mode):
            x = logits.contiguous()
            T, E = x.shape
            dev = x.device
            ids = torch.empty((T, top_k), dtype=torch.int64, device=dev)
            w = torch.empty((T, top_k), dtype=torch.float32, device=dev)
            nb = _route_grid(T)[0]
            probsum = torch.zeros((nb, E), dtype=torch.float32, device=dev)  # per-block partials
            lse = torch.empty(T, dtype=torch.float32, device=dev)
            counts = torch.zeros((nb, E), dtype=torch.int32, device=dev)
            if T > 0:
                _route_fwd_kernel[(nb,)](x, ids, w, probsum, lse, counts, T, E, K=top_k, MODE=_MODE_ID[mode],
                                         BLOCK_T=_ROUTE_BLOCK_T, BLOCK_E=triton.next_power_of_2(E))
            probsum, counts = probsum.sum(0), counts.sum(0)  # a fixed summation order: reproducible
            ctx.save_for_backward(x, ids, w)
            ctx.mode = mode
            ctx.mark_non_differentiable(ids, counts)
            return w.to(logits.dtype), probsum, lse, ids, counts

        @staticmethod
        def backward(ctx, dw, dprobsum, dlse, _ids, _counts):
            x, ids, w = ctx.saved_tensors
            T, E = x.shape
            dw = torch.zeros_like(w) if dw is None else dw.float().contiguous()
            dprobsum = x.new_zeros(E, dtype=torch.float32) if dprobsum is None else dprobsum.float().contiguous()
            dlse = x.new_zeros(T, dtype=torch.float32) if dlse is None else dlse.float().contiguous()
            dx = torch.empty((T, E), dtype=torch.float32, device=x.device)
            if T > 0:
                _route_bwd_kernel[_route_grid(T)](x, ids, w, dw, dprobsum, dlse, dx, T, E, K=ids.shape[1],
                                                  MODE=_MODE_ID[ctx.mode], BLOCK_T=_ROUTE_BLOCK_T,
                                                  BLOCK_E=triton.next_power_of_2(E))
            return dx.to(x.dtype), None, None

    def _route_triton(logits, top_k, mode="topk_softmax"):
        T, E = logits.shape
        w, probsum, lse, ids, counts = _RouteFn.apply(logits, top_k, mode)
        counts = counts.long()
        fraction = counts.float() / max(T * top_k, 1)
        balance = E * (fraction * probsum / max(T, 1)).sum()
        z = lse.square().mean() if T > 0 else lse.sum()
        return Routing(ids, w, counts, balance, z)

    # ----- dispatch: histogram per block, prefix sums, stable in-block ranks, gather / scatter ----------
    _DBLOCK = 64

    @triton.jit
    def _hist_kernel(ids_ptr, block_counts_ptr, N, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
        pid = tl.program_id(0)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(ids_ptr + i, mask=i < N, other=-1)
        cols = tl.arange(0, BLOCK_E)
        hist = tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0)
        tl.store(block_counts_ptr + pid * E + cols, hist, mask=cols < E)

    @triton.jit
    def _positions_kernel(ids_ptr, rank_base_ptr, starts_ptr, pos_ptr, order_ptr, N, E, capacity,
                          BLOCK: tl.constexpr):
        # An assignment's rank within its expert = earlier blocks' count (rank_base) + earlier same-expert
        # assignments in this block; that keeps the sort stable without a global sort.
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        i = pid * BLOCK + offs
        valid = i < N
        e = tl.load(ids_ptr + i, mask=valid, other=-1)
        earlier = (e[:, None] == e[None, :]) & (offs[None, :] < offs[:, None])
        rank = tl.sum(earlier.to(tl.int64), 1) + tl.load(rank_base_ptr + pid * E + e, mask=valid, other=0)
        keep = valid & (rank < capacity)
        pos = tl.load(starts_ptr + e, mask=valid, other=0) + rank
        tl.store(pos_ptr + i, tl.where(keep, pos, -1), mask=valid)
        tl.store(order_ptr + pos, i.to(tl.int64), mask=keep)

    # Row offsets below are int64: rows * H passes 2**31 at T*k*H >= 2**31 (e.g. 128k tokens, k=4, H=4096), and
    # int32 arithmetic would wrap to a negative offset. Tokens and positions loaded from int64 tensors are
    # int64 already; row indices made from program ids are cast.
    @triton.jit
    def _gather_rows_kernel(src_ptr, order_ptr, out_ptr, R, H, K: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = r < R
        m2 = rmask[:, None] & (h[None, :] < H)
        tok = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64) // K
        v = tl.load(src_ptr + tok[:, None] * H + h[None, :], mask=m2, other=0.0)
        tl.store(out_ptr + r[:, None] * H + h[None, :], v, mask=m2)

    @triton.jit
    def _gather_sum_kernel(src_ptr, pos_ptr, w_ptr, out_ptr, T, H, K: tl.constexpr, HAS_W: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        # out[t] = sum_j w[t, j] * src[pos[t, j]]: the combine (HAS_W) and the permute's backward. Each
        # token reads its own k rows, so no atomics are needed.
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        tmask = t < T
        hmask = h[None, :] < H
        acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
        for j in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + j, mask=tmask, other=-1).to(tl.int64)
            live = tmask & (p >= 0)
            v = tl.load(src_ptr + p[:, None] * H + h[None, :], mask=live[:, None] & hmask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + j, mask=live, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(out_ptr + t[:, None] * H + h[None, :], acc, mask=tmask[:, None] & hmask)

    @triton.jit
    def _unpermute_bwd_kernel(dout_ptr, y_ptr, pos_ptr, w_ptr, dy_ptr, dw_ptr, T, H, K: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        # dy[pos[t, j]] = w[t, j] * dout[t]; dw[t, j] = <dout[t], y[pos[t, j]]>, this program's BLOCK_H
        # columns of it into row program_id(1) of the (column blocks, T*k) partials (summed on the host:
        # no atomics).
        pid_h = tl.program_id(1)
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        tmask = t < T
        hmask = h[None, :] < H
        d = tl.load(dout_ptr + t[:, None] * H + h[None, :], mask=tmask[:, None] & hmask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + j, mask=tmask, other=-1).to(tl.int64)
            live = tmask & (p >= 0)
            m2 = live[:, None] & hmask
            w = tl.load(w_ptr + t * K + j, mask=live, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + p[:, None] * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(dy_ptr + p[:, None] * H + h[None, :], w[:, None] * d, mask=m2)
            tl.store(dw_ptr + pid_h.to(tl.int64) * T * K + t * K + j, tl.sum(tl.where(m2, d * y, 0.0), 1),
                     mask=tmask)

    def _block_h(H):
        return min(64, triton.next_power_of_2(max(H, 16)))

    class _PermuteFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, order, positions, top_k):
            x = x.contiguous()
            R, H = order.shape[0], x.shape[1]
            out = x.new_empty((R, H))
            if R > 0:
                grid = (triton.cdiv(R, 32), triton.cdiv(H, _block_h(H)))
                _gather_rows_kernel[grid](x, order, out, R, H, K=top_k, BLOCK_R=32, BLOCK_H=_block_h(H))
            ctx.save_for_backward(positions)
            ctx.shape = (x.shape[0], top_k)
            return out

        @staticmethod
        def backward(ctx, dout):
            (positions,) = ctx.saved_tensors
            T, k = ctx.shape
            dout = dout.contiguous()
            H = dout.shape[1]
            dx = dout.new_empty((T, H))
            if T > 0:
                grid = (triton.cdiv(T, 32), triton.cdiv(H, _block_h(H)))
                _gather_sum_kernel[grid](dout, positions, dout, dx, T, H, K=k, HAS_W=False, BLOCK_T=32,
                                         BLOCK_H=_block_h(H))
            return dx, None, None, None

    class _UnpermuteFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, weights, positions):
            y = y.contiguous()
            weights = weights.contiguous()
            T, k = weights.shape
            H = y.shape[1]
            out = y.new_empty((T, H))
            if T > 0:
                grid = (triton.cdiv(T, 32), triton.cdiv(H, _block_h(H)))
                _gather_sum_kernel[grid](y, positions, weights, out, T, H, K=k, HAS_W=True, BLOCK_T=32,
                                         BLOCK_H=_block_h(H))
            ctx.save_for_backward(y, weights, positions)
            return out

        @staticmethod
        def backward(ctx, dout):
            y, weights, positions = ctx.saved_tensors
            T, k = weights.shape
            dout = dout.contiguous()
            H = y.shape[1]
            dy = torch.zeros_like(y)
            nh = triton.cdiv(max(H, 1), _block_h(H))
            dw = torch.zeros((nh, T, k), dtype=torch.float32, device=y.device)  # per column-block partials
            if T > 0 and H > 0:
                _unpermute_bwd_kernel[(triton.cdiv(T, 32), nh)](dout, y, positions, weights, dy, dw, T, H, K=k,
                                                                BLOCK_T=32, BLOCK_H=_block_h(H))
            return dy, dw.sum(0).to(weights.dtype), None

    def _permute_triton(x, expert_ids, num_experts, capacity=None):
        T, k = expert_ids.shape
        flat = expert_ids.reshape(-1).contiguous().long()
        N, E, dev = flat.numel(), num_experts, flat.device
        nb = triton.cdiv(max(N, 1), _DBLOCK)
        block_counts = torch.zeros((nb, E), dtype=torch.int64, device=dev)
        _hist_kernel[(nb,)](flat, block_counts, N, E, BLOCK=_DBLOCK, BLOCK_E=triton.next_power_of_2(E))
        counts = block_counts.sum(0)
        rank_base = (block_counts.cumsum(0) - block_counts).contiguous()  # exclusive prefix over blocks
        kept = counts if capacity is None else counts.clamp(max=capacity)
        starts = (kept.cumsum(0) - kept).contiguous()
        R = N if capacity is None else int(kept.sum())  # host sync only when dropping (comparison path)
        positions = torch.empty(N, dtype=torch.int64, device=dev)
        order = torch.empty(R, dtype=torch.int64, device=dev)
        cap = N + 1 if capacity is None else capacity
        _positions_kernel[(nb,)](flat, rank_base, starts, positions, order, N, E, cap, BLOCK=_DBLOCK)
        plan = Dispatch(order, kept, T, k, positions, (counts - kept).sum())
        return _PermuteFn.apply(x, order, positions, k), plan

    def _unpermute_triton(y_sorted, weights, plan):
        if plan.positions is None:
            raise ValueError("moe_unpermute: the plan has no positions; make it with moe_permute")
        return _UnpermuteFn.apply(y_sorted, weights, plan.positions)

    # ----- grouped expert GEMMs -----------------------------------------------------------------------------
    @triton.jit
    def _gelu(h):
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(h):
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)

    @triton.jit
    def _grouped_mm_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, aux_ptr, group_ptr, tile_ptr, N, K, E,
                           stride_am, stride_be, stride_bk, stride_bn, stride_bias,
                           HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        # C[rows of e] = A[rows of e] @ B[e] (+ bias[e]); B[e] is (K, N) through strides, so transposes are free.
        # EPILOGUE 1: C = gelu(acc), acc stored to aux (the pre-activation); 2: C = acc * gelu'(aux).
        # The grid's first axis is an upper bound on row tiles (R/BLOCK_M + E); tile_ptr holds each expert's
        # first tile (E+1 entries), so the launch needs no host sync on the group sizes.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        total = tl.load(tile_ptr + E)
        if pid_m >= total:
            return
        es = tl.arange(0, BLOCK_E)
        ends = tl.load(tile_ptr + 1 + es, mask=es < E, other=2147483647)
        e = tl.sum((ends <= pid_m).to(tl.int32), 0)
        row0 = tl.load(group_ptr + e) + (pid_m - tl.load(tile_ptr + e)) * BLOCK_M
        row_end = tl.load(group_ptr + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < row_end
        cmask = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        b_base = b_ptr + e.to(tl.int64) * stride_be
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e * stride_bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        if EPILOGUE == 1:
            tl.store(aux_ptr + offs, acc, mask=m2)
            acc = _gelu(acc)
        elif EPILOGUE == 2:
            acc = acc * _gelu_grad(tl.load(aux_ptr + offs, mask=m2, other=0.0).to(tl.float32))
        tl.store(c_ptr + offs, acc, mask=m2)

    @triton.jit
    def _grouped_wgrad_kernel(g_ptr, a_ptr, dw_ptr, db_ptr, group_ptr, M, N, HAS_BIAS: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # dW[e] (M, N) = G[rows of e]^T @ A[rows of e], and db[e] = column sums of G over those rows.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.program_id(2)
        start = tl.load(group_ptr + e)
        end = tl.load(group_ptr + e + 1)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = ms < M
        nmask = ns < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        bacc = tl.zeros((BLOCK_M,), tl.float32)
        for r0 in range(start, end, BLOCK_K):
            rs = r0 + tl.arange(0, BLOCK_K)
            rmask = rs < end
            gt = tl.load(g_ptr + rs[None, :].to(tl.int64) * M + ms[:, None], mask=mmask[:, None] & rmask[None, :],
                         other=0.0)
            a = tl.load(a_ptr + rs[:, None].to(tl.int64) * N + ns[None, :], mask=rmask[:, None] & nmask[None, :],
                        other=0.0)
            if UPCAST:
                gt = gt.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(gt, a, acc, input_precision=PRECISION)
            if HAS_BIAS:
                bacc += tl.sum(gt.to(tl.float32), 1)
        base = e.to(tl.int64) * M * N
        tl.store(dw_ptr + base + ms[:, None] * N + ns[None, :], acc, mask=mmask[:, None] & nmask[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + e * M + ms, bacc, mask=mmask & (ms * 0 + pid_n == 0))  # one column of programs writes db

    _BM, _BN, _BK = 32, 32, 32

    def _mm_flags(t):
        # fp32 inputs: exact fp32 products (no TF32). bf16/fp16: native tensor-core dot on the GPU, but the
        # interpreter computes bf16 wrongly, so upcast there.
        upcast = dispatch.interpreting() or t.dtype == torch.float32
        return upcast, "ieee" if upcast else "tf32"

    def _grouped_mm(a, b, b_strides, bias, group, tiles, n_out, epilogue=0, aux=None):
        R, K = a.shape
        E = b.shape[0]
        out = a.new_empty((R, n_out))
        if R == 0:
            return out
        upcast, prec = _mm_flags(a)
        grid = (triton.cdiv(R, _BM) + E, triton.cdiv(n_out, _BN))
        _grouped_mm_kernel[grid](a, b, b if bias is None else bias, out, out if aux is None else aux, group, tiles,
                                 n_out, K, E, a.stride(0), b.stride(0), b_strides[0], b_strides[1],
                                 0 if bias is None else bias.stride(0), HAS_BIAS=bias is not None,
                                 EPILOGUE=epilogue, UPCAST=upcast, PRECISION=prec, BLOCK_M=_BM, BLOCK_N=_BN,
                                 BLOCK_K=_BK, BLOCK_E=triton.next_power_of_2(E))
        return out

    def _grouped_wgrad(g, a, group, E, dtype, with_bias):
        M, N = g.shape[1], a.shape[1]
        dw = torch.empty((E, M, N), dtype=torch.float32, device=g.device)
        db = torch.empty((E, M), dtype=torch.float32, device=g.device) if with_bias else None
        upcast, prec = _mm_flags(g)
        grid = (triton.cdiv(M, _BM), triton.cdiv(N, _BN), E)
        _grouped_wgrad_kernel[grid](g, a, dw, dw if db is None else db, group, M, N, HAS_BIAS=with_bias,
                                    UPCAST=upcast, PRECISION=prec, BLOCK_M=_BM, BLOCK_N=_BN, BLOCK_K=_BK)
        return dw.to(dtype), None if db is None else db.to(dtype)

    class _ExpertFFNFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, counts, w_up, b_up, w_down, b_down):
            x, w_up, w_down = x.contiguous(), w_up.contiguous(), w_down.contiguous()
            b_up = None if b_up is None else b_up.contiguous()
            b_down = None if b_down is None else b_down.contiguous()
            E, Fd, H = w_up.shape
            zero = counts.new_zeros(1)
            group = torch.cat([zero, counts.cumsum(0)]).to(torch.int32).contiguous()
            tiles = torch.cat([zero, ((counts + _BM - 1) // _BM).cumsum(0)]).to(torch.int32).contiguous()
            h = x.new_empty((x.shape[0], Fd))
            # up: B[e] = w_up[e]^T, (H, F); down: B[e] = w_down[e]^T, (F, H)
            act = _grouped_mm(x, w_up, (w_up.stride(2), w_up.stride(1)), b_up, group, tiles, Fd, epilogue=1, aux=h)
            y = _grouped_mm(act, w_down, (w_down.stride(2), w_down.stride(1)), b_down, group, tiles, H)
            ctx.save_for_backward(x, h, act, w_up, w_down, group, tiles)
            ctx.has_bias = (b_up is not None, b_down is not None)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, h, act, w_up, w_down, group, tiles = ctx.saved_tensors
            E, Fd, H = w_up.shape
            dy = dy.contiguous()
            # dH = (dY @ w_down[e]) * gelu'(h): B[e] = w_down[e], (H, F)
            dh = _grouped_mm(dy, w_down, (w_down.stride(1), w_down.stride(2)), None, group, tiles, Fd,
                             epilogue=2, aux=h)
            dx = _grouped_mm(dh, w_up, (w_up.stride(1), w_up.stride(2)), None, group, tiles, H)
            dw_down, db_down = _grouped_wgrad(dy, act, group, E, w_down.dtype, ctx.has_bias[1])
            dw_up, db_up = _grouped_wgrad(dh, x, group, E, w_up.dtype, ctx.has_bias[0])
            return dx, None, dw_up, db_up, dw_down, db_down

    def _expert_ffn_triton(x_sorted, tokens_per_expert, w_up, b_up, w_down, b_down):
        return _ExpertFFNFn.apply(x_sorted, tokens_per_expert.long(), w_up, b_up, w_down, b_down)

    dispatch.register_triton("moe_route", _route_triton)
    dispatch.register_triton("moe_permute", _permute_triton)
    dispatch.register_triton("moe_unpermute", _unpermute_triton)
    dispatch.register_triton("moe_expert_ffn", _expert_ffn_triton)
