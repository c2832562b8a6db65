"""Hugging Face checkpoints <-> XLT models: BERT / mBERT (`BertModel`), XLM-R (`XLMRobertaModel`) and
XLM-R XL / XXL (`XLMRobertaXLModel`), with their task heads.

- `load_encoder(name_or_dir)`, `load_task_model(name_or_dir, kind)`, `load_tokenizer(name_or_dir)`: a hub
  name (when the hub is reachable) or a local folder, weights from `model.safetensors` (sharded or not) or
  `pytorch_model.bin` through `torch.load(weights_only=True)`. The model is built on the meta device and
  each tensor is assigned as it is read, so loading never holds two copies of the weights.
- `export(model, folder)`: a folder that the matching `transformers` Auto* class loads.

The key maps are explicit tables (`encoder_key_map`, `head_key_map`) used in both directions. Anything that
does not fit (an unknown or missing tensor, a wrong shape, an architecture we do not implement) is an error
that names the tensor or field; only the task head (and a pooler the checkpoint lacks) is initialised
fresh, and `LoadReport` says so.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .config import EncoderConfig
from .encoder import Encoder
from .heads import HEAD_KINDS, TaskModel, make_head
from .io import write_folder

log = logging.getLogger("xlt.models")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]  # config, weights, tokenizer files
BIN_PATTERNS = ["*.json", "pytorch_model*.bin", "*.model", "*.txt"]
# HF buffers that older checkpoints store next to the weights; they carry no information we need.
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

# (model_type in config.json) -> (family, pre_layer_norm)
MODEL_TYPES = {"xlm-roberta": ("roberta", False), "roberta": ("roberta", False), "bert": ("bert", False),
               "xlm-roberta-xl": ("roberta", True)}
CLASS_STEM = {("roberta", False): "XLMRoberta", ("roberta", True): "XLMRobertaXL", ("bert", False): "Bert"}
BASE_PREFIX = {"roberta": "roberta.", "bert": "bert."}
HEAD_SUFFIX = {"pair": "ForSequenceClassification", "tagging": "ForTokenClassification",
               "qa": "ForQuestionAnswering", "choice": "ForMultipleChoice", "mlm": "ForMaskedLM"}
AUTO_CLASSES = {None: "AutoModel", "pair": "AutoModelForSequenceClassification",
                "tagging": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering",
                "choice": "AutoModelForMultipleChoice", "mlm": "AutoModelForMaskedLM"}


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the model and the tensor or field."""


@dataclass
class LoadReport:
    source: str  # the folder the weights came from
    fresh: list[str] = field(default_factory=list)  # XLT parameters initialised fresh (task head, pooler)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors not used (e.g. another head)
    labels: list[str] = field(default_factory=list)  # the checkpoint's id2label, in id order, if any

    def summary(self) -> str:
        parts = [f"loaded {self.source}"]
        if self.fresh:
            parts.append(f"initialised fresh: {', '.join(self.fresh)}")
        if self.unused:
            parts.append(f"not used from the checkpoint: {', '.join(self.unused)}")
        return "; ".join(parts)


