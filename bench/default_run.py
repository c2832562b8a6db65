"""Wall time and transfer of the embedded default, `python -m engine.train`, as a new user sees it: from
a cold pretraining cache (or a warm one with --warm), in a subprocess, on this machine.

    python -m bench.default_run [--warm] [--results bench/results/default_cpu.jsonl] [engine.train options]

Appends one JSONL row: environment, wall seconds, pretraining seconds, and the transfer summary
(English vs zero-shot mean per condition and task).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .env import environment


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", action="store_true", help="reuse the user's pretraining cache instead of a cold one")
    ap.add_argument("--results", default="bench/results/default_cpu.jsonl")
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "engine.train", "--out", f"{tmp}/run", "--run.console", "false"]
        if not args.warm:
            cmd += ["--run.cache_dir", f"{tmp}/cache"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + extra)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"engine.train failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        results = json.loads(Path(f"{tmp}/run/results.json").read_text())
    row = {"bench": "default_run", **environment(), "cold_cache": not args.warm, "args": extra,
           "wall_s": round(wall, 1), "pretrain_s": round(results["phases"]["pretrain"].get("seconds", 0.0), 1),
           "summary": {c: {t: {k: s[k] for k in ("en", "zero_shot_mean", "ratio")} for t, s in by_task.items()}
                       for c, by_task in results["summary"]["by_condition"].items()},
           "scores": results["scores"],
           # training-loop seconds of every phase (dev evaluations included; test scoring and data not)
           "phase_s": {name: round(info["seconds"], 1) for name, info in results["phases"].items()
                       if info.get("seconds") is not None}}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("commit", "wall_s", "pretrain_s")} | {"summary": row["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
