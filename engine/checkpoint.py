"""Checkpoints as folders: config.json + safetensors, written to a temporary path and renamed."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import Encoder, EncoderConfig, TaskModel, hf
from models.io import atomic_write_text, write_folder

__all__ = ["atomic_write_text", "load_encoder", "save_encoder", "save_task_model"]


def save_encoder(encoder: Encoder, folder: Path) -> None:
    write_folder(folder, {"config.json": json.dumps(encoder.cfg.to_dict(), indent=1),
                        "model.safetensors": encoder.state_dict()})


def load_encoder(folder: Path) -> Encoder:
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: not an XLT encoder checkpoint (missing {name})")
    cfg = EncoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        encoder = Encoder(cfg)
    state = load_file(str(folder / "model.safetensors"))
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder


def save_task_model(model: TaskModel | Encoder, folder: Path, meta: dict, tokenizer=None) -> None:
    """A fine-tuned model (or a bare encoder, e.g. after multi-task training) as a Hugging Face folder
    (transformers' Auto* class for its head loads it, and so does models.hf.load_task_model) with the tokenizer
    and `meta` (task.json) beside it. Architectures without a Hugging Face class are saved in XLT's own layout
    (config.json + model.safetensors)."""
    extra_files = {"task.json": json.dumps(meta, indent=1)}

    def add_tokenizer(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    # A dual encoder's head holds only its training scale: the model is its encoder (transformers' AutoModel).
    exported = model.encoder if isinstance(model, TaskModel) and model.head.kind == "dual-encoder" else model
    encoder = model.encoder if isinstance(model, TaskModel) else model
    try:
        hf.export(exported, folder, tokenizer=tokenizer, labels=meta.get("labels") or None, extra_files=extra_files)
    except hf.ModelLoadError:  # e.g. pre-layer-norm with an embedding norm, or MoE: no HF class to load it
        write_folder(folder, {"config.json": json.dumps(encoder.cfg.to_dict(), indent=1),
                              "model.safetensors": exported.state_dict(), **extra_files}, extra=add_tokenizer)


def load_exported(module: TaskModel | Encoder, folder: Path) -> None:
    """The weights of a folder written by save_task_model, loaded into `module` (a TaskModel or a bare Encoder
    of the same architecture): how a resumed run takes up a finished phase's result. Parameters the folder
    does not hold (a pooler that its head does not use, and so did not train) keep `module`'s values."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    if "model_type" in meta:  # a Hugging Face folder
        kind, _ = hf._head_kind_from_config(meta)
        if kind:
            loaded, report = hf.load_task_model(folder)  # the head kind and labels from its config.json
            fresh = set(report.fresh)
        else:
            loaded, fresh = hf.load_encoder(folder), set()
        state = {k: v for k, v in loaded.state_dict().items() if k not in fresh}
    else:  # XLT's own layout
        state = load_file(str(folder / "model.safetensors"))
    if isinstance(module, Encoder):
        if any(k.startswith("encoder.") for k in state):
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    elif not any(k.startswith("encoder.") for k in state):  # a bare encoder exported for a TaskModel (dual encoder)
        state = {f"encoder.{k}": v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or any(not (k.split(".")[0] == "head" or ".pooler." in f".{k}") for k in missing):
        raise hf.ModelLoadError(f"{folder}: does not hold this model's weights (missing {missing[:4]}, "
                                f"unexpected {unexpected[:4]})")
