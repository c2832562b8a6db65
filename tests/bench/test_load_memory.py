"""The load-memory benchmark runs end to end at a tiny size and writes sane rows (no memory assertions:
targets are met in benchmarks, not in tests)."""
from bench.load_memory import measure
from models import preset


def test_load_memory_rows():
    rows = measure("tiny", loaders=("xlt", "naive"))
    assert [r["loader"] for r in rows] == ["xlt", "naive"]
    for r in rows:
        assert r["parameters"] == preset("tiny").num_parameters()
        assert r["weight_bytes"] > 4 * r["parameters"]  # fp32 tensors plus the safetensors header
        assert r["peak_extra_bytes"] > 0 and r["ratio_to_weights"] > 0
