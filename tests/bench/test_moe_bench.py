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
