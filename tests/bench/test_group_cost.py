"""bench.group_cost: the fit of the CPU attention path's per-call cost, and the groupings it chooses."""
import json
import math

import pytest

from bench import group_cost


def test_line_fit_recovers_a_known_call_cost():
    points = [(e, 0.25 + 2e-5 * e) for e in (100, 4_000, 20_000, 90_000)]
    a, b, rel = group_cost.line_fit(points)
    assert math.isclose(a, 0.25) and math.isclose(b, 2e-5) and rel < 1e-9
    assert round(a / b) == 12_500  # the call cost in score elements
    a, b, rel = group_cost.line_fit([(1, 1.0), (2, 3.0), (3, 2.0)])
    assert rel > 0.1  # a poor fit says so


def test_group_cost_writes_a_fit_and_a_policy_row(tmp_path):
    from models.encoder import GROUP_CALL_COST

    out = tmp_path / "group_cost.jsonl"
    assert group_cost.main(["--presets", "tiny", "--repeats", "1", "--batches", "2", "--precision", "fp32",
                            "--call-costs", "1,1000000000", "--results", str(out)]) == 0
    fit, policy = map(json.loads, out.read_text().splitlines())  # tiny holds 128 positions: no QA-like mix
    assert fit["kind"] == "fit" and len(fit["points"]) == len(group_cost.SIZES) * len(group_cost.LONGEST)
    assert all(t > 0 for _, t in fit["points"]) and fit["precision"] == "fp32" and fit["commit"]
    assert policy["kind"] == "policy" and policy["mix"] == "xnli"
    groupings = policy["groupings"]
    assert set(groupings) == {"current", "fitted", "one_call", "1", "1000000000"}
    assert groupings["current"]["call_cost"] == GROUP_CALL_COST and policy["vs_current"]["current"] == 1.0
    assert groupings["one_call"]["groups_per_batch"] == 1
    # a call cost this large never splits a batch; a cost of 1 splits at every distinct length
    assert groupings["1000000000"]["groups_per_batch"] == 1
    assert groupings["1"]["groups_per_batch"] >= groupings["current"]["groups_per_batch"] > 1
    assert policy["best"] in groupings and policy["best"] != "one_call"


@pytest.mark.parametrize("argv, field", [(["--presets", "nope"], "--presets"), (["--repeats", "0"], "--repeats"),
                                         (["--call-costs", "8,x"], "--call-costs"),
                                         (["--call-costs", "0"], "--call-costs")])
def test_group_cost_rejects_bad_options(tmp_path, capsys, argv, field):
    assert group_cost.main(argv + ["--results", str(tmp_path / "x.jsonl")]) == 2
    assert field in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
