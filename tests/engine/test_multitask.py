"""Multi-task intermediate training and continued multilingual MLM: the mixture, per-task losses and dev
scores in the logs, the encoder handed on, on the synthetic suite and on real files."""
import json

import pytest

from engine import config as C
from engine.multitask import MLM, mixture_weights
from engine.protocol import run_study
from tests.engine.test_study import _overrides


def test_mixture_weights():
    sizes = {"a": 1000, "b": 100, "c": 10}
    assert mixture_weights(sizes, "proportional") == pytest.approx({"a": 1000 / 1110, "b": 100 / 1110, "c": 10 / 1110})
    capped = mixture_weights(sizes, "proportional", cap=100)
    assert capped == pytest.approx({"a": 100 / 210, "b": 100 / 210, "c": 10 / 210})
    hot = mixture_weights(sizes, "temperature", temperature=2.0)
    assert hot["a"] / hot["b"] == pytest.approx(10 ** 0.5) and sum(hot.values()) == pytest.approx(1.0)
    uniform = mixture_weights(sizes, "temperature", temperature=1e9)
    assert max(uniform.values()) - min(uniform.values()) < 1e-6
    with_mlm = mixture_weights({**sizes, MLM: 0}, "proportional", mlm_ratio=0.25)
    assert with_mlm[MLM] == 0.25 and sum(with_mlm.values()) == pytest.approx(1.0)
    assert with_mlm["a"] == pytest.approx(0.75 * 1000 / 1110)
    with pytest.raises(ValueError, match="multitask.sampling 'random'"):
        mixture_weights(sizes, "random")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    cfg = C.load(None, [*_overrides(root / "run", root / "cache"),
                        ("protocol.conditions", "baseline,multi:syn-mnli+syn-squad,nli_mlm"),
                        ("multitask.mixes", "{nli_mlm = [\"syn-mnli\", \"mlm\"]}"), ("multitask.mlm_lines", "200"),
                        ("multitask.mlm_seq_len", "32"), ("protocol.targets", "syn-xnli,syn-tatoeba")])
    return root, run_study(cfg)


def test_multitask_condition(multi):
    root, results = multi
    info = results["phases"]["multi:syn-mnli+syn-squad/intermediate-multitask"]
    assert set(info["mixture"]) == {"syn-mnli", "syn-squad"} and sum(info["mixture"].values()) == pytest.approx(1)
    rows = info["train_rows"]
    assert info["mixture"]["syn-mnli"] == pytest.approx(rows["syn-mnli"] / (rows["syn-mnli"] + rows["syn-squad"]))
    assert set(info["dev_en_by_task"]) == {"syn-mnli", "syn-squad"}
    assert info["dev_en"] == pytest.approx(sum(info["dev_en_by_task"].values()) / 2)
    folder = root / "run" / "multi-syn-mnli+syn-squad"
    lines = (folder / "intermediate-multitask" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("loss_syn-mnli" in r and "loss_syn-squad" in r for r in records)  # per-task losses logged
    assert any("dev_syn-mnli" in r and "dev_syn-squad" in r for r in records)  # per-task dev scores
    task = json.loads((folder / "intermediate-multitask" / "checkpoint" / "task.json").read_text())
    assert task["tasks"] == ["syn-mnli", "syn-squad"]
    assert results["phases"]["multi:syn-mnli+syn-squad/syn-xnli"]["lineage"] == ["pretrained", "syn-mnli", "syn-squad"]
    assert (folder / "predictions" / "syn-xnli" / "test-qsv.tsv").is_file()
    # the target is paired with the other conditions' (same seed, head, batch order)
    base, other = results["phases"]["baseline/syn-xnli"], results["phases"]["multi:syn-mnli+syn-squad/syn-xnli"]
    assert (base["seed"], base["head_init"], base["data_order"]) == (other["seed"], other["head_init"],
                                                                      other["data_order"])


def test_continued_mlm_condition(multi):
    root, results = multi
    info = results["phases"]["nli_mlm/intermediate-multitask"]
    assert info["mixture"] == pytest.approx({"syn-mnli": 0.5, MLM: 0.5})
    records = [json.loads(line) for line in
               (root / "run" / "nli_mlm" / "intermediate-multitask" / "metrics.jsonl").read_text().splitlines()]
    assert any(f"loss_{MLM}" in r and "loss_syn-mnli" in r for r in records)
    assert set(info["dev_en_by_task"]) == {"syn-mnli"}  # MLM has no dev score: selection on the tasks'
    assert results["phases"]["nli_mlm/syn-xnli"]["lineage"] == ["pretrained", "syn-mnli", MLM]
    assert results["scores"]["nli_mlm"]["syn-tatoeba"] != results["scores"]["baseline"]["syn-tatoeba"]


@pytest.mark.parametrize("conditions,extra,message", [
    ("multi:syn-mnli+nope", [], "unknown task 'nope'"),
    ("multi:mlm", [], "at least one intermediate task"),
    ("multi:syn-mnli+syn-mnli", [], "each once"),
    ("mixy", [], "unknown condition 'mixy'"),
    ("baseline", [("multitask.mixes", "{syn-mnli = [\"syn-squad\"]}")], "already a condition's name"),
    ("baseline", [("multitask.mlm_ratio", "1.0")], "multitask.mlm_ratio: must be in"),
])
def test_multitask_options_are_checked(tmp_path, conditions, extra, message):
    from engine.protocol import plan

    cfg = C.load(None, [("run.out", str(tmp_path / "o")), ("protocol.conditions", conditions), *extra])
    with pytest.raises(C.ConfigError, match=message):
        plan(cfg)
