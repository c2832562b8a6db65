"""The feature cache gives back exactly what the featurizer made, for every format; any change of what
determines the features is a miss; damaged files are misses that get rewritten; root=None never writes.
Also: batched featurize_choice equals the per-row implementation it replaced."""
import json

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

from engine import data
from engine.featcache import FeatureCache, read_features, rows_digest, tokenizer_digest, write_features
from engine.pretrain import train_tokenizer
from eval.synthetic import SyntheticWorld
from eval.tasks import TaskSpec

SIZES = {"syn-xnli": (60, 20, 20), "syn-pos": (40, 10, 10), "syn-panx": (40, 10, 10),
         "syn-squad": (40, 10, 0), "syn-swag": (30, 10, 0), "syn-mnli": (40, 10, 0)}


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(0, ("en", "qsv"), sizes=SIZES)


@pytest.fixture(scope="module")
def tok(world):
    return train_tokenizer(world.corpus("en", 300) + world.corpus("qsv", 300), vocab_size=400)


@pytest.fixture(scope="module")
def xlmr_like(world):
    """A Unigram tokenizer with XLM-R's specials and no token_type_ids (built offline)."""
    from tokenizers.trainers import UnigramTrainer
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    t = Tokenizer(tok_models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(world.corpus("en", 300), UnigramTrainer(vocab_size=300, special_tokens=specials,
                                                                  unk_token="<unk>"))
    bos, eos = t.token_to_id("<s>"), t.token_to_id("</s>")
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                     special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token="<mask>",
                                   model_input_names=["input_ids", "attention_mask"])


def long_contexts(rows: list[dict], join: int = 4) -> list[dict]:
    """QA rows whose contexts span several stories, so windows overflow (the answer stays in the first)."""
    out = []
    for i, row in enumerate(rows):
        extra = " ".join(rows[(i + j) % len(rows)]["context"] for j in range(1, join))
        out.append(row | {"context": row["context"] + " " + extra})
    return out


def cases(world):
    """(task, rows, max_len, doc_stride) per format, with the edge cases that matter to the encoding."""
    t = world.tasks
    squad = long_contexts(world.load("syn-squad", "train", "en"))
    squad[1] = squad[1] | {"answers": {"text": [], "answer_start": []}}  # unanswerable
    single = [r | {"sentence2": None} for r in world.load("syn-xnli", "dev", "en")]
    return {
        "pair": (t["syn-xnli"], world.load("syn-xnli", "train", "en"), 64, 128),
        "pair-single": (t["syn-xnli"], single, 16, 128),
        "tagging": (t["syn-pos"], world.load("syn-pos", "train", "en"), 12, 128),  # chunks long sentences
        "tagging-qsv": (t["syn-panx"], world.load("syn-panx", "test", "qsv"), 64, 128),
        "qa": (t["syn-squad"], squad, 64, 16),
        "choice": (t["syn-swag"], world.load("syn-swag", "train", "en"), 32, 128),
    }


@pytest.mark.parametrize("case", ["pair", "pair-single", "tagging", "tagging-qsv", "qa", "choice"])
@pytest.mark.parametrize("tokenizer", ["wordpiece", "xlmr-like"])
def test_round_trip_equals_made_features(world, tok, xlmr_like, tmp_path, case, tokenizer):
    tk = tok if tokenizer == "wordpiece" else xlmr_like
    task, rows, max_len, stride = cases(world)[case]
    made = data.featurize(task, rows, tk, max_len, stride)
    # the encoding's edge cases are really present
    if case == "tagging":
        assert any(-100 in f["labels"] for f in made) and any(-1 in f["word_index"] for f in made)
        assert len(made) > len(rows)  # chunked
    if case == "qa":
        assert len(made) > len(rows) and any(None in f["offsets"] for f in made)
        assert ("token_type_ids" in made[0]) == (tokenizer == "wordpiece")
    if case.startswith("pair"):
        assert ("token_type_ids" in made[0]) == (tokenizer == "wordpiece")

    cache = FeatureCache(tmp_path)
    got = cache.get(task, "train", "en", rows, tk, max_len, stride, lambda: made)
    assert got is made and (cache.hits, cache.misses) == (0, 1)
    loaded = cache.get(task, "train", "en", rows, tk, max_len, stride, lambda: pytest.fail("make() on a hit"))
    assert (cache.hits, cache.misses) == (1, 1)
    assert loaded == made
    assert [list(f) for f in loaded] == [list(f) for f in made]  # field order kept too
    if case == "qa":
        assert all(type(o) is tuple for f in loaded for o in f["offsets"] if o is not None)


