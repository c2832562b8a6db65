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
