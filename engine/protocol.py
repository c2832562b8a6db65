"""The study: pretrained encoder -> (English intermediate task) -> English target task -> zero-shot
evaluation in every language, for each condition, with the best checkpoint chosen on English dev only.

One code path for every data source (engine.sources: the synthetic world, XTREME, XTREME-R). Phases are a
list. Each writes `<out>/<condition>/<phase>/` and hands the encoder on to the next through a typed `Handoff`;
target tasks each start from a copy of the encoder their condition produced. Predictions and gold labels are
written in the leaderboard layout, `<out>/<condition>/{predictions,labels}/<task>/test-<lang>.<ext>`, and
scored from those files by eval.score, so `python -m eval.score` on them gives the numbers of results.json.

Paired science: a target task gets the same fine-tuning seed (head initialisation, batch order, dropout) in
every condition, so a condition's delta against the baseline is a paired comparison; `run.seed` varies it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from eval import analysis, loaders
from eval.run import finetuned_files, run_bucc, run_ranking, run_tatoeba
from eval.score import evaluate as score_folders
from eval.suites import INTERMEDIATE_TASKS, TARGET_TASKS
from eval.synthetic import DEFAULT_LANGUAGES, SyntheticWorld
from eval.synthetic.world import task_specs
from eval.tasks import TaskSpec
from models import Encoder, EncoderConfig, TaskModel, hf, make_head, preset
from models.config import HUB_PRESETS, MATCHES, ROUTERS, moe_variant, upcycled_config

from . import data, distributed
from .checkpoint import atomic_write_text, load_exported, save_task_model
from .config import Config, ConfigError, FinetuneConfig, load, to_toml
from .evaluate import dual_encoder_embedders, embedder, evaluate_ranking, evaluate_task, predict
from .featcache import FeatureCache
from .multitask import MLM, SAMPLINGS, read_mlm_texts, train_multitask
from .pretrain import default_cache_dir, pretrain
from .progress import PhaseLogger, say
from .report import summarize, table
from .sources import SUITE_NAMES, Source, Training, make_source, subset
from .trainer import Checkpoints, LoopConfig, bf16_supported, hold_freed_memory, train_loop

BASELINE = "baseline"
KNOWN_TASKS = set(TARGET_TASKS) | set(INTERMEDIATE_TASKS) | set(task_specs(DEFAULT_LANGUAGES))
RETRIEVAL_POOLING = "mean"  # XTREME's Tatoeba pooling (layer: eval.retrieval_layer)


@dataclass
class Handoff:
    """What one phase passes to the next: the encoder, and where its weights came from."""
    encoder: Encoder
    lineage: tuple[str, ...]


@dataclass
class TargetGroup:
    """Fine-tuned targets that share one English training (XQuAD and MLQA: one SQuAD v1.1 model)."""
    training: Training
    targets: list[TaskSpec]


@dataclass
class Plan:
    source: Source
    conditions: list[str]
    intermediate: dict[str, list[str]]  # condition -> its intermediate tasks ("mlm": continued masked LM)
    targets: list[TaskSpec]
    languages: dict[str, list[str]]  # target -> its evaluation languages
    groups: list[TargetGroup]  # the fine-tuned targets, in target order
    retrieval: list[TaskSpec]  # targets that embed with the condition's encoder, no training
    num_layers: int  # depth of the encoder, for layer options

    @property
    def world(self) -> SyntheticWorld | None:
        return self.source.world

    def training_rows(self) -> list[tuple[str, str]]:
        """(task, split) of every English train / dev split the run trains or selects on."""
        tasks = [t for c in self.conditions for t in self.intermediate[c] if t != MLM]
        tasks += [stage for g in self.groups for stage in g.training.stages]
        return [(t, split) for t in dict.fromkeys(tasks) for split in ("train", "dev")]

    def test_rows(self) -> list[tuple[str, str, str]]:
        """(task, split, language) of every evaluation split; BUCC also tunes its threshold on dev."""
        out = [(t.name, "test", lang) for t in self.targets for lang in self.languages[t.name]]
        out += [(t.name, "dev", lang) for t in self.targets if t.format == "mining" for lang in self.languages[t.name]]
        return out


# ----- planning: everything checked before anything is written --------------------------------------------
def plan(cfg: Config) -> Plan:
    """Check the configuration and everything the run will need that does not take data; raise ConfigError."""
    if cfg.protocol.suite not in SUITE_NAMES:
        raise ConfigError(f"protocol.suite: {cfg.protocol.suite!r}: expected one of {', '.join(SUITE_NAMES)}")
    world = None
    if cfg.protocol.suite == "synthetic":
        try:
            world = SyntheticWorld(cfg.world.seed, tuple(cfg.world.languages),
                                   {k: tuple(v) for k, v in cfg.world.sizes.items()}, cfg.world.code_switch_rate,
                                   cfg.world.sentence_switch_rate)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"world: {e}") from None
    elif not cfg.model.name:
        raise ConfigError(f"protocol.suite {cfg.protocol.suite}: needs a pretrained multilingual encoder, "
                          "model.name (a Hugging Face name such as xlm-roberta-large, or a local folder); "
                          "pretraining from scratch (model.preset) runs on the synthetic suite only")
    source = make_source(cfg.protocol.suite, world, cfg.data.dir)
    if cfg.data.dir and not Path(cfg.data.dir).is_dir():
        raise ConfigError(f"data.dir: {cfg.data.dir} is not a folder")
    num_layers = _check_model(cfg)
    for key in ("max_train_rows", "max_dev_rows"):
        if getattr(cfg.data, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0 (0 = all rows), got {getattr(cfg.data, key)}")

    conditions = list(cfg.protocol.conditions or source.default_conditions)
    if len(set(conditions)) != len(conditions):
        raise ConfigError("protocol.conditions: give each condition once")
    intermediate = {c: condition_tasks(c, cfg, source) for c in conditions}
    _check_multitask(cfg, source, intermediate)
    names = list(cfg.protocol.targets or source.targets)
    for t in names:
        if t not in source.targets:
            raise ConfigError(f"protocol.targets: unknown target task {t!r} in {source.name}; known: "
                              f"{', '.join(source.targets)}")
    if len(set(names)) != len(names) or not names:
        raise ConfigError("protocol.targets: give at least one target task, each once")
    targets = [source.task(t) for t in names]
    languages = _languages(cfg, source, targets)

    groups: dict[str, TargetGroup] = {}
    for t in targets:
        if t.needs_training:
            training = source.training(t.name)
            groups.setdefault(training.key, TargetGroup(training, [])).targets.append(t)
    retrieval = [t for t in targets if not t.needs_training]
    p = Plan(source, conditions, intermediate, targets, languages, list(groups.values()), retrieval, num_layers)
    _check_finetuning(cfg, p)
    layer = cfg.eval.retrieval_layer
    if not (layer == -1 or 0 <= layer <= num_layers):
        raise ConfigError(f"eval.retrieval_layer: {layer}: expected -1 (the middle layer) or 0..{num_layers} "
                          f"(0 = embeddings; the encoder has {num_layers} layers)")
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size: must be >= 1, got {cfg.eval.batch_size}")
    for name in ("steps", "batch_size", "seq_len", "vocab_size", "documents_per_language", "micro_batches",
                 "log_every"):
        if getattr(cfg.pretrain, name) < 1:
            raise ConfigError(f"pretrain.{name}: must be >= 1")
    if not 0 < cfg.pretrain.mask_prob < 1 or cfg.pretrain.lr <= 0:
        raise ConfigError(f"pretrain.mask_prob must be in (0, 1) and pretrain.lr > 0, got {cfg.pretrain.mask_prob}, "
                          f"{cfg.pretrain.lr}")
    return p


def _check_model(cfg: Config) -> int:
    """Model options; returns the encoder's depth."""
    m = cfg.model
    if m.match not in MATCHES:
        raise ConfigError(f"model.match: {m.match!r}: expected one of {', '.join(MATCHES)}")
    if m.arch == "moe":
        if m.experts < 1 or not 1 <= m.top_k <= m.experts:
            raise ConfigError(f"model.experts / model.top_k: need experts >= 1 and 1 <= top_k <= experts, got "
                              f"{m.experts} and {m.top_k}")
        if m.router not in ROUTERS:
            raise ConfigError(f"model.router: {m.router!r}: expected one of {', '.join(ROUTERS)}")
    if m.balance_coef < 0 or m.z_coef < 0 or not (0 <= m.hidden_dropout < 1 and 0 <= m.attention_dropout < 1):
        raise ConfigError("model: balance_coef and z_coef must be >= 0, dropouts in [0, 1)")
    try:
        arch = encoder_config(m)
    except ValueError as e:
        message = str(e)
        raise ConfigError(message if message.startswith("model:") else f"model: {message}") from None
    if m.name:
        try:  # fetch (or find) the model now, so a wrong name fails before anything is written
            arch = hf.config_from_hf(json.loads((hf.resolve(m.name) / "config.json").read_text()))
        except (hf.ModelLoadError, OSError) as e:
            raise ConfigError(f"model.name: {e}") from None
    if m.arch == "moe" and not 1 <= m.moe_every <= arch.num_layers:
        raise ConfigError(f"model.moe_every: {m.moe_every}: expected 1..{arch.num_layers} (the encoder's layers; "
                          "every moe_every-th is sparse)")
    if m.arch == "moe" and (m.upcycle or m.name):
        if m.match == "active" and m.top_k != 1:
            raise ConfigError(f"model.match: 'active' with an upcycled encoder needs model.top_k = 1 (every expert "
                              f"is a full copy of the dense FFN, so top-{m.top_k} would use {m.top_k}x its "
                              "parameters per token); or model.match = 'total' (experts cut from the dense FFN's "
                              "neurons), or 'none' (top-k copies, matched on neither)")
        if m.match == "total" and arch.intermediate_size % m.experts:
            raise ConfigError(f"model.experts: {m.experts} experts cut from a {arch.intermediate_size}-unit FFN "
                              "(model.match = 'total') must divide it evenly")
    try:
        resolve_device(cfg.run.device)
    except RuntimeError as e:
        raise ConfigError(f"run.device: {e}") from None
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard: true needs the tensorboard package: pip install tensorboard (or "
                          "xlt[tensorboard]); or set run.tensorboard = false")
    if cfg.run.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"run.precision: {cfg.run.precision!r}: expected auto, fp32 or bf16")
    if cfg.run.distributed not in distributed.MODES:
        raise ConfigError(f"run.distributed: {cfg.run.distributed!r}: expected one of {', '.join(distributed.MODES)}")
    for key, low in (("checkpoint_every", 0), ("keep_checkpoints", 1), ("max_skipped_steps", 1), ("threads", 0),
                     ("collective_timeout_min", 1)):
        if getattr(cfg.run, key) < low:
            raise ConfigError(f"run.{key}: must be >= {low}, got {getattr(cfg.run, key)}")
    if m.kernels not in ("auto", "torch", "triton"):
        raise ConfigError(f"model.kernels: {m.kernels!r}: expected auto, torch or triton")
    return arch.num_layers