# ----- configs ----------------------------------------------------------------------------------------------
def config_from_hf(hf: dict, source: str = "config.json") -> EncoderConfig:
    """EncoderConfig from a Hugging Face config.json dict; unsupported settings are errors naming the field."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"{source}: model_type {model_type!r} is not supported; XLT loads "
                             f"{', '.join(MODEL_TYPES)}")
    family, pre_ln = MODEL_TYPES[model_type]
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ModelLoadError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (expected 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not "
                             "supported (expected 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ModelLoadError(f"{source}: decoder / cross-attention models are not supported (encoders only)")
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
            pad_token_id=hf.get("pad_token_id", 0 if family == "bert" else 1),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            position_style="absolute" if family == "bert" else "roberta", pre_layer_norm=pre_ln,
            embedding_layer_norm=not pre_ln, family=family)
    except KeyError as e:
        raise ModelLoadError(f"{source}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise ModelLoadError(f"{source}: {e}") from None


def _hf_stem(cfg: EncoderConfig) -> str:
    """The HF class-name stem for cfg, or an error naming the field no HF class can represent."""
    if cfg.num_experts:
        raise ModelLoadError("export: Mixture-of-Experts encoders (num_experts > 0) have no Hugging Face "
                             "BERT / XLM-R class; they are saved in XLT's own layout")
    key = (cfg.family, cfg.pre_layer_norm)
    if key not in CLASS_STEM:
        raise ModelLoadError("export: pre_layer_norm=True exists in Hugging Face only as XLM-R XL "
                             "(family='roberta')")
    expected_position = "absolute" if cfg.family == "bert" else "roberta"
    if cfg.position_style != expected_position:
        raise ModelLoadError(f"export: family {cfg.family!r} needs position_style {expected_position!r}, "
                             f"got {cfg.position_style!r}")
    if cfg.embedding_layer_norm == cfg.pre_layer_norm:
        raise ModelLoadError(f"export: embedding_layer_norm={cfg.embedding_layer_norm} with pre_layer_norm="
                             f"{cfg.pre_layer_norm} has no Hugging Face class (XLM-R XL has no embedding norm, "
                             "BERT / XLM-R have one)")
    return CLASS_STEM[key]


def config_to_hf(cfg: EncoderConfig, kind: str | None = None, labels: list[str] | None = None) -> dict:
    stem = _hf_stem(cfg)
    model_type = {"XLMRoberta": "xlm-roberta", "XLMRobertaXL": "xlm-roberta-xl", "Bert": "bert"}[stem]
    out = {
        "model_type": model_type, "architectures": [stem + (HEAD_SUFFIX[kind] if kind else "Model")],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "pad_token_id": cfg.pad_token_id, "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
        "position_embedding_type": "absolute", "initializer_range": 0.02, "tie_word_embeddings": True,
    }
    if cfg.family == "roberta":
        out.update(bos_token_id=0, eos_token_id=2)
    if labels:
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
    return out


# ----- key maps ---------------------------------------------------------------------------------------------
def encoder_key_map(cfg: EncoderConfig) -> dict[str, str]:
    """XLT encoder parameter name -> HF base-model key (as in `XLMRobertaModel.state_dict()`)."""
    m = {"embeddings.word.weight": "embeddings.word_embeddings.weight",
         "embeddings.position.weight": "embeddings.position_embeddings.weight",
         "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
         "pooler.dense.weight": "pooler.dense.weight", "pooler.dense.bias": "pooler.dense.bias"}
    if cfg.embedding_layer_norm:
        m |= {"embeddings.norm.weight": "embeddings.LayerNorm.weight",
              "embeddings.norm.bias": "embeddings.LayerNorm.bias"}
    if cfg.pre_layer_norm:
        m |= {"final_norm.weight": "encoder.LayerNorm.weight", "final_norm.bias": "encoder.LayerNorm.bias"}
        norms = {"attn_norm": "attention.self_attn_layer_norm", "ffn_norm": "LayerNorm"}
    else:
        norms = {"attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}
    modules = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
               "attn.o": "attention.output.dense", "ffn.up": "intermediate.dense", "ffn.down": "output.dense",
               **norms}
    for i in range(cfg.num_layers):
        for ours, theirs in modules.items():
            for p in ("weight", "bias"):
                m[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    return m


def uses_pooler(kind: str | None, cfg: EncoderConfig) -> bool:
    """Whether the HF model for this head carries the pooler (the bare model and pooled heads do)."""
    return kind is None or kind == "choice" or (kind == "pair" and cfg.family == "bert")


def head_key_map(kind: str, cfg: EncoderConfig) -> dict[str, str]:
    """XLT head parameter name (inside TaskModel.head) -> HF key of the matching Auto* head model."""
    def linear(ours: str, theirs: str) -> dict[str, str]:
        return {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}
    if kind == "pair" and cfg.family == "roberta":
        return linear("dense", "classifier.dense") | linear("out", "classifier.out_proj")
    if kind in ("pair", "tagging", "choice"):
        return linear("out", "classifier")
    if kind == "qa":
        return linear("out", "qa_outputs")
    if kind == "mlm":
        root = "lm_head" if cfg.family == "roberta" else "cls.predictions"
        norm = "lm_head.layer_norm" if cfg.family == "roberta" else "cls.predictions.transform.LayerNorm"
        dense = "lm_head.dense" if cfg.family == "roberta" else "cls.predictions.transform.dense"
        return linear("dense", dense) | linear("norm", norm) | {"bias": f"{root}.bias"}
    raise ModelLoadError(f"unknown head kind {kind!r}: expected one of {', '.join(HEAD_KINDS)}")


# Tied copies HF may store beside the real tensors (the decoder is our word embedding, its bias our bias).
TIED_KEYS = ("lm_head.decoder.weight", "lm_head.decoder.bias", "cls.predictions.decoder.weight",
             "cls.predictions.decoder.bias")


# ----- locating and reading checkpoints ---------------------------------------------------------------------
def resolve(name_or_dir: str | Path, *, weights: bool = True) -> Path:
    """A local folder as is; otherwise a hub name, downloaded (config, weights, tokenizer) or taken from the
    local hub cache. Offline or unknown names raise an error that says how to pass a local folder."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model {name!r}: no such folder (expected a folder with config.json and weights, "
                             "or a Hugging Face hub name such as xlm-roberta-base)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS))
        if weights and not any((folder / f).exists() for f in WEIGHT_FILES):  # repos with .bin weights only
            folder = Path(snapshot_download(name, allow_patterns=BIN_PATTERNS))
        return folder
    except HFValidationError as e:
        raise ModelLoadError(f"model {name!r}: not a folder and not a valid hub name ({e})") from None
    except Exception as e:  # offline, unreachable, unknown repo, gated: the hub client's many error types
        raise ModelLoadError(
            f"model {name!r} could not be fetched from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Where the hub is reachable, run "
            f"`huggingface-cli download {name} --local-dir DIR` (or save_pretrained), then pass the folder "
            "instead of the name (config: model.name = \"DIR\")") from None


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None


