"""The training loop shared by every phase (MLM pretraining, intermediate task, target task).

It reads top to bottom: build the optimizer and schedule, then for each step take a batch, forward,
backward, clip, step; log every `log_every` steps; evaluate every `eval_every` steps (and at the end)
and keep the best weights by the dev score. Nothing here knows about tasks or languages.

Never lose work: with `checkpoints`, the whole training state (model, optimizer, schedule, step, best dev
score, the log's length, every RNG and the data position) is written every `checkpoint_every` steps and at
the end, atomically; a loop given a folder that holds one continues from it, and on CPU gives bit for bit
what the uninterrupted loop gives. A step whose loss or gradient is not finite is skipped (no update) and
counted; `max_skipped` of them in a row stop the phase with NonFiniteTraining, the last checkpoint intact.
"""
from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from models import IGNORE
from models.moe import MoEFeedForward

from . import distributed
from .data import device_of, to_device
from .progress import PhaseLogger, say


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
    checkpoint_every: int = 0  # with checkpoints: every this many steps (0: at the end only)
    max_skipped: int = 10  # consecutive non-finite steps that stop the phase


@dataclass
class LoopResult:
    steps: int
    best_score: float | None
    best_step: int | None
    final_loss: float
    seconds: float
    tokens: int
    skipped: int = 0
    resumed_from: int | None = None
    best_parts: dict | None = None  # the parts `evaluate` returned with the best score (every rank has them)


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Checkpoints:
    """A phase's training state: `<folder>/step-<n>.pt` (written to a temporary file, then renamed; the
    newest `keep` kept; FSDP2 runs add the shards in step-<n>.dcp/) and `<folder>/best-<n>.pt` (the best weights
    on dev, reached at step n). Read with weights_only=True; a file that cannot be read is reported by path and
    the one before it is used."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = Path(folder), max(1, keep)

    def _steps(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.folder.glob("step-*.pt")
                 if (m := re.fullmatch(r"step-(\d+)\.pt", p.name))]
        return sorted(found)

    def latest(self) -> tuple[dict, Path] | None:
        """The newest readable checkpoint. Every rank calls it: rank 0 chooses and every rank loads its choice,
        memory-mapped (under DDP each rank would otherwise hold a whole copy of model and optimizer states in
        host memory at once); ranks choosing by themselves could resume from different steps."""
        d = distributed.current()
        chosen, state = None, None
        if d.is_main:
            for _, path in reversed(self._steps()):
                try:
                    state, chosen = _load(path), path
                    break
                except Exception as e:  # truncated, corrupt, or not a checkpoint: the previous one is used
                    say(f"[checkpoint] {path} cannot be read ({type(e).__name__}: {e}); using the one before it")
        chosen = distributed.broadcast_object(None if chosen is None else str(chosen))
        if chosen is None:
            return None
        return (state if d.is_main else _load(Path(chosen))), Path(chosen)

    def _write(self, path: Path, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save(self, step: int, state: dict, model: torch.nn.Module, trained: torch.nn.Module, opt) -> Path:
        """Every rank calls it. One process or DDP: rank 0 writes the model's and optimizer's state into the .pt
        file; FSDP2: every rank writes its shards with torch.distributed.checkpoint (step-<n>.dcp/, readable
        at another world size) and the .pt file names it. Then the newest `keep` are kept."""
        d = distributed.current()
        path = self.folder / f"step-{step:08d}.pt"
        if d.active and d.mode == "fsdp2":
            state = state | {"dcp": distributed.save_sharded(trained, opt, self.folder / f"step-{step:08d}.dcp")}
        else:
            state = state | {"model": model.state_dict(), "optimizer": opt.state_dict()}
        if d.is_main:
            self._write(path, state)
            self._prune(step, state)
        distributed.barrier()
        return path

    def load_weights(self, state: dict, path: Path, model: torch.nn.Module, trained: torch.nn.Module, opt) -> None:
        """The model's and optimizer's state from a checkpoint, whatever the mode that wrote it."""
        d = distributed.current()
        if "dcp" in state:
            distributed.load_sharded(trained if (d.active and d.mode == "fsdp2") else model, opt,
                                     path.parent / state["dcp"])
            return
        if d.active and d.mode == "fsdp2":
            raise ValueError(f"{path}: written without FSDP2 (whole model and optimizer states); resume it with "
                             "run.distributed = ddp or in one process")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    def _prune(self, step: int, state: dict) -> None:
        for _, old in self._steps()[:-self.keep]:
            old.unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(".dcp"), ignore_errors=True)
        kept = {n for n, _ in self._steps()}
        for shards in self.folder.glob("step-*.dcp"):  # a run killed between a .dcp and its .pt left shards alone
            if (m := re.fullmatch(r"step-(\d+)\.dcp", shards.name)) and int(m.group(1)) not in kept \
                    and int(m.group(1)) <= step:
                shutil.rmtree(shards, ignore_errors=True)
        # best weights still needed: those a kept checkpoint names (index.json: step -> best step), and any
        # newer than the newest checkpoint
        index_path = self.folder / "index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        index = {k: v for k, v in index.items() if int(k) in {n for n, _ in self._steps()}}
        index[str(step)] = state["trainer"]["best_step"]
        tmp = index_path.with_name(".index.json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
        needed = set(index.values())
        for best in self.folder.glob("best-*.pt"):
            number = int(best.stem.split("-")[1])
            if number not in needed and number <= step:
                best.unlink(missing_ok=True)
        for tmp in self.folder.glob(".*.tmp"):  # left by a process killed while writing
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def save_best(self, step: int, model_state: dict) -> None:
        """The best weights so far, by the step they were reached at: a checkpoint names the ones it had."""
        if distributed.current().is_main:
            self._write(self.folder / f"best-{step:08d}.pt", model_state)
        distributed.barrier()

    def load_best(self, step: int) -> dict:
        return torch.load(self.folder / f"best-{step:08d}.pt", map_location="cpu", weights_only=True)


def _load(path: Path) -> dict:
    # mmap: tensors are read as pages are touched and shared by the ranks of a node (a private mapping: the
    # optimizer's in-place updates never write to the file)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # this rank's own device only (torch.cuda.set_device chose it): the state of every visible GPU could not
        # be restored where fewer are visible (a resume on 4 GPUs of a run on 8, or one GPU per SLURM task)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _Window:
    """Sums between two log steps: the loss, MoE auxiliary losses, per-task losses (multi-task models)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss, self.n, self.skipped = torch.zeros((), device=self.device), 0, 0
        self.aux: dict[str, torch.Tensor] = {}
        self.tasks: dict[str, list] = {}

    def add(self, out: dict) -> None:
        self.loss, self.n = self.loss + out["loss"].detach().float(), self.n + 1
        for key in ("task_loss", "balance_loss", "z_loss"):
            if key in out:
                self.aux[key] = self.aux.get(key, 0.0) + out[key].detach().float()
        if "task" in out:
            total = self.tasks.setdefault(out["task"], [0.0, 0])
            total[0], total[1] = total[0] + out.get("task_loss", out["loss"]).detach().float(), total[1] + 1

    def state(self) -> dict:
        return {"loss": self.loss, "n": self.n, "skipped": self.skipped, "aux": dict(self.aux),
                "tasks": {t: list(v) for t, v in self.tasks.items()}}

    def restore(self, state: dict) -> None:
        self.loss, self.n, self.skipped = state["loss"].to(self.device), state["n"], state["skipped"]
        self.aux = {k: v.to(self.device) for k, v in state["aux"].items()}
        self.tasks = {t: [v[0].to(self.device) if torch.is_tensor(v[0]) else v[0], v[1]]
                      for t, v in state["tasks"].items()}


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


