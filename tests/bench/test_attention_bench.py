"""A tiny CPU run of bench.attention: every row has its fields, the implementations that ran agree with the
fp32 twin on real tokens, and FLOPs count real tokens only. No timing is asserted."""
import json

import pytest

from bench import attention as bench


def test_bench_rows_on_cpu(tmp_path):
    out = tmp_path / "attn.jsonl"
    assert bench.main(["--device", "cpu", "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    shapes = bench.shapes("cpu")
    assert len(rows) == len(shapes) * len(bench.MODES) * len(bench.IMPLS)
    for r in rows:
        assert r["bench"] == "attention" and r["device"] == "cpu" and r["dtype"] == "fp32"
        assert {"commit", "torch", "cpu", "date", "shape", "mode", "heads", "head_dim", "real_tokens"} <= r.keys()
        assert r["real_tokens"] <= r["padded_tokens"] == r["batch"] * r["max_len"]
    skipped = {r["impl"] for r in rows if "skipped" in r}
    assert {"sdpa_cudnn_mask", "varlen_attn", "flash_attn"} <= skipped  # CUDA only
    measured = [r for r in rows if "skipped" not in r]
    assert {"xlt_varlen", "xlt_padded", "sdpa_math_mask"} <= {r["impl"] for r in measured}
    for r in measured:
        assert "error" not in r, r
        assert r["time_ms"] > 0 and r["tflops"] >= 0 and r["repeats"] == 1
        assert r.get("backend", "torch") == "torch"  # CPU: the twin, never the interpreter
        if not r["attends_padding"]:  # every masked implementation computes the same attention
            assert r["max_err"] < 1e-4, r
    mix = next(s for s in shapes if s["name"].startswith("xnli"))
    assert len(set(mix["lengths"])) > 1  # a real mix: padding exists


def test_flops_count_real_tokens_only():
    assert bench.flops([3, 5], 2, 4, "fwd") == 4 * (9 + 25) * 4 * 2
    assert bench.flops([3, 5], 2, 4, "fwd_bwd") == 3.5 * bench.flops([3, 5], 2, 4, "fwd")


def test_bench_rejects_unknown_impl(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--impls", "fastest"])
    assert e.value.code == 2 and "expected one of" in capsys.readouterr().err