def _weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            shards = json.loads((folder / index).read_text())["weight_map"].values()
            return [folder / s for s in sorted(set(shards))]
    raise ModelLoadError(f"{folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def _normalise_key(key: str) -> str:
    # Original Google BERT checkpoints name LayerNorm parameters gamma / beta (as transformers also accepts).
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def _read_bin(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot be read safely with weights_only=True ({e})") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be read safely with weights_only=True ({e})") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The safetensors header ({key: {dtype, shape, data_offsets}}) and where the data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor read straight into its own fresh buffer. Unlike reading through a memory map, this never
    has the file's pages and the tensor resident at once, so the peak stays at one copy of the weights."""
    header, start = _safetensors_header(path)
    with open(path, "rb") as f:
        for key, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = meta["data_offsets"]
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise ModelLoadError(f"{path}: tensor {key!r} has unsupported dtype {meta['dtype']}")
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise ModelLoadError(f"{path}: file is truncated (tensor {key!r})")
            yield key, buf.view(SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])


class _Checkpoint:
    """The weight files of a checkpoint: their keys (safetensors headers, or the .bin state dicts, each read
    once with weights_only=True and memory-mapped where the format allows), then their tensors one at a time."""

    def __init__(self, files: list[Path]):
        for path in files:
            if not path.exists():
                raise ModelLoadError(f"{path}: weight shard listed in the index is missing")
        self.files = files
        self.bins = {p: _read_bin(p) for p in files if p.suffix != ".safetensors"}
        self.keys = [_normalise_key(k) for p in files
                     for k in (self.bins[p] if p in self.bins else _safetensors_header(p)[0])]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            items = self.bins.pop(path).items() if path in self.bins else _read_safetensors(path)
            for key, tensor in items:
                yield _normalise_key(key), tensor


