"""XTREME-R's ranking tasks, Mewsli-X and LAReQA: loaders on fixture files written here in the official formats
(google-research get-mewsli-x.sh output, google-research-datasets/lareqa xquad-r/), engine.zero_shot end to end
with a tiny random encoder, and planted embeddings that give a perfect and a known mAP@20 through the whole path."""
import json
import re
from pathlib import Path

import pytest
import torch

from engine import evaluate
from engine.zero_shot import main
from eval import loaders, score
from eval.suites import SUITES

MEWSLIX_LANGS = SUITES["xtreme-r"].task("mewslix").languages
LAREQA_LANGS = SUITES["xtreme-r"].task("lareqa").languages
ENTITIES = {"Q1": "Berlin", "Q2": "Paris", "Q3": "Rome", "Q4": "Oslo", "Q5": "Lima"}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence ending in '.', the separating space left out (as the official files do)."""
    spans, start = [], 0
    for m in re.finditer(r"\.(?= |$)", text):
        spans.append((start, m.end()))
        start = m.end() + 1
    return spans


def jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def entity(qid: str, name: str) -> dict:
    description = f"{name} is a city.  It has\npeople. Trailing part outside the spans"
    spans = sentence_spans(description)[:2]
    return {"entity_id": qid, "title": name, "description": description, "description_language": "en",
            "description_url": f"https://en.wikipedia.org/wiki/{name}",
            "sentence_spans": [{"start": s, "end": e} for s, e in spans]}


def article(lang: str) -> dict:
    text = f"News in {lang}. The mayor of Berlin met {{the}} envoy of Paris today. Done."
    mentions = [{"example_id": f"{lang}-{name}", "entity_id": qid, "mention_span": {
        "start": text.index(name), "end": text.index(name) + len(name), "text": name}}
        for qid, name in (("Q1", "Berlin"), ("Q2", "Paris"))]
    return {"context": {"document_title": "t", "document_url": f"https://{lang}.wikinews.org/t", "section_title": "",
                        "document_id": f"doc-{lang}", "language": lang, "text": text,
                        "sentence_spans": [{"start": s, "end": e} for s, e in sentence_spans(text)]},
            "mentions": mentions}


def write_mewslix(root: Path) -> Path:
    folder = root / "mewslix"
    jsonl(folder / "candidate_set_entities.jsonl", [entity(q, n) for q, n in ENTITIES.items()])
    jsonl(folder / "wikinews_mentions-test.jsonl", [article(lang) for lang in MEWSLIX_LANGS])
    return folder


def xquad_r(lang: str) -> dict:
    """Two articles of one paragraph, two sentences each. q1: paragraph 1 sentence 1; q2: paragraph 2 sentence 0;
    q3: paragraph 2 sentence 1, except in Thai where its answer starts in the gap between the sentences."""
    articles = []
    for number, (first, second, questions) in enumerate((
            (f"{lang} river flows north.", f"{lang} city has bridges.", [("q1", "bridges", 1)]),
            (f"{lang} king rules here.", f"{lang} queen sings songs.", [("q2", "king", 0), ("q3", "songs", 1)]))):
        context = f"{first} {second}"
        breaks = sentence_spans(context)
        qas = []
        for qid, answer, sentence in questions:
            start = breaks[0][1] if (qid, lang) == ("q3", "th") else context.index(answer, breaks[sentence][0])
            qas.append({"id": qid, "question": f"{lang} question {qid}?",
                        "answers": [{"answer_start": start, "text": answer}]})
        articles.append({"paragraphs": [{"context": context, "qas": qas, "sentence_breaks": [list(b) for b in breaks],
                                         "sentences": [context[s:e] for s, e in breaks]}]})
    return {"data": articles}


def write_lareqa(root: Path) -> Path:
    folder = root / "lareqa" / "xquad-r"
    folder.mkdir(parents=True)
    for lang in LAREQA_LANGS:
        (folder / f"{lang}.json").write_text(json.dumps(xquad_r(lang), ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine.pretrain import train_tokenizer
    from models import Encoder, hf, preset

    root = tmp_path_factory.mktemp("ranking")
    write_mewslix(root / "data")
    write_lareqa(root / "data")
    texts = [article(lang)["context"]["text"] for lang in MEWSLIX_LANGS] + [
        p["context"] for lang in LAREQA_LANGS for a in xquad_r(lang)["data"] for p in a["paragraphs"]]
    torch.manual_seed(0)
    tokenizer = train_tokenizer(texts, vocab_size=200)
    hf.export(Encoder(preset("tiny", vocab_size=len(tokenizer))), root / "model", tokenizer=tokenizer)
    return root


# ----- loaders ----------------------------------------------------------------------------------------------
def test_mewslix_rows(setup):
    rows = loaders.load_local("mewslix", setup / "data", "de")
    queries = [r for r in rows if "query" in r]
    assert queries == [
        {"id": "de-Berlin", "query": "Berlin: The mayor of { Berlin } met (the) envoy of Paris today.",
         "answers": ["Q1"], "language": "de"},
        {"id": "de-Paris", "query": "Paris: The mayor of Berlin met (the) envoy of { Paris } today.",
         "answers": ["Q2"], "language": "de"}]
    candidates = rows[len(queries):]
    assert [c["id"] for c in candidates] == list(ENTITIES)
    assert candidates[0]["candidate"] == "Berlin is a city. It has people."  # the spans only, whitespace normalised
    # the pool is parsed once and shared by every language
    assert loaders.load_local("mewslix", setup / "data", "ja")[2] is candidates[0]


def test_mewslix_mention_text_edge_cases():
    text = "A {b} c. Mention here. Tail."
    spans = sentence_spans(text)
    start = text.index("Mention")
    assert loaders.mewslix_mention_text(text, spans, start, start + 7) == "Mention: { Mention } here."
    across = text.index("c.")  # "c. Mention" crosses a sentence break: both sentences are kept
    assert loaders.mewslix_mention_text(text, spans, across, start + 7) == (
        "c. Mention: A (b) { c. Mention } here.")
    assert loaders.mewslix_mention_text(text, [], start, start + 7) == "Mention: A (b) c. { Mention } here. Tail."


def test_mewslix_xtreme_layout_and_wikipedia_pairs(tmp_path):
    """xtreme's download_data.sh shards mentions into wikinews_mentions/{split}-{lang}.jsonl and blanks the test
    labels; google-research's wikipedia_pairs-train.jsonl holds (contextual_mention, entity) pairs."""
    folder = tmp_path / "mewslix"
    jsonl(folder / "candidate_set_entities.jsonl", [entity(q, n) for q, n in ENTITIES.items()])
    jsonl(folder / "wikinews_mentions" / "dev-de.jsonl", [article("de")])
    assert [r["answers"] for r in loaders.load_local("mewslix", tmp_path, "de", "dev")[:2]] == [["Q1"], ["Q2"]]
    blank = article("de")
    blank["mentions"][1]["entity_id"] = ""
    jsonl(folder / "wikinews_mentions" / "test-de.jsonl", [blank])
    with pytest.raises(loaders.FormatError, match=r"test-de.jsonl:1: mentions\[1\]: entity_id is empty"):
        loaders.load_local("mewslix", tmp_path, "de", "test")
    doc = article("en")
    jsonl(folder / "wikipedia_pairs-train.jsonl", [
        {"contextual_mention": {"context": doc["context"], "mention": m}, "entity": entity(m["entity_id"], name)}
        for m, name in zip(doc["mentions"], ("Berlin", "Paris"))])
    rows = loaders.load_local("mewslix", tmp_path, "en", "train")
    assert [r["id"] for r in rows] == ["en-Berlin", "en-Paris", "Q1", "Q2"]
    assert rows[0]["query"].startswith("Berlin: The mayor of { Berlin }")


