"""eval.score against the official scorer's own output on google-research/xtreme's mock submission."""
import json
import shutil
from pathlib import Path

import pytest

from eval import metrics
from eval.score import evaluate, main

MOCK = Path(__file__).parent / "fixtures" / "xtreme_mock"


def test_mock_submission_reproduces_the_official_json_exactly():
    overall, detailed = evaluate(MOCK / "predictions", MOCK / "labels", "xtreme")
    official = json.loads((MOCK / "official_scores_xtreme.json").read_text())
    ours = {**overall, **detailed}
    assert ours == official
    assert list(ours) == list(official)  # same keys in the same order, per task too
    assert all(list(ours[k]) == list(official[k]) for k in detailed)
    assert overall["all_task"] == 62.17319850507248
    # The per-task values evaluate_test.py pins.
    assert detailed["udpos"]["avg_f1"] == 70.21746048354693
    assert detailed["panx"]["avg_recall"] == 62.750000000000014
    assert detailed["xquad"]["avg_f1"] == 79.9586776859504
    assert detailed["mlqa"]["avg_exact_match"] == 57.142857142857146
    assert detailed["bucc2018"]["avg_f1"] == 55.0
    assert detailed["tatoeba"]["avg_accuracy"] == 53.611111111111114


def _partial(tmp_path, tasks):
    for side in ("predictions", "labels"):
        for t in tasks:
            shutil.copytree(MOCK / side / t, tmp_path / side / t)
    return tmp_path / "predictions", tmp_path / "labels"


def test_partial_xtreme_r_submission_scores_its_tasks_only(tmp_path):
    pred, gold = _partial(tmp_path, ["xnli", "mewslix", "mlqa", "tydiqa"])
    overall, detailed = evaluate(pred, gold, "xtreme-r")
    assert overall == {}  # no group is complete, no suite score
    # evaluate_test.py's XTREME_R_TASK2AVG_SCORES
    assert detailed["mewslix"]["avg_map@20"] == 14.39025156130419
    assert detailed["xnli"]["avg_accuracy"] == 30.666666666666668
    assert detailed["tydiqa"]["avg_f1"] == 97.22222222222223
    assert list(detailed) == ["xnli", "mewslix", "mlqa", "tydiqa"]


def test_group_score_appears_when_its_tasks_are_there(tmp_path):
    pred, gold = _partial(tmp_path, ["udpos", "panx"])
    overall, _ = evaluate(pred, gold, "xtreme")
    assert overall == {"tagging": 63.862698495741725}


def test_cli_writes_json_and_reports_missing_files(tmp_path, capsys):
    pred, gold = _partial(tmp_path, ["pawsx"])
    out = tmp_path / "scores.json"
    assert main([str(pred), str(gold), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pawsx"]["avg_accuracy"] == 51.42857142857143
    (pred / "pawsx" / "test-ko.tsv").unlink()
    out.unlink()
    assert main([str(pred), str(gold), "--out", str(out)]) == 2
    assert "pawsx/test-ko.tsv is missing" in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_wrong_counts_and_empty_submissions(tmp_path, capsys):
    pred, gold = _partial(tmp_path, ["xnli"])
    path = pred / "xnli" / "test-de.tsv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    assert main([str(pred), str(gold)]) == 2
    err = capsys.readouterr().err
    assert "test-de.tsv" in err and "examples but" in err
    assert main([str(tmp_path / "nothing"), str(gold)]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(gold)]) == 2
    assert "no task of xtreme" in capsys.readouterr().err



def test_cli_names_the_line_of_bad_json(tmp_path, capsys):
    pred, gold = _partial(tmp_path, ["mewslix"])
    path = pred / "mewslix" / "test-de.json"
    path.write_text('{\n "q1": ["e1"],\n "q2": ["e2"\n}\n')
    out = tmp_path / "scores.json"
    assert main([str(pred), str(gold), "--suite", "xtreme-r", "--out", str(out)]) == 2
    assert "mewslix/test-de.json:4: not valid JSON" in capsys.readouterr().err
    assert not out.exists()


# ----- the metrics eval.score added -------------------------------------------------------------------------
def test_bucc_f1_by_hand():
    gold = ["de-1\ten-1", "de-2\ten-2", "de-3\ten-3", "de-4\ten-4"]
    pred = ["de-1\ten-1", "de-2\ten-9", "de-3\ten-3"]
    out = metrics.bucc_f1(pred, gold)
    assert out["precision"] == pytest.approx(200 / 3) and out["recall"] == 50.0
    assert out["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5) * 100)
    assert metrics.bucc_f1(["x\ty"], gold) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="no gold"):
        metrics.bucc_f1(pred, [])


def test_map_at_k_is_reciprocal_rank_with_one_gold_and_ap_with_several():
    gold = {"q1": ["a"], "q2": ["b"], "q3": ["c"]}
    pred = {"q1": ["a", "x"], "q2": ["x", "y", "b"], "q3": ["x"] * 20 + ["c"]}  # q3's hit is past rank 20
    assert metrics.map_at_k(pred, gold) == pytest.approx((1 + 1 / 3 + 0) / 3 * 100)
    # two targets found at ranks 1 and 3: (1/1 + 2/3) / 2
    assert metrics.map_at_k({"q": ["a", "x", "b"]}, {"q": ["a", "b"]}) == pytest.approx((1 + 2 / 3) / 2 * 100)
    assert metrics.map_at_k({}, {"q": ["a"]}) == 0.0  # unanswered queries count as 0
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.map_at_k({}, {"q": []})
    assert metrics.score("map@20", pred, gold)["score"] == metrics.map_at_k(pred, gold)


def test_partial_languages_score_what_is_there_and_no_group(tmp_path, capsys):
    pred, gold = _partial(tmp_path, ["xnli", "pawsx"])
    for lang in ("de", "fr", "ja"):  # drop three of PAWS-X's languages
        (pred / "pawsx" / f"test-{lang}.tsv").unlink()
    with pytest.raises(Exception, match="test-de.tsv is missing"):
        evaluate(pred, gold, "xtreme")
    overall, detailed = evaluate(pred, gold, "xtreme", partial=True)
    assert list(detailed["pawsx"]["accuracy"]) == ["en", "es", "ko", "zh"]
    full_overall, full = evaluate(MOCK / "predictions", MOCK / "labels", "xtreme")
    assert detailed["xnli"] == full["xnli"]  # complete tasks score as without --partial
    assert "classification" not in overall  # PAWS-X is incomplete
    assert main([str(pred), str(gold), "--partial", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["pawsx"] == detailed["pawsx"]


def test_the_synthetic_suite_is_scored_like_the_others():
    from eval.suites import SUITES

    suite = SUITES["synthetic"]
    assert suite.task("syn-xquad").format == "qa" and suite.extension("syn-xquad") == "json"
    assert suite.extension("syn-pos") == "tsv" and "en" not in suite.task("syn-tatoeba").languages
