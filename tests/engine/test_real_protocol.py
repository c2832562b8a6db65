"""The real protocol end to end, offline: a tiny random XLM-R / BERT built here with a tokenizer trained on the
fixture text, fixture files in every official format (tests/realdata.py), one intermediate task, a pair, a
tagging, a QA and a retrieval target in three languages. Asserts the leaderboard layout, that `eval.score`
rescoring equals results.json, the paired seeds, and the bad-input contract (exit 2, nothing written)."""
import json
from pathlib import Path

import pytest

from engine import config as C
from engine.protocol import run_study
from engine.train import main
from eval.score import main as score_main
from tests import realdata

LANGS = ("en", "de", "ru")
ROWS = {"train": 96, "dev": 24, "test": 24}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = realdata.write_data_dir(root / "data", LANGS, ROWS)
    texts = realdata.all_texts(data)
    models = {family: realdata.tiny_hf_model(root / family, family, texts, vocab_size=500)
              for family in ("xlm-roberta", "bert")}
    return root, data, models


def _args(world, out, *extra):
    root, data, models = world
    return ["--protocol.suite", "xtreme", "--model.name", str(models["xlm-roberta"]), "--data.dir", str(data),
            "--out", str(out), "--run.cache_dir", str(root / "cache"), "--run.console", "false",
            "--run.precision", "fp32", "--protocol.languages", ",".join(LANGS),
            "--target.epochs", "2", "--target.lr", "1e-3", "--target.batch_size", "16",
            "--intermediate.epochs", "1", "--intermediate.lr", "1e-3", "--intermediate.batch_size", "16",
            "--target.overrides", "{xquad = {max_len = 96, doc_stride = 32}, mlqa = {max_len = 96, doc_stride = 32}}",
            *extra]


def _config(args):
    from engine.train import parse_args

    path, overrides, _ = parse_args(args)
    return C.load(path, overrides)


@pytest.fixture(scope="module")
def run(world):
    root = world[0]
    out = root / "run"
    args = _args(world, out, "--protocol.conditions", "baseline,squad",
                 "--protocol.targets", "xnli,panx,xquad,mlqa,tatoeba")
    return out, run_study(_config(args))


def test_leaderboard_layout_and_rescoring(run, tmp_path):
    out, results = run
    assert set(results["scores"]) == {"baseline", "squad"}
    for condition in ("baseline", "squad"):
        for side in ("predictions", "labels"):
            folder = out / condition / side
            assert sorted(p.name for p in (folder / "xnli").iterdir()) == ["test-de.tsv", "test-en.tsv", "test-ru.tsv"]
            assert sorted(p.name for p in (folder / "tatoeba").iterdir()) == ["test-de.tsv", "test-ru.tsv"]
            assert (folder / "xquad" / "test-ru.json").is_file() and (folder / "mlqa" / "test-de.json").is_file()
        # the drop-in scorer on the written files gives the very numbers of results.json
        assert score_main([str(out / condition / "predictions"), str(out / condition / "labels"), "--suite",
                           "xtreme", "--partial", "--out", str(tmp_path / f"{condition}.json")]) == 0
        official = json.loads((tmp_path / f"{condition}.json").read_text())
        assert official == results["suite"]["scores"][condition]
        assert results["scores"][condition]["xnli"] == official["xnli"]["accuracy"]
        assert results["scores"][condition]["panx"] == official["panx"]["f1"]
        qa = {lang: (official["xquad"]["exact_match"][lang] + official["xquad"]["f1"][lang]) / 2 for lang in LANGS}
        assert results["scores"][condition]["xquad"] == qa
    labels = (out / "baseline" / "labels" / "xnli" / "test-de.tsv").read_text().split()
    assert len(labels) == ROWS["test"] and set(labels) <= {"contradiction", "entailment", "neutral"}
    view = results["analysis"]["baseline"]["tasks"]["xnli"]
    assert "chance_corrected_ratio" in view or view["english"] <= 100 / 3
    assert "all_task" not in results["suite"]["scores"]["baseline"]  # three languages of fifteen


def test_phases_pairing_and_shared_training(run):
    out, results = run
    phases = results["phases"]
    for task in ("xnli", "panx", "xquad"):  # paired: the same seed, head and batch order in both conditions
        base, other = phases[f"baseline/{task}"], phases[f"squad/{task}"]
        assert (base["seed"], base["head_init"], base["data_order"]) == (other["seed"], other["head_init"],
                                                                          other["data_order"])
        assert other["lineage"] == ["pretrained", "squad"]
    assert phases["baseline/mlqa"]["model_from"] == "xquad"  # one SQuAD v1.1 model serves XQuAD and MLQA
    assert not (out / "baseline" / "mlqa").exists()
    assert phases["squad/intermediate-squad"]["train_rows"] >= ROWS["train"]  # QA windows: one or more per question
    # XNLI trains on MNLI (labels mapped by name) and is chosen on XNLI's English dev
    assert phases["baseline/xnli"]["train_rows"] == ROWS["train"]
    task = json.loads((out / "baseline" / "xnli" / "checkpoint" / "task.json").read_text())
    assert task["labels"] == ["contradiction", "entailment", "neutral"] and task["dev_score_en"] is not None
    saved = C.load(str(out / "config.toml"), [])
    assert saved.protocol.suite == "xtreme" and saved.protocol.targets == ["xnli", "panx", "xquad", "mlqa", "tatoeba"]
    assert results["model"]["model"]["parameters"] == results["model"]["dense"]["parameters"]
    assert results["data"]["features_made"] > 0