def _languages(cfg: Config, source: Source, targets: list[TaskSpec]) -> dict[str, list[str]]:
    asked = cfg.protocol.languages
    known = {"en"} | {lang for t in targets for lang in t.languages}  # English: the source language, always
    if source.world is not None:
        known = set(source.world.codes)
    for lang in asked:
        if lang not in known:
            where = (f"the world has {', '.join(source.world.codes)} (set world.languages to change it)"
                     if source.world is not None else "no selected target task has it")
            raise ConfigError(f"protocol.languages: unknown language {lang!r}; {where}")
    if asked and "en" not in asked:
        raise ConfigError("protocol.languages: must include 'en' (the transfer gap is measured against it)")
    out = {}
    for t in targets:
        out[t.name] = [lang for lang in t.languages if not asked or lang in asked]
        if not out[t.name]:
            raise ConfigError(f"protocol.languages: target {t.name} has none of {', '.join(asked)} (its languages: "
                              f"{', '.join(t.languages)})")
    return out


def _check_finetuning(cfg: Config, p: Plan) -> None:
    """Fine-tuning options and their per-task overrides, for every phase the run will train."""
    known = {f.name for f in fields(FinetuneConfig)} - {"overrides"}
    phases = {"intermediate": [t for c in p.conditions for t in p.intermediate[c] if t != MLM],
              "target": [t.name for g in p.groups for t in g.targets]}
    # overrides may name the tasks of any suite (the defaults tune the synthetic ones); other suites' are inert
    tasks = set(p.source.targets) | set(p.source.intermediates) | KNOWN_TASKS
    for section, used in phases.items():
        ft: FinetuneConfig = getattr(cfg, section)
        for task, values in ft.overrides.items():
            if task not in tasks:
                raise ConfigError(f"{section}.overrides: unknown task {task!r}; known: {', '.join(sorted(tasks))}")
            if not isinstance(values, dict) or set(values) - known:
                raise ConfigError(f"{section}.overrides.{task}: expected a table with keys among {sorted(known)}")
            for key, value in values.items():
                expected = next(f.type for f in fields(FinetuneConfig) if f.name == key)  # "int" or "float"
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not number or (expected == "int" and not isinstance(value, int)):
                    what = "an integer" if expected == "int" else "a number"
                    raise ConfigError(f"{section}.overrides.{task}.{key}: expected {what}, got {value!r}")
        for task in [None, *used]:
            _check_ranges(ft.for_task(task) if task else ft, f"{section}.overrides.{task}" if task else section)
    for g in p.groups:  # targets that share one fine-tuning must agree on its settings
        first = cfg.target.for_task(g.targets[0].name)
        for t in g.targets[1:]:
            if cfg.target.for_task(t.name) != first:
                raise ConfigError(f"target.overrides: {g.targets[0].name} and {t.name} share one English fine-tuning "
                                  f"({g.training.stages[-1]} trained on {g.training.key.split('/')[0]}); give them the "
                                  "same settings")