def test_lareqa_rows_pool_and_gold(setup):
    rows = loaders.load_local("lareqa", setup / "data", "de")
    queries = [r for r in rows if "query" in r]
    candidates = [r for r in rows if "candidate" in r]
    assert len(candidates) == 4 * len(LAREQA_LANGS)  # every sentence of every language
    assert candidates[4] == {"id": "de_1_0", "candidate": "de river flows north. de river flows north. "
                                                          "de city has bridges."}
    assert [q["id"] for q in queries] == ["q1_de", "q2_de", "q3_de"]
    assert queries[0]["query"] == "de question q1?"
    assert queries[0]["answers"] == [f"{lang}_1_1" for lang in LAREQA_LANGS]  # the answer sentence, every language
    assert queries[1]["answers"] == [f"{lang}_2_0" for lang in LAREQA_LANGS]
    # Thai's q3 answer starts between sentences: no Thai query, no Thai gold
    assert queries[2]["answers"] == [f"{lang}_2_1" for lang in LAREQA_LANGS if lang != "th"]
    assert [q["id"] for q in loaders.load_local("lareqa", setup / "data", "th") if "query" in q] == ["q1_th", "q2_th"]


def test_no_hub_copy_and_missing_language_file(tmp_path):
    with pytest.raises(loaders.DataUnavailable, match=r"mewslix: not on the Hugging Face hub \(Mewsli-X: run "
                                                      r"get-mewsli-x.sh.*--data-dir DIR"):
        loaders.load("mewslix", "de")
    with pytest.raises(loaders.DataUnavailable, match="lareqa: not on the Hugging Face hub"):
        loaders.load("lareqa", "de")
    folder = write_lareqa(tmp_path)
    (folder / "th.json").unlink()
    with pytest.raises(loaders.DataUnavailable) as err:
        loaders.load_local("lareqa", tmp_path, "de")
    assert "lareqa th test: no local file" in str(err.value) and "lareqa/xquad-r/th.json" in str(err.value)
    assert "<data-dir>/lareqa/xquad-r/<lang>.json" in str(err.value)
    with pytest.raises(loaders.DataUnavailable, match="XQuAD-R is a test set only"):
        loaders.load_local("lareqa", tmp_path, "de", "dev")
    (tmp_path / "m" / "mewslix").mkdir(parents=True)
    jsonl(tmp_path / "m" / "mewslix" / "wikinews_mentions-test.jsonl", [article("de")])
    with pytest.raises(loaders.DataUnavailable, match="candidate_set_entities.jsonl"):
        loaders.load_local("mewslix", tmp_path / "m", "de")