def _base_prefix(keys: list[str]) -> str:
    for key in keys:
        if key.endswith("embeddings.word_embeddings.weight"):
            return key[: -len("embeddings.word_embeddings.weight")]
    raise ModelLoadError("checkpoint has no embeddings.word_embeddings.weight: not a BERT / XLM-R checkpoint")


# ----- loading ----------------------------------------------------------------------------------------------
def _head_kind_from_config(hf: dict) -> tuple[str | None, int]:
    for arch in hf.get("architectures") or []:
        for kind, suffix in HEAD_SUFFIX.items():
            if arch.endswith(suffix):
                return kind, len(hf.get("id2label") or {}) or 2
    return None, 0


def _materialise_fresh(model: nn.Module, missing: set[str]) -> None:
    """Give the parameters the checkpoint lacks real storage and XLT's initialisation. Only whole modules
    may be fresh (a half-loaded module would silently mix trained and random weights)."""
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if not own or not any(k in missing for k in own):
            continue
        if not all(k in missing for k in own):
            raise ModelLoadError(f"checkpoint has only some of {', '.join(own)}")
        module.to_empty(device="cpu", recurse=False)
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            Encoder._init_weights(module)
        else:  # a bare parameter (the MLM output bias)
            for p in module.parameters(recurse=False):
                nn.init.zeros_(p)