def condition_tasks(name: str, cfg: Config, source: Source) -> list[str]:
    """The intermediate tasks of a condition: none (baseline), one (an intermediate task's name), or a
    multi-task mix: `multi:a+b+c` or a name in multitask.mixes; `mlm` in a mix is continued masked LM."""
    if name == BASELINE:
        return []
    if name in source.intermediates:
        return [name]
    if name.startswith("multi:"):
        tasks, where = name[len("multi:"):].split("+"), f"protocol.conditions: {name!r}"
    elif name in cfg.multitask.mixes:
        tasks, where = cfg.multitask.mixes[name], f"multitask.mixes.{name}"
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"{where}: expected a list of task names, got {tasks!r}")
    else:
        raise ConfigError(f"protocol.conditions: unknown condition {name!r}; expected {BASELINE!r}, an intermediate "
                          f"task ({', '.join(source.intermediates)}), multi:task+task(+{MLM}) or a name in "
                          "multitask.mixes")
    for t in tasks:
        if t != MLM and t not in source.intermediates:
            raise ConfigError(f"{where}: unknown task {t!r}; expected intermediate tasks "
                              f"({', '.join(source.intermediates)}) or {MLM!r}")
    if len(set(tasks)) != len(tasks) or not [t for t in tasks if t != MLM]:
        raise ConfigError(f"{where}: expected at least one intermediate task (besides {MLM!r}), each once")
    return list(tasks)


