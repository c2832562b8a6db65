"""Smoke run of bench/moe.py: it writes one well-formed row per variant (no timing assertions)."""
import json

import pytest

from bench import moe as bench_moe


def test_tiny_cpu_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "moe_cpu.jsonl"
    assert bench_moe.main(["--device", "cpu", "--tiny", "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_variant = {r["variant"]: r for r in rows}
    assert {"dense_equal_active", "moe_torch", "moe_grouped_mm", "megablocks_dmoe"} <= set(by_variant)
    for name in ("dense_equal_active", "moe_torch"):
        r = by_variant[name]
        assert "skipped" not in r and r["ms_fwd_bwd"] > 0 and r["tokens_per_s"] > 0
        assert r["commit"] and r["torch"] and r["tokens"] == 256 and r["experts"] == 4
    assert 0 < by_variant["moe_torch"]["routing_share"]
    for r in rows:  # every row either measured or says why not
        assert ("ms_fwd_bwd" in r) != ("skipped" in r)
    assert "moe_torch" in capsys.readouterr().out


def test_bad_top_k_is_an_error():
    with pytest.raises(SystemExit):
        bench_moe.main(["--tiny", "--top-k", "9"])


def test_timing_goes_through_the_shared_helper_after_warm_up(tmp_path, monkeypatch):
    """bench.moe times every measured variant (and its routing step) with bench.timing, after warm-up calls."""
    from bench import timing
    calls = []

    def spy(fn, device, repeats, warmup=0):
        calls.append((str(device), repeats, warmup))
        return timing.median_ms(fn, device, repeats, warmup)

    monkeypatch.setattr(bench_moe, "median_ms", spy)
    out = tmp_path / "moe_cpu.jsonl"
    assert bench_moe.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    measured = [r for r in map(json.loads, out.read_text().splitlines()) if "skipped" not in r]
    routed = [r for r in measured if "routing_ms" in r]
    assert len(calls) == len(measured) + len(routed) and routed
    assert bench_moe.WARMUP >= 1 and all(c == ("cpu", measured[0]["repeats"], bench_moe.WARMUP) for c in calls)
    assert not any("peak_extra_mib" in r for r in measured)  # no allocator counter on CPU


class _FakeEvent:
    clock = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        _FakeEvent.clock[0] += 1.5
        self.t = _FakeEvent.clock[0]

    def elapsed_time(self, other):
        return other.t - self.t


def test_cuda_timing_uses_events_and_memory_is_extra_over_the_base(monkeypatch):
    """The shared helper's CUDA branches, with torch.cuda's events and counters faked (no GPU here): times are
    the events' elapsed milliseconds (not perf_counter), warm-up calls are not timed, and memory is the
    peak during the call minus what was allocated before it."""
    import time

    import torch

    from bench import timing
    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    monkeypatch.setattr(time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("perf_counter on CUDA")))
    n = []
    times, last = timing.timed_calls(lambda: n.append(1) or len(n), "cuda", repeats=3, warmup=2)
    assert times == [1.5, 1.5, 1.5] and last == 5 and len(syncs) >= 4
    assert timing.median_ms(lambda: None, torch.device("cuda"), repeats=3) == 1.5
    state = {"allocated": 1000, "peak": 1000}

    def call():
        state["peak"] = state["allocated"] + 300
        return "done"
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    assert timing.cuda_peak_extra_bytes(call) == (300, "done")
