"""python -m engine.study on a tiny grid (2 sizes x 2 architectures x 2 conditions x 1 seed): the report's
rows, valid PNG plots, a rerun that trains nothing, a killed worker's cell reported as failed while the other
cells finish, and the submitit launcher (its local executor)."""
import json
import os
import signal
import threading
import time

import pytest

from engine.study import Cell, load_study, main, run_study_grid

TINY = {"world.languages": ["en", "qsv"], "pretrain.steps": 20, "pretrain.batch_size": 16,
        "pretrain.documents_per_language": 120, "pretrain.vocab_size": 400, "pretrain.lr": 1e-3,
        "world.sizes": {"syn-xnli": [240, 40, 40], "syn-tatoeba": [0, 0, 30], "syn-mnli": [120, 30, 0]},
        "protocol.targets": ["syn-xnli", "syn-tatoeba"], "target.epochs": 1.0, "target.batch_size": 16,
        "intermediate.epochs": 1.0, "intermediate.batch_size": 16, "run.precision": "fp32"}


def _toml(value):
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def study_file(tmp, name="tiny", **study):
    fields = {"name": name, "sizes": ["tiny", "xlt-64"], "archs": ["dense", "moe-upcycled"],
              "conditions": ["baseline", "syn-mnli"], "seeds": [0], "workers": 2, "threads": 1,
              "cache_dir": str(tmp / "cache")} | study
    lines = ["[study]"] + [f"{k} = {_toml(v)}" for k, v in fields.items()]
    lines += ["[study.overrides]"] + [f'"{k}" = {_toml(v)}' for k, v in TINY.items()]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    out = tmp / "out"
    code = main(["--config", str(study_file(tmp)), "--out", str(out)])
    return tmp, out, code


def test_report_rows_and_plots(grid):
    import matplotlib.image

    tmp, out, code = grid
    assert code == 0
    status = json.loads((out / "status.json").read_text())
    assert len(status) == 8 and all(s["state"] == "done" for s in status.values())
    cells = (out / "cells.csv").read_text().splitlines()
    assert len(cells) == 1 + 8
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 8  # one seed: one row per size x arch x condition
    report = (out / "report.md").read_text()
    for size in ("tiny", "xlt-64"):
        for arch in ("dense", "moe-upcycled"):
            assert f"| {size} | {arch} | baseline |" in report and f"| {size} | {arch} | syn-mnli |" in report
    deltas = (out / "deltas.csv").read_text().splitlines()
    assert len(deltas) == 1 + 4  # syn-mnli vs baseline, per size x arch
    for name in ("score_vs_active_parameters.png", "transfer_gap_vs_size.png", "delta_vs_size.png"):
        image = matplotlib.image.imread(out / "plots" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    one = json.loads((out / "cells" / "xlt-64" / "moe-upcycled" / "seed-0" / "syn-mnli" / "results.json").read_text())
    assert one["model"]["model"]["experts"] == 8 and one["model"]["model"]["top_k"] == 1
    assert one["phases"]["pretrain"]["cached"]  # the upcycled arm reused the dense pretraining


def test_paired_deltas_are_per_seed_differences(grid):
    from engine.study_report import aggregate, cell_row

    tmp, out, _ = grid
    rows = []
    for size in ("tiny", "xlt-64"):
        for condition in ("baseline", "syn-mnli"):
            path = out / "cells" / size / "dense" / "seed-0" / condition / "results.json"
            rows.append(cell_row(Cell(size, "dense", condition, 0), json.loads(path.read_text())))
    _, deltas = aggregate(rows)
    tiny = next(d for d in deltas if d["size"] == "tiny")
    assert tiny["zero_shot"]["per_seed"] == [rows[1]["zero_shot"] - rows[0]["zero_shot"]]


def test_a_rerun_trains_nothing(grid, capsys):
    tmp, out, _ = grid
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("results.json")}
    start = time.perf_counter()
    assert main(["--config", str(study_file(tmp)), "--out", str(out)]) == 0
    assert "8 cells, 8 already done, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("results.json")} == before
    assert time.perf_counter() - start < 30  # checks only: no engine.train run