def _check_multitask(cfg: Config, source: Source, intermediate: dict[str, list[str]]) -> None:
    mt = cfg.multitask
    for name in mt.mixes:
        if name == BASELINE or name in source.intermediates or name.startswith("multi:"):
            raise ConfigError(f"multitask.mixes: {name!r} is already a condition's name; choose another")
    checks = [("sampling", mt.sampling in SAMPLINGS, f"one of {', '.join(SAMPLINGS)}"), ("cap", mt.cap >= 0, ">= 0"),
              ("temperature", mt.temperature > 0, "> 0"), ("mlm_ratio", 0 < mt.mlm_ratio < 1, "in (0, 1)"),
              ("mlm_lines", mt.mlm_lines >= 1, ">= 1"), ("mlm_seq_len", mt.mlm_seq_len >= 8, ">= 8"),
              ("mlm_mask_prob", 0 < mt.mlm_mask_prob < 1, "in (0, 1)")]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"multitask.{key}: must be {expected}, got {getattr(mt, key)!r}")
    if any(MLM in tasks for tasks in intermediate.values()):
        if source.world is None and not mt.mlm_dir:
            raise ConfigError(f"multitask.mlm_dir: a condition trains {MLM!r}, which needs multilingual text: "
                              "<mlm_dir>/<lang>.txt, one sentence or document per line")
        if mt.mlm_dir and not Path(mt.mlm_dir).is_dir():
            raise ConfigError(f"multitask.mlm_dir: {mt.mlm_dir} is not a folder")


def condition_folder(condition: str) -> str:
    """A condition's folder name (multi:a+b -> multi-a+b: no colon in paths)."""
    return condition.replace(":", "-")


def _check_ranges(ft: FinetuneConfig, where: str) -> None:
    checks = [("epochs", ft.epochs > 0, "> 0"), ("batch_size", ft.batch_size >= 1, ">= 1"), ("lr", ft.lr > 0, "> 0"),
              ("warmup_ratio", 0 <= ft.warmup_ratio < 1, "in [0, 1)"),
              ("warmup_steps", ft.warmup_steps >= 0, ">= 0"), ("weight_decay", ft.weight_decay >= 0, ">= 0"),
              ("grad_clip", ft.grad_clip >= 0, ">= 0 (0 = no clipping)"), ("max_len", ft.max_len >= 8, ">= 8"),
              ("doc_stride", ft.doc_stride >= 1, ">= 1"), ("query_max_len", ft.query_max_len >= 0, ">= 0"),
              ("evals_per_epoch", ft.evals_per_epoch >= 1, ">= 1"), ("log_every", ft.log_every >= 1, ">= 1"),
              ("micro_batches", 1 <= ft.micro_batches <= ft.batch_size, f"in 1..batch_size ({ft.batch_size})")]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{where}.{key}: must be {expected}, got {getattr(ft, key)}")


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


def planned_architecture(cfg: Config) -> tuple[EncoderConfig, EncoderConfig]:
    """(the run's encoder, its dense twin) as configured, without loading or training anything: a Hugging Face
    model's config.json, or the preset with the configured vocabulary size (the trained tokenizer's can be a
    little smaller); an MoE upcycled as model.match asks."""
    m = cfg.model
    if m.name:
        try:
            dense = hf.config_from_hf(json.loads((hf.resolve(m.name, weights=False) / "config.json").read_text()))
        except (hf.ModelLoadError, OSError):
            if m.name not in HUB_PRESETS:
                raise
            dense = preset(HUB_PRESETS[m.name])  # the checkpoint's shape, known without the hub
    else:
        dense = replace(encoder_config(replace(m, arch="dense")), vocab_size=cfg.pretrain.vocab_size)
    if m.arch != "moe":
        return dense, dense
    if m.upcycle or m.name:
        return upcycled_config(dense, m.experts, m.top_k, m.moe_every, m.router, m.match), dense
    return replace(encoder_config(m), vocab_size=dense.vocab_size), dense


def make_sparse(encoder: Encoder, m, seed: int) -> Encoder:
    """Sparse upcycling of a dense pretrained encoder (model.arch = moe with upcycle, or a HF model), matched as
    model.match asks (Encoder.upcycled). The fresh routers are drawn from `seed`, not from whatever the global
    generator holds after a cached pretraining."""
    if m.arch != "moe" or encoder.cfg.num_experts:
        return encoder
    torch.manual_seed(seed)
    sparse = encoder.upcycled(m.experts, m.top_k, m.moe_every, m.router, match=m.match)
    return sparse.with_config(moe_balance_coef=m.balance_coef, moe_z_coef=m.z_coef)


def architecture(cfg: EncoderConfig, seq_len: int) -> dict:
    """Total and active parameters and training FLOPs per token (at seq_len) of an encoder configuration."""
    return {"parameters": cfg.num_parameters(), "active_parameters": cfg.active_parameters(),
            "flops_per_token": cfg.flops_per_token(seq_len), "flops_seq_len": seq_len,
            "experts": cfg.num_experts, "top_k": cfg.moe_top_k if cfg.num_experts else 0,
            "expert_size": cfg.expert_size if cfg.num_experts else 0}


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


def target_seed(run_seed: int, training: Training, stage: str) -> int:
    """The fine-tuning seed of a target's training stage: the same in every condition (paired comparisons)."""
    return phase_seed(run_seed, "target", training.key, stage)


