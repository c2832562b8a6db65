"""eval.loaders on fixture files written here in every official format, and on real samples in
../shared/data (skipped when that folder is absent)."""
import json
from pathlib import Path

import pytest

from eval import loaders
from eval.languages import iso3, language
from eval.suites import INTERMEDIATE_TASKS, SUITES, TARGET_TASKS, any_task

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
XNLI = TARGET_TASKS["xnli"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


SQUAD = {"version": "2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
    {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
    {"id": "english-2", "question": "Is it?", "answers": [], "is_impossible": True}]}]}]}


def test_suites_are_the_official_lists():
    xt, xr = SUITES["xtreme"], SUITES["xtreme-r"]
    assert len(xt.tasks) == 9 and len(xr.tasks) == 10
    assert "pawsx" not in xr.tasks and "bucc2018" not in xr.tasks and {"xcopa", "mewslix", "lareqa"} <= set(xr.tasks)
    assert len(xt.task("panx").languages) == 40 and len(xr.task("panx").languages) == 48
    assert len(xt.task("udpos").languages) == 33 and len(xr.task("udpos").languages) == 38
    assert xt.task("tatoeba").languages[:3] == ("ar", "he", "vi") and "en" not in xt.task("tatoeba").languages
    assert xr.task("xquad").languages[-1] == "ro"
    assert XNLI.labels == ("contradiction", "entailment", "neutral") and XNLI.train_task == "MNLI"
    assert xt.extension("mlqa") == "json" and xr.extension("xcopa") == "jsonl" and xt.extension("udpos") == "tsv"
    assert TARGET_TASKS["panx"].head == "tagging" and not TARGET_TASKS["bucc2018"].needs_training
    assert set(INTERMEDIATE_TASKS) == {"squad", "squad_v2", "mnli", "qqp", "anli", "hellaswag", "cosmosqa",
                                       "commonsenseqa", "ccg", "siqa", "copa"}  # + XCOPA's training stages
    # every language of every suite has family and script metadata
    for s in (xt, xr):
        for t in s.tasks:
            assert all(language(lang).family != "unknown" for lang in s.task(t).languages), t
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        any_task("nope")


def test_squad_json_v1_and_v2(tmp_path):
    rows = loaders.read_squad_json(write(tmp_path / "dev-v2.0.json", json.dumps(SQUAD)))
    assert rows[0] == {"id": "q1", "context": "Paris is in France.", "question": "Where is Paris?",
                       "answers": {"text": ["France"], "answer_start": [12]}}
    assert rows[1]["answers"] == {"text": [], "answer_start": []}
    assert [r["id"] for r in loaders.english_slice(rows)] == ["english-2"]
    with pytest.raises(loaders.FormatError, match=r"bad.json: not SQuAD-format"):
        loaders.read_squad_json(write(tmp_path / "bad.json", '{"data": [{"x": 1}]}'))


