"""The run configuration: typed sections, loaded from defaults, then a TOML file, then dotted CLI
overrides (`--section.key value`). Unknown sections or keys and ill-typed values are errors that name
the file or option and what was expected. The resolved config is written back as TOML beside the run."""
from __future__ import annotations

import math
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from eval.synthetic.world import DEFAULT_LANGUAGES

from .pretrain import MLMConfig


class ConfigError(ValueError):
    """A user mistake in the configuration or command line (exit code 2)."""


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    out: str = ""  # default: runs/<name>
    cache_dir: str = ""  # pretrained-model cache; "" = $XLT_CACHE or ~/.cache/xlt; "none" = no cache
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto: bf16 where the hardware computes it natively
    console: bool = True
    # Also write each phase's logged metrics as TensorBoard events in its folder (`tensorboard --logdir <out>`
    # shows every phase; a study's folder, every cell). Needs `pip install tensorboard`.
    tensorboard: bool = False
    # Never lose work: every phase's training state is checkpointed every `checkpoint_every` steps (and at its
    # end) under <phase>/state/, the newest `keep_checkpoints` kept; `--resume` continues a killed run from there.
    # A finished phase's state is deleted (its best weights stay in <phase>/checkpoint/) unless keep_finished_state.
    # Under torchrun: ddp or fsdp2 (ignored in one process). Batch sizes stay global, split over the ranks.
    distributed: str = "ddp"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    keep_finished_state: bool = False
    max_skipped_steps: int = 10  # consecutive non-finite steps (skipped, no update) that stop a phase
    # Under torchrun: how long a rank waits in a collective before the job is aborted. The other ranks wait at a
    # barrier while rank 0 evaluates a phase on the test sets; NCCL's own default (10 min) is shorter than that
    # takes for a large model on XTREME.
    collective_timeout_min: int = 240


@dataclass
class WorldConfig:
    """The built-in synthetic multilingual suite."""
    seed: int = 0
    languages: list[str] = field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    sizes: dict = field(default_factory=dict)  # task -> [train, dev, test] rows
    code_switch_rate: float = 0.2  # share of content words written in English in non-English corpora
    sentence_switch_rate: float = 0.1  # share of sentences of non-English documents written in English


@dataclass
class ModelConfig:
    preset: str = "xlt-tiny"  # the architecture pretrained from scratch on the synthetic corpus
    # A Hugging Face model instead (hub name such as xlm-roberta-base, or a local folder): its weights and
    # tokenizer are loaded and the pretraining phase is skipped.
    name: str = ""
    kernels: str = "auto"  # auto | torch | triton
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0  # XLM-R fine-tunes with 0.1; 0 keeps the CPU twin fast
    # dense | moe. An MoE encoder is pretrained from scratch with experts matched to the dense preset on
    # `match` (active: same FLOPs per token; total: same parameter count), or, with `upcycle` (always for a
    # Hugging Face model), made from the dense pretrained encoder: each expert a copy of its FFN.
    arch: str = "dense"
    experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # every n-th layer is sparse (1 = all, 2 = every other)
    router: str = "topk_softmax"  # topk_softmax | softmax_topk | sigmoid
    match: str = "active"
    upcycle: bool = False
    balance_coef: float = 0.01  # load-balancing loss weight
    z_coef: float = 0.001  # router z-loss weight


@dataclass
class FinetuneConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-4
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # > 0: linear warmup over this many steps instead of warmup_ratio (XTREME's QA: 500)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_len: int = 128  # XTREME's QA setting for real models: max_len 384 with doc_stride 128
    doc_stride: int = 128  # overlap of the windows over a long QA context (capped at max_len // 2)
    query_max_len: int = 0  # dual encoders (Mewsli-X, LAReQA): length of the queries; 0 = max_len
    evals_per_epoch: int = 1  # dev evaluations (for best-checkpoint selection) per epoch
    log_every: int = 50
    micro_batches: int = 1  # gradient accumulation: each rank's share of a batch in this many pieces
    overrides: dict = field(default_factory=dict)  # task -> {key: value} for that task only

    def for_task(self, task: str) -> "FinetuneConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "overrides"}
        values.update(self.overrides.get(task, {}))
        return FinetuneConfig(**values)


@dataclass
class DataConfig:
    """Where the real tasks' data come from (protocol.suite xtreme / xtreme-r), and its feature cache."""
    dir: str = ""  # root of the official raw files (eval.loaders layouts); "" = the Hugging Face hub
    cache_dir: str = ""  # tokenized features; "" = <pretraining cache>/features; "none" = no cache
    max_train_rows: int = 0  # use at most this many English training rows per task (0 = all): quick runs
    max_dev_rows: int = 0  # likewise for the English dev rows that choose the checkpoint (0 = all)


@dataclass
class ProtocolConfig:
    suite: str = "synthetic"  # synthetic (the built-in world) | xtreme | xtreme-r
    # One condition per entry: "baseline" (no intermediate task) or an intermediate task's name;
    # [] = the suite's default (synthetic: baseline, syn-mnli, syn-squad; real suites: baseline, squad, mnli).
    conditions: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # [] = every task of the suite
    languages: list[str] = field(default_factory=list)  # evaluation languages; [] = each task's official list


