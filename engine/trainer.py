"""The training loop shared by every phase (MLM pretraining, intermediate task, target task).

It reads top to bottom: build the optimizer and schedule, then for each step take a batch, forward,
backward, clip, step; log every `log_every` steps; evaluate every `eval_every` steps (and at the end)
and keep the best weights by the dev score. Nothing here knows about tasks or languages.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from models.moe import MoEFeedForward

from .data import device_of, to_device
from .progress import PhaseLogger


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # > 0: instead of warmup_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    bf16: bool = False  # autocast matmuls to bfloat16 (weights, optimizer state and losses stay fp32)


@dataclass
class LoopResult:
    steps: int
    best_score: float | None
    best_step: int | None
    final_loss: float
    seconds: float
    tokens: int


def decays(module: torch.nn.Module, name: str, p: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to parameter `name` of `module`: to weight matrices and embeddings, not to
    biases, norms or scalars (as BERT / XLM-R fine-tuning does). MoE expert biases are stacked (E, F) but are
    biases all the same: they are treated as the dense FFN's biases are."""
    if isinstance(module, MoEFeedForward):
        return name not in MoEFeedForward.BIASES
    return p.dim() >= 2 and not isinstance(module, torch.nn.LayerNorm)


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> tuple[torch.optim.Optimizer, object]:
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # a shared (tied) parameter is one parameter
                seen.add(id(p))
                (decay if decays(module, name, p) else no_decay).append(p)
    # The fused AdamW: one kernel over all parameters instead of a loop of small ops per parameter, which
    # matters for the tiny encoder's short CPU steps.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=fused or None)
    warmup = cfg.warmup_steps or max(1, int(cfg.warmup_ratio * cfg.steps))

    def factor(step: int) -> float:  # linear warmup, then linear decay to 0 (as transformers' linear schedule)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_loop(model: torch.nn.Module, batches: Iterator[dict], cfg: LoopConfig, logger: PhaseLogger,
               evaluate: Callable[[], float | tuple[float, dict]] | None = None) -> LoopResult:
    """Train for cfg.steps batches drawn from `batches`. With `evaluate` (higher is better; it may also return
    a dict of parts to log, e.g. each task's dev score), the best weights seen at an evaluation point are
    restored at the end. A multi-task model names each batch's task (out["task"]): the per-task mean losses
    are logged too. The loss is read back to the host only at log steps, so a GPU is not synchronised every
    step."""
    opt, sched = make_optimizer(model, cfg)
    device = device_of(model)
    best_score, best_step, best_state = -math.inf, None, None
    start, tokens, loss_value = time.perf_counter(), 0, float("nan")
    window_loss, window_n = torch.zeros((), device=device), 0
    window_aux: dict[str, torch.Tensor] = {}  # MoE models: task loss, balance loss, z-loss
    window_tasks: dict[str, list] = {}  # multi-task models: task -> [loss sum, batches]
    logger.start(cfg.steps)
    for step in range(1, cfg.steps + 1):
        model.train()
        batch = next(batches)
        tokens += int(batch["lengths"].sum())  # counted on the host copy: real tokens, no padding
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(batch)
        loss = out["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        opt.step()
        sched.step()
        window_loss, window_n = window_loss + loss.detach().float(), window_n + 1
        for key in ("task_loss", "balance_loss", "z_loss"):
            if key in out:
                window_aux[key] = window_aux.get(key, 0.0) + out[key].detach().float()
        if "task" in out:
            total = window_tasks.setdefault(out["task"], [0.0, 0])
            total[0], total[1] = total[0] + out.get("task_loss", out["loss"]).detach().float(), total[1] + 1
        logger.advance()
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_value = window_loss.item() / window_n
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{logger.phase}: loss became {loss_value} by step {step}")
            elapsed = time.perf_counter() - start
            extra = {k: round(v.item() / window_n, 6) for k, v in window_aux.items()}
            extra |= {f"loss_{task}": round(float(t[0]) / t[1], 6) for task, t in window_tasks.items()}
            router = getattr(getattr(model, "encoder", None), "router_stats", dict)()
            if router:
                extra |= {"max_expert_load": round(router["max_load"], 3), "dropped": router["dropped"],
                          "tokens_per_expert": router["tokens_per_expert"]}
            logger.log(step=step, loss=loss_value, lr=sched.get_last_lr()[0],
                       tokens_per_s=tokens / max(elapsed, 1e-9), elapsed_s=elapsed, **extra)
            window_loss, window_n, window_aux, window_tasks = torch.zeros((), device=device), 0, {}, {}
        if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            score = evaluate()
            score, parts = score if isinstance(score, tuple) else (score, {})
            improved = score > best_score
            if improved:
                best_score, best_step = score, step
                best_state = copy.deepcopy(model.state_dict())
            logger.log(step=step, dev_score=score, **{f"dev_{k}": v for k, v in parts.items()}, best=improved)
    logger.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return LoopResult(cfg.steps, best_score if best_step else None, best_step, loss_value,
                      time.perf_counter() - start, tokens)


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off where the hardware has bf16 arithmetic (Ampere+ GPUs; CPUs with
    AVX512-BF16 or AMX); elsewhere it is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def repeat(make_epoch: Callable[[int], Iterator[dict]]) -> Iterator[dict]:
    """An endless stream of batches: epoch 0, epoch 1, ... each made fresh (reshuffled)."""
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1