def test_malformed_files_name_file_line_and_field(tmp_path):
    folder = tmp_path / "mewslix"
    jsonl(folder / "candidate_set_entities.jsonl", [entity("Q1", "Berlin")])
    mentions = folder / "wikinews_mentions-test.jsonl"

    def fails(match):
        with pytest.raises(loaders.FormatError, match=match):
            loaders.load_local("mewslix", tmp_path, "de")

    mentions.write_text(json.dumps(article("de")) + "\n{not json\n")
    fails(r"wikinews_mentions-test.jsonl:2: not a JSON line")
    broken = article("de")
    del broken["mentions"][0]["mention_span"]["start"]
    jsonl(mentions, [article("en"), broken])
    fails(r"wikinews_mentions-test.jsonl:2: mentions\[0\]: missing field mention_span.start")
    shifted = article("de")
    shifted["mentions"][0]["mention_span"]["start"] += 1
    shifted["mentions"][0]["mention_span"]["end"] += 1
    jsonl(mentions, [shifted])
    fails(r"wikinews_mentions-test.jsonl:1: mentions\[0\]: mention_span.text 'Berlin' is not .* 'erlin '")
    no_text = article("de")
    no_text["context"]["text"] = ""
    jsonl(mentions, [no_text])
    fails(r"wikinews_mentions-test.jsonl:1: context.text is empty \(the released \*_no_text files")
    jsonl(mentions, [article("de"), article("de")])
    fails(r"wikinews_mentions-test.jsonl:2: example_id 'de-Berlin' appears twice")
    jsonl(mentions, [article("de")])
    fails(r"the gold entities of 1 de mentions are not in .*candidate_set_entities.jsonl \(e.g. de-Paris -> Q2\)")
    bad_entity = entity("Q2", "Paris")
    del bad_entity["description"]
    jsonl(folder / "candidate_set_entities.jsonl", [entity("Q1", "Berlin"), bad_entity])
    fails(r"candidate_set_entities.jsonl:2: missing field description")

    xq = write_lareqa(tmp_path / "x")
    (xq / "de.json").write_text('{"data": [\n  {"paragraphs": []},\n  oops\n]}\n')
    with pytest.raises(loaders.FormatError, match=r"xquad-r/de.json:3: not valid JSON"):
        loaders.load_local("lareqa", tmp_path / "x", "en")
    data = xquad_r("de")
    del data["data"][1]["paragraphs"][0]["sentence_breaks"]
    (xq / "de.json").write_text(json.dumps(data))
    with pytest.raises(loaders.FormatError, match=r"de.json: data\[1\].paragraphs\[0\]: missing field "
                                                  r"sentence_breaks"):
        loaders.load_local("lareqa", tmp_path / "x", "en")
    data = xquad_r("de")
    data["data"][0]["paragraphs"][0]["sentence_breaks"][1] = [30, 999]
    (xq / "de.json").write_text(json.dumps(data))
    with pytest.raises(loaders.FormatError, match=r"paragraphs\[0\].sentence_breaks\[1\]: span \(30, 999\) is not "
                                                  r"inside the text"):
        loaders.read_xquad_r(xq / "de.json")


