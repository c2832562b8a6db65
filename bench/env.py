"""What a benchmark row records about where it ran."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit(root: Path | None = None) -> str:
    """The checkout's short commit (+dirty); XLT_COMMIT where the tree was copied without .git (the GPU
    machine: bench/gpu_check.sh is handed the commit by its caller)."""
    if os.environ.get("XLT_COMMIT"):
        return os.environ["XLT_COMMIT"]
    try:
        root = root or Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        # bench/results is left out: the rows a bench appends must not mark the next bench's rows dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


# The vector units that decide CPU speed here: machines named alike ("AMD EPYC") differed 2.4x in MLM
# pretraining time (default_cpu.jsonl rows 9d1d552 and 2d92fc9), fp32 on AVX2 against bf16 on AVX512-BF16.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_features() -> list[str]:
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in CPU_FEATURES if f in flags]


def environment() -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
           "cpu": cpu_name(), "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env |= gpu_info()
    return env


def gpu_info() -> dict:
    """The GPU a row ran on: name, CUDA, and through nvidia-ml-py (when installed) the driver, the clocks
    at the time of the row (SM, memory; current and maximum, MHz) and the power limit (W)."""
    info = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
            "gpu_sms": torch.cuda.get_device_properties(0).multi_processor_count}
    try:
        import pynvml
    except ImportError:
        return info | {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info |= {"driver": pynvml.nvmlSystemGetDriverVersion(),
                 "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                 "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                 "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                 "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                 "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000}
    except Exception as e:  # NVML missing or refused in a sandbox: the row says so instead of failing
        info["nvml"] = f"{type(e).__name__}: {e}"
    return info


def append_row(path: Path, row: dict, show: tuple[str, ...]) -> None:
    """Append one JSONL row and print its `show` fields (or why it has no measurement) on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: row[k] for k in show if k in row}
    if row.get("skipped") or row.get("error"):
        shown["note"] = row.get("skipped") or row.get("error")
    print(json.dumps(shown), flush=True)
