"""Cross-entropy on logits, and the projection fused with it (`linear_cross_entropy`).

Options follow torch.nn.functional.cross_entropy: ignore_index, label_smoothing, reduction, plus the
z-loss `lse_square_scale * logsumexp(logits)**2` per token. With reduction="mean" the loss is averaged
over non-ignored targets, and a batch where every target is ignored gives 0 (not NaN). Losses come back
in fp32 whatever the input dtype.

Layers, as in DESIGN.md:
- `_ce_rows_kernel` (Triton): one program per row; an online softmax in fp32 over vocabulary tiles gives
  the row's logsumexp, the target logit is read on its own in fp32 (so a bf16 gradient store cannot
  cancel it), and a second sweep writes d(loss)/d(logits) into a gradient buffer, which may be the logits
  buffer itself (Liger-Kernel's trick: the forward leaves the gradient where the logits were) when that
  buffer belongs to the op: a chunk of `linear_cross_entropy`'s logits, or `cross_entropy`'s contiguous
  copy of strided logits. A caller's logits are never overwritten: a Triton store bumps no version
  counter, so autograd could not tell that another use of them in the graph now reads a gradient.
- host functions `cross_entropy_forward/backward` and `linear_cross_entropy_forward/backward`, and one
  autograd Function per op. `linear_cross_entropy` walks the rows in chunks (`chunk_rows`): per chunk the
  logits are projected, turned into their gradient in place, and consumed at once into grad hidden,
  grad weight (accumulated in fp32) and grad bias, so the N x V logits never exist and the backward only
  scales by grad_output. The same Function runs the Triton row kernel or its PyTorch twin
  (`_ce_rows_torch`), so CPU runs get the same memory saving.
- reduction="none": per-row grad_output is unknown in the forward and grad weight sums over rows, so the
  forward computes losses only and the backward recomputes the chunks with the per-row scale.
- `*_reference`: the simple unchunked oracle.

Targets out of range raise ValueError on CPU tensors (a host check) and, on CUDA, only with
XLT_CHECK_INPUTS=1 (the check syncs the host); otherwise the kernel gives such a row a NaN loss.
Compute dtype: under autocast, the autocast dtype for the projections; otherwise fp32 for the twin and the
input dtype for Triton. Softmax arithmetic is fp32 everywhere.
"""
from __future__ import annotations


import torch

from . import dispatch

REDUCTIONS = ("mean", "sum", "none")
MIN_CHUNK_ROWS = 128  # below this the weight is re-read per chunk for little work (bandwidth bound)
MIN_CHUNK_LOGITS = 1 << 22  # chunks may hold this many logits (16 MiB in fp32): small vocabularies in one go


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
    # Host sync: done for CPU tensors, and on CUDA only when XLT_CHECK_INPUTS=1.
    if not dispatch.host_checks(target):
        return
    valid = target != ignore_index
    if valid.any():
        bad = valid & ((target < 0) | (target >= vocab))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: target[{i}] = {int(target[i])} is out of range [0, {vocab}) "
                             f"and is not ignore_index ({ignore_index})")


# ----- references (the oracle) -------------------------------------------------------------------------------
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


def linear_cross_entropy_reference(hidden, weight, bias, target, ignore_index=-100, label_smoothing=0.0,
                                   lse_square_scale=0.0, reduction="mean"):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return cross_entropy_reference(logits, target, ignore_index, label_smoothing, lse_square_scale, reduction)


# ----- Triton kernel -----------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton run the twins
    triton = None