def _load(name_or_dir, kind: str | None, num_labels: int, dtype: torch.dtype | None, **overrides):
    folder = resolve(name_or_dir)
    hf = _read_config(folder)
    cfg = config_from_hf(hf, str(folder / "config.json"))
    if overrides:
        cfg = replace(cfg, **overrides)
    ckpt_kind, ckpt_labels = _head_kind_from_config(hf)
    if kind is not None and kind not in HEAD_KINDS:
        raise ModelLoadError(f"unknown head kind {kind!r}: expected one of {', '.join(HEAD_KINDS)}")
    if kind is not None and kind == ckpt_kind and not num_labels:
        num_labels = ckpt_labels

    with torch.device("meta"):
        encoder = Encoder(cfg)
        model: nn.Module = TaskModel(encoder, make_head(kind, cfg, encoder, num_labels)) if kind else encoder
    enc_prefix = "encoder." if kind else ""
    checkpoint = _Checkpoint(_weight_files(folder))
    base = _base_prefix(checkpoint.keys)
    # checkpoint key -> our parameter name
    wanted = {base + theirs: enc_prefix + ours for ours, theirs in encoder_key_map(cfg).items()}
    if kind:
        wanted |= {theirs: "head." + ours for ours, theirs in head_key_map(kind, cfg).items()}
    params = dict(model.named_parameters())
    report = LoadReport(str(folder))
    id2label = hf.get("id2label") or {}
    report.labels = [id2label[k] for k in sorted(id2label, key=int)] if kind == ckpt_kind else []
    state: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint.tensors():
        ours = wanted.get(key)
        if ours is None:
            if key.endswith(IGNORED_SUFFIXES) or key in TIED_KEYS:
                continue
            if key.startswith(base) and base:  # inside the encoder but unknown to us: the model is not ours
                raise ModelLoadError(f"{folder}: unexpected tensor {key!r} in the encoder weights")
            if not base and key.startswith(("embeddings.", "encoder.", "pooler.")):
                raise ModelLoadError(f"{folder}: unexpected tensor {key!r} in the encoder weights")
            report.unused.append(key)
            continue
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise ModelLoadError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(params[ours].shape)} for {ours} (from config.json)")
        state[ours] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    missing = set(params) - set(state)
    inv = {v: k for k, v in wanted.items()}
    may_be_fresh = {p for p in missing if p.startswith(("head.", enc_prefix + "pooler."))}
    if missing - may_be_fresh:
        names = sorted(inv[p] for p in missing - may_be_fresh)
        raise ModelLoadError(f"{folder}: missing tensor(s) {', '.join(names[:8])}"
                             + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_fresh(model, may_be_fresh)
    if dtype is not None:
        model.to(dtype)
    report.fresh = sorted(may_be_fresh)
    if report.fresh:
        log.warning("%s", report.summary())
    return model, report


def load_encoder(name_or_dir: str | Path, *, dtype: torch.dtype | None = None, **overrides) -> Encoder:
    """An XLT Encoder with the weights of a HF BERT / XLM-R / XLM-R XL checkpoint (hub name or folder).
    `overrides` change config fields that do not affect weights (dropout, kernel_backend)."""
    return _load(name_or_dir, None, 0, dtype, **overrides)[0]


def load_task_model(name_or_dir: str | Path, kind: str | None = None, num_labels: int = 0, *,
                    dtype: torch.dtype | None = None, **overrides) -> tuple[TaskModel, LoadReport]:
    """An encoder with a task head. kind defaults to the checkpoint's own head (its `architectures`); a head
    the checkpoint lacks is initialised fresh and listed in the report."""
    if kind is None:
        folder = resolve(name_or_dir)
        kind, labels = _head_kind_from_config(_read_config(folder))
        if kind is None:
            raise ModelLoadError(f"{folder}: the checkpoint has no task head; pass kind= one of "
                                 f"{', '.join(HEAD_KINDS)}")
        num_labels = num_labels or labels
        name_or_dir = folder
    if kind in ("pair", "tagging") and num_labels < 1:
        raise ModelLoadError(f"a {kind} head needs num_labels >= 1")
    return _load(name_or_dir, kind, num_labels, dtype, **overrides)


def load_tokenizer(name_or_dir: str | Path):
    """The checkpoint's tokenizer through transformers.AutoTokenizer (right padding, as the encoder needs)."""
    from transformers import AutoTokenizer

    folder = resolve(name_or_dir, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"{folder}: no usable tokenizer ({type(e).__name__}: {e})") from None
    tokenizer.padding_side = "right"
    return tokenizer


# ----- export -----------------------------------------------------------------------------------------------
def hf_state_dict(model: Encoder | TaskModel) -> tuple[dict[str, torch.Tensor], str | None]:
    """The model's weights under HF keys, and its head kind (None for a bare encoder)."""
    encoder = model.encoder if isinstance(model, TaskModel) else model
    kind = model.head.kind if isinstance(model, TaskModel) else None
    cfg = encoder.cfg
    _hf_stem(cfg)
    base = BASE_PREFIX[cfg.family] if kind else ""
    ours = encoder.state_dict()
    out = {base + theirs: ours[name] for name, theirs in encoder_key_map(cfg).items()
           if uses_pooler(kind, cfg) or not name.startswith("pooler.")}
    if kind:
        head = model.head.state_dict()
        out |= {theirs: head[name] for name, theirs in head_key_map(kind, cfg).items()}
    return out, kind


def export(model: Encoder | TaskModel, folder: str | Path, *, tokenizer=None, labels: list[str] | None = None,
           extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json, model.safetensors, tokenizer files if given, and
    any `extra_files` texts) that transformers' Auto* class for its head loads; the folder appears complete
    or not at all."""
    state, kind = hf_state_dict(model)
    cfg = (model.encoder if isinstance(model, TaskModel) else model).cfg
    if kind in ("pair", "tagging"):
        outputs = model.head.out.out_features
        labels = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(outputs)]  # HF's names
        if len(labels) != outputs:
            raise ModelLoadError(f"export: {len(labels)} labels given for a head with {outputs} outputs")
    files = {"config.json": json.dumps(config_to_hf(cfg, kind, labels), indent=2),
             "model.safetensors": {k: v.clone() for k, v in state.items()}, **(extra_files or {})}
    write_folder(Path(folder), files, extra=tokenizer.save_pretrained if tokenizer is not None else None)
    return Path(folder)
