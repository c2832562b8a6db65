"""Multi-task intermediate training (Phang et al. 2020's multi-task condition) and continued multilingual MLM
during intermediate training, as one phase: several tasks, each with its own head, on one encoder.

Each step trains one task's batch; the task is drawn with probability proportional to its number of training
examples (capped at `multitask.cap`, "examples-proportional mixing"), or to examples ** (1 / temperature)
("temperature sampling"). `mlm` in the mix is masked LM on multilingual text (the synthetic corpus, or
`<multitask.mlm_dir>/<lang>.txt`) through the fused linear cross-entropy, drawn on `multitask.mlm_ratio` of
the steps. The phase runs as many steps as its tasks' epochs of batches (plus the MLM share); the checkpoint
kept is the one with the best mean English dev score over its tasks (MLM has none), and each task's loss and
dev score are logged. Then the heads are dropped and the encoder handed on.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from eval.tasks import TaskSpec
from models import Encoder, TaskModel, hf, make_head

from . import data
from .config import FinetuneConfig, MultitaskConfig
from .evaluate import evaluate_task
from .pretrain import mlm_stream, pack_texts
from .progress import PhaseLogger
from .trainer import Checkpoints, LoopConfig, train_loop

MLM = "mlm"
SAMPLINGS = ("proportional", "temperature")


def mixture_weights(examples: dict[str, int], sampling: str, cap: int = 0, temperature: float = 1.0,
                    mlm_ratio: float = 0.0) -> dict[str, float]:
    """Sampling probability of each task from its number of training examples; MLM, when present, takes
    mlm_ratio of the mass and the tasks share the rest."""
    tasks = {t: n for t, n in examples.items() if t != MLM}
    if sampling == "proportional":
        raw = {t: float(min(n, cap) if cap else n) for t, n in tasks.items()}
    elif sampling == "temperature":
        raw = {t: float(n) ** (1.0 / temperature) for t, n in tasks.items()}
    else:
        raise ValueError(f"multitask.sampling {sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    total = sum(raw.values())
    share = 1.0 - (mlm_ratio if MLM in examples else 0.0)
    weights = {t: share * w / total for t, w in raw.items()}
    if MLM in examples:
        weights[MLM] = mlm_ratio
    return weights


class MultiTaskModel(nn.Module):
    """One encoder and a head per task; a batch names its task (`batch["task"]`) and goes through that head."""

    def __init__(self, encoder: Encoder, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        # views: encoder + one head, for forward and evaluation (not registered: they hold no state of their own)
        self.views = {t: TaskModel(encoder, head, initialise=False) for t, head in heads.items()}

    def forward(self, batch: dict) -> dict:
        out = self.views[batch["task"]](batch)
        out["task"] = batch["task"]
        return out


def mlm_head_from(model_name: str, encoder: Encoder) -> nn.Module:
    """The MLM head of a Hugging Face checkpoint (XLM-R and BERT checkpoints carry theirs), tied to `encoder`'s
    embeddings; a fresh one where the checkpoint has none."""
    head = make_head("mlm", encoder.cfg, encoder)
    TaskModel(encoder, head)  # initialises it (BERT's initialisation)
    if model_name:
        loaded, report = hf.load_task_model(model_name, kind="mlm")
        if not any(name.startswith("head.") for name in report.fresh):
            head.load_state_dict(loaded.head.state_dict())
    return head


def train_multitask(encoder: Encoder, tasks: list[TaskSpec], task_data, ft_of, mt: MultitaskConfig,
                    mlm_texts: dict[str, list[str]] | None, model_name: str, seed: int, out: Path, run,
                    eval_batch: int, bf16: bool) -> tuple[MultiTaskModel, dict]:
    """Train `tasks` (and MLM when mlm_texts is given) on one encoder; `ft_of(task)` is the task's
    FinetuneConfig. Returns the model with the best mean English dev score and the phase info."""
    tokenizer = task_data.tokenizer
    heads, streams, examples, feats_of, ft_by = {}, {}, {}, {}, {}
    for i, task in enumerate(tasks):
        ft: FinetuneConfig = ft_of(task.name)
        ft_by[task.name] = ft
        torch.manual_seed(seed + 1 + i)
        head = make_head(task.head, encoder.cfg, encoder, num_labels=len(task.labels))
        TaskModel(encoder, head)  # initialises the head
        heads[task.name] = head.to(data.device_of(encoder))
        _, train = task_data.get(task, "train", "en", ft)
        feats_of[task.name] = task_data.get(task, "dev", "en", ft)
        examples[task.name] = len(train)
        streams[task.name] = data.training_stream(train, ft.batch_size, tokenizer.pad_token_id, seed + 1 + i)
    first = ft_by[tasks[0].name]
    if mlm_texts is not None:
        heads[MLM] = mlm_head_from(model_name, encoder).to(data.device_of(encoder))
        sequences = pack_texts(mlm_texts, tokenizer, mt.mlm_seq_len)
        if len(sequences) < first.batch_size:
            raise ValueError(f"multitask: the MLM text gives {len(sequences)} sequences of {mt.mlm_seq_len} tokens, "
                             f"fewer than one batch of {first.batch_size}: give more text (multitask.mlm_lines)")
        streams[MLM] = mlm_stream(sequences, tokenizer, first.batch_size, mt.mlm_mask_prob, seed)
        examples[MLM] = 0
    model = MultiTaskModel(encoder, heads)
    weights = mixture_weights(examples, mt.sampling, mt.cap, mt.temperature, mt.mlm_ratio)
    per_epoch = sum(data.num_batches(examples[t.name], ft_by[t.name].batch_size) for t in tasks)
    task_share = 1.0 - weights.get(MLM, 0.0)
    steps = max(1, math.ceil(first.epochs * per_epoch / task_share))
    mixed = data.MixtureStream(streams, weights, seed)

    def dev_scores():  # rank 0 alone evaluates; train_loop hands every rank the score and its parts
        scores = {}
        for task in tasks:
            rows, feats = feats_of[task.name]
            scores[task.name] = evaluate_task(model.views[task.name], task, rows, tokenizer, ft_by[task.name].max_len,
                                              eval_batch, "en", feats)[0]["score"]
        return sum(scores.values()) / len(scores), scores

    torch.manual_seed(seed)
    loop = LoopConfig(steps=steps, lr=first.lr, warmup_ratio=first.warmup_ratio, warmup_steps=first.warmup_steps,
                      weight_decay=first.weight_decay, grad_clip=first.grad_clip, log_every=first.log_every,
                      eval_every=max(1, per_epoch // first.evals_per_epoch), bf16=bf16,
                      checkpoint_every=run.checkpoint_every, max_skipped=run.max_skipped_steps)
    checkpoints = Checkpoints(out / "state", run.keep_checkpoints)
    logger = PhaseLogger(f"{out.parent.name}/{out.name}", out / "metrics.jsonl", run.console, run.tensorboard)
    result = train_loop(model, mixed, loop, logger, evaluate=dev_scores, checkpoints=checkpoints)
    return model, {"steps": steps, "best_step": result.best_step, "dev_en": result.best_score,
                   "dev_en_by_task": result.best_parts, "seconds": round(result.seconds, 2), "tokens": result.tokens,
                   "train_rows": examples, "mixture": weights, "seed": seed, "skipped_steps": result.skipped}


def read_mlm_texts(mt: MultitaskConfig, languages: list[str], world=None) -> dict[str, list[str]]:
    """The continued-MLM text per language: the synthetic corpus (a stream apart from pretraining's), or
    `<mlm_dir>/<lang>.txt` (one sentence or document per line; the first `mlm_lines` non-empty lines)."""
    if world is not None and not mt.mlm_dir:
        return {lang: world.corpus(lang, mt.mlm_lines, stream=2) for lang in languages}
    out = {}
    for lang in languages:
        path = Path(mt.mlm_dir) / f"{lang}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"multitask.mlm_dir: {path} is missing (one sentence or document per line, per "
                                    "language)")
        lines = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line.strip())
                    if len(lines) >= mt.mlm_lines:
                        break
        if not lines:
            raise ValueError(f"multitask.mlm_dir: {path} has no text")
        out[lang] = lines
    return out
