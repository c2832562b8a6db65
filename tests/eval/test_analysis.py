"""The analysis view ("XTREME-A", XLT's own definition)."""
import json
from pathlib import Path

import pytest

from eval import analysis
from eval.score import evaluate

MOCK = Path(__file__).parent / "fixtures" / "xtreme_mock"


def test_task_view_by_hand():
    view = analysis.task_view({"en": 90.0, "de": 80.0, "nl": 70.0, "ru": 40.0, "zz": 60.0})
    assert view["english"] == 90.0 and view["zero_shot_mean"] == 62.5 and view["gap"] == 27.5
    assert view["worst"] == {"language": "ru", "score": 40.0}
    assert view["by_family"]["IE:Germanic"] == 80.0 and view["by_family"]["IE:Slavic"] == 40.0
    assert view["by_family"]["unknown"] == 60.0  # a code the table does not know
    assert view["by_script"]["Latin"] == 80.0 and view["by_script"]["Cyrillic"] == 40.0
    no_en = analysis.task_view({"de": 10.0, "fr": 20.0})
    assert "gap" not in no_en and "english" not in no_en and no_en["zero_shot_mean"] == 15.0
    with pytest.raises(ValueError, match="at least one"):
        analysis.task_view({})


def test_suite_view_of_the_mock_submission():
    _, detailed = evaluate(MOCK / "predictions", MOCK / "labels", "xtreme")
    scores = analysis.language_scores(detailed)
    assert scores["xquad"]["en"] == pytest.approx((detailed["xquad"]["exact_match"]["en"]
                                                    + detailed["xquad"]["f1"]["en"]) / 2)
    view = analysis.suite_view(scores)
    assert view["name"].startswith("XTREME-A") and "XLT's own" in view["name"]
    xnli = view["tasks"]["xnli"]
    assert xnli["english"] == 30.0 and xnli["worst"] == {"language": "zh", "score": 10.0}
    assert xnli["gap"] == pytest.approx(30.0 - (sum(detailed["xnli"]["accuracy"].values()) - 30.0) / 14)
    assert "gap" not in view["tasks"]["tatoeba"]  # Tatoeba has no English test set
    gaps = [v["gap"] for v in view["tasks"].values() if "gap" in v]
    assert view["mean_gap"] == pytest.approx(sum(gaps) / len(gaps)) and len(gaps) == 7
    table = analysis.markdown(view)
    assert "| xnli | 30.0 |" in table and "zh (10.0)" in table
    json.dumps(view)  # serialisable as written by engine.zero_shot


def test_chance_corrected_ratio():
    view = analysis.task_view({"en": 80.0, "de": 60.0, "fr": 40.0}, chance=100 / 3)
    assert view["ratio"] == pytest.approx(50.0 / 80.0)
    assert view["chance_corrected_ratio"] == pytest.approx((50.0 - 100 / 3) / (80.0 - 100 / 3))
    at_chance = analysis.task_view({"en": 30.0, "de": 20.0}, chance=100 / 3)
    assert "chance_corrected_ratio" not in at_chance and "ratio" in at_chance
    suite = analysis.suite_view({"xnli": {"en": 80.0, "de": 60.0}}, chance={"xnli": 50.0})
    assert suite["tasks"]["xnli"]["chance_corrected_ratio"] == pytest.approx(10.0 / 30.0)