def test_a_killed_worker_is_reported_and_the_others_finish(grid, tmp_path):
    tmp, out, _ = grid
    import shutil

    victim, other = "xlt-64/dense/seed-0/syn-mnli", "tiny/dense/seed-0/syn-mnli"
    for cell in (victim, other):
        shutil.rmtree(out / "cells" / cell)
    s = load_study(str(study_file(tmp)), [])
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", run_study_grid(s, out)))
    thread.start()
    deadline = time.time() + 120
    killed = False
    while thread.is_alive() and time.time() < deadline and not killed:
        try:
            st = json.loads((out / "status.json").read_text()).get(victim, {})
        except (OSError, ValueError):
            st = {}
        if st.get("state") == "running":
            os.kill(st["pid"], signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    thread.join(180)
    assert killed and result["code"] == 1
    status = json.loads((out / "status.json").read_text())
    assert status[victim]["state"] == "failed" and "SIGKILL" in status[victim]["error"]
    assert status[other]["state"] == "done"
    assert f"`{victim}`: killed by SIGKILL" in (out / "report.md").read_text()


def test_dry_run_lists_cells_with_parameter_counts(tmp_path, capsys):
    assert main(["--config", str(study_file(tmp_path)), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    listing = capsys.readouterr().out
    assert "8 cells of study tiny" in listing and "| xlt-64/moe-upcycled/seed-0/baseline |" in listing
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("override,message", [
    (["--study.archs", "dense,sparse"], "study.archs: 'sparse'"),
    (["--study.conditions", "baseline,nope"], "cell tiny/dense/seed-0/nope: protocol.conditions: unknown"),
    (["--study.seeds", "0,0"], "study.seeds: give at least one, each once"),
    (["--study.launcher", "kubernetes"], "study.launcher"),
    (["--study.bogus", "1"], "unknown key 'bogus'"),
])
def test_bad_study_config_exits_2(tmp_path, capsys, override, message):
    assert main(["--config", str(study_file(tmp_path)), "--out", str(tmp_path / "o"), *override]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_submitit_launcher_runs_cells(tmp_path):
    pytest.importorskip("submitit")
    path = study_file(tmp_path, "sub", sizes=["tiny"], archs=["dense"], conditions=["baseline"],
                      launcher="submitit", submitit_cluster="local", submitit={"timeout_min": 10})
    out = tmp_path / "out"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    assert (out / "cells" / "tiny" / "dense" / "seed-0" / "baseline" / "results.json").is_file()
    assert json.loads((out / "status.json").read_text())["tiny/dense/seed-0/baseline"]["state"] == "done"


def test_a_table_on_the_command_line_joins_the_recipes_table():
    """The documented command (recipes/study-xlmr.toml's head) adds data.dir to the recipe's overrides; it must
    not drop the recipe's own (GPU, bf16, the MLM text): tables given on the command line merge, key by key."""
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "study-xlmr.toml")
    base_xnli = '{"xlm-roberta-base" = {"target.overrides" = {xnli = {lr = 1e-5}}}}'
    s = load_study(recipe, [("study.overrides", '{"data.dir" = "DATA"}'), ("study.size_overrides", base_xnli)])
    assert s.overrides == {"run.device": "cuda", "run.precision": "bf16", "multitask.mlm_dir": "mlm-text",
                           "data.dir": "DATA"}
    base = s.size_overrides["xlm-roberta-base"]
    assert base["target.overrides"]["xnli"] == {"lr": 1e-5} and base["target.overrides"]["udpos"] == {"epochs": 10.0}
    assert base["eval.retrieval_layer"] == 8
    assert s.size_overrides["facebook/xlm-roberta-xl"]["eval.retrieval_layer"] == 21


def test_local_workers_each_get_a_gpu_of_their_own(tmp_path, monkeypatch):
    """--workers N on a machine with GPUs: cells running at the same time never share a device (every cell's
    run.device = "cuda" would otherwise be the first GPU), and every device is used. Cells here stand in for
    engine.train: each records the CUDA_VISIBLE_DEVICES it was given and when it ran."""
    import sys

    from engine import study

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert study.visible_gpus() == ["3", "5"]
    record = ("import json, os, sys, time; t0 = time.time(); time.sleep(0.4); "
              "open(sys.argv[1], 'w').write(json.dumps([os.environ['CUDA_VISIBLE_DEVICES'], t0, time.time()]))")
    monkeypatch.setattr(study, "train_command", lambda args: [sys.executable, "-c", record, *args])
    monkeypatch.setattr(study, "cell_args", lambda cell, s, out: [str(out / f"{cell.seed}.json")])
    cells = [Cell("tiny", "dense", "baseline", seed) for seed in range(6)]
    s = study.StudyConfig(workers=2)
    done = []
    study.run_local(cells, s, tmp_path, study.Status(tmp_path / "status.json", cells),
                    lambda cell, code, seconds: done.append(code))
    assert done == [0] * 6
    runs = [json.loads((tmp_path / f"{c.seed}.json").read_text()) for c in cells]
    assert {gpu for gpu, _, _ in runs} == {"3", "5"}
    for i, (gpu, start, end) in enumerate(runs):
        for other_gpu, other_start, other_end in runs[i + 1:]:
            if start < other_end and other_start < end:  # ran at the same time
                assert gpu != other_gpu
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")
    assert study.visible_gpus() == ["1"]  # CUDA stops reading at an invalid entry