# ----- engine.zero_shot -------------------------------------------------------------------------------------
def test_run_writes_rankings_that_eval_score_rescores(setup, capsys):
    out = setup / "out"
    code = main(["--model", str(setup / "model"), "--suite", "xtreme-r", "--tasks", "mewslix,lareqa",
                 "--data-dir", str(setup / "data"), "--layer", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pool = {"mewslix": set(ENTITIES), "lareqa": {f"{lang}_{p}_{s}" for lang in LAREQA_LANGS for p in (1, 2)
                                                 for s in (0, 1)}}
    for task, langs in (("mewslix", MEWSLIX_LANGS), ("lareqa", LAREQA_LANGS)):
        for lang in langs:
            preds = json.loads((out / "predictions" / task / f"test-{lang}.json").read_text())
            labels = json.loads((out / "labels" / task / f"test-{lang}.json").read_text())
            rows = loaders.load_local(task, setup / "data", lang)
            assert labels == {r["id"]: r["answers"] for r in rows if "query" in r}
            assert preds.keys() == labels.keys()
            for ranked in preds.values():  # the whole pool (5 entities) or the top 20 of 44 sentences
                assert len(ranked) == min(20, len(pool[task])) == len(set(ranked)) and set(ranked) <= pool[task]
    scores = json.loads((out / "scores.json").read_text())
    assert all(0 <= v <= 100 for task in ("mewslix", "lareqa") for v in scores[task]["map@20"].values())
    assert "all_task" not in scores and "retrieval" not in scores  # Tatoeba was not run
    rescored = setup / "rescored.json"
    assert score.main([str(out / "predictions"), str(out / "labels"), "--suite", "xtreme-r", "--out",
                       str(rescored)]) == 0
    again = json.loads(rescored.read_text())
    assert again == {"mewslix": scores["mewslix"], "lareqa": scores["lareqa"]}


def planted(rows_by_task, constructed: bool):
    """Text -> vector: each candidate on the axis of the question or mention it answers (others on a 'none'
    axis), each query on its own answer's axis: a perfect ranking. `constructed` moves some vectors so that
    LAReQA's q2_de ranks 10 golds, a wrong sentence, then the 11th gold, and Mewsli-X's de-Paris ranks Rome
    first."""
    axes = {key: i for i, key in enumerate(["none", "extra", "q1", "q2", "q3", *ENTITIES])}

    def axis(key, weight=1.0, extra=0.0):
        v = torch.zeros(len(axes))
        v[axes[key]], v[axes["extra"]] = weight, extra
        return v

    vectors = {}
    for task, rows in rows_by_task.items():
        owner = {}
        for r in rows:
            if "query" in r:
                key = r["answers"][0] if task == "mewslix" else r["id"].split("_")[0]
                vectors[r["query"]] = axis(key)
                owner.update({cid: key for cid in r["answers"]})
        for r in rows:
            if "candidate" in r:
                vectors[r["candidate"]] = axis(r["id"] if task == "mewslix" else owner.get(r["id"], "none"))
    if constructed:
        text = {r["id"]: r.get("candidate", r.get("query")) for rows in rows_by_task.values() for r in rows}
        vectors[text["ar_1_0"]] = axis("q2", 0.9, (1 - 0.81) ** 0.5)  # cosine 0.9 to q2: rank 11
        vectors[text["zh_2_0"]] = axis("q2", 0.8, 0.6)  # a gold of q2 at cosine 0.8: rank 12
        vectors[text["de-Paris"]] = axis("Q3", 0.9) + axis("Q2", 0.5)  # gold Q2 ranked second
    return vectors


@pytest.mark.parametrize("constructed", [False, True])
def test_planted_embeddings_give_known_map(setup, monkeypatch, capsys, constructed):
    rows = {task: loaders.load_local(task, setup / "data", "de") for task in ("mewslix", "lareqa")}
    vectors = planted(rows, constructed)
    monkeypatch.setattr(evaluate, "embed", lambda encoder, tokenizer, sentences, **kw: torch.stack(
        [vectors[s] for s in sentences]))
    monkeypatch.setattr("eval.run.POOL_CHUNK", 3)  # the pool embedded in pieces ranks the same
    out = setup / f"planted-{constructed}"
    code = main(["--model", str(setup / "model"), "--suite", "xtreme-r", "--tasks", "mewslix,lareqa",
                 "--languages", "de", "--data-dir", str(setup / "data"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())
    if not constructed:
        assert scores["mewslix"]["map@20"]["de"] == scores["lareqa"]["map@20"]["de"] == 100.0
        return
    assert scores["mewslix"]["map@20"]["de"] == pytest.approx(75.0)  # AP 1 and 1/2
    # q1, q3: AP 1; q2: golds at ranks 1-10 and 12 -> (10 + 11/12) / 11
    assert scores["lareqa"]["map@20"]["de"] == pytest.approx(100 * (1 + (10 + 11 / 12) / 11 + 1) / 3)
    ranked = json.loads((out / "predictions" / "lareqa" / "test-de.json").read_text())["q2_de"]
    assert ranked[10:12] == ["ar_1_0", "zh_2_0"]


def test_checkpoint_encoder_replaces_model_for_its_task(setup, capsys):
    base = ["--suite", "xtreme-r", "--tasks", "mewslix", "--languages", "de", "--data-dir", str(setup / "data")]
    out = setup / "ck"
    # --model is never loaded when the only task embeds with its own checkpoint
    code = main(["--model", str(setup / "missing"), *base, "--checkpoint", f"mewslix={setup / 'model'}",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "predictions" / "mewslix" / "test-de.json").is_file()
    assert main(["--model", str(setup / "missing"), *base, "--out", str(setup / "ck2")]) == 2
    assert "missing" in capsys.readouterr().err and not (setup / "ck2").exists()


def test_run_malformed_data_exits_2_and_writes_nothing(tmp_path, setup, capsys):
    folder = write_lareqa(tmp_path)
    (folder / "el.json").write_text("{\n\n]")
    out = tmp_path / "out"
    code = main(["--model", str(setup / "model"), "--suite", "xtreme-r", "--tasks", "lareqa", "--languages", "de",
                 "--data-dir", str(tmp_path), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert re.search(r"xquad-r/el.json:3: not valid JSON", capsys.readouterr().err)
