"""The XTREME metrics, giving the same numbers as the official scorer on the same predictions.

Reference: google-research/xtreme `evaluate.py` (tagging f1 through seqeval 0.0.12, accuracy, Tatoeba),
`third_party/evaluate_squad.py` (SQuAD v1.1: XQuAD, TyDiQA-GoldP) and `third_party/evaluate_mlqa.py` (MLQA).
Every score is on the 0-100 scale the official script reports, and is computed with the same arithmetic in
the same order, so results agree to the last bit, not merely approximately.

Where the official script would crash (empty input, a question without gold answers, an empty tag) or
silently mis-score (tag lists of different lengths), we raise ValueError with a message instead.
"""
from __future__ import annotations

import operator
import re
import string
import unicodedata
from collections import Counter
from typing import Callable, Mapping, Sequence

__all__ = ["accuracy", "span_f1", "squad_scores", "squad_v2_scores", "mlqa_scores", "qa_score", "retrieval_accuracy",
           "bucc_f1", "map_at_k", "score", "METRIC_NAMES", "MLQA_LANGS"]


# ----- classification ---------------------------------------------------------------------------------------
def _check_same_length(name: str, predictions, labels, what: str = "labels") -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(labels)} {what}")
    if len(predictions) == 0:
        raise ValueError(f"{name}: no predictions to score")


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Percentage of predictions equal to their label (XNLI, PAWS-X, XCOPA)."""
    _check_same_length("accuracy", predictions, labels)
    correct = sum(int(p == gold) for p, gold in zip(predictions, labels))
    # Same expression as evaluate.py's `accuracy`, so the float is identical.
    return float(correct) / len(predictions) * 100


def retrieval_accuracy(predicted_indices: Sequence[int], gold_indices: Sequence[int]) -> float:
    """Tatoeba: percentage of queries whose nearest neighbour is the gold index.

    evaluate.py scores Tatoeba with plain `accuracy` over one index per line; we compare integers (numpy
    and torch integer scalars included) rather than their text, which is the same on well-formed files."""
    try:
        pred = [operator.index(i) for i in predicted_indices]
        gold = [operator.index(i) for i in gold_indices]
    except TypeError as err:
        raise ValueError(f"retrieval_accuracy: indices must be integers ({err})") from None
    _check_same_length("retrieval_accuracy", pred, gold, "gold indices")
    return accuracy(pred, gold)


# ----- tagging: seqeval 0.0.12 chunking ---------------------------------------------------------------------
# XTREME pins seqeval 0.0.12 and scores UD-POS with the same chunk-level f1 as PAN-X. That version reads any
# tag as <prefix = first character><type = text after the LAST '-'>, with no validation. So a POS tag such as
# NOUN is prefix 'N', type 'NOUN'; runs of equal POS tags merge into one chunk (type change ends a chunk), but
# a tag starting with 'S' (SCONJ, SYM) is a single-token chunk, 'B'/'I'/'E' behave as in BIO(ES), and a tag
# whose first character is 'O' is treated like O. Newer seqeval splits at the FIRST '-' after the prefix and
# gives other numbers (see tests/eval/test_metrics.py), hence this re-implementation.
def _split_tag(tag: str) -> tuple[str, str]:
    return tag[0], tag.split("-")[-1]


def _chunk_ends(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk ended on the previous token (seqeval 0.0.12 `end_of_chunk`)."""
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", "O"):
        return True
    return prev_prefix not in ("O", ".") and prev_type != type_


