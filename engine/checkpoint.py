"""Checkpoints as folders: config.json + safetensors, written to a temporary path and renamed."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models import Encoder, EncoderConfig


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_dir(folder: Path, files: dict[str, object]) -> None:
    """Write {name: text | tensor dict} into a fresh temp folder, then rename it over `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        for name, content in files.items():
            if isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / name))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_encoder(encoder: Encoder, folder: Path) -> None:
    _write_dir(folder, {"config.json": json.dumps(encoder.cfg.to_dict(), indent=1),
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


def save_task_model(model: torch.nn.Module, folder: Path, meta: dict) -> None:
    """An encoder with its head: one safetensors file for both, plus the encoder config and `meta`."""
    _write_dir(folder, {"config.json": json.dumps(model.encoder.cfg.to_dict(), indent=1),
                        "task.json": json.dumps(meta, indent=1), "model.safetensors": model.state_dict()})
