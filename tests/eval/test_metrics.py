"""eval.metrics against hand-computed cases and against numbers of the official XTREME scorer.

The "golden" values below were produced by running google-research/xtreme's own `evaluate.py`,
`third_party/evaluate_squad.py` and `third_party/evaluate_mlqa.py` (commit 838c13b) with seqeval 0.0.12
(tag v0.0.12, commit 445d997) on the seeded inputs built here; equality is exact, not approximate.
"""
import random
import warnings

import numpy as np
import pytest

from eval import metrics
from eval.metrics import (MLQA_LANGS, accuracy, mlqa_scores, qa_score, retrieval_accuracy, score, span_f1,
                          squad_scores)
from eval.metrics import _chunks  # the chunker itself, to pin down seqeval 0.0.12's quirks

UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X"]
NER = ["O", "O", "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def noisy_corpus(tagset, seed, n_sent=40, max_len=12, keep=0.7):
    """Random gold sentences, and predictions that keep each gold tag with probability `keep`."""
    rng = random.Random(seed)
    gold = [[rng.choice(tagset) for _ in range(rng.randint(1, max_len))] for _ in range(n_sent)]
    pred = [[t if rng.random() < keep else rng.choice(tagset) for t in s] for s in gold]
    return pred, gold


# ----- accuracy / retrieval ---------------------------------------------------------------------------------
def test_accuracy_by_hand():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 50.0
    assert accuracy(["entailment"], ["entailment"]) == 100.0
    assert accuracy([0, 0, 0], [1, 0, 1]) == pytest.approx(100 / 3)


def test_accuracy_rejects_mismatch_and_empty():
    with pytest.raises(ValueError, match="3 predictions but 4 labels"):
        accuracy([0, 1, 2], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_retrieval_accuracy():
    assert retrieval_accuracy([0, 2, 2, 3], [0, 1, 2, 3]) == 75.0
    assert retrieval_accuracy(np.array([3, 1, 2]), range(3)) == pytest.approx(200 / 3)  # numpy ints are fine
    with pytest.raises(ValueError, match="integers"):
        retrieval_accuracy([0.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="2 predictions but 3 gold indices"):
        retrieval_accuracy([0, 1], [0, 1, 2])


# ----- span f1: seqeval 0.0.12 ------------------------------------------------------------------------------
def test_span_f1_seqeval_docstring_example():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert span_f1(pred, gold) == {"precision": 50.0, "recall": 50.0, "f1": 50.0}


def test_span_f1_precision_and_recall_differ():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]  # 2 of 3 predicted right, 2 of 3 gold found
    pred2 = [["B-PER", "I-PER", "O", "O"], ["O", "O"]]  # 1 predicted, right; 1 of 3 gold found
    assert span_f1(pred, gold)["f1"] == pytest.approx(200 / 3)
    out = span_f1(pred2, gold)
    assert out["precision"] == 100.0
    assert out["recall"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(50.0)


def test_i_after_o_starts_an_entity():
    assert _chunks([["O", "I-PER", "I-PER", "O"]]) == {("PER", 1, 2)}
    assert span_f1([["O", "B-PER", "I-PER", "O"]], [["O", "I-PER", "I-PER", "O"]])["f1"] == 100.0


def test_b_followed_by_i_of_another_type_splits():
    assert _chunks([["B-PER", "I-LOC"]]) == {("PER", 0, 0), ("LOC", 1, 1)}
    assert span_f1([["B-PER", "I-LOC"]], [["B-PER", "B-LOC"]])["f1"] == 100.0
    assert span_f1([["B-PER", "I-LOC"]], [["B-PER", "I-PER"]])["f1"] == 0.0


def test_chunks_stop_at_sentence_ends():
    # An 'O' is inserted after every sentence, so positions skip one slot per sentence boundary.
    assert _chunks([["B-PER"], ["I-PER"]]) == {("PER", 0, 0), ("PER", 2, 2)}
    assert _chunks([["O", "B-LOC"]]) == {("LOC", 1, 1)}  # closed by the trailing sentinel


def test_plain_pos_tags_merge_runs_of_the_same_tag():
    # NOUN is prefix 'N', type 'NOUN': a run of equal tags is ONE chunk, so this is not token accuracy.
    assert _chunks([["NOUN", "NOUN", "VERB", "ADP", "DET", "NOUN"]]) == {
        ("NOUN", 0, 1), ("VERB", 2, 2), ("ADP", 3, 3), ("DET", 4, 4), ("NOUN", 5, 5)}
    gold = [["NOUN", "NOUN", "VERB", "ADP", "DET", "NOUN"]]
    pred = [["NOUN", "VERB", "VERB", "ADP", "DET", "NOUN"]]  # 5 of 6 tokens right, 3 of 5 chunks
    assert span_f1(pred, gold) == {"precision": 60.0, "recall": 60.0, "f1": 60.0}


def test_pos_tags_starting_with_s_or_i_follow_their_prefix():
    # SCONJ/SYM read as S- (single-token chunks), INTJ as I- (continues a run), X at the end closes normally.
    assert _chunks([["SCONJ", "SCONJ", "INTJ", "INTJ", "X"]]) == {
        ("SCONJ", 0, 0), ("SCONJ", 1, 1), ("INTJ", 2, 3), ("X", 4, 4)}
    assert span_f1([["SCONJ", "SCONJ", "NOUN"]], [["SCONJ", "SCONJ", "PRON"]])["f1"] == pytest.approx(200 / 3)


def test_tags_with_hyphens_take_the_type_after_the_last_hyphen():
    assert _chunks([["B-ORG-X", "I-LOC-X"]]) == {("X", 0, 1)}
    assert _chunks([["NOUN-A", "VERB-A"]]) == {("A", 0, 1)}
    assert span_f1([["B-LOC-X"]], [["B-ORG-X"]])["f1"] == 100.0


def test_tag_quirks_o_prefix_and_dot():
    # Any tag whose first character is 'O' counts as outside; '.' never forms a chunk nor ends one by type.
    assert _chunks([["OTHER", "B-PER", "OTHER"]]) == {("PER", 1, 1)}
    assert _chunks([["NOUN", ".", "NOUN"]]) == {("NOUN", 0, 0), ("NOUN", 2, 2)}
    # 'O-PER' is outside, yet typed PER: the I-PER after it starts a chunk only by the O -> I rule.
    assert _chunks([["O-PER", "I-PER"]]) == {("PER", 1, 1)}


def test_span_f1_no_entities_is_zero():
    assert span_f1([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_span_f1_rejects_mismatches():
    with pytest.raises(ValueError, match="2 predictions but 3 gold sentences"):
        span_f1([["O"], ["O"]], [["O"], ["O"], ["O"]])
    with pytest.raises(ValueError, match="sentence 1 has 2 predicted tags but 3 gold tags"):
        span_f1([["O"], ["O", "O"]], [["O"], ["O", "O", "O"]])
    with pytest.raises(ValueError, match="sentence 0 is a string"):
        span_f1(["B-PER"], [["B-PER"]])
    with pytest.raises(ValueError, match="sentence 0 token 1"):
        span_f1([["O", ""]], [["O", "O"]])


@pytest.mark.parametrize("tagset,seed,expected", [
    (UPOS, 11, {"f1": 73.22654462242562, "precision": 73.0593607305936, "recall": 73.39449541284404}),
    (NER, 12, {"f1": 74.11764705882354, "precision": 75.44910179640718, "recall": 72.83236994219652}),
])
def test_span_f1_matches_official_scorer_exactly(tagset, seed, expected):
    pred, gold = noisy_corpus(tagset, seed)
    assert span_f1(pred, gold) == expected


# Newer seqeval (1.x) agrees with 0.0.12 on BIO tags whose types contain no '-', ill-formed transitions
# included: both versions share end_of_chunk/start_of_chunk and differ only in how a tag is split.
def _seqeval_1x_f1():
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    import seqeval
    if not getattr(seqeval, "__version__", "1").startswith("1"):
        pytest.skip("needs seqeval 1.x")

    def f1(pred, gold):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 1.x warns about non-BIO tags and empty denominators
            return seqeval_metrics.f1_score(gold, pred) * 100
    return f1


def _well_formed_bio(rng, length):
    tags, prev = [], "O"
    for _ in range(length):
        choice = rng.choice(["O", "B-PER", "B-LOC", "B-MISC", "I"])
        tag = ("I" + prev[1:] if prev != "O" else "O") if choice == "I" else choice
        tags.append(tag)
        prev = tag
    return tags


def test_span_f1_agrees_with_seqeval_1x_on_bio():
    f1_1x = _seqeval_1x_f1()
    rng = random.Random(5)
    for _ in range(300):
        gold = [_well_formed_bio(rng, rng.randint(1, 10)) for _ in range(rng.randint(1, 4))]
        pred = [_well_formed_bio(rng, len(s)) if rng.random() < 0.5 else list(s) for s in gold]
        assert span_f1(pred, gold)["f1"] == pytest.approx(f1_1x(pred, gold), abs=1e-9)
    pred, gold = noisy_corpus(NER, 3)  # arbitrary (also ill-formed) BIO: still the same
    assert span_f1(pred, gold)["f1"] == pytest.approx(f1_1x(pred, gold), abs=1e-9)


def test_span_f1_known_differences_from_seqeval_1x():
    f1_1x = _seqeval_1x_f1()
    # 1. 1.x types a tag by the text after the FIRST '-' following the prefix ('ORG-X' vs 'LOC-X'),
    #    0.0.12 by the text after the LAST '-' ('X' for both), so these spans match only in 0.0.12.
    assert span_f1([["B-LOC-X"]], [["B-ORG-X"]])["f1"] == 100.0
    assert f1_1x([["B-LOC-X"]], [["B-ORG-X"]]) == 0.0
    # 2. 1.x gives the POS tag 'X' the empty type '_', the same as the 'O' sentinel, so an X chunk at the end
    #    of a sentence is never closed and never counted; 0.0.12 (and XTREME's UD-POS numbers) count it.
    assert span_f1([["NOUN", "VERB"]], [["NOUN", "X"]])["f1"] == 50.0
    assert f1_1x([["NOUN", "VERB"]], [["NOUN", "X"]]) == pytest.approx(200 / 3)


# ----- SQuAD ------------------------------------------------------------------------------------------------
def test_squad_normalisation():
    golds = {"q1": ["Eiffel Tower"], "q2": ["apple"], "q3": ["US"], "q4": ["atre"]}
    preds = {"q1": "the  Eiffel Tower.", "q2": "An apple", "q3": "U.S.", "q4": "theatre"}
    per_question = {q: squad_scores({q: preds[q]}, {q: golds[q]})["exact_match"] for q in golds}
    assert per_question == {"q1": 100.0, "q2": 100.0, "q3": 100.0, "q4": 0.0}  # 'the' inside a word stays


def test_squad_f1_by_hand_and_max_over_golds():
    # "big red dog" vs "red dog barked": 2 shared tokens, p = r = 2/3.
    assert squad_scores({"q": "the big red dog"}, {"q": ["a red dog barked"]})["f1"] == pytest.approx(200 / 3)
    # vs "obama": p=1/2, r=1 -> 2/3; vs "president barack obama": p=1, r=2/3 -> 0.8; the max counts.
    out = squad_scores({"q": "Barack Obama"}, {"q": ["Obama", "President Barack Obama"]})
    assert out["exact_match"] == 0.0
    assert out["f1"] == pytest.approx(80.0)
    assert squad_scores({"q": "Obama"}, {"q": ["Barack Obama", "obama!"]})["exact_match"] == 100.0


def test_squad_missing_prediction_counts_zero_and_extra_ids_are_ignored():
    out = squad_scores({"q1": "x", "zzz": "y"}, {"q1": ["x"], "q2": ["y"]})
    assert out == {"exact_match": 50.0, "f1": 50.0}


def test_squad_keeps_non_ascii_punctuation_mlqa_drops_it():
    assert squad_scores({"q": "«Paris»"}, {"q": ["Paris"]})["f1"] == 0.0
    assert mlqa_scores({"q": "«Paris»"}, {"q": ["Paris"]}, "en")["exact_match"] == 100.0


def test_qa_rejects_bad_input():
    with pytest.raises(ValueError, match="no questions"):
        squad_scores({}, {})
    with pytest.raises(ValueError, match="'q7' has no gold answer"):
        squad_scores({"q7": "x"}, {"q7": []})


# ----- MLQA -------------------------------------------------------------------------------------------------
def test_mlqa_chinese_characters_are_tokens():
    # 北京大学 -> 北 京 大 学 against 北 京: 2 shared, p=1/2, r=1 -> f1 2/3. Whitespace tokenization sees 0.
    out = mlqa_scores({"q": "北京大学"}, {"q": ["北京"]}, "zh")
    assert out["exact_match"] == 0.0
    assert out["f1"] == pytest.approx(200 / 3)
    assert squad_scores({"q": "北京大学"}, {"q": ["北京"]})["f1"] == 0.0
    # Latin runs stay whole words; spacing around CJK characters does not matter.
    assert mlqa_scores({"q": "iPhone 手机。"}, {"q": ["iphone手机"]}, "zh")["exact_match"] == 100.0


def test_mlqa_language_specific_articles():
    assert mlqa_scores({"q": "der Rhein"}, {"q": ["Rhein"]}, "de")["exact_match"] == 100.0
    assert mlqa_scores({"q": "Die Stadt"}, {"q": ["Stadt"]}, "de")["exact_match"] == 100.0
    en = mlqa_scores({"q": "der Rhein"}, {"q": ["Rhein"]}, "en")  # 'der' is not an English article
    assert en["exact_match"] == 0.0 and en["f1"] == pytest.approx(200 / 3)
    assert mlqa_scores({"q": "los Andes"}, {"q": ["Andes"]}, "es")["exact_match"] == 100.0
    assert mlqa_scores({"q": "الكتاب"}, {"q": ["كتاب"]}, "ar")["exact_match"] == 100.0
    # The official Arabic rule removes 'ال' anywhere, also inside a word: جمال -> جم
    assert mlqa_scores({"q": "جمال"}, {"q": ["جم"]}, "ar")["exact_match"] == 100.0


def test_mlqa_unknown_language():
    with pytest.raises(ValueError, match="unknown language 'fr'; supported: en, es, de, vi, ar, hi, zh"):
        mlqa_scores({"q": "x"}, {"q": ["x"]}, "fr")
    assert set(MLQA_LANGS) == {"en", "es", "de", "ar", "vi", "hi", "zh"}


PIECES = ["the", "a", "Der", "die", "el", "Los", "những", "الكتاب", "北京", "大学", "，", "“", "”", "'", "-", "$",
          "Paris", "PARIS,", "1,000", "école", "«", "»", "हिंदी", "।", "iPhone"]


def noisy_qa(seed, n=60):
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))
    answers = {f"q{i}": [text() for _ in range(rng.randint(1, 3))] for i in range(n)}
    preds = {q: (rng.choice(g) if rng.random() < 0.3 else text()) for q, g in answers.items() if rng.random() < 0.9}
    return preds, answers


# Note es: EM above f1 is official behaviour: an answer made only of articles normalises to "" on both sides,
# which is an exact match but has f1 0.
@pytest.mark.parametrize("lang,expected", [
    (None, {"exact_match": 33.333333333333336, "f1": 40.656084656084644}),  # SQuAD
    ("en", {"exact_match": 35.0, "f1": 36.753968253968246}),
    ("es", {"exact_match": 38.333333333333336, "f1": 34.42063492063492}),
    ("de", {"exact_match": 35.0, "f1": 37.77777777777778}),
    ("ar", {"exact_match": 35.0, "f1": 38.17460317460317}),
    ("vi", {"exact_match": 35.0, "f1": 38.03174603174603}),
    ("hi", {"exact_match": 35.0, "f1": 38.17460317460317}),
    ("zh", {"exact_match": 35.0, "f1": 38.01984126984127}),
])
def test_qa_matches_official_scorer_exactly(lang, expected):
    preds, answers = noisy_qa(13)
    got = squad_scores(preds, answers) if lang is None else mlqa_scores(preds, answers, lang)
    assert got == expected


# ----- dispatch ---------------------------------------------------------------------------------------------
def test_qa_score():
    assert qa_score({"exact_match": 50.0, "f1": 70.0}) == 60.0


def test_score_dispatch():
    assert score("accuracy", [1, 0], [1, 1], lang="de") == {"score": 50.0, "accuracy": 50.0}
    assert score("retrieval_accuracy", [0, 1], [0, 1]) == {"score": 100.0, "accuracy": 100.0}
    tags = score("span_f1", [["B-PER", "O"]], [["B-PER", "B-LOC"]])
    assert tags["score"] == tags["f1"] == pytest.approx(200 / 3)
    assert tags["precision"] == 100.0 and tags["recall"] == 50.0
    qa = score("squad", {"q1": "x b", "q2": "c"}, {"q1": ["b"], "q2": ["c"]}, lang="en")  # lang is ignored
    assert qa["exact_match"] == 50.0
    assert qa["f1"] == pytest.approx((200 / 3 + 100) / 2)  # q1: p=1/2, r=1
    assert qa["score"] == pytest.approx((qa["exact_match"] + qa["f1"]) / 2)
    zh = score("mlqa", {"q": "北京大学"}, {"q": ["北京"]}, lang="zh")
    assert zh["score"] == pytest.approx((0.0 + 200 / 3) / 2)


def test_score_rejects_unknown_metric_and_missing_mlqa_language():
    with pytest.raises(ValueError, match="unknown metric 'bleu'; known: accuracy, span_f1, squad, squad_v2, mlqa"):
        score("bleu", [], [])
    with pytest.raises(ValueError, match="mlqa needs the answer language"):
        score("mlqa", {"q": "x"}, {"q": ["x"]})
    assert set(metrics.METRIC_NAMES) == {"accuracy", "span_f1", "squad", "squad_v2", "mlqa", "retrieval_accuracy",
                                         "bucc_f1", "map@20"}


def test_squad_v2_scores_unanswerable_questions_as_evaluate_v2():
    from eval.metrics import squad_v2_scores

    golds = {"a": ["the Eiffel Tower"], "b": [], "c": [""], "d": ["Paris"]}
    preds = {"a": "Eiffel Tower", "b": "", "c": "Lyon", "d": ""}
    out = squad_v2_scores(preds, golds)
    # a: exact (articles dropped); b: "" against no answer, exact; c: wrong; d: "" against an answer, 0
    assert out["exact_match"] == 50.0 and out["f1"] == 50.0
    assert squad_v2_scores({"d": "in Paris"}, {"d": ["Paris"]})["f1"] == pytest.approx(100 * 2 / 3)
    assert squad_v2_scores({}, {"b": []})["exact_match"] == 0.0  # a missing prediction counts 0