def _chunk_starts(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk starts on the current token (seqeval 0.0.12 `start_of_chunk`)."""
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", "O") and prefix in ("E", "I"):
        return True
    return prefix not in ("O", ".") and prev_type != type_


def _chunks(sentences: list[list[str]]) -> set[tuple[str, int, int]]:
    """(type, first, last) of every chunk, positions in the concatenation of the sentences.

    As seqeval does for a list of lists: an 'O' closes each sentence (so no chunk spans two sentences and
    positions count these separators) and one more 'O' closes the whole sequence. A chunk that ends without
    a recorded start reuses the last start seen; this quirk is kept on purpose."""
    flat = [tag for sent in sentences for tag in [*sent, "O"]] + ["O"]
    found = set()
    prev_prefix, prev_type, begin = "O", "", 0
    for i, tag in enumerate(flat):
        prefix, type_ = _split_tag(tag)
        if _chunk_ends(prev_prefix, prefix, prev_type, type_):
            found.add((prev_type, begin, i - 1))
        if _chunk_starts(prev_prefix, prefix, prev_type, type_):
            begin = i
        prev_prefix, prev_type = prefix, type_
    return found


def _check_sentences(name: str, sentences, role: str) -> list[list[str]]:
    out = []
    for i, sent in enumerate(sentences):
        if isinstance(sent, str):
            raise ValueError(f"{name}: {role} sentence {i} is a string, expected a list of tags")
        sent = list(sent)
        for j, tag in enumerate(sent):
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"{name}: {role} sentence {i} token {j}: tag {tag!r} is not a non-empty string")
        out.append(sent)
    return out


def span_f1(predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision/recall/f1 (0-100) over exactly matching chunks, as XTREME scores PAN-X and UD-POS."""
    _check_same_length("span_f1", predictions, labels, "gold sentences")
    pred = _check_sentences("span_f1", predictions, "predicted")
    gold = _check_sentences("span_f1", labels, "gold")
    for i, (p, g) in enumerate(zip(pred, gold)):
        # seqeval would silently shift every later position and mis-score; refuse instead.
        if len(p) != len(g):
            raise ValueError(f"span_f1: sentence {i} has {len(p)} predicted tags but {len(g)} gold tags")
    gold_chunks, pred_chunks = _chunks(gold), _chunks(pred)
    correct = len(gold_chunks & pred_chunks)
    # seqeval's arithmetic (0 when a denominator is empty), then evaluate.py's scaling by 100.
    p = correct / len(pred_chunks) if pred_chunks else 0
    r = correct / len(gold_chunks) if gold_chunks else 0
    f = 2 * p * r / (p + r) if p + r > 0 else 0
    return {"precision": float(p * 100), "recall": float(r * 100), "f1": float(f * 100)}


# ----- question answering -----------------------------------------------------------------------------------
def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    """Bag-of-tokens f1 (0-1) of the official SQuAD/MLQA scripts; 0 when no token is shared."""
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0
    precision = 1.0 * same / len(pred_tokens)
    recall = 1.0 * same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def _qa_scores(name: str, predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]],
               normalize: Callable[[str], str]) -> dict[str, float]:
    """EM and f1 (0-100), max over gold answers, mean over the questions in `answers` (in its order, as the
    official loop sums). A question without a prediction scores 0; predictions for unknown ids are ignored."""
    if len(answers) == 0:
        raise ValueError(f"{name}: no questions to score")
    exact_match = f1 = 0
    for qid, golds in answers.items():
        if isinstance(golds, str):
            raise ValueError(f"{name}: question {qid!r}: gold answers must be a list of strings, got a string")
        if len(golds) == 0:
            raise ValueError(f"{name}: question {qid!r} has no gold answer")
        if qid not in predictions:
            continue
        pred = normalize(predictions[qid])
        gold = [normalize(g) for g in golds]
        exact_match += max(pred == g for g in gold)
        f1 += max(_token_f1(pred.split(), g.split()) for g in gold)
    return {"exact_match": 100.0 * exact_match / len(answers), "f1": 100.0 * f1 / len(answers)}


_EN_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def _normalize_squad(text: str) -> str:
    """SQuAD v1.1: lower case, drop ASCII punctuation, drop English articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_EN_ARTICLES.sub(" ", text).split())


def squad_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and f1 (0-100): XQuAD and TyDiQA-GoldP in XTREME."""
    return _qa_scores("squad", predictions, answers, _normalize_squad)


