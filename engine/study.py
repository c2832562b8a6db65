"""`python -m engine.study [--config STUDY.toml] [--study.key value ...] [--out DIR] [--workers N] [--dry-run]`

The research question as one command: model size x architecture (dense / MoE) x intermediate condition x
seed. Each cell is one `python -m engine.train` run in its own folder (`<out>/cells/<size>/<arch>/seed-<s>/
<condition>/`); a cell whose results.json exists is never redone, so rerunning a study picks up where it
stopped. Cells run as independent processes: `--workers N` locally (each with cores / N threads and, where CUDA
devices are visible, a GPU of its own: worker k's cells see the k-th device, round-robin when there are more
workers than devices), or through submitit (`study.launcher = "submitit"`: SLURM on a cluster, its local
executor elsewhere). A failing cell is reported and does not stop the others. After every finished cell the
report is rewritten (engine/study_report.py: report.md, cells.csv, summary.csv, deltas.csv, plots/*.png). Exit
code 0 when every cell is done, 1 when some failed, 2 for a bad study configuration.

Cells that share a pretraining (same preset, architecture and seed; an upcycled MoE shares its dense
pretraining) run one first, so the others find it in the cache instead of pretraining it again side by side.
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, _parse_literal, _set, _toml_value, load, read_toml

ARCHS = {
    # name -> engine.train model options. "moe" is matched on active parameters: pretrained sparse from scratch
    # for presets (experts of width FFN / top_k), upcycled top-1 copies for a Hugging Face model.
    "dense": {"model.arch": "dense"},
    "moe": {"model.arch": "moe", "model.match": "active"},
    "moe-total": {"model.arch": "moe", "model.match": "total"},
    "moe-upcycled": {"model.arch": "moe", "model.match": "active", "model.upcycle": True, "model.top_k": 1},
}
LAUNCHERS = ("local", "submitit")


@dataclass
class StudyConfig:
    name: str = "synthetic-grid"
    recipe: str = ""  # the engine.train recipe every cell starts from ("" = the embedded default)
    # presets pretrained on the synthetic corpus, or Hugging Face models (hub names or folders)
    sizes: list[str] = field(default_factory=lambda: ["xlt-64", "xlt-tiny", "xlt-256"])
    archs: list[str] = field(default_factory=lambda: ["dense", "moe-upcycled"])
    conditions: list[str] = field(default_factory=lambda: ["baseline", "syn-mnli", "multi:syn-mnli+syn-swag"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    workers: int = 1
    threads: int = 0  # torch threads per cell; 0 = the machine's cores / workers
    launcher: str = "local"  # local (processes here) | submitit (SLURM, or its local executor)
    submitit_cluster: str = ""  # "" = SLURM when available, else local; "local" | "slurm" to force one
    submitit: dict = field(default_factory=dict)  # executor parameters: timeout_min, slurm_partition, gpus_per_node
    cache_dir: str = ""  # the cells' shared pretraining / feature cache ("" = $XLT_CACHE or ~/.cache/xlt)
    overrides: dict = field(default_factory=dict)  # engine.train options for every cell: {"target.epochs" = 2}
    arch_overrides: dict = field(default_factory=dict)  # arch -> {option: value}
    size_overrides: dict = field(default_factory=dict)  # size -> {option: value}


@dataclass
class StudyFile:
    study: StudyConfig = field(default_factory=StudyConfig)


@dataclass(frozen=True)
class Cell:
    size: str
    arch: str
    condition: str
    seed: int

    @property
    def id(self) -> str:
        return f"{_slug(self.size)}/{self.arch}/seed-{self.seed}/{self.condition.replace(':', '-')}"

    @property
    def pretraining(self) -> tuple:
        """Cells with the same key share one pretraining (an upcycled MoE starts from the dense one)."""
        arch = "dense" if self.arch == "moe-upcycled" else self.arch
        return self.size, arch, self.seed


def _slug(size: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(size).name if "/" in size else size)


def load_study(path: str | None, overrides: list[tuple[str, str]]) -> StudyConfig:
    root = StudyFile()
    if path is not None:
        for section, value in read_toml(path).items():
            _set(root, section, value, f"{path}: {section}")
    for dotted, raw in overrides:
        section, _, key = dotted.partition(".")
        if section != "study" or not key or "." in key:
            raise ConfigError(f"--{dotted}: study options take the form --study.key value")
        _set(root.study, key, _parse_literal(raw), f"--{dotted}", merge=True)  # a table joins the recipe's
    return root.study


def grid(s: StudyConfig) -> list[Cell]:
    return [Cell(size, arch, c, seed) for size in s.sizes for arch in s.archs for c in s.conditions for seed in s.seeds]


def _option_args(options: dict, where: str) -> list[str]:
    args = []
    for key, value in options.items():
        if "." not in key:
            raise ConfigError(f"{where}: {key!r}: expected an engine.train option section.key")
        args += [f"--{key}", value if isinstance(value, str) else _toml_value(value)]
    return args


def is_preset(size: str) -> bool:
    from models import PRESETS

    return size in PRESETS


def cell_args(cell: Cell, s: StudyConfig, out: Path) -> list[str]:
    """engine.train arguments of a cell (after the recipe): size, architecture, condition, seed, then the
    study's overrides, the architecture's and the size's."""
    args = ["--config", str(Path(s.recipe).resolve())] if s.recipe else []
    args += ["--out", str((out / "cells" / cell.id).resolve()), "--run.seed", str(cell.seed), "--run.console", "false",
             "--protocol.conditions", cell.condition, "--run.name", cell.id.replace("/", "-")]
    if s.cache_dir:
        args += ["--run.cache_dir", s.cache_dir if s.cache_dir == "none" else str(Path(s.cache_dir).resolve())]
    args += ["--model.preset", cell.size] if is_preset(cell.size) else ["--model.name", cell.size]
    threads = s.threads or max(1, (os.cpu_count() or 1) // max(1, s.workers))
    args += ["--run.threads", str(threads)]
    args += _option_args(ARCHS[cell.arch], "study.archs")
    args += _option_args(s.overrides, "study.overrides")
    args += _option_args(s.arch_overrides.get(cell.arch, {}), f"study.arch_overrides.{cell.arch}")
    args += _option_args(s.size_overrides.get(cell.size, {}), f"study.size_overrides.{cell.size}")
    return args


def check(s: StudyConfig, out: Path, dry_run: bool = False) -> list[Cell]:
    """Every cell's configuration resolves (engine.train's own checks, without data or training). A dry run
    lists cells whose Hugging Face model cannot be reached here (it is checked when the cell runs)."""
    from engine.protocol import plan
    from engine.train import parse_args

    for name, values, allowed in (("archs", s.archs, ARCHS), ("launcher", [s.launcher], LAUNCHERS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(f"study.{name}: {', '.join(map(repr, bad))}: expected among {', '.join(allowed)}")
    for name in ("sizes", "archs", "conditions", "seeds"):
        values = getattr(s, name)
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"study.{name}: give at least one, each once")
    if s.workers < 1 or s.threads < 0:
        raise ConfigError(f"study.workers must be >= 1 and study.threads >= 0, got {s.workers}, {s.threads}")
    for table, keys in (("arch_overrides", s.archs), ("size_overrides", s.sizes)):
        unknown = sorted(set(getattr(s, table)) - set(keys))
        if unknown:
            raise ConfigError(f"study.{table}: {', '.join(unknown)} not in study.{table.split('_')[0]}s")
    if s.recipe and not Path(s.recipe).is_file():
        raise ConfigError(f"study.recipe: {s.recipe}: no such file")
    cells = grid(s)
    checked = set()
    for cell in cells:
        key = (cell.size, cell.arch, cell.condition)
        if key in checked:
            continue
        checked.add(key)
        path, overrides, _ = parse_args(cell_args(cell, s, out))
        try:
            plan(load(path, overrides))
        except ConfigError as e:
            if not (dry_run and str(e).startswith("model.name:")):
                raise ConfigError(f"cell {cell.id}: {e}") from None
    return cells


# ----- running ------------------------------------------------------------------------------------------------
def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "engine.train", *args, "--overwrite"]  # a failed attempt's folder is replaced


def run_cell_process(args: list[str], log: str) -> int:
    """One cell: engine.train in its own process, output to `log`. Module-level, so submitit can pickle it."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(train_command(args), stdout=f, stderr=subprocess.STDOUT).returncode


class Status:
    """<out>/status.json: every cell's state (queued, running with its pid, done, failed), written atomically."""

    def __init__(self, path: Path, cells: list[Cell]):
        self.path, self.lock = path, threading.Lock()
        self.cells = {c.id: {"state": "queued"} for c in cells}

    def set(self, cell: Cell, **fields) -> None:
        with self.lock:
            log = self.cells.get(cell.id, {}).get("log")
            self.cells[cell.id] = ({"log": log} if log else {}) | fields
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.cells, indent=1))
            tmp.replace(self.path)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def visible_gpus() -> list[str]:
    """The CUDA devices the cells may use: CUDA_VISIBLE_DEVICES's entries where it is set (a negative one hides
    the rest, as CUDA reads it), else every device torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = []
        for d in (d.strip() for d in env.split(",")):
            if not d or d.startswith("-"):
                break
            gpus.append(d)
        return gpus
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(cells: list[Cell], s: StudyConfig, out: Path, status: Status, finished) -> None:
    # One slot per worker; a cell takes a free slot and, where there are GPUs, that slot's GPU alone: without
    # it every cell's run.device = "cuda" would be the first GPU.
    gpus = visible_gpus()
    slots: queue.Queue = queue.Queue()
    for k in range(s.workers):
        slots.put(k)

    def one(cell: Cell) -> tuple[Cell, int, float]:
        log = out / "logs" / f"{cell.id.replace('/', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        slot = slots.get()
        env = os.environ | ({"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {})
        start = time.perf_counter()
        try:
            with open(log, "w") as f:
                proc = subprocess.Popen(train_command(cell_args(cell, s, out)), stdout=f, stderr=subprocess.STDOUT,
                                        env=env)
                status.set(cell, state="running", pid=proc.pid, log=str(log),
                           **({"gpu": env["CUDA_VISIBLE_DEVICES"]} if gpus else {}))
                code = proc.wait()
        finally:
            slots.put(slot)
        return cell, code, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=s.workers) as pool:
        for future in as_completed([pool.submit(one, c) for c in cells]):
            finished(*future.result())


def run_submitit(cells: list[Cell], s: StudyConfig, out: Path, status: Status, finished) -> None:
    try:
        import submitit
    except ImportError:
        raise ConfigError("study.launcher = submitit needs submitit: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=out / "submitit", cluster=s.submitit_cluster or None)
    executor.update_parameters(**({"timeout_min": 24 * 60} | s.submitit))
    jobs = {}
    for cell in cells:
        log = out / "logs" / f"{cell.id.replace('/', '-')}.log"
        job = executor.submit(run_cell_process, cell_args(cell, s, out), str(log))
        jobs[job] = (cell, time.perf_counter())
        status.set(cell, state="running", job=str(job.job_id), log=str(log))
    while jobs:
        for job in [j for j in jobs if j.done()]:
            cell, start = jobs.pop(job)
            try:
                code = job.result()
            except Exception as e:  # the job died (killed, preempted, out of time): a failed cell
                code = -signal.SIGKILL if "SIGKILL" in str(e) or "signal 9" in str(e) else 1
            finished(cell, code, time.perf_counter() - start)
        time.sleep(0.5)


def run_study_grid(s: StudyConfig, out: Path, dry_run: bool = False) -> int:
    from .study_report import describe_cells, write_report

    cells = check(s, out, dry_run)
    if dry_run:
        print(describe_cells(cells, s))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"name": s.name, "cells": [c.id for c in cells]}, indent=1))
    status = Status(out / "status.json", cells)
    todo = []
    for cell in cells:
        if (out / "cells" / cell.id / "results.json").is_file():
            status.set(cell, state="done", reused=True)
        else:
            todo.append(cell)
    print(f"[study] {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
          f"({s.workers} workers, launcher {s.launcher})", flush=True)
    failed: list[str] = []

    def finished(cell: Cell, code: int, seconds: float) -> None:
        ok = code == 0 and (out / "cells" / cell.id / "results.json").is_file()
        status.set(cell, state="done" if ok else "failed", seconds=round(seconds, 1),
                   **({} if ok else {"error": _describe(code)}))
        if not ok:
            failed.append(cell.id)
        print(f"[study] {cell.id}: {'done' if ok else 'FAILED (' + _describe(code) + ')'} in {seconds:.0f} s",
              flush=True)
        write_report(out, cells, status.cells)

    # one cell per pretraining first, so that the others find it cached instead of pretraining it again
    leaders = {}
    for cell in todo:
        leaders.setdefault(cell.pretraining, cell)
    first = [c for c in todo if is_preset(c.size) and leaders[c.pretraining] == c]
    rest = [c for c in todo if c not in first]
    launch = run_local if s.launcher == "local" else run_submitit
    for batch in (first, rest):
        if batch:
            launch(batch, s, out, status, finished)
    write_report(out, cells, status.cells)
    print(f"[study] report: {out / 'report.md'}" + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


USAGE = __doc__.strip().splitlines()[0].strip("`") + """

options:
  --config FILE        a TOML file with a [study] table (see recipes/study-*.toml)
  --out DIR            the study folder (default runs/study-<study.name>)
  --workers N          cells run at the same time (study.workers)
  --dry-run            list the cells with their parameter counts, run nothing
  --study.key VALUE    one study setting, e.g. --study.seeds 0,1,2 --study.sizes xlt-64,xlt-tiny
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides, out, dry_run = None, [], None, False
    i = 0
    try:
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                print(USAGE)
                return 0
            if arg == "--dry-run":
                dry_run, i = True, i + 1
                continue
            name, eq, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
            if not arg.startswith("--"):
                raise ConfigError(f"unexpected argument {arg!r} (see --help)")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"option --{name} needs a value")
                value, i = argv[i + 1], i + 1
            i += 1
            if name == "config":
                path = value
            elif name == "out":
                out = Path(value)
            elif name == "workers":
                overrides.append(("study.workers", value))
            elif name.startswith("study."):
                overrides.append((name, value))
            else:
                raise ConfigError(f"unknown option --{name} (see --help)")
        s = load_study(path, overrides)
        return run_study_grid(s, out or Path("runs") / f"study-{s.name}", dry_run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