@dataclass
class MultitaskConfig:
    """Multi-task intermediate conditions (`multi:a+b+c`, or a name in `mixes`) and continued multilingual MLM
    during intermediate training (`mlm` as one of the mix's tasks, e.g. `multi:syn-mnli+mlm`)."""
    sampling: str = "proportional"  # proportional (to training examples, capped) | temperature
    cap: int = 0  # proportional: examples counted per task at most (0 = no cap; T5 uses 2**21)
    temperature: float = 2.0  # temperature sampling: p(task) proportional to examples ** (1 / temperature)
    mlm_ratio: float = 0.5  # with mlm in the mix: the share of steps that are MLM batches
    mlm_dir: str = ""  # real suites: <mlm_dir>/<lang>.txt, one sentence or document per line
    mlm_languages: list[str] = field(default_factory=list)  # [] = the run's evaluation languages
    mlm_lines: int = 2000  # lines (synthetic: documents) per language
    mlm_seq_len: int = 128
    mlm_mask_prob: float = 0.15
    mixes: dict = field(default_factory=dict)  # name -> [tasks]: a named multi-task condition


@dataclass
class EvalConfig:
    batch_size: int = 128
    retrieval_layer: int = -1  # hidden layer for retrieval embeddings; -1 = the middle layer


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: MLMConfig = field(default_factory=MLMConfig)
    # Extractive QA learns slowest at this size: a higher learning rate for it. POS tagging reaches 100 on
    # English dev within an epoch, so two are enough (NER stayed at 90 after two, so it keeps three).
    intermediate: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        epochs=2.0, overrides={"syn-squad": {"lr": 1e-3}}))
    target: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        overrides={"syn-xquad": {"lr": 1e-3}, "syn-pos": {"epochs": 2.0}}))
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def out_dir(self) -> Path:
        return Path(self.run.out or Path("runs") / self.run.name)


# ----- typed assignment ------------------------------------------------------------------------------------
def _coerce(value, typ, where: str):
    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):  # CLI shorthand: a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} at {where}")


def _set(obj, key: str, value, where: str, merge: bool = False) -> None:
    """obj.key = value, typed. With `merge` (a command-line option), a table is merged key by key into the one
    it overrides, as a recipe's tables are into those of the recipe it extends."""
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        known = ", ".join(f.name for f in fields(obj))
        raise ConfigError(f"{where}: unknown key {key!r}; known keys: {known}")
    current = getattr(obj, key)
    if is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a [{key}] table")
        for k, v in value.items():
            _set(current, k, v, f"{where}.{k}", merge)
        return
    if merge and isinstance(current, dict) and isinstance(value, dict):
        value = _merge(current, value)
    setattr(obj, key, _coerce(value, hints[key], where))


def read_toml(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A TOML config file as a dict. A top-level `extends = "other.toml"` (relative to the file) reads that
    file first and merges this one over it, table by table (a recipe for XLM-R base restates only what
    differs from the large one)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{chain[-1]}: extends {path}: no such file" if chain else f"--config {path}: no such file")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a file name, got {base!r}")
    parent = (p.parent / base).resolve()
    if parent in chain + (p.resolve(),):
        raise ConfigError(f"{path}: extends {base}: a cycle of recipes")
    return _merge(read_toml(parent, chain + (p.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(path: str | None, overrides: list[tuple[str, str]]) -> Config:
    """Defaults <- TOML file (and the files it extends) <- `--section.key value` overrides. A table on the command
    line (`--target.overrides '{syn-pos = {epochs = 1}}'`) is merged into the file's, not put in its place."""
    cfg = Config()
    if path is not None:
        for section, value in read_toml(path).items():
            _set(cfg, section, value, f"{path}: {section}")
    for dotted, raw in overrides:
        parts = dotted.split(".")
        if len(parts) < 2:
            raise ConfigError(f"--{dotted}: options take the form --section.key value")
        target = cfg
        for part in parts[:-2]:
            if not hasattr(target, part) or not is_dataclass(getattr(target, part)):
                raise ConfigError(f"--{dotted}: unknown section {part!r}")
            target = getattr(target, part)
        section, key = parts[-2], parts[-1]
        if not is_dataclass(target) or not hasattr(target, section) or not is_dataclass(getattr(target, section)):
            raise ConfigError(f"--{dotted}: unknown section {section!r}; sections: "
                              f"{', '.join(f.name for f in fields(Config))}")
        _set(getattr(target, section), key, _parse_literal(raw), f"--{dotted}", merge=True)
    return cfg


def _parse_literal(raw: str):
    """A CLI value as TOML would read it (numbers, booleans, [lists]); otherwise the plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# ----- writing --------------------------------------------------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(cfg: Config) -> str:
    lines = []
    for section in fields(cfg):
        lines.append(f"[{section.name}]")
        obj = getattr(cfg, section.name)
        for f in fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
        lines.append("")
    return "\n".join(lines)
