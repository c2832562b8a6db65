"""Progress and metrics: a tqdm bar on a terminal, one console line per log step, JSONL always, and TensorBoard
events when asked for (`run.tensorboard`: the numeric fields of each line as scalars, in the phase's folder)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .distributed import current


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class PhaseLogger:
    def __init__(self, phase: str, jsonl: Path | None = None, console: bool = True, tensorboard: bool = False):
        self.phase = phase
        main = current().is_main  # under torchrun, rank 0 alone logs
        self.jsonl = jsonl if main else None
        self.console = console and main
        self.tensorboard = tensorboard and self.jsonl is not None  # events go next to the JSONL
        self.writer = None
        self.total = 0
        self.bar = None
        self.t0 = time.perf_counter()
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)

    def start(self, total_steps: int, done: int = 0) -> None:
        self.total, self.t0 = total_steps, time.perf_counter()
        if self.console and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=done, desc=self.phase, leave=False, dynamic_ncols=True)
        if self.tensorboard:
            # A resumed phase logs again from step done + 1: purge_step hides the events a killed run wrote
            # after its checkpoint, as truncate() drops its JSONL lines.
            self._open_writer(purge_step=done + 1 if done else None)

    def _open_writer(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only when asked for: tensorboard is optional
        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(str(self.jsonl.parent), purge_step=purge_step)

    def size(self) -> int:
        """Bytes logged so far (a checkpoint records it, so that a resumed phase logs from there again)."""
        return self.jsonl.stat().st_size if self.jsonl is not None and self.jsonl.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop what was logged after `size` bytes (the lines after the checkpoint a phase resumes from)."""
        if self.jsonl is not None and self.jsonl.exists():
            with open(self.jsonl, "r+b") as f:
                f.truncate(size)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, **fields) -> None:
        record = {"phase": self.phase, **fields}
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard and "step" in fields:
            if self.writer is None:
                self._open_writer()
            for key, value in fields.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, fields["step"])
            self.writer.flush()  # as the JSONL line is: a killed run loses nothing it logged
        if not self.console:
            return
        parts = [f"[{self.phase}]"]
        if "step" in fields and self.total:
            parts.append(f"step {fields['step']}/{self.total}")
        for key, value in fields.items():
            if key in ("step", "elapsed_s", "best", "tokens_per_expert"):  # the last one: JSONL only
                continue
            if key == "tokens_per_s":
                parts.append(f"{value / 1000:.1f}k tok/s")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            else:
                parts.append(f"{key} {value}")
        if fields.get("best"):
            parts.append("(best so far)")
        if "elapsed_s" in fields and self.total and fields.get("step"):
            elapsed = fields["elapsed_s"]
            eta = elapsed / fields["step"] * (self.total - fields["step"])
            parts.append(f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")
        line = "  ".join(parts)
        if self.bar is not None:
            if "loss" in fields:
                self.bar.set_postfix(loss=f"{fields['loss']:.4f}", refresh=False)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def say(message: str) -> None:
    """A plain progress message on the console (phase headers, summaries); rank 0 only under torchrun."""
    if current().is_main:
        print(message, flush=True)