# ----- data --------------------------------------------------------------------------------------------------
class TaskData:
    """Rows and model inputs of (task, split, language), read and tokenized once per run (features also cached
    on disk across runs): every condition trains and scores on the same data. English train and dev rows are
    capped at data.max_train_rows / max_dev_rows, the same sample in every condition and seed."""

    def __init__(self, source: Source, limits=None, features: FeatureCache | None = None):
        self.source, self.limits = source, limits
        self.features = features or FeatureCache(None)
        self.tokenizer = None
        self._rows: dict = {}

    def rows(self, task: str, split: str, lang: str) -> list[dict]:
        key = (task, split, lang)
        if key not in self._rows:
            rows = self.source.rows(task, split, lang)
            if not rows:
                raise loaders.DataUnavailable(f"{task} {lang} {split}: no rows")
            if self.limits is not None and split != "test":
                limit = self.limits.max_train_rows if split == "train" else self.limits.max_dev_rows
                rows = subset(rows, limit, f"{task}-{split}-{lang}")
            self._rows[key] = rows
        return self._rows[key]

    def get(self, task: TaskSpec, split: str, lang: str, ft: FinetuneConfig) -> tuple[list[dict], list[dict]]:
        rows = self.rows(task.name, split, lang)
        def make():
            return data.featurize(task, rows, self.tokenizer, ft.max_len, ft.doc_stride, ft.query_max_len)

        feats = self.features.get(task, split, lang, rows, self.tokenizer, ft.max_len, ft.doc_stride, make,
                                  query_max_len=ft.query_max_len)
        return rows, feats


# ----- phases ------------------------------------------------------------------------------------------------
def new_task_model(encoder: Encoder, task: TaskSpec, seed: int) -> TaskModel:
    """`encoder` with a fresh head for `task`, initialised from `seed`."""
    torch.manual_seed(seed)
    head = make_head(task.head, encoder.cfg, encoder, num_labels=len(task.labels))
    return TaskModel(encoder, head.to(data.device_of(encoder)))


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part).encode())
    return h.hexdigest()[:16]


