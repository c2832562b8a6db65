"""The timing and memory methods every kernel bench shares (bench/README.md, "Methods"):

- time on CUDA: CUDA events around each timed call (the host waits for the end event), after the warm-up
  calls (Triton compiles and autotunes then); on CPU: time.perf_counter. Rows report the median.
- memory on CUDA: torch.cuda.max_memory_allocated during a call minus torch.cuda.memory_allocated before it
  (the caching allocator's counters), so the figure is the call's extra memory, not the process's peak.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def timed_calls(fn: Callable, device, repeats: int, warmup: int = 0):
    """Call fn() `warmup` times, then `repeats` timed times: (milliseconds per timed call, the last result)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    result = None
    for _ in range(warmup):
        result = fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def median_ms(fn: Callable, device, repeats: int, warmup: int = 0) -> float:
    """The median of timed_calls' milliseconds."""
    return statistics.median(timed_calls(fn, device, repeats, warmup)[0])


def cuda_peak_extra_bytes(fn: Callable):
    """(bytes fn() allocates at its peak beyond what was allocated before it, fn's result), on CUDA."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, result


CUDA_MEMORY_METHOD = "cuda max_memory_allocated - memory_allocated before the call"
