"""Featurization and batching: labels land on the right subwords, long inputs are windowed or chunked
without losing anything, and decoding maps predictions back exactly."""
import random

import pytest
import torch

from engine import data
from engine.evaluate import _best_span, predict
from engine.pretrain import train_tokenizer
from eval.tasks import TaskSpec
from models import IGNORE

TAGS = TaskSpec("t", "tagging", "span_f1", ("en",), ("A", "B", "O"))
QA = TaskSpec("q", "qa", "squad", ("en",))


@pytest.fixture(scope="module")
def tok():
    words = "the red apples maria bought yesterday in paris who what where long words ."
    return train_tokenizer([words] * 20 + ["un be liev ab ly unbelievably"] * 5, vocab_size=60)


def test_tagging_labels_first_subwords_only(tok):
    row = {"tokens": ["maria", "unbelievably", "."], "tags": ["A", "B", "O"]}
    (feat,) = data.featurize_tagging(TAGS, [row], tok, 64)
    pieces = tok.convert_ids_to_tokens(feat["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    labelled = [(p, lab) for p, lab in zip(pieces, feat["labels"]) if lab != IGNORE]
    assert [lab for _, lab in labelled] == [0, 1, 2]
    assert len(pieces) > 5  # "unbelievably" is split, and only its first piece is labelled
    assert [w for w in feat["word_index"] if w >= 0] == [0, 1, 2]


def test_long_sentences_are_chunked_and_merged_back(tok):
    tokens = ["maria", "bought", "the", "red", "apples"] * 9
    tags = [random.choice(TAGS.labels) for _ in tokens]
    feats = data.featurize_tagging(TAGS, [{"tokens": tokens, "tags": tags}], tok, 12)
    assert len(feats) > 3 and all(len(f["input_ids"]) <= 12 for f in feats)
    covered = sorted(w for f in feats for w in f["word_index"] if w >= 0)
    assert covered == list(range(len(tokens)))  # every word exactly once

    class Oracle(torch.nn.Module):  # predicts the gold label wherever one is given
        def forward(self, batch):
            gold = batch["labels"].clamp(min=0)
            return {"logits": torch.nn.functional.one_hot(gold, 3).float()}

    preds = predict(Oracle(), TAGS, [{"tokens": tokens, "tags": tags}], feats, 4, tok.pad_token_id)
    assert preds == [tags]


def test_tagging_rejects_bad_rows(tok):
    with pytest.raises(ValueError, match="row 0: 2 tokens but 1 tags"):
        data.featurize_tagging(TAGS, [{"tokens": ["a", "b"], "tags": ["A"]}], tok, 16)
    with pytest.raises(ValueError, match=r"row 0: unknown tag\(s\) \['Z'\]"):
        data.featurize_tagging(TAGS, [{"tokens": ["a"], "tags": ["Z"]}], tok, 16)


def test_qa_windows_find_the_answer_in_every_window_that_holds_it(tok):
    context = " ".join(["the red apples in paris ."] * 8 + ["maria bought apples yesterday ."])
    answer = "yesterday"
    start = context.index(answer)
    row = {"id": "0", "question": "what", "context": context, "answers": {"text": [answer], "answer_start": [start]}}
    feats = data.featurize_qa(QA, [row], tok, max_len=24, stride=8)
    assert len(feats) > 2
    hits = [f for f in feats if f["start_positions"] != 0]
    assert hits, "the last window holds the answer"
    for f in hits:
        s, e = f["offsets"][f["start_positions"]], f["offsets"][f["end_positions"]]
        assert context[s[0]:e[1]] == answer
    for f in feats:
        if f["start_positions"] == 0:
            assert f["end_positions"] == 0
    # decoding: logits peaked on the gold span give back the answer text
    f = hits[0]
    n = len(f["input_ids"])
    s_log, e_log = torch.zeros(n), torch.zeros(n)
    s_log[f["start_positions"]], e_log[f["end_positions"]] = 5.0, 5.0
    _, a, b = _best_span(f["offsets"], s_log, e_log)
    assert context[a:b] == answer


def test_best_span_never_picks_question_tokens_or_reversed_spans():
    offsets = [None, None, (0, 3), (4, 7), None]
    s, e = torch.tensor([9.0, 9.0, 1.0, 0.0, 9.0]), torch.tensor([9.0, 9.0, 0.0, 2.0, 9.0])
    assert _best_span(offsets, s, e) == (3.0, 0, 7)


def test_collate_pads_right_and_reports_lengths():
    feats = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3], "example": 0},
             {"input_ids": [8], "labels": [4], "example": 1}]
    batch = data.collate(feats, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["lengths"].tolist() == [3, 1] and batch["example"] == [0, 1]


def test_shuffled_batches_cover_every_feature_once():
    feats = [{"input_ids": [1] * random.randint(1, 30), "example": i} for i in range(203)]
    seen = [e for b in data.batches(feats, 16, 0, random.Random(0)) for e in b["example"]]
    assert sorted(seen) == list(range(203))
    assert sum(1 for _ in data.batches(feats, 16, 0)) == data.num_batches(203, 16)