def loss_count(batch: dict) -> int:
    """The number of terms a batch's loss averages over: labelled tokens (tagging, MLM) or examples (pair,
    choice, dual encoder; QA: questions, start and end averaged)."""
    if "start_positions" in batch:
        return len(batch["start_positions"])
    labels = batch.get("labels")
    if labels is None:
        return len(batch["lengths"])
    return int((labels != IGNORE).sum()) if torch.is_tensor(labels) else len(labels)


def _forward_backward(trained: torch.nn.Module, item, d, device, bf16: bool) -> tuple[dict, int]:
    """Forward and backward of one step's data: a batch, or this rank's micro-batches of the global batch.
    Every micro-batch's mean loss is weighted by its share of the global number of loss terms (all
    micro-batches of all ranks), so the gradient is the global batch's mean, whatever the split. Returns
    the loss parts averaged the same way, and the real tokens of the global batch."""
    micro = item if isinstance(item, list) else [item]
    if len(micro) == 1 and not d.active:  # one process, one batch: the plain step
        batch = micro[0]
        tokens = int(batch["lengths"].sum())  # counted on the host copy: real tokens, no padding
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = trained(to_device(batch, device))
        out["loss"].backward()
        return out, tokens
    counts = [0 if m.get("dummy") else loss_count(m) for m in micro]
    local = torch.tensor([float(sum(counts)), float(sum(int(m["lengths"].sum()) for m in micro if not m.get("dummy")))],
                         dtype=torch.float64, device=device)
    n_global, tokens = distributed.all_sum(local).tolist()
    sums: dict[str, torch.Tensor] = {}
    task = None
    for j, batch in enumerate(micro):
        with distributed.gradient_sync(trained, last=j == len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = trained(to_device(batch, device))
            # DDP and FSDP2 average gradients over ranks: the world size undoes it, the counts weight the terms
            (out["loss"] * (counts[j] * d.world / max(n_global, 1.0))).backward()
        for key in ("loss", "task_loss", "balance_loss", "z_loss"):
            if key in out:
                sums[key] = sums.get(key, 0.0) + out[key].detach().float() * counts[j]
        task = out.get("task", task)
    merged = {k: distributed.all_sum(v) / max(n_global, 1.0) for k, v in sums.items()}
    if task is not None:
        merged["task"] = task
    return merged, int(tokens)


def train_loop(model: torch.nn.Module, batches: Iterator[dict], cfg: LoopConfig, logger: PhaseLogger,
               evaluate: Callable[[], float | tuple[float, dict]] | None = None,
               checkpoints: Checkpoints | None = None) -> LoopResult:
    """Train for cfg.steps batches drawn from `batches`. With `evaluate` (higher is better; it may also return
    a dict of parts to log, e.g. each task's dev score), the best weights seen at an evaluation point are
    restored at the end. A multi-task model names each batch's task (out["task"]): the per-task mean losses
    are logged too. With `checkpoints` (and `batches` with state() / restore()), the loop saves its state and
    continues from the newest one it finds (see the module docstring)."""
    d = distributed.current()
    device = device_of(model)
    # DDP wraps `model`; FSDP2 shards a copy of it in place, and `model` takes the copy's weights (gathered
    # whole) before every evaluation and at the end, so that evaluation and everything after the loop see a
    # plain module
    sharded = d.active and d.mode == "fsdp2"
    trained = distributed.wrap(copy.deepcopy(model) if sharded else model, d, cfg.bf16)
    opt, sched = make_optimizer(trained, cfg)

    def sync_model():
        if sharded:
            model.load_state_dict(distributed.full_model_state(trained))
    best_score, best_step, best_state, best_parts = -math.inf, None, None, None
    first, tokens, loss_value, elapsed0, skipped, in_a_row, resumed = 1, 0, float("nan"), 0.0, 0, 0, None
    window = _Window(device)
    found = checkpoints.latest() if checkpoints is not None else None
    if found is not None:
        state, path = found
        checkpoints.load_weights(state, path, model, trained, opt)
        sched.load_state_dict(state["scheduler"])
        t = state["trainer"]
        first, tokens, elapsed0 = t["step"] + 1, t["tokens"], t["elapsed"]
        skipped, in_a_row = t["skipped"], t["in_a_row"]
        best_step, loss_value = t["best_step"], t["loss_value"]
        best_score = t["best_score"] if best_step is not None else -math.inf
        best_parts = t.get("best_parts")
        best_state = checkpoints.load_best(best_step) if best_step is not None else None
        window.restore(t["window"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[d.rank % len(rngs)])  # another world size: the ranks' dropout streams differ
        batches.restore(state["data"])
        logger.truncate(t["log_bytes"])  # lines logged after the checkpoint are written again
        resumed = t["step"]
        say(f"[{logger.phase}] resuming after step {resumed} from {path}")
    start = time.perf_counter() - elapsed0
    logger.start(cfg.steps, done=first - 1)
    for step in range(first, cfg.steps + 1):
        trained.train()
        opt.zero_grad(set_to_none=True)
        out, step_tokens = _forward_backward(trained, next(batches), d, device, cfg.bf16)
        tokens += step_tokens
        norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                              foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
            norm = norm.full_tensor()
        finite = (torch.isfinite(out["loss"].detach()) & torch.isfinite(norm)).to(torch.int32)
        if bool(distributed.all_min(finite)):  # one host sync per step; every rank skips together
            opt.step()
            window.add(out)
            in_a_row = 0
        else:  # no update from a non-finite loss or gradient
            opt.zero_grad(set_to_none=True)
            skipped, in_a_row, window.skipped = skipped + 1, in_a_row + 1, window.skipped + 1
            if in_a_row >= cfg.max_skipped:
                where = f"; the last checkpoint is in {checkpoints.folder}" if checkpoints is not None else ""
                raise NonFiniteTraining(f"{logger.phase}: {in_a_row} steps in a row (up to step {step}) had a "
                                        f"non-finite loss or gradient; stopping{where}. Lower the learning rate, "
                                        "or train in fp32 (run.precision = fp32)")
        sched.step()
        logger.advance()
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_value = window.loss.item() / window.n if window.n else float("nan")
            elapsed = time.perf_counter() - start
            extra = {k: round(v.item() / window.n, 6) for k, v in window.aux.items()}
            extra |= {f"loss_{task}": round(float(t[0]) / t[1], 6) for task, t in window.tasks.items()}
            if window.skipped:
                extra["skipped_steps"] = window.skipped
            # from the module that trains (under FSDP2 a copy of `model`, whose own stats are evaluation's or
            # none), summed over the ranks' last micro-batches
            encoder = getattr(getattr(trained, "module", trained), "encoder", None)  # .module: DDP's wrapper
            router = encoder.router_stats(distributed.all_sum) if hasattr(encoder, "router_stats") else {}
            if router:
                extra |= {"max_expert_load": round(router["max_load"], 3), "dropped": router["dropped"],
                          "tokens_per_expert": router["tokens_per_expert"]}
            logger.log(step=step, loss=loss_value, lr=sched.get_last_lr()[0],
                       tokens_per_s=tokens / max(elapsed, 1e-9), elapsed_s=elapsed, **extra)
            window.reset()
        if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            sync_model()
            # rank 0 evaluates (on the plain model); every rank takes its score, so all keep the same best weights
            score = distributed.broadcast_object(evaluate() if d.is_main else None)
            score, parts = score if isinstance(score, tuple) else (score, {})
            improved = score > best_score
            if improved:
                best_score, best_step, best_parts = score, step, parts
                best_state = copy.deepcopy(model.state_dict())
                if checkpoints is not None:
                    checkpoints.save_best(step, best_state)
            logger.log(step=step, dev_score=score, **{f"dev_{k}": v for k, v in parts.items()}, best=improved)
        if checkpoints is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                                        or step == cfg.steps):
            rngs = distributed.gather_objects(rng_state())
            checkpoints.save(step, {
                "scheduler": sched.state_dict(),
                "trainer": {"step": step, "tokens": tokens, "elapsed": time.perf_counter() - start,
                            "skipped": skipped, "in_a_row": in_a_row, "best_step": best_step,
                            "best_score": best_score if best_step is not None else None, "best_parts": best_parts,
                            "loss_value": loss_value,
                            "window": window.state(), "log_bytes": logger.size()},
                "rng": rngs if d.active else rngs[0], "data": batches.state()}, model, trained, opt)
    logger.close()
    sync_model()
    if best_state is not None:
        model.load_state_dict(best_state)
    return LoopResult(cfg.steps, best_score if best_step else None, best_step, loss_value,
                      time.perf_counter() - start, tokens, skipped, resumed, best_parts)


def hold_freed_memory() -> bool:
    """Keep memory that CPU training frees for its next step instead of handing it back to the OS.

    A training step frees and re-allocates the same large activation buffers every time. glibc serves big
    blocks with fresh mmaps and trims the top of its heap, so each step page-faults its activations in again
    (the `minor_faults_per_step` of bench.throughput's CPU rows). A fixed mmap threshold of 32 MiB (glibc's
    largest) and a 1 GiB trim threshold make freed blocks reused; the resident set then stays at the run's peak.
    Returns False, changing nothing, where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


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
