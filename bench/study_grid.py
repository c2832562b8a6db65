"""The default synthetic study grid (recipes/study-synthetic.toml: 3 sizes x 2 architectures x 3 conditions x
2 seeds) as a new user runs it: `python -m engine.study --workers 2`, cold pretraining and feature caches, in a
subprocess, on this machine.

    python -m bench.study_grid [--config recipes/study-synthetic.toml] [--workers 2]
        [--results bench/results/study_synthetic] [engine.study options]

Appends one JSONL row (environment, wall seconds, cells done / failed) to <results>.jsonl and copies the
study's report (report.md, the CSVs, plots/, status.json) into <results>/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .env import append_row, environment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recipes/study-synthetic.toml")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--results", default="bench/results/study_synthetic")
    args, extra = ap.parse_known_args(argv)
    results = Path(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "engine.study", "--config", args.config, "--workers", args.workers,
               "--out", f"{tmp}/study", "--study.cache_dir", f"{tmp}/cache", *extra]
        t0 = time.perf_counter()
        code = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t0
        study = Path(tmp) / "study"
        if not (study / "status.json").is_file():
            print(f"engine.study failed with exit code {code}", file=sys.stderr)
            return code or 1
        status = json.loads((study / "status.json").read_text())
        if results.exists():
            shutil.rmtree(results)
        results.mkdir(parents=True)
        for name in ("report.md", "cells.csv", "summary.csv", "deltas.csv", "status.json", "study.json"):
            if (study / name).is_file():
                shutil.copy(study / name, results / name)
        if (study / "plots").is_dir():
            shutil.copytree(study / "plots", results / "plots")
    states = [s["state"] for s in status.values()]
    row = {"bench": "study_grid", **environment(), "config": args.config, "workers": int(args.workers),
           "args": extra, "wall_s": round(wall, 1), "cells": len(states), "done": states.count("done"),
           "failed": states.count("failed"),
           "cell_s": {cid: s.get("seconds") for cid, s in status.items()}}
    append_row(Path(f"{results}.jsonl"), row, ("commit", "wall_s", "cells", "done", "failed"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