def test_pair_tsv_maps_labels_by_name(tmp_path):
    official = write(tmp_path / "xnli.test.tsv", "language\tgold_label\tsentence1\tsentence2\n"
                     "de\tentailment\tA\tB\nfr\tneutral\tC\tD\nde\tcontradiction\tE\tF\n")
    rows = loaders.read_pair_tsv(official, XNLI, "de")
    assert rows == [{"sentence1": "A", "sentence2": "B", "label": 1}, {"sentence1": "E", "sentence2": "F", "label": 0}]
    xtreme = write(tmp_path / "test-de.tsv", "A\tB\tneutral\n")
    assert loaders.read_pair_tsv(xtreme, XNLI)[0]["label"] == 2
    mnli = INTERMEDIATE_TASKS["mnli"]  # HF order: the same name gets another id
    assert loaders.read_pair_tsv(xtreme, mnli)[0]["label"] == 1
    qqp = write(tmp_path / "QQP" / "dev.tsv",
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tx?\ty?\t1\n")
    assert loaders.read_pair_tsv(qqp, INTERMEDIATE_TASKS["qqp"]) == [{"sentence1": "x?", "sentence2": "y?", "label": 1}]
    with pytest.raises(loaders.FormatError, match=r"bad.tsv:1: label 'maybe'"):
        loaders.read_pair_tsv(write(tmp_path / "bad.tsv", "A\tB\tmaybe\n"), XNLI)
    with pytest.raises(loaders.FormatError, match=r"short.tsv:2: 2 tab-separated fields"):
        loaders.read_pair_tsv(write(tmp_path / "short.tsv", "A\tB\tneutral\nA\tB\n"), XNLI)


def test_conll_and_conllu(tmp_path):
    wikiann = write(tmp_path / "panx" / "test-de.tsv", "de:Paris\tB-LOC\nde:liegt\tO\n\nen:Ana\tB-PER\n")
    assert loaders.read_conll(wikiann) == [{"tokens": ["Paris", "liegt"], "tags": ["B-LOC", "O"]},
                                           {"tokens": ["Ana"], "tags": ["B-PER"]}]
    ud = write(tmp_path / "ud" / "de_gsd-ud-test.conllu", "# text = Zum Haus.\n"
               "1-2\tZum\t_\t_\t_\t_\t_\t_\t_\t_\n1\tZu\tzu\tADP\t_\t_\t3\tcase\t_\t_\n"
               "2\tdem\tder\tDET\t_\t_\t3\tdet\t_\t_\n2.1\tx\tx\tX\t_\t_\t_\t_\t_\t_\n"
               "3\tHaus\tHaus\tNOUN\t_\t_\t0\troot\t_\t_\n\n"
               "1\t_\t_\tNOUN\t_\t_\t0\troot\t_\t_\n2\t_\t_\tVERB\t_\t_\t1\tx\t_\t_\n\n")
    assert loaders.read_conllu(ud) == [{"tokens": ["Zu", "dem", "Haus"], "tags": ["ADP", "DET", "NOUN"]}]
    write(tmp_path / "ud2" / "de_hdt-ud-test.conllu", "1\tJa\tja\tINTJ\t_\t_\t0\troot\t_\t_\n")
    rows = loaders.load_local("udpos", tmp_path, "de", "test")  # all treebanks of the language
    assert [r["tags"] for r in rows] == [["ADP", "DET", "NOUN"], ["INTJ"]]
    with pytest.raises(loaders.FormatError, match=r"bad.conllu:1: 3 tab-separated"):
        loaders.read_conllu(write(tmp_path / "bad.conllu", "1\tx\ty\n"))


def test_tatoeba_rows_and_sorted_positions(tmp_path):
    write(tmp_path / "tatoeba" / "tatoeba.deu-eng.deu", "Hallo\nJa\nNein\n")
    write(tmp_path / "tatoeba" / "tatoeba.deu-eng.eng", "Hello\nYes\nNo\n")
    rows = loaders.load_local("tatoeba", tmp_path, "de")
    assert rows[1] == {"source": "Ja", "target": "Yes"}
    # sorted English file: Hello, No, Yes -> line 0 at 0, line 1 (Yes) at 2, line 2 (No) at 1
    assert loaders.tatoeba_sorted_positions([r["target"] for r in rows]) == [0, 2, 1]
    assert loaders.tatoeba_sorted_positions(["b", "a", "b"]) == [1, 0, 2]  # stable for equal lines
    write(tmp_path / "t2" / "tatoeba.fra-eng.fra", "a\n")
    with pytest.raises(loaders.FormatError, match="line-aligned"):
        loaders.read_tatoeba(tmp_path / "t2" / "tatoeba.fra-eng.fra", write(tmp_path / "t2" / "x.eng", "a\nb\n"))
    assert iso3("zh") == "cmn"


def test_bucc_files(tmp_path):
    write(tmp_path / "bucc2018" / "de-en.sample.de", "de-1\tHallo Welt\nde-2\tNein\n")
    write(tmp_path / "bucc2018" / "de-en.sample.en", "en-1\tHello world\n")
    write(tmp_path / "bucc2018" / "de-en.sample.gold", "de-1\ten-1\n")
    rows = loaders.load_local("bucc2018", tmp_path, "de", "dev")  # dev falls back to BUCC's "sample"
    assert [r["side"] for r in rows] == ["source", "source", "target", "gold"]
    assert rows[-1]["id"] == "de-1\ten-1" and rows[0]["text"] == "Hallo Welt"


def test_choice_formats(tmp_path):
    write(tmp_path / "xcopa" / "et" / "val.et.jsonl", json.dumps(
        {"premise": "P.", "choice1": "A", "choice2": "B", "question": "effect", "label": 1}) + "\n")
    assert loaders.load_local("xcopa", tmp_path, "et", "dev") == [
        {"context": "P. What happened as a result?", "question": "effect", "endings": ["A", "B"], "label": 1}]
    hs = write(tmp_path / "hellaswag_val.jsonl", json.dumps({"ctx": "C", "endings": list("abcd"), "label": 2}) + "\n")
    assert loaders.read_choice_records(hs, INTERMEDIATE_TASKS["hellaswag"])[0]["label"] == 2
    csqa = write(tmp_path / "dev_rand_split.jsonl", json.dumps({"answerKey": "C", "question": {
        "stem": "Q?", "choices": [{"label": k, "text": k.lower()} for k in "ABCDE"]}}) + "\n")
    assert loaders.read_choice_records(csqa, INTERMEDIATE_TASKS["commonsenseqa"])[0] == {
        "context": "Q?", "endings": list("abcde"), "label": 2}
    write(tmp_path / "R1" / "dev.jsonl", json.dumps({"context": "P", "hypothesis": "H", "label": "c"}) + "\n")
    assert loaders.load_local("anli", tmp_path, "en", "dev") == [{"sentence1": "P", "sentence2": "H", "label": 2}]
    with pytest.raises(loaders.FormatError, match=r"x.jsonl:1: expected premise"):
        loaders.read_xcopa_jsonl(write(tmp_path / "x.jsonl", '{"premise": "P"}\n'))


def test_missing_local_file_names_what_was_tried(tmp_path):
    with pytest.raises(loaders.DataUnavailable, match=r"xquad de test: no local file under .*xquad/xquad.de.json"):
        loaders.load_local("xquad", tmp_path, "de")


def test_offline_hub_message_names_dataset_config_and_local_option():
    with pytest.raises(loaders.DataUnavailable) as err:
        loaders.load_hub("panx", "de", "test")
    msg = str(err.value)
    assert "google/xtreme (config PAN-X.de)" in msg and "--data-dir" in msg and "OFFLINE" in msg
    with pytest.raises(loaders.DataUnavailable, match="udpos.German"):
        loaders.load_hub("udpos", "de")
    with pytest.raises(loaders.DataUnavailable, match="tatoeba.deu"):
        loaders.load_hub("tatoeba", "de")
    with pytest.raises(loaders.DataUnavailable, match="ccg: not on the Hugging Face hub"):
        loaders.load_hub("ccg", "en", "train")


def test_hub_rows_map_class_labels_by_name():
    hf_nli = ["entailment", "neutral", "contradiction"]  # HF ClassLabel order
    row = loaders.from_hub_row(INTERMEDIATE_TASKS["anli"], {"premise": "P", "hypothesis": "H", "label": 2},
                               {"label": hf_nli}, "en")
    assert row["label"] == 2  # contradiction in the task's (HF) order
    row = loaders.from_hub_row(XNLI, {"language": "de", "sentence1": "A", "sentence2": "B", "gold_label": "neutral"},
                               {}, "de")
    assert row["label"] == 2  # neutral in XTREME's order
    assert loaders.from_hub_row(XNLI, {"language": "fr", "sentence1": "A", "sentence2": "B",
                                       "gold_label": "neutral"}, {}, "de") is None
    panx = loaders.from_hub_row(TARGET_TASKS["panx"], {"tokens": ["Ana"], "ner_tags": [1], "langs": ["de"]},
                                {"ner_tags": ["O", "B-PER", "I-PER"]}, "de")
    assert panx == {"tokens": ["Ana"], "tags": ["B-PER"]}
    tydi = {"id": "arabic-1", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": [0]}}
    assert loaders.from_hub_row(TARGET_TASKS["tydiqa"], tydi, {}, "ar")["id"] == "arabic-1"
    assert loaders.from_hub_row(TARGET_TASKS["tydiqa"], tydi, {}, "bn") is None


# ----- real samples -----------------------------------------------------------------------------------------
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@needs_shared
def test_real_xquad_and_xcopa():
    for lang in ("de", "zh"):
        rows = loaders.load_local("xquad", SHARED, lang)
        assert len(rows) == 1190
        for r in rows[:50]:
            start, text = r["answers"]["answer_start"][0], r["answers"]["text"][0]
            assert r["context"][start:start + len(text)] == text  # spans index the original text
    rows = loaders.load_local("xcopa", SHARED, "et", "test")
    assert len(rows) == 500 and {r["label"] for r in rows} == {0, 1}


@needs_shared
def test_real_tatoeba_udpos_cosmosqa_anli():
    rows = loaders.load_local("tatoeba", SHARED, "de")
    assert len(rows) == 1000 and all(r["source"] and r["target"] for r in rows)
    assert sorted(loaders.tatoeba_sorted_positions([r["target"] for r in rows])) == list(range(1000))
    ud = loaders.load_local("udpos", SHARED, "en", "test")
    assert len(ud) > 2000 and {t for r in ud for t in r["tags"]} <= set(TARGET_TASKS["udpos"].labels)
    assert all(len(r["tokens"]) == len(r["tags"]) for r in ud)
    cosmos = loaders.load_local("cosmosqa", SHARED, "en", "dev")
    assert len(cosmos) > 100 and all(len(r["endings"]) == 4 and 0 <= r["label"] < 4 for r in cosmos)
    anli = loaders.load_local("anli", SHARED, "en", "dev")
    assert len(anli) > 100 and {r["label"] for r in anli} == {0, 1, 2}


def test_siqa_copa_and_tydiqa_test_layouts(tmp_path):
    """Social IQa's labels file beside it; SuperGLUE COPA's val split; XTREME's TyDiQA test set is GoldP dev,
    one language's slice; a QA test file whose answers were blanked (xtreme's download) is an error."""
    (tmp_path / "socialiqa-train-dev").mkdir()
    rec = {"context": "Ana cooked.", "question": "Why?", "answerA": "hungry", "answerB": "bored", "answerC": "cold"}
    (tmp_path / "socialiqa-train-dev" / "dev.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "socialiqa-train-dev" / "dev-labels.lst").write_text("1\n")
    assert loaders.load_local("siqa", tmp_path, "en", "dev") == [
        {"context": "Ana cooked. Why?", "endings": ["hungry", "bored", "cold"], "label": 0}]
    (tmp_path / "socialiqa-train-dev" / "dev-labels.lst").write_text("1\n2\n")
    with pytest.raises(loaders.FormatError, match="2 labels but .*dev.jsonl has 1 records"):
        loaders.load_local("siqa", tmp_path, "en", "dev")
    (tmp_path / "COPA").mkdir()
    copa = {"premise": "It rained.", "choice1": "I got wet.", "choice2": "I slept.", "question": "effect", "label": 0}
    (tmp_path / "COPA" / "val.jsonl").write_text(json.dumps(copa) + "\n")
    assert loaders.load_local("copa", tmp_path, "en", "dev")[0]["endings"] == ["I got wet.", "I slept."]
    qas = [{"id": f"{name}-{i}", "question": "q", "answers": [{"text": "Ana", "answer_start": 0}]}
           for i, name in enumerate(("english", "arabic", "arabic"))]
    dev = {"data": [{"paragraphs": [{"context": "Ana", "qas": qas}]}]}
    (tmp_path / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(dev))
    assert [r["id"] for r in loaders.load_local("tydiqa", tmp_path, "ar", "test")] == ["arabic-1", "arabic-2"]
    for qa in qas:
        qa["answers"] = [{"text": "", "answer_start": 0}]
    (tmp_path / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(dev))
    with pytest.raises(loaders.FormatError, match="every gold answer is empty: xtreme's download_data.sh blanks"):
        loaders.load_local("tydiqa", tmp_path, "ar", "test")


def test_squad_in_retrieval_form():
    context = "Ana lives in Paris. She works at Acme! Does she sing? Yes."
    rows = [{"id": "q1", "context": context, "question": "Where does Ana work?",
             "answers": {"text": ["Acme"], "answer_start": [context.index("Acme")]}},
            {"id": "q2", "context": context, "question": "Unanswerable?", "answers": {"text": [], "answer_start": []}}]
    out = loaders.squad_as_retrieval(rows)
    queries = [r for r in out if "query" in r]
    pool = {r["id"]: r["candidate"] for r in out if "candidate" in r}
    assert queries == [{"id": "q1", "query": "Where does Ana work?", "answers": ["0_1"]}]
    assert pool["0_1"] == f"She works at Acme! {context}" and len(pool) == 4
    assert [context[a:b] for a, b in loaders.sentence_spans(context)] == [
        "Ana lives in Paris.", "She works at Acme!", "Does she sing?", "Yes."]
