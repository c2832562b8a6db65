"""bench.cpu_gemm_shapes: rows per dtype and row count, bad options exit 2."""
import json

from bench import cpu_gemm_shapes


def test_writes_one_row_per_dtype_and_row_count(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert cpu_gemm_shapes.main(["--rows", "5,70", "--calls", "3", "--rounds", "2", "--threads", "1",
                                 "--results", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["dtype"], r["rows"]) for r in rows] == [("bfloat16", 5), ("bfloat16", 70), ("float32", 5),
                                                      ("float32", 70)]
    for r in rows:
        assert r["row_bucket"] == 64 and r["calls"] == 3 and r["rounds"] == 2 and "commit" in r
        assert all(r[f"us_per_row_{k}"] > 0 for k in ("same", "fresh", "bucketed"))
        # the ratios are of the rounded medians' unrounded values: equal to 1e-2
        assert abs(r["fresh_vs_same"] - r["us_per_row_fresh"] / r["us_per_row_same"]) < 1e-2
        assert abs(r["bucketed_vs_same"] - r["us_per_row_bucketed"] / r["us_per_row_same"]) < 1e-2


def test_bad_rows_exit_2(tmp_path, capsys):
    assert cpu_gemm_shapes.main(["--rows", "ten", "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "--rows" in capsys.readouterr().err
    assert cpu_gemm_shapes.main(["--rows", "0", "--results", str(tmp_path / "r.jsonl")]) == 2
    assert not (tmp_path / "r.jsonl").exists()
