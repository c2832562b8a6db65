"""The kernel micro-benchmarks (bench/test_kernel_micro.py) run as tests here, each once
(--benchmark-disable), so a broken anchor or shape fails CI instead of the GPU check."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_micro_benchmarks_run_once_each():
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "-rs",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
