"""bench/gpu_check.sh cannot run without a GPU; what can be checked here is checked: the script parses, its
stage limits add up to the 8 minutes it promises, every bench it calls exists and takes the options it is
given, what it imports needs no `datasets` (the GPU machines have none), a stage stopped at its limit still
reports what it met, and the summary reads its folder."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_script_parses_and_its_limits_fit_eight_minutes():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    limits = [int(n) for n in re.findall(r'^stage \S+ (\d+) ', text, re.M)]
    assert len(limits) >= 8
    assert sum(limits) <= 8 * 60 - 15  # room for the header and the summary


def test_every_bench_it_calls_takes_the_options_it_is_given():
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(r'-m (bench\.\w+)((?: +--[\w-]+(?:[= ]+"?[^\s"]*"?)?)*)', text)
    assert {m for m, _ in calls} >= {"bench.attention", "bench.cross_entropy", "bench.moe", "bench.throughput",
                                     "bench.gpu_summary"}
    for module, options in calls:
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        for flag in re.findall(r"--[\w-]+", options):
            assert f'"{flag}"' in source, f"{module} has no option {flag}"


def test_what_the_gpu_machine_imports_needs_no_datasets():
    blocker = ("import sys\nclass _No:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'datasets': raise ImportError('no datasets here')\n"
               "sys.meta_path.insert(0, _No())\n")
    imports = re.search(r'stage imports \d+ "\$PY" -c "(.*?)"\n', SCRIPT.read_text(), re.S).group(1)
    code = blocker + "\n".join(line for line in imports.splitlines() if "cuda.is_available" not in line)
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_summary_reads_a_check_folder(tmp_path):
    (tmp_path / "stages.tsv").write_text("imports\t0\t3\nkernel-tests-1\t1\t80\nthroughput\t124\t110\n")
    (tmp_path / "gpu_check.log").write_text("=== kernel-tests-1\n....F\n1 failed, 4 passed in 80.1s\n")
    row = {"bench": "attention", "gpu": "NVIDIA H200", "commit": "abc1234", "impl": "xlt", "mode": "fwd_bwd",
           "tflops": 412.345678, "max_err": 0.002}
    (tmp_path / "attention_cuda.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(
        {"bench": "attention", "impl": "flash_attn", "skipped": "flash-attn is not installed"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_summary", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "kernel-tests-1     FAILED (exit 1)" in out and "throughput         TIMED OUT" in out
    assert "pytest: 1 failed, 4 passed in 80.1s" in out
    assert "impl=xlt mode=fwd_bwd tflops=412.3 max_err=0.002" in out
    assert "[skipped: flash-attn is not installed]" in out and "gpu=NVIDIA H200" in out


def _stage_function() -> str:
    """The script's own `stage` function, to run it here on commands that stand in for the GPU's."""
    return re.search(r"^stage\(\) \{.*?^\}$", SCRIPT.read_text(), re.M | re.S).group(0)


@pytest.mark.slow  # two stages run to their limits (8 s and 3 s)
def test_a_stage_stopped_at_its_limit_still_reports_what_it_met(tmp_path):
    # A pytest stage that fails one test and then hangs in the next, and a bench that hangs in a function, each
    # stopped at its limit by the script's own `stage`. The launcher may ignore SIGINT / SIGTERM (a background
    # job does): `trap '' INT TERM` stands in for it.
    (tmp_path / "test_stand_in.py").write_text(
        "import time\n\ndef test_fails():\n    assert 1 == 2, 'wrong'\n\n"
        "def test_hangs():\n    time.sleep(120)\n")
    bench = "import time\n\ndef step():\n    time.sleep(120)\n\nstep()\n"
    script = "\n".join([
        "trap '' INT TERM", f"LOG={tmp_path}/gpu_check.log", f"STATUS={tmp_path}/stages.tsv", _stage_function(),
        f"cd {tmp_path}",
        f"stage kernel-tests-1 8 {sys.executable} -m pytest test_stand_in.py -q -p no:cacheprovider -rfE",
        f"stage throughput 3 {sys.executable} -c '{bench}'"])
    subprocess.run(["bash", "-c", script], check=True, timeout=60, capture_output=True)
    rcs = dict(line.split("\t")[:2] for line in (tmp_path / "stages.tsv").read_text().splitlines())
    assert rcs == {"kernel-tests-1": "124", "throughput": "124"}  # stopped by the limit, not by the kill after it
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_summary", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    out = proc.stdout
    assert "FAILED test_stand_in.py::test_fails - AssertionError: wrong" in out, out
    assert f"interrupted at {tmp_path}/test_stand_in.py" in out, out  # the test it was in when its time ran out
    assert 'interrupted at File "<string>", line 4, in step' in out, out
    assert "pytest: 1 failed" in out, out
