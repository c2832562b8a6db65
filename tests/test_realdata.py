"""tests/realdata.py: every fixture file loads through eval.loaders.load_local with the expected rows and valid
labels, and the tiny BERT / XLM-R folders load, run and tokenize pairs with offsets (QA doc stride)."""
import json

import pytest
import torch

from eval import loaders
from eval.suites import any_task
from tests import realdata

LANGS = realdata.DEFAULT_LANGUAGES


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return realdata.write_data_dir(tmp_path_factory.mktemp("realdata") / "data")


@pytest.fixture(scope="module")
def expected():
    return realdata.expected_rows()


def test_every_local_task_is_written():
    missing = sorted(set(loaders.LOCAL_PATTERNS) - set(realdata.TASKS))
    assert not missing, f"tests/realdata.py writes no files for {missing}: add a writer"
    assert set(realdata.expected_rows()) == set(realdata.written())


def test_languages_per_task():
    assert realdata.languages_of("xnli") == ("en", "de", "ru")
    assert realdata.languages_of("mnli") == realdata.languages_of("ccg") == ("en",)
    assert realdata.languages_of("tatoeba") == realdata.languages_of("bucc2018") == ("de", "ru")  # English: pivot
    xcopa = any_task("xcopa").languages
    assert realdata.languages_of("xcopa")[0] == xcopa[0] and set(realdata.languages_of("xcopa")) <= set(xcopa)
    assert realdata.languages_of("lareqa") == any_task("lareqa").languages  # the pool needs all 11
    for task in realdata.TASKS:  # substitutes come from the task's own list and are distinct
        langs = realdata.languages_of(task, ("en", "de", "ru", "sw"))
        assert set(langs) <= set(any_task(task).languages) and len(set(langs)) == len(langs), task
    assert realdata.languages_of("pawsx", ("fr",)) == ("fr",)
    assert realdata.LANG_MAP["en"] == "en" and len({realdata.LANG_MAP[c] for c in LANGS}) == 3
    with pytest.raises(ValueError, match="unknown language"):
        realdata.expected_rows(("en", "xx"))


def _check_rows(task: str, rows: list[dict]):
    spec = any_task(task)
    if spec.format == "pair":
        assert all(0 <= r["label"] < len(spec.labels) and r["sentence1"] and r["sentence2"] for r in rows)
    elif spec.format == "tagging":
        tags = set(realdata.CCG_OF_UPOS.values()) if task == "ccg" else set(spec.labels)
        assert all(len(r["tokens"]) == len(r["tags"]) > 0 and set(r["tags"]) <= tags for r in rows)
    elif spec.format == "qa":
        for r in rows:
            for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
                assert text and r["context"][start:start + len(text)] == text, r
        assert len({r["id"] for r in rows}) == len(rows)
    elif spec.format == "choice":
        assert all(len(r["endings"]) == spec.num_choices and 0 <= r["label"] < spec.num_choices for r in rows)
        assert all(len(set(r["endings"])) == spec.num_choices for r in rows)
    elif spec.format == "retrieval":
        assert all(r["source"] and r["target"] for r in rows)
        assert len({r["target"] for r in rows}) == len(rows)  # the gold neighbour is well defined
    elif spec.format == "mining":
        ids = {side: {r["id"] for r in rows if r["side"] == side} for side in ("source", "target")}
        gold = [r["id"].split("\t") for r in rows if r["side"] == "gold"]
        assert gold and all(s in ids["source"] and t in ids["target"] for s, t in gold)
        assert len(ids["source"]) > len(gold) and len(ids["target"]) > len(gold)  # unpaired sentences too
    elif spec.format == "ranking":
        pool = {r["id"] for r in rows if "candidate" in r}
        queries = [r for r in rows if "query" in r]
        assert queries and all(r["answers"] and set(r["answers"]) <= pool for r in queries)
    else:
        raise AssertionError(spec.format)