def test_empty_and_odd_features_round_trip(tmp_path):
    write_features(tmp_path / "e.safetensors", [], {"k": 1})
    assert read_features(tmp_path / "e.safetensors", {"k": 1}) == []
    feats = [{"a": [], "b": 7, "c": [None, None], "d": [{"x": [1]}]},
             {"a": [2**40, -3], "b": -2**40, "c": [(0, 5)], "d": []}]
    write_features(tmp_path / "o.safetensors", feats, {"k": 2})
    assert read_features(tmp_path / "o.safetensors", {"k": 2}) == feats
    with pytest.raises(TypeError, match=r"features\.a"):
        write_features(tmp_path / "bad.safetensors", [{"a": [1.5]}], {})
    with pytest.raises(ValueError, match="negative span"):
        write_features(tmp_path / "bad.safetensors", [{"o": [(-1, -1)]}], {})
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written


def test_any_change_of_the_key_is_a_miss(world, tok, tmp_path):
    task, rows, max_len, _ = cases(world)["pair"]
    qa_task, qa_rows, qa_len, stride = cases(world)["qa"]
    cache = FeatureCache(tmp_path)
    calls = []

    def get(task=task, split="train", rows=rows, tk=tok, max_len=max_len, stride=128, lang="en"):
        def make():
            calls.append(1)
            return data.featurize(task, rows, tk, max_len, stride)
        return cache.get(task, split, lang, rows, tk, max_len, stride, make)

    get()
    get(stride=64)  # doc_stride does not matter outside QA
    assert (cache.hits, cache.misses) == (1, 1)
    edited = [dict(r) for r in rows]
    edited[5]["sentence2"] += " x"
    other_tok = train_tokenizer(world.corpus("en", 300), vocab_size=300)
    for kwargs in ({"rows": edited}, {"rows": rows[:-1]}, {"max_len": max_len - 1}, {"split": "dev"},
                   {"lang": "qsv"}, {"tk": other_tok}):
        before = cache.misses
        get(**kwargs)
        assert cache.misses == before + 1, kwargs
    get(task=qa_task, rows=qa_rows, max_len=qa_len, stride=stride)
    get(task=qa_task, rows=qa_rows, max_len=qa_len, stride=stride)
    misses = cache.misses
    assert get(task=qa_task, rows=qa_rows, max_len=qa_len, stride=stride // 2) != []
    assert cache.misses == misses + 1  # QA: doc_stride is part of the key
    assert len(calls) == cache.misses
    get(tk=other_tok)
    assert cache.get(task, "train", "en", rows, other_tok, max_len, 128, pytest.fail, query_max_len=8)  # pair: a hit
    ranking = TaskSpec("r", "ranking", "map20", ("en",))
    before = cache.misses
    for qlen in (8, 8, 9):
        cache.get(ranking, "train", "en", rows, tok, max_len, 128, lambda: [], query_max_len=qlen)
    assert cache.misses == before + 2  # ranking: query_max_len is part of the key


def test_digests(world, tok):
    rows = world.load("syn-xnli", "dev", "en")
    assert rows_digest(rows) == rows_digest([dict(reversed(list(r.items()))) for r in rows])  # key order
    assert rows_digest(rows) != rows_digest(rows[:-1])
    assert tokenizer_digest(tok) == tokenizer_digest(tok)
    rebuilt = train_tokenizer(world.corpus("en", 300) + world.corpus("qsv", 300), vocab_size=400)
    rebuilt(["maria bought apples"], truncation=True, max_length=3)  # call state the backend's JSON records
    assert tokenizer_digest(rebuilt) == tokenizer_digest(tok)  # same definition, another object
    rebuilt.add_tokens(["zzzq"])
    assert tokenizer_digest(rebuilt) != tokenizer_digest(tok)  # the memo notices added tokens
    with pytest.raises(TypeError, match="rows 0..1 are not JSON"):
        rows_digest([{"a": object()}, {"a": 1}])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_is_a_miss_and_is_rewritten(world, tok, tmp_path, damage):
    task, rows, max_len, stride = cases(world)["qa"]
    made = data.featurize(task, rows, tok, max_len, stride)
    cache = FeatureCache(tmp_path)
    cache.get(task, "train", "en", rows, tok, max_len, stride, lambda: made)
    (path,) = tmp_path.glob("*.safetensors")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # one byte of the arrays, past the header: only the checksum can tell
        header = 8 + int.from_bytes(raw[:8], "little")
        i = header + (len(raw) - header) // 2
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x55]) + raw[i + 1:])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 100)
    else:
        path.write_bytes(b"")
    got = cache.get(task, "train", "en", rows, tok, max_len, stride, lambda: made)
    assert got == made and (cache.hits, cache.misses) == (0, 2)
    assert path.read_bytes() == raw  # rewritten whole
    assert cache.get(task, "train", "en", rows, tok, max_len, stride, lambda: pytest.fail("miss")) == made


