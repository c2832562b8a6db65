"""The study: pretrained encoder -> (English intermediate task) -> English target task -> zero-shot
evaluation in every language, for each condition, with the best checkpoint chosen on English dev only.

Phases are a list. Each writes `<out>/<condition>/<phase>/` and hands the encoder on to the next through
a typed `Handoff`; target tasks each start from a copy of the encoder their condition produced.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from eval.synthetic import SyntheticWorld
from eval.tasks import TaskSpec
from models import Encoder, EncoderConfig, TaskModel, hf, make_head, preset
from models.config import moe_variant

from . import data
from .checkpoint import atomic_write_text, save_task_model
from .config import Config, ConfigError, FinetuneConfig, to_toml
from .evaluate import evaluate_retrieval, evaluate_task
from .pretrain import default_cache_dir, pretrain
from .progress import PhaseLogger, say
from .report import summarize, table
from .trainer import LoopConfig, bf16_supported, repeat, train_loop

BASELINE = "baseline"


@dataclass
class Handoff:
    """What one phase passes to the next: the encoder, and where its weights came from."""
    encoder: Encoder
    lineage: tuple[str, ...]


@dataclass
class Plan:
    world: SyntheticWorld
    conditions: list[str]
    targets: list[TaskSpec]
    languages: list[str]


def plan(cfg: Config) -> Plan:
    """Check everything the run will need before anything is written; raise ConfigError otherwise."""
    try:
        world = SyntheticWorld(cfg.world.seed, tuple(cfg.world.languages),
                               {k: tuple(v) for k, v in cfg.world.sizes.items()}, cfg.world.code_switch_rate,
                               cfg.world.sentence_switch_rate)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"world: {e}") from None
    try:
        encoder_config(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.model.name:
        try:  # fetch (or find) the model now, so a wrong name fails before anything is written
            hf.config_from_hf(json.loads((hf.resolve(cfg.model.name) / "config.json").read_text()))
        except (hf.ModelLoadError, OSError) as e:
            raise ConfigError(f"model.name: {e}") from None
    try:
        resolve_device(cfg.run.device)
    except RuntimeError as e:
        raise ConfigError(f"run.device: {e}") from None
    if cfg.run.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"run.precision: {cfg.run.precision!r}: expected auto, fp32 or bf16")
    if cfg.model.kernels not in ("auto", "torch", "triton"):
        raise ConfigError(f"model.kernels: {cfg.model.kernels!r}: expected auto, torch or triton")
    intermediate = [n for n, t in world.tasks.items() if t.role == "intermediate"]
    for c in cfg.protocol.conditions:
        if c != BASELINE and c not in intermediate:
            raise ConfigError(f"protocol.conditions: unknown condition {c!r}; expected {BASELINE!r} or an "
                              f"intermediate task: {', '.join(intermediate)}")
    if len(set(cfg.protocol.conditions)) != len(cfg.protocol.conditions) or not cfg.protocol.conditions:
        raise ConfigError("protocol.conditions: give at least one condition, each once")
    targets = [n for n, t in world.tasks.items() if t.role == "target"]
    for t in cfg.protocol.targets:
        if t not in targets:
            raise ConfigError(f"protocol.targets: unknown target task {t!r}; known: {', '.join(targets)}")
    languages = cfg.protocol.languages or list(world.codes)
    for lang in languages:
        if lang not in world.codes:
            raise ConfigError(f"protocol.languages: unknown language {lang!r}; the world has "
                              f"{', '.join(world.codes)} (set world.languages to change it)")
    if "en" not in languages:
        raise ConfigError("protocol.languages: must include 'en' (the transfer gap is measured against it)")
    for section in ("intermediate", "target"):
        ft: FinetuneConfig = getattr(cfg, section)
        known = {f.name for f in fields(FinetuneConfig)} - {"overrides"}
        for task, values in ft.overrides.items():
            if task not in world.tasks:
                raise ConfigError(f"{section}.overrides: unknown task {task!r}")
            if not isinstance(values, dict) or set(values) - known:
                raise ConfigError(f"{section}.overrides.{task}: expected a table with keys among {sorted(known)}")
        for task in [None, *ft.overrides]:
            one = ft.for_task(task) if task else ft
            where = f"{section}.overrides.{task}" if task else section
            if one.max_len < 8 or one.doc_stride < 1:
                raise ConfigError(f"{where}: need max_len >= 8 and doc_stride >= 1, got max_len {one.max_len}, "
                                  f"doc_stride {one.doc_stride}")
    for name in ("steps", "batch_size", "seq_len", "vocab_size", "documents_per_language"):
        if getattr(cfg.pretrain, name) < 1:
            raise ConfigError(f"pretrain.{name}: must be >= 1")
    return Plan(world, list(cfg.protocol.conditions), [world.tasks[t] for t in cfg.protocol.targets], languages)


def encoder_config(m) -> EncoderConfig:
    """The architecture pretrained from scratch: the preset, or its MoE variant (model.arch = "moe")."""
    if m.arch not in ("dense", "moe"):
        raise ValueError(f"arch {m.arch!r}: expected dense or moe")
    dense = preset(m.preset, moe_balance_coef=m.balance_coef, moe_z_coef=m.z_coef)
    if dense.num_experts:
        raise ValueError(f"preset {m.preset!r} is already sparse; choose a dense preset and model.arch = moe")
    if m.arch == "dense" or m.upcycle or m.name:
        return dense
    return moe_variant(replace(dense, moe_router=m.router), m.experts, m.top_k, m.match, m.moe_every)


def make_sparse(encoder: Encoder, m, seed: int) -> Encoder:
    """Sparse upcycling of a dense pretrained encoder (model.arch = moe with upcycle, or a HF model). The fresh
    routers are drawn from `seed`, not from whatever the global generator holds after a cached pretraining."""
    if m.arch != "moe" or encoder.cfg.num_experts:
        return encoder
    torch.manual_seed(seed)
    sparse = encoder.upcycled(m.experts, m.top_k, m.moe_every, m.router)
    return sparse.with_config(moe_balance_coef=m.balance_coef, moe_z_coef=m.z_coef)


def use_bf16(run, device: torch.device) -> bool:
    """run.precision: bf16 forces autocast, auto uses it where the hardware computes bf16 natively."""
    return run.precision == "bf16" or (run.precision == "auto" and bf16_supported(device))


def for_finetuning(encoder: Encoder, m, device: torch.device) -> Encoder:
    """The pretrained encoder with the fine-tuning dropout and kernel backend of `model`, on `device`."""
    return encoder.with_config(hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                               kernel_backend=m.kernels).to(device)


def retrieval_layer(cfg: Config, encoder: Encoder) -> int:
    """The hidden layer retrieval embeds with: eval.retrieval_layer, or the middle one (-1)."""
    return cfg.eval.retrieval_layer if cfg.eval.retrieval_layer >= 0 else encoder.cfg.num_layers // 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} but no CUDA device is available")
    return device


def phase_seed(*key) -> int:
    return int(hashlib.sha256("-".join(map(str, key)).encode()).hexdigest()[:8], 16)


class TaskData:
    """Rows and model inputs of (task, split, language), generated and tokenized once per run: every
    condition trains and scores on the same data."""

    def __init__(self, world: SyntheticWorld, tokenizer):
        self.world, self.tokenizer = world, tokenizer
        self._memo: dict = {}

    def get(self, task: TaskSpec, split: str, lang: str, ft: FinetuneConfig) -> tuple[list[dict], list[dict]]:
        key = (task.name, split, lang, ft.max_len, ft.doc_stride)
        if key not in self._memo:
            rows = self.world.load(task.name, split, lang)
            self._memo[key] = rows, data.featurize(task, rows, self.tokenizer, ft.max_len, ft.doc_stride)
        return self._memo[key]


def finetune(encoder: Encoder, task: TaskSpec, task_data: TaskData, ft: FinetuneConfig, seed: int,
             out: Path, console: bool, eval_batch: int, bf16: bool) -> tuple[TaskModel, dict]:
    """Train `task` on English train rows; keep the weights with the best English dev score."""
    torch.manual_seed(seed)
    tokenizer = task_data.tokenizer
    head = make_head(task.format, encoder.cfg, encoder, num_labels=len(task.labels))
    model = TaskModel(encoder, head.to(data.device_of(encoder)))
    _, train_feats = task_data.get(task, "train", "en", ft)
    dev_rows, dev_feats = task_data.get(task, "dev", "en", ft)
    per_epoch = data.num_batches(len(train_feats), ft.batch_size)
    steps = max(1, math.ceil(ft.epochs * per_epoch))
    rng = random.Random(seed)
    batches = repeat(lambda e: data.batches(train_feats, ft.batch_size, tokenizer.pad_token_id, rng))

    def dev_score() -> float:
        return evaluate_task(model, task, dev_rows, tokenizer, ft.max_len, eval_batch, "en", dev_feats)[0]["score"]

    loop = LoopConfig(steps=steps, lr=ft.lr, warmup_ratio=ft.warmup_ratio, weight_decay=ft.weight_decay,
                      grad_clip=ft.grad_clip, log_every=ft.log_every,
                      eval_every=max(1, per_epoch // max(1, ft.evals_per_epoch)), bf16=bf16)
    logger = PhaseLogger(f"{out.parent.name}/{out.name}", out / "metrics.jsonl", console)
    result = train_loop(model, batches, loop, logger, evaluate=dev_score)
    save_task_model(model, out / "checkpoint", {"task": task.name, "format": task.format,
                                                "labels": list(task.labels), "best_step": result.best_step,
                                                "dev_score_en": result.best_score}, tokenizer)
    return model, {"steps": steps, "best_step": result.best_step, "dev_en": result.best_score,
                   "seconds": round(result.seconds, 2), "train_rows": len(train_feats)}


def run_study(cfg: Config) -> dict:
    p = plan(cfg)  # raises ConfigError before anything is written
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.toml", to_toml(cfg))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    world, console = p.world, cfg.run.console

    device = resolve_device(cfg.run.device)
    bf16 = use_bf16(cfg.run, device)

    # Phase 1: the pretrained multilingual encoder: a Hugging Face model by name, or the stand-in for XLM-R
    # pretrained here with MLM on the synthetic corpus (cached by its config).
    if cfg.model.name:
        pretrained, tokenizer = hf.load_encoder(cfg.model.name), hf.load_tokenizer(cfg.model.name)
        pre_info = {"model": cfg.model.name, "cached": True}
        say(f"[pretrain] skipped: loaded {cfg.model.name} ({pretrained.cfg.num_parameters() / 1e6:.1f}M parameters)")
    else:
        cache = {"none": None, "": default_cache_dir()}.get(cfg.run.cache_dir, Path(cfg.run.cache_dir))
        pretrained, tokenizer, pre_info = pretrain(world, encoder_config(cfg.model), cfg.pretrain, cfg.run.seed,
                                                   cache, out / "pretrain", bf16, device)
    pretrained = make_sparse(pretrained, cfg.model, phase_seed(cfg.run.seed, "upcycle"))
    arch = pretrained.cfg
    pre_info |= {"parameters": arch.num_parameters(), "active_parameters": arch.active_parameters(),
                 "experts": arch.num_experts, "top_k": arch.moe_top_k if arch.num_experts else 0}
    pretrained = for_finetuning(pretrained, cfg.model, device)
    layer = retrieval_layer(cfg, pretrained)
    scores: dict = {}
    phases: dict = {"pretrain": pre_info}
    task_data = TaskData(world, tokenizer)

    for condition in p.conditions:
        say(f"== condition {condition} ==")
        handoff = Handoff(copy.deepcopy(pretrained), ("pretrained",))
        scores[condition] = {}
        if condition != BASELINE:  # Phase 2: English intermediate task
            task = world.tasks[condition]
            phase_dir = out / condition / f"intermediate-{task.name}"
            model, info = finetune(handoff.encoder, task, task_data, cfg.intermediate.for_task(task.name),
                                   phase_seed(cfg.run.seed, condition, task.name), phase_dir, console,
                                   cfg.eval.batch_size, bf16)
            handoff = Handoff(model.encoder, handoff.lineage + (task.name,))
            phases[f"{condition}/intermediate-{task.name}"] = info

        for task in p.targets:  # Phase 3: English target task, then zero-shot evaluation
            langs = [lang for lang in p.languages if lang in task.languages]
            phase_dir = out / condition / task.name
            preds_out = {}
            if task.needs_training:
                ft = cfg.target.for_task(task.name)
                model, info = finetune(copy.deepcopy(handoff.encoder), task, task_data, ft,
                                       phase_seed(cfg.run.seed, condition, task.name), phase_dir, console,
                                       cfg.eval.batch_size, bf16)
                for lang in langs:
                    rows, feats = task_data.get(task, "test", lang, ft)
                    result, preds_out[lang] = evaluate_task(model, task, rows, tokenizer, ft.max_len,
                                                            cfg.eval.batch_size, lang, feats)
                    scores[condition].setdefault(task.name, {})[lang] = result["score"]
            else:
                info = {"layer": layer}
                for lang in langs:
                    result, preds_out[lang] = evaluate_retrieval(handoff.encoder, task,
                                                                 world.load(task.name, "test", lang), tokenizer, layer,
                                                                 cfg.target.max_len, cfg.eval.batch_size)
                    scores[condition].setdefault(task.name, {})[lang] = result["score"]
            for lang, preds in preds_out.items():
                atomic_write_text(phase_dir / "predictions" / f"test-{lang}.json", json.dumps(preds))
            info["lineage"] = list(handoff.lineage)
            phases[f"{condition}/{task.name}"] = info
            row = scores[condition][task.name]
            say(f"[{condition}/{task.name}] " + " ".join(f"{lang} {v:.1f}" for lang, v in row.items()))

    results = {
        "scores": scores,
        "summary": summarize(scores, world.tasks),
        "chance": {t.name: t.chance for t in p.targets},
        "languages": {code: world.languages[code].spec.description for code in p.languages},
        "phases": phases,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": str(device), "threads": torch.get_num_threads(), "bf16": bf16},
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    report = table(results, world.tasks)
    atomic_write_text(out / "results.md", report)
    say(report)
    say(f"results: {out / 'results.json'} ({results['wall_seconds']:.0f} s)")
    return results
