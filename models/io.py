"""Atomic file writes: a file or a whole folder appears complete or not at all (temp path, then rename)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(folder: Path, files: dict[str, str | dict[str, torch.Tensor]],
                 extra: Callable[[Path], None] | None = None) -> None:
    """Write {name: text | tensor dict (saved as safetensors)} into a fresh temp folder, let `extra` add
    more (e.g. a tokenizer's files), then rename it over `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        for name, content in files.items():
            if isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / name),
                          metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
