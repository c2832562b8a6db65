"""One screen from a bench/gpu_check.sh folder: each stage's status and wall time (and, for a stage that failed or
timed out, what its log says went wrong), the GPU and versions, the kernel tests' outcome, and the key figures of
every bench row.

    python -m bench.gpu_summary FOLDER
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Per bench: the fields that say what a row measured (the rest is environment).
KEY_FIELDS = {
    "attention": ("impl", "shape", "mode", "dtype", "time_ms", "tflops", "max_err"),
    "cross_entropy": ("impl", "n", "h", "v", "dtype", "time_ms", "peak_extra_mib"),
    "moe": ("variant", "dtype", "ms_fwd_bwd", "tokens_per_s", "peak_extra_mib", "routing_share"),
    "throughput": ("preset", "arch", "impl", "mix", "tokens_per_s", "step_ms", "mfu", "peak_mem_mib",
                   "power_w", "joules_per_token"),
}
ENV_FIELDS = ("gpu", "driver", "cuda", "torch", "triton", "commit", "sm_clock_mhz", "sm_clock_max_mhz")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def stage_logs(folder: Path) -> dict[str, list[str]]:
    """Each stage's lines of gpu_check.log, between its `=== NAME (limit` and `=== NAME: exit` markers."""
    log = folder / "gpu_check.log"
    if not log.is_file():
        return {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in log.read_text(errors="replace").splitlines():
        start = re.match(r"=== (\S+) \(limit \d+s\): ", line)
        if start:
            current = sections.setdefault(start.group(1), [])
        elif re.match(r"=== \S+: exit \d+ after ", line):
            current = None
        elif current is not None:
            current.append(line)
    return sections


MAX_EVIDENCE = 8  # lines per failed stage: the summary must stay one screen


def evidence(lines: list[str]) -> list[str]:
    """What a failed or timed-out stage's log says went wrong: pytest's FAILED / ERROR lines, where a
    KeyboardInterrupt (the stage's time limit) caught it, else its last line (a bench's exception)."""
    found = [line for line in lines if re.match(r"(FAILED|ERROR) \S", line)]
    for i, line in enumerate(lines):
        if re.match(r"\S+:\d+: KeyboardInterrupt$", line):  # pytest: the test it was in
            found.append("interrupted at " + line.rsplit(":", 1)[0])
        elif line == "KeyboardInterrupt" and i >= 2:  # a Python traceback: its innermost frame
            frame = next((f.strip() for f in reversed(lines[:i]) if f.strip().startswith("File ")), None)
            found.append(f"interrupted at {frame}" if frame else "interrupted")
    if not found:
        found = [line for line in lines if line.strip()][-1:]
    shown = found[:MAX_EVIDENCE]
    if len(found) > MAX_EVIDENCE:
        shown.append(f"... and {len(found) - MAX_EVIDENCE} more in gpu_check.log")
    return shown


def stages(folder: Path) -> list[str]:
    path = folder / "stages.tsv"
    if not path.is_file():
        return ["(no stages.tsv)"]
    logs = stage_logs(folder)
    lines = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split("\t")
        state = "ok" if rc == "0" else "TIMED OUT" if rc in ("124", "137") else f"FAILED (exit {rc})"
        lines.append(f"  {name:<18} {state:<16} {seconds:>4} s")
        if rc != "0":
            lines += [f"      {e[:150]}" for e in evidence(logs.get(name, []))]
    return lines


def test_outcomes(folder: Path) -> list[str]:
    """pytest's final line for each kernel-test run, from the log."""
    log = folder / "gpu_check.log"
    if not log.is_file():
        return []
    text = log.read_text(errors="replace")
    pattern = r"^=* ?(\d+ (?:passed|failed|error|skipped).*?) ?=*$|^(no tests ran.*)$"
    return [f"  pytest: {m.group(1) or m.group(2)}" for m in re.finditer(pattern, text, re.M)]


def rows(folder: Path) -> list[str]:
    lines, env = [], None
    for path in sorted(folder.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not records:
            continue
        env = env or {k: records[0][k] for k in ENV_FIELDS if k in records[0]}
        bench = records[0].get("bench", path.stem)
        fields = KEY_FIELDS.get(bench, ())
        lines.append(f"{path.name} ({len(records)} rows)")
        for r in records:
            note = r.get("skipped") or r.get("error")
            shown = " ".join(f"{k}={_fmt(r[k])}" for k in fields if k in r and r[k] is not None)
            lines.append(f"  {shown}" + (f"  [{'skipped' if r.get('skipped') else 'error'}: {note}]" if note else ""))
    head = ["environment: " + " ".join(f"{k}={v}" for k, v in env.items())] if env else []
    return head + lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m bench.gpu_summary FOLDER (a bench/gpu_check.sh output folder)", file=sys.stderr)
        return 2
    folder = Path(args[0])
    print("\n".join(["== gpu_check summary: stages", *stages(folder), *test_outcomes(folder), "== rows",
                     *rows(folder)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
