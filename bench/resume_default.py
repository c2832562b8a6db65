"""Never lose work, measured on the embedded default: `python -m engine.train` run uninterrupted, and run again
with a real SIGKILL in the middle of a target phase, then `--resume`d; the two results.json must agree.

    python -m bench.resume_default [--phase syn-mnli/syn-xnli] [--after 4] [--results bench/results/resume_cpu.jsonl]
        [engine.train options]

Both runs share one pretraining cache (the first run fills it; the killed run's pretraining is then cached,
which is what a resumed study meets too). The child kills itself with SIGKILL right after the `--after`-th
checkpoint of `--phase`. Appends one JSONL row: the wall times, where it was killed, whether the scores, the
summary and every phase's logged losses agree.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .env import append_row, environment

KILLER = textwrap.dedent("""
    import os, signal, sys
    phase, nth = sys.argv[1], int(sys.argv[2])
    import engine.trainer as trainer
    real_save, seen = trainer.Checkpoints.save, [0]

    def save(self, step, state, *args):
        path = real_save(self, step, state, *args)
        if f"/{phase}/state/" in str(path):
            seen[0] += 1
            if seen[0] == nth:
                print(f"[bench] SIGKILL after checkpoint {path}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer.Checkpoints.save = save
    from engine.train import main
    sys.exit(main(sys.argv[3:]))
""")


def _losses(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("metrics.jsonl")):
        if path.parent.name == "pretrain":  # the killed run reuses the first run's cached pretraining
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out[str(path.relative_to(folder))] = [{k: r.get(k) for k in ("step", "loss", "dev_score")} for r in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="syn-mnli/syn-xnli")
    ap.add_argument("--after", type=int, default=4, help="kill after this many checkpoints of the phase")
    ap.add_argument("--results", default="bench/results/resume_cpu.jsonl")
    args, extra = ap.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--run.console", "false", "--run.cache_dir", f"{tmp}/cache", "--run.checkpoint_every", "50",
                  *extra]
        t0 = time.perf_counter()
        first = subprocess.run([sys.executable, "-m", "engine.train", "--out", f"{tmp}/a", *common])
        uninterrupted_s = time.perf_counter() - t0
        if first.returncode != 0:
            return first.returncode
        script = Path(tmp) / "killer.py"
        script.write_text(KILLER)
        t0 = time.perf_counter()
        killed = subprocess.run([sys.executable, str(script), args.phase, str(args.after), "--out", f"{tmp}/b",
                                 *common])
        resumed = subprocess.run([sys.executable, "-m", "engine.train", "--out", f"{tmp}/b", "--resume", *common])
        interrupted_s = time.perf_counter() - t0
        if resumed.returncode != 0:
            return resumed.returncode
        a, b = (json.loads(Path(f"{tmp}/{x}/results.json").read_text()) for x in ("a", "b"))
        losses_equal = _losses(Path(f"{tmp}/a")) == _losses(Path(f"{tmp}/b"))
        resumed_at = b["phases"].get(args.phase, {}).get("resumed_after_step")
    row = {"bench": "resume_default", **environment(), "args": extra, "phase": args.phase,
           "killed_exit_code": killed.returncode, "resumed_after_step": resumed_at,
           "uninterrupted_s": round(uninterrupted_s, 1), "killed_and_resumed_s": round(interrupted_s, 1),
           "scores_equal": a["scores"] == b["scores"], "summary_equal": a["summary"] == b["summary"],
           "logged_losses_equal": losses_equal}
    append_row(Path(args.results), row, ("commit", "killed_exit_code", "resumed_after_step", "scores_equal",
                                         "summary_equal", "logged_losses_equal"))
    return 0 if row["scores_equal"] and row["logged_losses_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