def squad_v2_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v2.0 exact match and f1 (0-100) as its official evaluate-v2.0.py: an unanswerable question (no gold
    answer, or only empty ones) has the gold answer "", and an empty side scores 1 only against an empty other."""
    if len(answers) == 0:
        raise ValueError("squad_v2: no questions to score")
    exact_match = f1 = 0
    for qid, golds in answers.items():
        if isinstance(golds, str):
            raise ValueError(f"squad_v2: question {qid!r}: gold answers must be a list of strings, got a string")
        if qid not in predictions:
            continue
        gold = [_normalize_squad(g) for g in golds if _normalize_squad(g)] or [""]
        pred = _normalize_squad(predictions[qid])
        exact_match += max(pred == g for g in gold)
        f1 += max(_token_f1(pred.split(), g.split()) if pred and g else float(pred == g) for g in gold)
    return {"exact_match": 100.0 * exact_match / len(answers), "f1": 100.0 * f1 / len(answers)}


# MLQA removes every Unicode punctuation character (general category P*) plus ASCII string.punctuation (which
# adds symbols such as $ + < = > ^ ` | ~), then articles of the answer language, then re-tokenizes: on
# whitespace, or for Chinese with each CJK character as its own token.
def _is_mlqa_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _article_remover(words: str) -> Callable[[str], str]:
    pattern = re.compile(r"\b(" + words + r")\b")
    return lambda text: pattern.sub(" ", text)


_MLQA_ARTICLES: dict[str, Callable[[str], str]] = {
    "en": _article_remover("a|an|the"),
    "es": _article_remover("un|una|unos|unas|el|la|los|las"),
    "de": _article_remover("ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des"),
    "vi": _article_remover("của|là|cái|chiếc|những"),
    # The official Arabic pattern is '\sال^|ال': its first branch can never match ('^' after three
    # characters), so it amounts to replacing every 'ال', also inside words, with a space.
    "ar": lambda text: text.replace("ال", " "),
    "hi": lambda text: text,  # no articles
    "zh": lambda text: text,  # no articles
}
MLQA_LANGS = tuple(_MLQA_ARTICLES)


def _is_cjk(ch: str) -> bool:
    # The official range is U+4E00-U+9FA5 (not the whole CJK block up to U+9FFF).
    return "\u4e00" <= ch <= "\u9fa5"


def _mixed_segmentation(text: str) -> list[str]:
    """Chinese: each CJK character (or punctuation mark) is a token; other runs split on whitespace."""
    tokens, run = [], ""
    for ch in text:
        if _is_cjk(ch) or _is_mlqa_punct(ch):
            tokens.extend(run.split())
            run = ""
            tokens.append(ch)
        else:
            run += ch
    tokens.extend(run.split())
    return tokens


def _normalize_mlqa(text: str, lang: str) -> str:
    text = "".join(ch for ch in text.lower() if not _is_mlqa_punct(ch))
    text = _MLQA_ARTICLES[lang](text)
    tokens = _mixed_segmentation(text) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


def mlqa_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]], lang: str) -> dict[str, float]:
    """MLQA exact match and f1 (0-100) with the answer language's normalisation (evaluate_mlqa.py)."""
    if lang not in _MLQA_ARTICLES:
        raise ValueError(f"mlqa: unknown language {lang!r}; supported: {', '.join(MLQA_LANGS)}")
    return _qa_scores(f"mlqa[{lang}]", predictions, answers, lambda s: _normalize_mlqa(s, lang))


def qa_score(scores: Mapping[str, float]) -> float:
    """XTREME's QA task score: the mean of exact match and f1."""
    return (scores["exact_match"] + scores["f1"]) / 2