@pytest.mark.parametrize("task,split,lang", realdata.written())
def test_written_files_load(data, expected, task, split, lang):
    rows = loaders.load_local(task, data, lang, split)
    assert len(rows) == expected[(task, split, lang)]
    _check_rows(task, rows)


def test_dev_and_test_sets_are_parallel_and_labels_meaningful(data):
    en, de = (loaders.load_local("xnli", data, lang, "test") for lang in ("en", "de"))
    assert [r["label"] for r in en] == [r["label"] for r in de] and en[0]["sentence1"] != de[0]["sentence1"]
    assert len({r["label"] for r in en}) == 3  # every class occurs
    for task, split in (("pawsx", "test"), ("qqp", "train"), ("panx", "dev")):
        rows = loaders.load_local(task, data, "en", split)
        labels = {r["label"] for r in rows} if "label" in rows[0] else {t for r in rows for t in r["tags"]}
        assert len(labels) > 1, task
    v2 = loaders.load_local("squad_v2", data, "en", "dev")
    assert sum(not r["answers"]["text"] for r in v2) == len(v2) // 3  # unanswerable ones
    mining = loaders.load_local("bucc2018", data, "de", "dev")  # dev = the BUCC "sample" files
    source = {r["id"]: r["text"] for r in mining if r["side"] == "source"}
    target = {r["id"]: r["text"] for r in mining if r["side"] == "target"}
    tatoeba = {r["source"]: r["target"] for r in loaders.load_local("tatoeba", data, "de", "test")}
    bucc_test = loaders.load_local("bucc2018", data, "de", "test")
    test_pairs = [r["id"].split("\t") for r in bucc_test if r["side"] == "gold"]
    test = {r["id"]: r["text"] for r in bucc_test if r["side"] != "gold"}
    assert all(tatoeba.get(test[s]) == test[t] for s, t in test_pairs)  # gold pairs are translations
    assert set(source) and set(target) and not set(source) & set(target)
    # TyDiQA: train is the English slice of a file that holds other languages too
    train = json.loads((data / "tydiqa/tydiqa-goldp-v1.1-train/tydiqa-goldp-v1.1-train.json").read_text())
    ids = [qa["id"] for a in train["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert any(not i.startswith("english-") for i in ids)
    assert all(r["id"].startswith("english-") for r in loaders.load_local("tydiqa", data, "en", "train"))


def test_rows_per_split_and_other_languages(tmp_path):
    sizes = {"train": 5, "dev": 3, "test": 2}
    langs = ("en", "fr", "zh")
    root = realdata.write_data_dir(tmp_path / "d", languages=langs, rows_per_split=sizes, seed=1)
    counts = realdata.expected_rows(langs, sizes, seed=1)
    assert "fr" not in realdata.languages_of("mewslix", langs)  # not a Mewsli-X language: substituted
    for task, split, lang in [("xnli", "test", "zh"), ("pawsx", "dev", "fr"), ("panx", "train", "zh"),
                              ("bucc2018", "test", "fr"), ("lareqa", "test", "th"), ("xcopa", "test", "zh"),
                              ("cosmosqa", "dev", "en"), ("commonsenseqa", "train", "en")] + [
            ("mewslix", "dev", lang) for lang in realdata.languages_of("mewslix", langs)]:
        rows = loaders.load_local(task, root, lang, split)
        assert len(rows) == counts[(task, split, lang)], (task, split, lang)
        _check_rows(task, rows)
    assert len(loaders.load_local("squad", root, "en", "train")) == 5
    assert len(loaders.load_local("udpos", root, "en", "test")) == 2  # two English treebanks, concatenated


def test_all_texts_cover_the_fixture(data):
    texts = realdata.all_texts(data)
    assert len(texts) == len(set(texts)) > 500
    text = set(texts)
    row = loaders.load_local("xquad", data, "ru", "test")[0]
    assert row["context"] in text and row["question"] in text
    assert loaders.load_local("tatoeba", data, "de", "test")[0]["source"] in text
    assert " ".join(loaders.load_local("panx", data, "de", "dev")[0]["tokens"]) in text


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    texts = realdata.all_texts(data)
    root = tmp_path_factory.mktemp("models")
    return {family: realdata.tiny_hf_model(root / family, family, texts) for family in ("bert", "xlm-roberta")}


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_tiny_models_load_run_and_tokenize_pairs(models, data, family):
    from engine.data import featurize
    from models import hf

    folder = models[family]
    encoder, tokenizer = hf.load_encoder(folder).eval(), hf.load_tokenizer(folder)
    assert tokenizer.is_fast and len(tokenizer) == encoder.cfg.vocab_size <= 400
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    if family == "xlm-roberta":
        assert [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
        assert tokenizer.mask_token_id == len(tokenizer) - 1
        assert encoder.cfg.position_style == "roberta" and encoder.cfg.pad_token_id == 1
        assert encoder.cfg.type_vocab_size == 1 and encoder.cfg.max_seq_len >= 512
    else:
        assert encoder.cfg.family == "bert" and encoder.cfg.max_seq_len >= 512
    row = loaders.load_local("xquad", data, "de", "test")[0]
    question_len = len(tokenizer(row["question"])["input_ids"])
    enc = tokenizer(row["question"], row["context"], truncation="only_second", max_length=question_len + 18, stride=8,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    assert len(enc["input_ids"]) > 1  # doc-stride windows
    assert ("token_type_ids" in enc) == (family == "bert")
    ids = enc["input_ids"][0]
    specials = ([tokenizer.cls_token_id], [tokenizer.sep_token_id]) if family == "bert" else ([0], [2])
    assert ids[0] == specials[0][0] and ids[-1] == specials[1][0]
    if family == "xlm-roberta":
        sep = [i for i, t in enumerate(ids) if t == 2]
        assert sep[1] == sep[0] + 1  # <s> A </s></s> B </s>
    seq = enc.sequence_ids(0)
    for t, (s, e) in enumerate(enc["offset_mapping"][0]):
        if seq[t] == 1:
            assert row["context"][s:e].strip("▁ ") or s == e
    texts = realdata.all_texts(data)
    unknown = sum(i == tokenizer.unk_token_id for s in texts[:300] for i in tokenizer(s)["input_ids"])
    assert unknown == 0  # trained on the fixture: every character is known
    # a forward pass on a padded batch
    batch = tokenizer([row["question"], row["context"]], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert hidden.shape == (2, batch["input_ids"].shape[1], encoder.cfg.hidden_size) and torch.isfinite(hidden).all()
    # the training featurizers: QA windows keep the answer recoverable from offsets, tagging aligns words
    rows = loaders.load_local("xquad", data, "ru", "test")
    longest = max(len(tokenizer(r["question"])["input_ids"]) for r in rows)
    feats = featurize(any_task("xquad"), rows, tokenizer, longest + 24, doc_stride=8)
    assert len(feats) > len(rows)  # some contexts take more than one window
    found = [f for f in feats if f["start_positions"] > 0]
    assert found and len({f["example"] for f in found}) == len(rows)
    for f in found:
        answer = rows[f["example"]]["answers"]["text"][0]
        start, end = f["offsets"][f["start_positions"]][0], f["offsets"][f["end_positions"]][1]
        assert rows[f["example"]]["context"][start:end].strip() == answer
    tags = loaders.load_local("udpos", data, "de", "dev")
    feats = featurize(any_task("udpos"), tags, tokenizer, 64)
    assert sum(sum(i >= 0 for i in f["word_index"]) for f in feats) == sum(len(r["tokens"]) for r in tags)


def test_xlmr_folder_matches_transformers(models):
    """The exported XLM-R folder is a Hugging Face checkpoint: transformers' own model gives the same states."""
    import transformers

    from models import hf

    folder = models["xlm-roberta"]
    ours, tokenizer = hf.load_encoder(folder).eval(), hf.load_tokenizer(folder)
    theirs = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(["maria ate the apples.", "who ate the apples in paris?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
        b = theirs(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-4)