def test_file_for_another_key_is_a_miss(world, tok, tmp_path):
    task, rows, max_len, stride = cases(world)["pair"]
    cache = FeatureCache(tmp_path)
    cache.get(task, "train", "en", rows, tok, max_len, stride, lambda: data.featurize(task, rows, tok, max_len))
    (path,) = tmp_path.glob("*.safetensors")
    key = cache.key(task, "train", "en", rows, tok, max_len, stride)
    assert read_features(path, key) and json.dumps(key)
    write_features(path, [{"a": 1}], key | {"rows": "something else"})  # a name collision, say
    made = data.featurize(task, rows, tok, max_len)
    assert cache.get(task, "train", "en", rows, tok, max_len, stride, lambda: made) == made
    assert cache.misses == 2


def test_no_root_never_writes(world, tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task, rows, max_len, stride = cases(world)["choice"]
    cache = FeatureCache(None)
    calls = []
    for _ in range(2):
        cache.get(task, "train", "en", rows, tok, max_len, stride, lambda: calls.append(1) or [])
    assert len(calls) == 2 and (cache.hits, cache.misses) == (0, 2)
    assert list(tmp_path.iterdir()) == []


# ----- batched featurize_choice ----------------------------------------------------------------------
def per_row_featurize_choice(task, rows, tokenizer, max_len):
    """The implementation before batching (one tokenizer call per row): the oracle."""
    feats = []
    for i, row in enumerate(rows):
        if len(row["endings"]) != task.num_choices:
            raise ValueError(f"{task.name}: row {i}: {len(row['endings'])} endings, expected {task.num_choices}")
        enc = data._pair_inputs(tokenizer, [row["context"]] * task.num_choices, list(row["endings"]), max_len)
        choices = [{k: v[c] for k, v in enc.items()} for c in range(task.num_choices)]
        feats.append({"choices": choices, "labels": row["label"], "example": i})
    return feats


@pytest.mark.parametrize("max_len", [8, 16, 64])
def test_batched_choice_equals_per_row(world, tok, xlmr_like, max_len):
    task = world.tasks["syn-swag"]
    rows = world.load("syn-swag", "train", "en") + world.load("syn-swag", "dev", "qsv")
    for tk in (tok, xlmr_like):
        assert data.featurize_choice(task, rows, tk, max_len) == per_row_featurize_choice(task, rows, tk, max_len)
    assert data.featurize_choice(task, [], tok, max_len) == []
    bad = rows[:3] + [rows[3] | {"endings": rows[3]["endings"][:2]}]
    with pytest.raises(ValueError, match="row 3: 2 endings, expected 4"):
        data.featurize_choice(task, bad, tok, max_len)


# ----- the benchmark, smoke-run at a tiny size ---------------------------------------------------------
@pytest.mark.parametrize("case", ["pair", "qa-384", "qa-128", "tagging", "choice"])
def test_bench_featurize_row(world, tok, tmp_path, case):
    from bench.featurize import measure
    row = measure(case, world, tok, 20, tmp_path)
    assert row["case"] == case and row["rows"] == 20 and row["features"] >= 20 and row["tokens"] > 0
    assert row["cold_s"] >= row["tokenize_s"] > 0 and row["warm_s"] >= 0 and row["file_bytes"] > 0
    if case == "qa-128":
        assert row["features"] > row["rows"]  # contexts longer than one window
