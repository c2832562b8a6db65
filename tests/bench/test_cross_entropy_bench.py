"""A tiny run of bench.cross_entropy: every row has its fields, and the implementations agree on the loss.
No timing is asserted."""
import json

import pytest

from bench import cross_entropy as bench


def test_bench_rows_at_a_small_size(tmp_path):
    out = tmp_path / "ce.jsonl"
    assert bench.main(["--device", "cpu", "--sizes", "96:16:700", "--repeats", "1", "--threads", "1",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == list(bench.IMPLS)
    for r in rows:
        assert r["bench"] == "cross_entropy" and r["device"] == "cpu" and (r["n"], r["h"], r["v"]) == (96, 16, 700)
        assert {"commit", "torch", "cpu", "date"} <= r.keys()
    measured = [r for r in rows if "skipped" not in r]
    skipped = {r["impl"]: r["skipped"] for r in rows if "skipped" in r}
    assert "liger" in skipped  # CUDA only
    assert {"xlt", "eager"} <= {r["impl"] for r in measured}
    for r in measured:
        assert "error" not in r, r
        assert r["time_ms"] > 0 and r["peak_extra_mib"] >= 0 and r["repeats"] == 1 and r["memory_method"]
    losses = [r["loss"] for r in measured]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])  # same inputs, same loss
    xlt = next(r for r in measured if r["impl"] == "xlt")
    assert xlt["backend"] == "torch" and xlt["chunk_rows"] == 96


def test_bench_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--sizes", "96x16x700"])
    assert e.value.code == 2 and "expected N:H:V" in capsys.readouterr().err