if triton is not None:
    @triton.jit
    def _ce_rows_kernel(X, stride_x, T, LOSS, DX, stride_dx, SCALE, stride_scale, V, ignore_index, eps, z,
                        HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """Row loss into LOSS; with HAS_GRAD, scale * d(loss)/d(x) into DX (which may alias X)."""
        row = tl.program_id(0).to(tl.int64)  # N * V exceeds 2**31 at XLM-R sizes
        x_row = X + row * stride_x
        dx_row = DX + row * stride_dx
        t = tl.load(T + row).to(tl.int64)
        cols0 = tl.arange(0, BLOCK_V)
        if t == ignore_index:
            tl.store(LOSS + row, 0.0)
            if HAS_GRAD:
                for start in range(0, V, BLOCK_V):
                    cols = start + cols0
                    tl.store(dx_row + cols, tl.zeros([BLOCK_V], tl.float32).to(DX.dtype.element_ty),
                             mask=cols < V)
            return
        # The target logit, read in fp32 before the sweep below may overwrite it; NaN when out of range.
        in_range = (t >= 0) & (t < V)
        x_t = tl.load(x_row + t, mask=in_range, other=float("nan")).to(tl.float32)
        m = float("-inf")
        d = 0.0
        sum_x = 0.0
        for start in range(0, V, BLOCK_V):  # online softmax: running max m and sum d of exp(x - m)
            cols = start + cols0
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            sum_x += tl.sum(tl.where(cols < V, x, 0.0), 0)
            m = m_new
        lse = m + tl.log(d)
        loss = (1.0 - eps) * (lse - x_t) + z * lse * lse
        if eps > 0.0:  # only then: masked (-inf) logits make sum_x infinite, and 0 * inf is NaN
            loss += eps * (lse - sum_x / V)
        tl.store(LOSS + row, loss)
        if HAS_GRAD:
            # d loss / d x_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t]
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
            coef = (1.0 + 2.0 * z * lse) * scale
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * coef - eps / V * scale
                g = tl.where(cols == t, g - (1.0 - eps) * scale, g)
                tl.store(dx_row + cols, g.to(DX.dtype.element_ty), mask=cols < V)


def _ce_rows_triton(x, target, ignore_index, eps, z, scale, grad_out):
    """Per-row fp32 losses of logits x (n, V); with grad_out (may be x), writes scale * d loss / d x there."""
    n, V = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return loss
    interp = dispatch.interpreting()
    block = min(triton.next_power_of_2(V), 16384 if interp else 4096)  # fewer, larger tiles when interpreted
    dx = grad_out if grad_out is not None else x
    _ce_rows_kernel[(n,)](x, x.stride(0), target, loss, dx, dx.stride(0), scale,
                          0 if scale.dim() == 0 else scale.stride(0), V, ignore_index, float(eps), float(z),
                          HAS_GRAD=grad_out is not None, BLOCK_V=block, num_warps=1 if interp else 8)
    return loss


# ----- PyTorch twin of the row kernel ------------------------------------------------------------------------
def _ce_rows_torch(x, target, ignore_index, eps, z, scale, grad_out):
    """The row kernel in PyTorch, fp32; works in place in x when x is fp32 and grad_out is x."""
    n, V = x.shape
    xf = x.float()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    m = xf.amax(dim=1, keepdim=True)
    lse = (m + (xf - m).exp_().sum(dim=1, keepdim=True).log_()).squeeze(1)
    x_t = xf.gather(1, safe[:, None]).squeeze(1)
    loss = (1.0 - eps) * (lse - x_t) + z * lse.square()
    if eps > 0.0:  # only then: masked (-inf) logits make the mean infinite, and 0 * inf is NaN
        loss = loss + eps * (lse - xf.mean(dim=1))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if grad_out is None:
        return loss
    scale = scale.float().expand(n)
    g = xf.sub_(lse[:, None]) if xf.data_ptr() == grad_out.data_ptr() else xf - lse[:, None]
    g.exp_().mul_(((1.0 + 2.0 * z * lse) * scale)[:, None]).sub_((eps / V) * scale[:, None])
    g[torch.arange(n, device=x.device), safe] -= (1.0 - eps) * scale
    g.masked_fill_(~valid[:, None], 0.0)
    if g.data_ptr() != grad_out.data_ptr():
        grad_out.copy_(g)
    return loss


# ----- cross_entropy: host functions and autograd ------------------------------------------------------------
def _scale_for(target, ignore_index, reduction):
    """(n_valid, scale): the forward's gradient scale, 1/n_valid for mean, on the device (no host sync)."""
    n_valid = (target != ignore_index).sum()
    if reduction == "mean":
        return n_valid, 1.0 / n_valid.clamp(min=1).float()
    return n_valid, torch.ones((), dtype=torch.float32, device=target.device)


def _reduce(rows, n_valid, reduction):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / n_valid.clamp(min=1)


def cross_entropy_forward(logits, target, ignore_index, label_smoothing, lse_square_scale, reduction,
                          grad_out=None):
    """Loss as `reduction` asks; with grad_out (may be logits), the gradient of that loss for grad_output 1
    (for "none": of each row's own loss) is written into it."""
    n_valid, scale = _scale_for(target, ignore_index, reduction)
    rows = _ce_rows_triton(logits, target, ignore_index, label_smoothing, lse_square_scale, scale, grad_out)
    return _reduce(rows, n_valid, reduction)


def cross_entropy_backward(dlogits, grad_output):
    """Scale the forward's gradient by grad_output (a scalar, or per row for reduction="none"), in place."""
    go = grad_output[:, None] if grad_output.dim() == 1 else grad_output
    return dlogits.mul_(go.to(dlogits.dtype) if dlogits.dtype != torch.float32 else go)


def _once(ctx, op):
    # The backward scales the gradient computed in the forward in place: a second backward through the
    # same graph (retain_graph=True) would scale it twice.
    if getattr(ctx, "used", False):
        raise RuntimeError(f"{op}: backward ran twice through one graph; the gradient is computed in the "
                           "forward and consumed by the first backward (call the loss again instead)")
    ctx.used = True


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, lse_square_scale, reduction):
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        grad_out = None
        if ctx.needs_input_grad[0]:
            # Only a buffer this Function owns takes the gradient: its own contiguous copy (in place, no extra
            # N x V), else a new one. The caller's logits may be read elsewhere in the graph.
            grad_out = x if x.data_ptr() != logits.data_ptr() else torch.empty_like(x)
        loss = cross_entropy_forward(x, target, ignore_index, label_smoothing, lse_square_scale, reduction,
                                     grad_out)
        ctx.save_for_backward(grad_out)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _once(ctx, "cross_entropy")
        (dlogits,) = ctx.saved_tensors
        return cross_entropy_backward(dlogits, grad_output), None, None, None, None, None