def finetune(model: TaskModel, task: TaskSpec, task_data: TaskData, ft: FinetuneConfig, seed: int, out: Path,
             run, eval_batch: int, bf16: bool) -> dict:
    """Train `model` on `task`'s English train rows; keep the weights with the best English dev score. The
    seed fixes the batch order and dropout (and, through new_task_model, the head). The training state is
    checkpointed under out/state (run.checkpoint_every) and a killed phase continues from there."""
    torch.manual_seed(seed)
    tokenizer = task_data.tokenizer
    _, train_feats = task_data.get(task, "train", "en", ft)
    dev_rows, dev_feats = task_data.get(task, "dev", "en", ft)
    if not train_feats:
        raise loaders.DataUnavailable(f"{task.name}: no English training example survives featurization")
    per_epoch = data.num_batches(len(train_feats), ft.batch_size)
    steps = max(1, math.ceil(ft.epochs * per_epoch))
    stream = data.training_stream(train_feats, ft.batch_size, tokenizer.pad_token_id, seed, ft.micro_batches)
    head_init = _digest(*(t.detach().cpu().float().numpy().tobytes() for t in model.head.state_dict().values()))
    data_order = _digest([[train_feats[i]["example"] for i in g] for g in stream.groups_of(0)])

    def dev_score() -> float:
        if task.format == "ranking":
            return evaluate_ranking(model, dev_rows, tokenizer, ft.max_len, ft.query_max_len, eval_batch)["score"]
        return evaluate_task(model, task, dev_rows, tokenizer, ft.max_len, eval_batch, "en", dev_feats)[0]["score"]

    loop = LoopConfig(steps=steps, lr=ft.lr, warmup_ratio=ft.warmup_ratio, warmup_steps=ft.warmup_steps,
                      weight_decay=ft.weight_decay,
                      grad_clip=ft.grad_clip, log_every=ft.log_every,
                      eval_every=max(1, per_epoch // ft.evals_per_epoch), bf16=bf16,
                      checkpoint_every=run.checkpoint_every, max_skipped=run.max_skipped_steps)
    logger = PhaseLogger(f"{out.parent.name}/{out.name}", out / "metrics.jsonl", run.console, run.tensorboard)
    result = train_loop(model, stream, loop, logger, evaluate=dev_score,
                        checkpoints=Checkpoints(out / "state", run.keep_checkpoints))
    meta = {"task": task.name, "format": task.format, "labels": list(task.labels), "best_step": result.best_step,
            "dev_score_en": result.best_score}
    if task.format == "ranking":  # how to embed with the exported encoder
        meta |= {"pooling": model.head.pooling, "layer": model.encoder.cfg.num_layers}
    if distributed.current().is_main:
        save_task_model(model, out / "checkpoint", meta, tokenizer)
    distributed.barrier()
    return {"steps": steps, "best_step": result.best_step, "dev_en": result.best_score,
            "seconds": round(result.seconds, 2), "tokens": result.tokens, "train_rows": len(train_feats), "seed": seed,
            "head_init": head_init, "data_order": data_order, "skipped_steps": result.skipped,
            "resumed_after_step": result.resumed_from}


def finished(phase_dir: Path) -> dict | None:
    """A finished phase's info (its done.json), or None."""
    path = phase_dir / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mark_done(phase_dir: Path, info: dict, run) -> None:
    """Record a phase as finished (after everything it writes); its training state goes unless kept."""
    if distributed.current().is_main:
        atomic_write_text(phase_dir / "done.json", json.dumps(info, indent=1))
        if not run.keep_finished_state:
            shutil.rmtree(phase_dir / "state", ignore_errors=True)
    distributed.barrier()


def train_target(encoder: Encoder, group: TargetGroup, cfg: Config, task_data: TaskData, out: Path,
                 bf16: bool) -> tuple[TaskModel, dict]:
    """A copy of `encoder` trained through the group's stages (XCOPA: Social IQa, then COPA), each stage on its
    own English train rows, chosen on its own English dev rows; one head across stages of one format."""
    first, info = group.targets[0], {}
    ft = cfg.target.for_task(first.name)
    model = None
    for stage in group.training.stages:
        task = task_data.source.task(stage)
        seed = target_seed(cfg.run.seed, group.training, stage)
        if model is None:
            model = new_task_model(copy.deepcopy(encoder), task, seed)
        phase = out / (first.name if stage == first.name else f"{first.name}-{stage}")
        if stage != first.name and (done := finished(phase)) is not None:  # an earlier stage, finished before
            load_exported(model, phase / "checkpoint")
            info[stage] = done
            continue
        info[stage] = finetune(model, task, task_data, ft if stage == first.name else cfg.target.for_task(stage),
                               seed, phase, cfg.run, cfg.eval.batch_size, bf16)
        if stage != first.name:
            mark_done(phase, info[stage], cfg.run)
    return model, info


def intermediate_phase(handoff: Handoff, condition: str, p: Plan, cfg: Config, task_data: TaskData,
                       mlm_texts: dict | None, root: Path, bf16: bool) -> tuple[Handoff, str, dict]:
    """Train the condition's intermediate task, or its multi-task mix (with continued MLM when `mlm` is in it),
    on the handed-over encoder; the heads are dropped and the encoder handed on."""
    tasks = p.intermediate[condition]
    seed = phase_seed(cfg.run.seed, "intermediate", condition)
    phase = f"intermediate-{condition}" if tasks == [condition] else "intermediate-multitask"
    lineage = handoff.lineage + tuple(tasks)
    if (done := finished(root / phase)) is not None:  # a resumed run: the phase's result, as it was handed on
        load_exported(handoff.encoder, root / phase / "checkpoint")
        return Handoff(handoff.encoder, lineage), phase, done
    if tasks == [condition]:  # one intermediate task
        task = p.source.task(condition)
        model = new_task_model(handoff.encoder, task, seed)
        info = finetune(model, task, task_data, cfg.intermediate.for_task(task.name), seed, root / phase,
                        cfg.run, cfg.eval.batch_size, bf16)
    else:
        specs = [p.source.task(t) for t in tasks if t != MLM]
        model, info = train_multitask(handoff.encoder, specs, task_data, cfg.intermediate.for_task, cfg.multitask,
                                      mlm_texts if MLM in tasks else None, cfg.model.name, seed, root / phase,
                                      cfg.run, cfg.eval.batch_size, bf16)
        if distributed.current().is_main:
            save_task_model(model.encoder, root / phase / "checkpoint",
                            {"tasks": tasks, "mixture": info["mixture"], "best_step": info["best_step"],
                             "dev_score_en": info["dev_en"], "dev_score_en_by_task": info["dev_en_by_task"]},
                            task_data.tokenizer)
    mark_done(root / phase, info, cfg.run)
    return Handoff(model.encoder, lineage), phase, info


def write_leaderboard(root: Path, task: TaskSpec, lang: str, ext: str, pred: str, gold: str) -> None:
    atomic_write_text(root / "predictions" / task.name / f"test-{lang}.{ext}", pred)
    atomic_write_text(root / "labels" / task.name / f"test-{lang}.{ext}", gold)


def evaluate_finetuned(model: TaskModel, task: TaskSpec, langs: list[str], cfg: Config, task_data: TaskData,
                       root: Path) -> None:
    """Zero-shot predictions of a fine-tuned target in each language, in the leaderboard layout."""
    ft, tokenizer = cfg.target.for_task(task.name), task_data.tokenizer
    ext = task_data.source.suite.extension(task.name)
    if task.format == "ranking":
        candidates, queries = dual_encoder_embedders(model, tokenizer, ft.max_len, ft.query_max_len,
                                                     cfg.eval.batch_size)
        pool: dict = {}
        for lang in langs:
            write_leaderboard(root, task, lang, ext, *run_ranking(candidates, task_data.rows(task.name, "test", lang),
                                                                  pool, queries))
        return
    for lang in langs:
        rows, feats = task_data.get(task, "test", lang, ft)
        preds = predict(model, task, rows, feats, cfg.eval.batch_size, tokenizer.pad_token_id)
        write_leaderboard(root, task, lang, ext, *finetuned_files(task, rows, preds))


def evaluate_retrieval(encoder: Encoder, task: TaskSpec, langs: list[str], cfg: Config, task_data: TaskData,
                       root: Path, split: str = "test") -> dict:
    """Tatoeba / BUCC with the condition's encoder (no training), in the leaderboard layout (the synthetic
    Tatoeba can also be run on its dev split, for design choices)."""
    layer = retrieval_layer(cfg, encoder)
    embed = embedder(encoder, task_data.tokenizer, layer, RETRIEVAL_POOLING, cfg.target.max_len, cfg.eval.batch_size)
    ext = task_data.source.suite.extension(task.name)
    for lang in langs:
        test = task_data.rows(task.name, split, lang)
        files = (run_bucc(embed, task_data.rows(task.name, "dev", lang), test) if task.format == "mining"
                 else run_tatoeba(embed, test))
        write_leaderboard(root, task, lang, ext, *files)
    return {"layer": layer, "pooling": RETRIEVAL_POOLING}


def pretrained_encoder(cfg: Config, p: Plan, out: Path, device: torch.device, bf16: bool, resume: bool = False):
    """Phase 1: the pretrained multilingual encoder: a Hugging Face model by name, or the stand-in for XLM-R
    pretrained here with MLM on the synthetic corpus (cached by everything that determines it)."""
    if cfg.model.name:
        encoder, tokenizer = hf.load_encoder(cfg.model.name), hf.load_tokenizer(cfg.model.name)
        say(f"[pretrain] skipped: loaded {cfg.model.name} ({encoder.cfg.num_parameters() / 1e6:.1f}M parameters)")
        return encoder, tokenizer, {"model": cfg.model.name, "cached": True}
    cache = {"none": None, "": default_cache_dir()}.get(cfg.run.cache_dir, Path(cfg.run.cache_dir))
    if not resume and distributed.current().is_main:  # a fresh run never continues from another's pretraining
        shutil.rmtree(out / "pretrain" / "state", ignore_errors=True)
    distributed.barrier()
    encoder, tokenizer, info = pretrain(p.world, encoder_config(cfg.model), cfg.pretrain, cfg.run.seed, cache,
                                        out / "pretrain", bf16, device, cfg.run.checkpoint_every,
                                        tensorboard=cfg.run.tensorboard)
    if not cfg.run.keep_finished_state and distributed.current().is_main:
        shutil.rmtree(out / "pretrain" / "state", ignore_errors=True)
    return encoder, tokenizer, info


def feature_cache_dir(cfg: Config) -> Path | None:
    if cfg.data.cache_dir == "none" or (not cfg.data.cache_dir and cfg.run.cache_dir == "none"):
        return None
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return (Path(cfg.run.cache_dir) if cfg.run.cache_dir else default_cache_dir()) / "features"


def check_out(out: Path, overwrite: bool) -> None:
    """--out must be new or empty; with overwrite, it may hold an earlier XLT run (config.toml), which is then
    replaced. A folder that holds anything else is never deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out}: already holds a run; pass --overwrite to replace it, or choose another --out")
    if not (out / "config.toml").is_file():
        raise ConfigError(f"--out {out}: is not empty and holds no XLT run (no config.toml): not overwriting it")


# ----- the study ---------------------------------------------------------------------------------------------
def check_resume(out: Path, resolved: Config) -> None:
    """--resume: --out must hold a run of this very configuration (what may differ: how it reports and how many
    threads it uses and how long its ranks wait: console, tensorboard, threads, collective_timeout_min)."""
    saved_path = out / "config.toml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {out} holds no run to resume (no config.toml); run without --resume")
    try:
        saved = load(str(saved_path), [])
    except ConfigError as e:
        raise ConfigError(f"--resume: {saved_path} cannot be read: {e}") from None
    ignore = {("run", "console"), ("run", "tensorboard"), ("run", "threads"), ("run", "collective_timeout_min")}
    diffs = []
    for section in fields(resolved):
        ours, theirs = getattr(resolved, section.name), getattr(saved, section.name)
        for f in fields(ours):
            if (section.name, f.name) not in ignore and getattr(ours, f.name) != getattr(theirs, f.name):
                was, now = getattr(theirs, f.name), getattr(ours, f.name)
                diffs.append(f"{section.name}.{f.name}: run has {was!r}, now {now!r}")
    if diffs:
        raise ConfigError(f"--resume: the configuration differs from the run in {out}: " + "; ".join(diffs[:5])
                          + ("; ..." if len(diffs) > 5 else "") + " (resume with the run's own settings, or start "
                          "a new --out)")


def run_study(cfg: Config, overwrite: bool = False, resume: bool = False) -> dict:
    """The whole protocol. With `resume`, a killed run in the same --out continues: finished conditions and
    phases are taken as they are and the interrupted phase continues from its last checkpoint."""
    p = plan(cfg)  # raises ConfigError before anything is written
    out = cfg.out_dir()
    resolved = copy.deepcopy(cfg)
    resolved.protocol.conditions, resolved.protocol.targets = list(p.conditions), [t.name for t in p.targets]
    if resume:
        check_resume(out, resolved)
    else:
        check_out(out, overwrite)
    task_data = TaskData(p.source, cfg.data, FeatureCache(feature_cache_dir(cfg)))
    where = "built in" if p.world else f"local files under {cfg.data.dir}" if cfg.data.dir else "the Hugging Face hub"
    say(f"[data] reading {p.source.name} ({where})")
    for task, split in p.training_rows():  # every file read and checked now: bad data fails before any training
        task_data.rows(task, split, "en")
    for task, split, lang in p.test_rows():
        task_data.rows(task, split, lang)
    mlm_texts = None
    if any(MLM in tasks for tasks in p.intermediate.values()):
        languages = cfg.multitask.mlm_languages or (list(p.world.codes) if p.world else list(dict.fromkeys(
            lang for t in p.targets for lang in p.languages[t.name])))
        try:
            mlm_texts = read_mlm_texts(cfg.multitask, languages, p.world)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None

    device = resolve_device(cfg.run.device)
    d = distributed.setup(cfg.run.distributed, device.type, cfg.run.collective_timeout_min)
    device = distributed.device_for(d, device)
    main = d.is_main  # rank 0 alone writes; the others train alongside it and wait at the phases' ends
    if main:
        if out.exists() and overwrite and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(out / "config.toml", to_toml(resolved))
    distributed.barrier()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if device.type == "cpu":
        hold_freed_memory()
    t0 = time.perf_counter()
    bf16 = use_bf16(cfg.run, device)

    pretrained, tokenizer, pre_info = pretrained_encoder(cfg, p, out, device, bf16, resume)
    dense_arch = pretrained.cfg
    pretrained = make_sparse(pretrained, cfg.model, phase_seed(cfg.run.seed, "upcycle"))
    seq_len = cfg.target.max_len
    arms = {"arch": cfg.model.arch, "match": cfg.model.match if cfg.model.arch == "moe" else None,
            "model": architecture(pretrained.cfg, seq_len),
            "dense": architecture(replace(dense_arch, num_experts=0, moe_expert_size=0), seq_len)}
    pre_info |= {k: arms["model"][k] for k in ("parameters", "active_parameters", "experts", "top_k")}
    pretrained = for_finetuning(pretrained, cfg.model, device)
    task_data.tokenizer = tokenizer
    scores: dict = {}
    suite_scores: dict = {}
    phases: dict = {"pretrain": pre_info}

    for condition in p.conditions:
        root = out / condition_folder(condition)
        if (done := finished(root)) is not None:  # a resumed run: this condition was finished before
            say(f"== condition {condition}: finished before, taken from {root / 'done.json'} ==")
            scores[condition], suite_scores[condition] = done["scores"], done["suite"]
            phases |= done["phases"]
            continue
        say(f"== condition {condition} ==")
        handoff = Handoff(copy.deepcopy(pretrained), ("pretrained",))
        condition_phases = {}
        if p.intermediate[condition]:  # Phase 2: English intermediate task(s)
            handoff, phase, info = intermediate_phase(handoff, condition, p, cfg, task_data, mlm_texts, root, bf16)
            condition_phases[f"{condition}/{phase}"] = info

        for group in p.groups:  # Phase 3: English target task, then zero-shot evaluation
            first = root / group.targets[0].name
            group_phases = finished(first)
            if group_phases is None:
                model, stages = train_target(handoff.encoder, group, cfg, task_data, root, bf16)
                group_phases = {}
                for i, task in enumerate(group.targets):
                    if main:  # rank 0 evaluates and writes; the others wait at mark_done's barrier
                        evaluate_finetuned(model, task, p.languages[task.name], cfg, task_data, root)
                    info = dict(stages[task.name] if task.name in stages else stages[group.training.stages[-1]])
                    if len(group.training.stages) > 1:
                        info["stages"] = stages
                    if i:
                        info = {"model_from": group.targets[0].name}
                    group_phases[f"{condition}/{task.name}"] = info | {"lineage": list(handoff.lineage)}
                del model
                mark_done(first, group_phases, cfg.run)
            condition_phases |= group_phases
        if not main:
            mark_done(root, {}, cfg.run)  # the barrier: rank 0 evaluates, scores and records the condition
            continue
        for task in p.retrieval:
            info = evaluate_retrieval(handoff.encoder, task, p.languages[task.name], cfg, task_data, root)
            condition_phases[f"{condition}/{task.name}"] = info | {"lineage": list(handoff.lineage)}

        overall, detailed = score_folders(root / "predictions", root / "labels", p.source.suite, partial=True)
        suite_scores[condition] = {**overall, **detailed}
        per_language = analysis.language_scores(detailed)
        scores[condition] = {t.name: per_language[t.name] for t in p.targets}
        phases |= condition_phases
        mark_done(root, {"scores": scores[condition], "suite": suite_scores[condition], "phases": condition_phases},
                  cfg.run)
        for t in p.targets:
            row = scores[condition][t.name]
            say(f"[{condition}/{t.name}] " + " ".join(f"{lang} {v:.1f}" for lang, v in row.items()))

    if not main:
        return {}
    chance = {t.name: t.chance for t in p.targets}
    results = {
        "scores": scores,
        "summary": summarize(scores, chance),
        "suite": {"name": p.source.name, "scores": suite_scores},
        "analysis": {c: analysis.suite_view(s, chance) for c, s in scores.items()},
        "chance": chance,
        "languages": {code: p.source.describe(code) for code in dict.fromkeys(
            lang for t in p.targets for lang in p.languages[t.name])},
        "model": arms,
        "phases": phases,
        "data": {"dir": cfg.data.dir or None, "max_train_rows": cfg.data.max_train_rows,
                 "max_dev_rows": cfg.data.max_dev_rows, "features_cached": task_data.features.hits,
                 "features_made": task_data.features.misses},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": str(device), "threads": torch.get_num_threads(), "bf16": bf16,
                        "world_size": d.world, "distributed": d.mode},
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    report = table(results, {t.name: t for t in p.targets})
    atomic_write_text(out / "results.md", report)
    say(report)
    say(f"results: {out / 'results.json'} ({results['wall_seconds']:.0f} s)")
    return results