def test_a_second_run_reads_the_features_from_the_cache(world, run, tmp_path):
    args = _args(world, tmp_path / "again", "--protocol.conditions", "baseline", "--protocol.targets", "xnli")
    again = run_study(_config(args))
    assert again["data"]["features_made"] == 0 and again["data"]["features_cached"] > 0
    assert again["scores"]["baseline"]["xnli"] == run[1]["scores"]["baseline"]["xnli"]  # and the same run


def test_bert_family_and_xtreme_r_tasks(world, tmp_path):
    """mBERT-style model; XTREME-R's XCOPA (Social IQa, then COPA), Mewsli-X and LAReQA dual encoders, and
    BUCC; every output rescored."""
    root, data, models = world
    out = tmp_path / "xr"
    xcopa = realdata.languages_of("xcopa", LANGS)
    args = _args(world, out, "--model.name", str(models["bert"]), "--protocol.suite", "xtreme-r",
                 "--protocol.conditions", "baseline", "--protocol.targets", "xcopa,mewslix,lareqa",
                 "--protocol.languages", ",".join(LANGS + xcopa),
                 "--target.overrides", "{lareqa = {max_len = 64, query_max_len = 24}, mewslix = {max_len = 48}}")
    results = run_study(_config(args))
    phases = results["phases"]
    assert set(phases["baseline/xcopa"]["stages"]) == {"siqa", "xcopa"}  # XTREME-R trains SIQA, then COPA
    assert (out / "baseline" / "xcopa-siqa" / "checkpoint").is_dir()
    for task in ("mewslix", "lareqa"):
        preds = json.loads((out / "baseline" / "predictions" / task / "test-de.json").read_text())
        assert preds and all(len(ranked) <= 20 for ranked in preds.values())
        assert phases[f"baseline/{task}"]["dev_en"] is not None
        assert json.loads((out / "baseline" / task / "checkpoint" / "task.json").read_text())["pooling"] == "pooler"
    lareqa_langs = list(results["scores"]["baseline"]["lareqa"])
    assert lareqa_langs == ["de", "en", "ru"]  # the pool spans all 11 files; scored on the languages asked
    assert score_main([str(out / "baseline" / "predictions"), str(out / "baseline" / "labels"), "--suite",
                       "xtreme-r", "--partial", "--out", str(tmp_path / "xr.json")]) == 0
    assert json.loads((tmp_path / "xr.json").read_text()) == results["suite"]["scores"]["baseline"]
    bucc = _args(world, tmp_path / "bucc", "--protocol.conditions", "baseline", "--protocol.targets", "bucc2018")
    mined = run_study(_config(bucc))
    assert set(mined["scores"]["baseline"]["bucc2018"]) == {"de", "ru"}