def _cross_entropy_triton(logits, target, *, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                          reduction="mean"):
    return CrossEntropyFunction.apply(logits, target, ignore_index, label_smoothing, lse_square_scale, reduction)


def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                  reduction="mean", backend="auto"):
    """Cross-entropy from logits (N, V) and int targets (N,); see module docstring for options. The
    logits are never modified (the Triton path writes its gradient into a buffer of its own)."""
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D (N, V), got {tuple(logits.shape)}")
    _check_options("cross_entropy", logits.shape, target, ignore_index, label_smoothing, lse_square_scale,
                   reduction)
    _check_target_range("cross_entropy", target, logits.shape[1], ignore_index)
    if dispatch.resolve("cross_entropy", backend, logits.device) == "triton":
        return dispatch.triton_impl("cross_entropy")(logits, target, ignore_index=ignore_index,
                                                     label_smoothing=label_smoothing,
                                                     lse_square_scale=lse_square_scale, reduction=reduction)
    return cross_entropy_reference(logits, target, ignore_index, label_smoothing, lse_square_scale, reduction)


# ----- linear_cross_entropy: chunked host functions and autograd ---------------------------------------------
def chunk_rows(n: int, h: int, v: int) -> int:
    """Rows per chunk: transient logits about the size of the input (n*h), at least MIN_CHUNK_ROWS rows and
    up to MIN_CHUNK_LOGITS logits (so small vocabularies do not pay a per-chunk overhead for nothing)."""
    rows = 1 << max(0, -(-n * h // v) - 1).bit_length()  # next power of two of ceil(n*h/v)
    return max(1, min(n, max(rows, MIN_CHUNK_ROWS, MIN_CHUNK_LOGITS // v)))


def _compute_dtype(hidden, weight, backend):
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.float32 if backend == "torch" else torch.promote_types(hidden.dtype, weight.dtype)


def _add_mm_f32(acc, a, b):
    """acc += a @ b, acc fp32; low-precision inputs keep a fast GEMM with an fp32 result on CUDA."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):  # older torch: no fp32-output GEMM for this dtype
            pass
    acc.addmm_(a.float(), b.float())


def _lce_chunks(hidden, weight, bias, target, opts, scale, need, backend):
    """One walk over row chunks: fp32 row losses and, for each input in `need`, its gradient for the loss
    scaled by `scale` (0-dim, or per row). Gradients of weight and bias come back in fp32."""
    (N, H), V = hidden.shape, weight.shape[0]
    ignore_index, eps, z = opts
    rows_fn = _ce_rows_triton if backend == "triton" else _ce_rows_torch
    dtype = _compute_dtype(hidden, weight, backend)
    dev = hidden.device
    with torch.autocast(dev.type, enabled=False):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        loss = torch.empty(N, dtype=torch.float32, device=dev)
        dh = torch.empty_like(hidden) if need[0] else None
        dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need[1] else None
        db = torch.zeros(V, dtype=torch.float32, device=dev) if need[2] else None
        any_grad = any(need)
        step = chunk_rows(N, H, V)
        for s in range(0, N, step):
            e = min(s + step, N)
            h = hidden[s:e].to(dtype)
            x = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
            loss[s:e] = rows_fn(x, target[s:e], ignore_index, eps, z, scale if scale.dim() == 0 else scale[s:e],
                                x if any_grad else None)
            # x now holds d loss / d logits for this chunk: consume it before the next chunk
            if dh is not None:
                dh[s:e] = x @ w
            if dw is not None:
                _add_mm_f32(dw, x.t(), h)
            if db is not None:
                db += x.sum(dim=0, dtype=torch.float32)
    return loss, dh, dw, db


def linear_cross_entropy_forward(hidden, weight, bias, target, opts, reduction, need, backend):
    """Loss as `reduction` asks and the gradients in `need` for grad_output 1 (none for "none")."""
    n_valid, scale = _scale_for(target, opts[0], reduction)
    if reduction == "none":
        need = (False, False, False)
    rows, dh, dw, db = _lce_chunks(hidden, weight, bias, target, opts, scale, need, backend)
    return _reduce(rows, n_valid, reduction), (dh, dw, db)


def linear_cross_entropy_backward(grads, grad_output, dtypes):
    """Scale the forward's gradients by the scalar grad_output; cast to the inputs' dtypes."""
    return tuple(None if g is None else g.mul_(grad_output).to(dt) for g, dt in zip(grads, dtypes))


def linear_cross_entropy_backward_none(hidden, weight, bias, target, opts, grad_output, need, backend):
    """reduction="none": recompute the chunks with each row's grad_output as its scale."""
    _, dh, dw, db = _lce_chunks(hidden, weight, bias, target, opts, grad_output.float(), need, backend)
    return dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, label_smoothing, lse_square_scale, reduction,
                backend):
        opts = (ignore_index, label_smoothing, lse_square_scale)
        need = tuple(ctx.needs_input_grad[:3])
        loss, grads = linear_cross_entropy_forward(hidden, weight, bias, target, opts, reduction, need, backend)
        ctx.reduction, ctx.opts, ctx.need, ctx.backend = reduction, opts, need, backend
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
        else:
            ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction != "none":
            _once(ctx, "linear_cross_entropy")
        if ctx.reduction == "none":
            grads = linear_cross_entropy_backward_none(*ctx.saved_tensors, ctx.opts, grad_output, ctx.need,
                                                       ctx.backend)
        else:
            grads = linear_cross_entropy_backward(ctx.saved_tensors, grad_output, ctx.dtypes)
        return (*grads, None, None, None, None, None, None)


def _linear_cross_entropy_triton(hidden, weight, bias, target, *, ignore_index=-100, label_smoothing=0.0,
                                 lse_square_scale=0.0, reduction="mean"):
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, target, ignore_index, label_smoothing,
                                            lse_square_scale, reduction, "triton")


def linear_cross_entropy(hidden, weight, bias, target, *, ignore_index=-100, label_smoothing=0.0,
                         lse_square_scale=0.0, reduction="mean", backend="auto"):
    """cross_entropy(hidden @ weight.T + bias, target): hidden (N, H), weight (V, H), bias (V,) or None.
    Chunked over rows on every backend; gradients are computed in the forward (see module docstring)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected hidden (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    _check_options("linear_cross_entropy", hidden.shape, target, ignore_index, label_smoothing,
                   lse_square_scale, reduction)
    _check_target_range("linear_cross_entropy", target, weight.shape[0], ignore_index)
    if dispatch.resolve("linear_cross_entropy", backend, hidden.device) == "triton":
        return dispatch.triton_impl("linear_cross_entropy")(
            hidden, weight, bias, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, reduction=reduction)
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, target, ignore_index, label_smoothing,
                                            lse_square_scale, reduction, "torch")


if triton is not None:
    dispatch.register_triton("cross_entropy", _cross_entropy_triton)
    dispatch.register_triton("linear_cross_entropy", _linear_cross_entropy_triton)
