"""bench.study_grid on a one-cell grid: the row and the copied report."""
import json

from bench import study_grid
from tests.engine.test_study_grid import study_file


def test_bench_row_and_report(tmp_path):
    config = study_file(tmp_path, "one", sizes=["tiny"], archs=["dense"], conditions=["baseline"], workers=1)
    results = tmp_path / "results" / "grid"
    assert study_grid.main(["--config", str(config), "--workers", "1", "--results", str(results)]) == 0
    row = json.loads((tmp_path / "results" / "grid.jsonl").read_text())
    assert row["bench"] == "study_grid" and row["cells"] == row["done"] == 1 and row["wall_s"] > 0
    assert {"commit", "cpu_features"} <= row.keys()
    assert (results / "report.md").read_text().startswith("# Study one")
    assert (results / "plots" / "score_vs_active_parameters.png").is_file()