def test_bad_input_exits_2_and_writes_nothing(world, tmp_path, capsys):
    root, data, models = world
    broken = tmp_path / "broken"
    realdata.write_data_dir(broken, LANGS, {"train": 8, "dev": 4, "test": 4})
    (broken / "panx_dataset" / "ru" / "test").unlink()
    xnli_dev = next(broken.glob("**/xnli.dev.tsv"))
    lines = xnli_dev.read_text().splitlines()
    xnli_dev.write_text("\n".join(lines[:3] + ["only\ttwo"] + lines[3:]) + "\n")
    cases = [
        (["--data.dir", str(broken), "--protocol.targets", "panx"], "panx ru test: no local file under"),
        (["--data.dir", str(broken), "--protocol.targets", "xnli"], f"{xnli_dev}:4"),
        (["--protocol.targets", "xnli,nope"], "unknown target task 'nope'"),
        (["--protocol.languages", "en,xx"], "unknown language 'xx'"),
        (["--protocol.conditions", "baseline,sst"], "unknown condition 'sst'"),
        (["--data.dir", str(tmp_path / "missing")], "data.dir"),
        (["--eval.retrieval_layer", "7"], "eval.retrieval_layer: 7: expected -1 (the middle layer) or 0..2"),
        (["--target.overrides", "{xnli = {epochs = 0}}"], "target.overrides.xnli.epochs: must be > 0"),
        (["--target.overrides", "{xquad = {lr = 1e-3}, mlqa = {lr = 2e-3}}"], "share one English fine-tuning"),
        (["--model.arch", "moe", "--model.top_k", "2"], "model.match: 'active' with an upcycled encoder"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert main(_args(world, out, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert not out.exists(), extra
    offline = _args(world, tmp_path / "hub", "--protocol.targets", "xnli")
    offline[offline.index("--data.dir") + 1] = ""  # no data dir: the hub, unreachable offline
    assert main(offline) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded: HF_DATASETS_OFFLINE" in err and "--data-dir" in err
    assert not (tmp_path / "hub").exists()


def test_an_existing_run_is_refused_unless_overwritten(world, tmp_path, capsys):
    out = tmp_path / "once"
    args = _args(world, out, "--protocol.conditions", "baseline", "--protocol.targets", "tatoeba")
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert main(args) == 2 and "already holds a run; pass --overwrite" in capsys.readouterr().err
    (out / "stale.txt").write_text("from the earlier run")
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "results.json").read_text())["scores"] == first["scores"]
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    assert main([*_args(world, other, "--protocol.targets", "tatoeba"), "--overwrite"]) == 2
    assert "holds no XLT run" in capsys.readouterr().err and (other / "thesis.tex").exists()


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_the_real_protocol_on_real_files(tmp_path):
    """../shared/data (real XQuAD and Tatoeba): SQuAD-format training from XQuAD English (a subset of SQuAD v1.1
    dev), a tiny XLM-R with a tokenizer trained on the text; XQuAD and Tatoeba scored zero-shot in German on the
    whole real test sets."""
    data = tmp_path / "data"
    (data / "squad").mkdir(parents=True)
    articles = json.loads((SHARED / "xquad" / "xquad.en.json").read_text())["data"]
    (data / "squad" / "train-v1.1.json").write_text(json.dumps({"data": articles[:30], "version": "1.1"}))
    (data / "squad" / "dev-v1.1.json").write_text(json.dumps({"data": articles[30:36], "version": "1.1"}))
    (data / "xquad").mkdir()
    for lang in ("en", "de"):
        (data / "xquad" / f"xquad.{lang}.json").symlink_to(SHARED / "xquad" / f"xquad.{lang}.json")
    (data / "tatoeba").mkdir()
    for side in ("deu", "eng"):
        (data / "tatoeba" / f"tatoeba.deu-eng.{side}").symlink_to(SHARED / "tatoeba" / f"tatoeba.deu-eng.{side}")
    texts = [p["context"] for a in articles for p in a["paragraphs"]][:200]
    texts += (SHARED / "tatoeba" / "tatoeba.deu-eng.deu").read_text().splitlines()[:500]
    model = realdata.tiny_hf_model(tmp_path / "xlmr", "xlm-roberta", texts, vocab_size=800)
    out = tmp_path / "run"
    code = main(["--protocol.suite", "xtreme", "--model.name", str(model), "--data.dir", str(data), "--out", str(out),
                 "--run.cache_dir", str(tmp_path / "cache"), "--run.console", "false", "--run.precision", "fp32",
                 "--protocol.conditions", "baseline", "--protocol.targets", "xquad,tatoeba",
                 "--protocol.languages", "en,de", "--target.epochs", "1", "--target.batch_size", "32",
                 "--target.lr", "1e-3", "--target.overrides", "{xquad = {max_len = 192, doc_stride = 64}}",
                 "--data.max_train_rows", "400", "--data.max_dev_rows", "100"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]["baseline"]["xquad"]) == {"en", "de"}
    assert set(results["scores"]["baseline"]["tatoeba"]) == {"de"}
    assert score_main([str(out / "baseline" / "predictions"), str(out / "baseline" / "labels"), "--partial",
                       "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == results["suite"]["scores"]["baseline"]
    gold = json.loads((out / "baseline" / "labels" / "xquad" / "test-de.json").read_text())
    assert sum(len(p["qas"]) for a in gold["data"] for p in a["paragraphs"]) == 1190  # the whole German test set
    assert len((out / "baseline" / "labels" / "tatoeba" / "test-de.tsv").read_text().split()) == 1000


def test_multitask_with_continued_mlm_on_real_files(world, tmp_path):
    """multi:squad+mnli+mlm on the real formats, MLM text from <mlm_dir>/<lang>.txt."""
    root, data, models = world
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    texts = realdata.all_texts(data)
    for i, lang in enumerate(LANGS):
        (mlm / f"{lang}.txt").write_text("\n".join(texts[i::3][:300]) + "\n")
    out = tmp_path / "mt"
    results = run_study(_config(_args(world, out, "--protocol.conditions", "multi:squad+mnli+mlm",
                                      "--protocol.targets", "xnli", "--multitask.mlm_dir", str(mlm),
                                      "--multitask.mlm_seq_len", "32", "--multitask.sampling", "temperature")))
    info = results["phases"]["multi:squad+mnli+mlm/intermediate-multitask"]
    assert set(info["mixture"]) == {"squad", "mnli", "mlm"} and info["mixture"]["mlm"] == 0.5
    assert results["phases"]["multi:squad+mnli+mlm/xnli"]["lineage"] == ["pretrained", "squad", "mnli", "mlm"]
    assert (out / "multi-squad+mnli+mlm" / "predictions" / "xnli" / "test-ru.tsv").is_file()
    missing = _args(world, tmp_path / "nomlm", "--protocol.conditions", "multi:squad+mlm", "--protocol.targets", "xnli")
    assert main(missing) == 2 and not (tmp_path / "nomlm").exists()