# ----- retrieval: BUCC mining, Mewsli-X / LAReQA ranking -------------------------------------------------------
def bucc_f1(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """BUCC 2018: precision/recall/f1 (0-100) of the predicted "src_id<TAB>tgt_id" pairs against the gold pairs,
    both as sets (duplicates count once), as evaluate.py's `bucc_f1` computes them."""
    gold = {tuple(line.split("\t")) for line in labels}
    pred = {tuple(line.split("\t")) for line in predictions}
    if not gold:
        raise ValueError("bucc_f1: no gold pairs to score")
    correct = len(gold & pred)
    if correct == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    p, r = correct / len(pred), correct / len(gold)
    return {"f1": 2 * p * r / (p + r) * 100, "precision": p * 100, "recall": r * 100}


def _average_precision_at_k(targets, ranked: Sequence[str], k: int) -> float:
    """AP@k as xtreme's utils_lareqa computes it; with one target it is utils_mewslix's reciprocal rank."""
    ranked = list(ranked)[:k]
    score = hits = 0.0
    for i, pred in enumerate(ranked):
        if pred in targets and pred not in ranked[:i]:
            hits += 1.0
            score += hits / (i + 1.0)
    return score / min(len(targets), k)


def map_at_k(predictions: Mapping[str, Sequence[str]], answers: Mapping[str, Sequence[str]],
             k: int = 20) -> float:
    """Mean average precision at k (0-100) over the queries in `answers` (id -> correct ids), each ranked list in
    `predictions` cut at k; a query without predictions scores 0. Mewsli-X (one gold entity per mention: the
    official map@20 is its mean reciprocal rank, equal to AP@20 with one target) and LAReQA (several)."""
    if len(answers) == 0:
        raise ValueError("map@k: no queries to score")
    ap = []
    for qid, golds in answers.items():
        if isinstance(golds, str) or len(golds) == 0:
            raise ValueError(f"map@k: query {qid!r}: gold must be a non-empty list of ids")
        ranked = predictions.get(qid, [])
        if isinstance(ranked, str):
            raise ValueError(f"map@k: query {qid!r}: predictions must be a list of ids, got a string")
        ap.append(_average_precision_at_k({g.strip() for g in golds}, ranked, k))
    return sum(ap) / len(ap) * 100


# ----- dispatch ---------------------------------------------------------------------------------------------
METRIC_NAMES = ("accuracy", "span_f1", "squad", "squad_v2", "mlqa", "retrieval_accuracy", "bucc_f1", "map@20")


def score(metric: str, predictions, labels, lang: str | None = None) -> dict[str, float]:
    """Scores of `predictions` against `labels` under `metric`: always "score" (the 0-100 number XTREME
    averages: accuracy, f1, or (EM + f1) / 2) plus the metric's own parts. `lang` is used by mlqa only."""
    if metric == "accuracy":
        acc = accuracy(predictions, labels)
        return {"score": acc, "accuracy": acc}
    if metric == "retrieval_accuracy":
        acc = retrieval_accuracy(predictions, labels)
        return {"score": acc, "accuracy": acc}
    if metric == "span_f1":
        out = span_f1(predictions, labels)
        return {"score": out["f1"], **out}
    if metric == "squad":
        out = squad_scores(predictions, labels)
        return {"score": qa_score(out), **out}
    if metric == "squad_v2":
        out = squad_v2_scores(predictions, labels)
        return {"score": qa_score(out), **out}
    if metric == "mlqa":
        if lang is None:
            raise ValueError(f"mlqa needs the answer language: lang= one of {', '.join(MLQA_LANGS)}")
        out = mlqa_scores(predictions, labels, lang)
        return {"score": qa_score(out), **out}
    if metric == "bucc_f1":
        out = bucc_f1(predictions, labels)
        return {"score": out["f1"], **out}
    if metric == "map@20":
        value = map_at_k(predictions, labels, 20)
        return {"score": value, "map@20": value}
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_NAMES)}")
