"""Task data as XLT rows (layouts in eval/tasks.py), from local files in the official raw formats or from the
Hugging Face hub.

- Local: `load_local(task, data_dir, lang, split)` finds the file under `data_dir` by the official file
  names (`LOCAL_PATTERNS`, e.g. `xquad/xquad.de.json`, `tatoeba/tatoeba.deu-eng.deu`, `**/de_*-ud-test.conllu`)
  and reads it with the format's reader (`read_*`), each usable on its own.
- Hub: `load_hub(task, lang, split)` reads `eval.suites.HUB[task]` with `datasets.load_dataset` and converts
  rows with `from_hub_row`. Offline (or unreachable) it raises DataUnavailable naming the dataset, config and
  the local alternative.

Ranking tasks (XTREME-R; local files only, as XLT knows no official hub copy): Mewsli-X from google-research's
`get-mewsli-x.sh` output (`wikinews_mentions-{dev,test}.jsonl`, `candidate_set_entities.jsonl`,
`wikipedia_pairs-{train,dev}.jsonl`, under `--data-dir` or its `mewslix/`), LAReQA from XQuAD-R
(`lareqa/xquad-r/<lang>.json`). A language's rows are its query rows followed by the task's whole candidate pool,
which is parsed once per process and shared between languages (`_cached`). Query and candidate texts follow the
XTREME-R baseline (xtreme third_party/utils_mewslix.py, utils_lareqa.py); see `read_xquad_r`,
`mewslix_mention_text`.

Pitfalls handled here: NLI labels are mapped by name (XTREME files order them contradiction / entailment /
neutral, Hugging Face entailment / neutral / contradiction); TyDiQA-GoldP training keeps the English slice
only; UD-POS concatenates every treebank of the language, UPOS column, multiword-token and empty-node lines
skipped; Tatoeba rows stay aligned (the leaderboard's sorted-English indices are `tatoeba_sorted_positions`).
"""
from __future__ import annotations

import csv
import functools
import json
import os
import re
from pathlib import Path
from typing import Iterator

from .languages import LANGUAGES, iso3, language
from .suites import HUB, any_task
from .tasks import TaskSpec


class DataUnavailable(RuntimeError):
    """Data that cannot be found or reached; the message says which and how to provide it."""


class FormatError(ValueError):
    """A data file that does not have the expected format; the message names the file and line."""


# ----- readers: one per official file format ---------------------------------------------------------------
def read_squad_json(path: str | Path) -> list[dict]:
    """SQuAD v1.1 / v2.0 JSON (also XQuAD, MLQA, TyDiQA-GoldP): one row per question. SQuAD v2.0's
    unanswerable questions get empty answer lists."""
    path = Path(path)
    data = read_json(path)
    try:
        rows = []
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa["answers"]
                    rows.append({"id": qa["id"], "context": paragraph["context"], "question": qa["question"],
                                 "answers": {"text": [a["text"] for a in answers],
                                             "answer_start": [a["answer_start"] for a in answers]}})
    except (KeyError, TypeError) as err:
        raise FormatError(f"{path}: not SQuAD-format JSON (data -> paragraphs -> qas), missing {err}") from None
    return rows


def _label_id(task: TaskSpec, name: str, where: str) -> int:
    """A class index by label NAME in the task's own order (never by another dataset's index)."""
    aliases = {"e": "entailment", "n": "neutral", "c": "contradiction", "contradictory": "contradiction"}
    name = aliases.get(name.strip(), name.strip())
    if name not in task.labels:
        raise FormatError(f"{where}: label {name!r} is not one of {', '.join(task.labels)}")
    return task.labels.index(name)


def _tsv_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def read_pair_tsv(path: str | Path, task: TaskSpec, lang: str | None = None) -> list[dict]:
    """Sentence-pair tsv: with a header naming sentence1/sentence2 (or question1/question2) and gold_label /
    label / is_duplicate columns (XNLI-1.0 `xnli.test.tsv` with its `language` column, PAWS-X, GLUE MNLI/QQP),
    or XTREME's header-less `sentence1<TAB>sentence2<TAB>label`. Labels are matched by name."""
    path = Path(path)
    lines = _tsv_rows(path)
    if not lines:
        raise FormatError(f"{path}: empty file")
    header = lines[0]
    if "sentence1" in header or "question1" in header:
        first = "sentence1" if "sentence1" in header else "question1"
        second = "sentence2" if first == "sentence1" else "question2"
        label = next((c for c in ("gold_label", "label", "is_duplicate") if c in header), None)
        if label is None:
            raise FormatError(f"{path}:1: no gold_label / label / is_duplicate column in the header")
        cols = {name: header.index(name) for name in (first, second, label)}
        lang_col = header.index("language") if "language" in header else None
        body, start = lines[1:], 2
    else:
        cols, lang_col, body, start = {"s1": 0, "s2": 1, "label": 2}, None, lines, 1
        first, second, label = "s1", "s2", "label"
    rows = []
    for n, fields in enumerate(body, start):
        if len(fields) <= max(cols.values()):
            raise FormatError(f"{path}:{n}: {len(fields)} tab-separated fields, expected at least "
                              f"{max(cols.values()) + 1}")
        if lang_col is not None and lang is not None and fields[lang_col] != lang:
            continue
        name = fields[cols[label]]
        if task.labels == ("not_duplicate", "duplicate") and name in ("0", "1"):
            name = task.labels[int(name)]
        rows.append({"sentence1": fields[cols[first]], "sentence2": fields[cols[second]],
                     "label": _label_id(task, name, f"{path}:{n}")})
    return rows


def read_conll(path: str | Path) -> list[dict]:
    """Token<TAB>tag lines, sentences separated by blank lines (PAN-X / WikiANN, XTREME's tagging tsv, CCG).
    WikiANN's raw `lang:token` prefix is removed. A file without tags (test inputs) gets no `tags`."""
    path = Path(path)
    rows, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if tokens:
                    rows.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[-1]:
                raise FormatError(f"{path}:{n}: expected token<TAB>tag")
            token = fields[0]
            if ":" in token[:4] and token.split(":", 1)[0].isalpha() and len(token.split(":", 1)[0]) in (2, 3):
                token = token.split(":", 1)[1]  # WikiANN raw files: "en:Paris"
            tokens.append(token)
            tags.append(fields[-1])
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def read_conllu(path: str | Path) -> list[dict]:
    """Universal Dependencies .conllu: word forms and the UPOS column. Comment lines, multiword-token ranges
    (1-2) and empty nodes (1.1) are skipped; as XTREME does, zero-width non-joiners and spaces inside a
    word are removed, and sentences whose words are all '_' (treebanks shipped without text) dropped."""
    path = Path(path)
    rows, tokens, tags = [], [], []

    def close():
        num_empty = sum(t == "_" for t in tokens)
        if tokens and (num_empty == 0 or num_empty < len(tokens) - 1):
            rows.append({"tokens": list(tokens), "tags": list(tags)})
        tokens.clear()
        tags.clear()

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                close()
                continue
            if line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 10:
                raise FormatError(f"{path}:{n}: {len(fields)} tab-separated fields, a .conllu line has 10")
            if "-" in fields[0] or "." in fields[0]:
                continue
            tokens.append("".join(fields[1].replace("\u200c", "").split(" ")))
            tags.append(fields[3])
    close()
    return rows


def read_tatoeba(source_path: str | Path, english_path: str | Path) -> list[dict]:
    """Tatoeba `tatoeba.<iso3>-eng.<iso3>` and `.eng`: line i of one is the translation of line i of the other."""
    src = Path(source_path).read_text(encoding="utf-8").splitlines()
    eng = Path(english_path).read_text(encoding="utf-8").splitlines()
    if len(src) != len(eng):
        raise FormatError(f"{source_path}: {len(src)} lines but {english_path} has {len(eng)}; the files must be "
                          "line-aligned")
    return [{"source": s.strip(), "target": t.strip()} for s, t in zip(src, eng)]


def tatoeba_sorted_positions(targets: list[str]) -> list[int]:
    """Position of each English line in XTREME's alphabetically sorted English file (a stable sort, so equal
    lines keep their order): the leaderboard's labels, and the form a prediction index is written in."""
    order = sorted(range(len(targets)), key=lambda i: targets[i])
    position = [0] * len(targets)
    for pos, i in enumerate(order):
        position[i] = pos
    return position


def _id_sentences(path: Path) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise FormatError(f"{path}:{n}: expected id<TAB>sentence")
            out.append((fields[0], fields[1].strip()))
    return out


def read_bucc(folder: str | Path, lang: str, split: str) -> list[dict]:
    """BUCC 2018 `<lang>-en.<split>.<lang>`, `.en` (id<TAB>sentence) and, when present, `.gold`
    (src_id<TAB>en_id) in `folder`, as mining rows."""
    folder = Path(folder)
    prefix = folder / f"{lang}-en.{split}"
    rows = []
    for side, suffix in (("source", lang), ("target", "en")):
        path = Path(f"{prefix}.{suffix}")
        if not path.is_file():
            raise DataUnavailable(f"bucc2018 {lang} {split}: {path} is missing")
        rows += [{"side": side, "id": i, "text": s} for i, s in _id_sentences(path)]
    gold = Path(f"{prefix}.gold")
    if gold.is_file():
        rows += [{"side": "gold", "id": "\t".join(line.split())} for line in gold.read_text().splitlines() if line]
    return rows


def read_json(path: Path, error: type[ValueError] = FormatError):
    """A JSON file; invalid JSON raises `error` naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None


def _numbered_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    raise FormatError(f"{path}:{n}: not a JSON line ({err})") from None


def _jsonl(path: Path) -> list[dict]:
    return [record for _, record in _numbered_jsonl(path)]


COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def copa_row(record: dict, where: str) -> dict:
    """XCOPA / COPA: the premise with its question as context, the two alternatives as endings."""
    try:
        question = record["question"]
        return {"context": f"{record['premise']} {COPA_QUESTIONS[question]}", "question": question,
                "endings": [record["choice1"], record["choice2"]], "label": int(record["label"])}
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{where}: expected premise, choice1, choice2, question (cause/effect), label: "
                          f"{err!r}") from None


def read_xcopa_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return [copa_row(r, f"{path}:{n}") for n, r in enumerate(_jsonl(path), 1)]


def read_siqa(path: str | Path) -> list[dict]:
    """Social IQa's release (`socialiqa-train-dev/{train,dev}.jsonl`: context, question, answerA/B/C) with its
    labels in the `<split>-labels.lst` file beside it (one of 1, 2, 3 per line)."""
    path = Path(path)
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        raise FormatError(f"{path}: Social IQa keeps its labels in {labels_path.name} beside it, which is missing")
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = list(_numbered_jsonl(path))
    if len(labels) != len(records):
        raise FormatError(f"{labels_path}: {len(labels)} labels but {path} has {len(records)} records")
    rows = []
    for (n, r), label in zip(records, labels):
        _require(r, ("context", "question", "answerA", "answerB", "answerC"), f"{path}:{n}")
        if label not in ("1", "2", "3"):
            raise FormatError(f"{labels_path}: label {label!r} for {path}:{n} is not 1, 2 or 3")
        rows.append({"context": f"{r['context']} {r['question']}",
                     "endings": [r["answerA"], r["answerB"], r["answerC"]], "label": int(label) - 1})
    return rows


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise FormatError(f"{where}: missing field(s) {', '.join(missing)}")


def read_nli_records(path: str | Path, task: TaskSpec) -> list[dict]:
    """ANLI: the official jsonl (context, hypothesis, label e/n/c) or its analysis CSV (context, statement,
    gold_label); labels by name."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            records = [(n, r) for n, r in enumerate(csv.DictReader(f), 2)]
        keys = ("context", "statement", "gold_label")
    else:
        records = list(enumerate(_jsonl(path), 1))
        keys = ("context", "hypothesis", "label")
    rows = []
    for n, r in records:
        _require(r, keys, f"{path}:{n}")
        rows.append({"sentence1": r[keys[0]], "sentence2": r[keys[1]],
                     "label": _label_id(task, str(r[keys[2]]), f"{path}:{n}")})
    return rows


def read_choice_records(path: str | Path, task: TaskSpec) -> list[dict]:
    """HellaSwag jsonl (ctx, endings, label), CommonsenseQA jsonl (question.stem, question.choices,
    answerKey), Cosmos QA CSV (context, question, answer0..3, label)."""
    path = Path(path)
    rows = []
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for n, r in enumerate(csv.DictReader(f), 2):
                _require(r, ("context", "question", "answer0", "label"), f"{path}:{n}")
                rows.append({"context": f"{r['context']} {r['question']}",
                             "endings": [r[f"answer{i}"] for i in range(task.num_choices)], "label": int(r["label"])})
        return rows
    for n, r in enumerate(_jsonl(path), 1):
        where = f"{path}:{n}"
        if "ctx" in r:
            _require(r, ("endings", "label"), where)
            rows.append({"context": r["ctx"], "endings": list(r["endings"]), "label": int(r["label"])})
        elif isinstance(r.get("question"), dict):
            _require(r, ("answerKey",), where)
            choices = r["question"]["choices"]
            keys = [c["label"] for c in choices]
            if r["answerKey"] not in keys:
                raise FormatError(f"{where}: answerKey {r['answerKey']!r} is not one of {keys}")
            rows.append({"context": r["question"]["stem"], "endings": [c["text"] for c in choices],
                         "label": keys.index(r["answerKey"])})
        else:
            raise FormatError(f"{where}: neither HellaSwag (ctx, endings, label) nor CommonsenseQA "
                              "(question.stem, question.choices, answerKey)")
    return rows


# ----- ranking tasks: Mewsli-X and LAReQA (XQuAD-R) ---------------------------------------------------------
def _field(record, dotted: str, where: str):
    """record["a"]["b"] for dotted "a.b", or FormatError naming where and the missing field."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise FormatError(f"{where}: missing field {dotted}")
        value = value[key]
    return value


def _span(start, end, text: str, where: str) -> tuple[int, int]:
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
        raise FormatError(f"{where}: span ({start!r}, {end!r}) is not inside the text ({len(text)} characters)")
    return start, end


def _spans(items, text: str, where: str) -> list[tuple[int, int]]:
    """Mewsli-X sentence spans, [{"start": s, "end": e}, ...], checked against text."""
    return [_span(_field(item, "start", f"{where}[{k}]"), _field(item, "end", f"{where}[{k}]"), text, f"{where}[{k}]")
            for k, item in enumerate(items)]


_BRACES = re.compile(r"\{(.*?)\}")


def mewslix_mention_text(text: str, spans: list[tuple[int, int]], start: int, end: int) -> str:
    """A mention's query text as the XTREME-R baseline builds it (xtreme third_party/utils_mewslix.py,
    preprocess_mention): the mention, a colon, then the sentence holding it with the mention set off by { },
    braces already there turned into parentheses, whitespace normalised: "Smith: The verdict came back for
    { Smith }, who stepped down." A mention across a sentence break keeps every sentence it touches (the
    baseline assumes one); a context without sentence spans is used whole."""
    touched = [(s, e) for s, e in spans if s < end and start < e]
    lo, hi = (min(s for s, _ in touched), max(e for _, e in touched)) if touched else (0, len(text))
    mention = text[start:end]
    left, right = (_BRACES.sub(r"(\1)", part) for part in (text[lo:start], text[end:hi]))
    return " ".join(f"{mention}: {left} {{ {mention} }} {right}".split())


def mewslix_entity_text(description: str, spans: list[tuple[int, int]]) -> str:
    """An entity's candidate text as the baseline embeds it (preprocess_entity_description): the description's
    sentences joined by spaces, whitespace normalised (the whole description when it has no sentence spans)."""
    return " ".join((" ".join(description[s:e] for s, e in spans) if spans else description).split())


def _entity_row(entity: dict, where: str) -> dict:
    description = _field(entity, "description", where)
    spans = _spans(_field(entity, "sentence_spans", where), description, f"{where}: sentence_spans")
    return {"id": _field(entity, "entity_id", where), "candidate": mewslix_entity_text(description, spans)}


def _mention_rows(record: dict, prefix: str, mentions: list[tuple[str, dict]], where: str) -> list[dict]:
    """Query rows {id, query, answers: [entity id], language} for mentions (name, mention) of the context at
    `prefix`context in record."""
    text = _field(record, f"{prefix}context.text", where)
    if not text:
        raise FormatError(f"{where}: {prefix}context.text is empty (the released *_no_text files carry no article "
                          "text: google-research's get-mewsli-x.sh fills it in)")
    language = _field(record, f"{prefix}context.language", where)
    spans = _spans(_field(record, f"{prefix}context.sentence_spans", where), text,
                   f"{where}: {prefix}context.sentence_spans")
    rows = []
    for name, mention in mentions:
        at = f"{where}: {name}"
        start, end = _span(_field(mention, "mention_span.start", at), _field(mention, "mention_span.end", at), text,
                           f"{at}.mention_span")
        if text[start:end] != _field(mention, "mention_span.text", at):
            raise FormatError(f"{at}: mention_span.text {mention['mention_span']['text']!r} is not the context's "
                              f"text[{start}:{end}] {text[start:end]!r}")
        entity = _field(mention, "entity_id", at)
        if not entity:
            raise FormatError(f"{at}: entity_id is empty (xtreme's download_data.sh blanks the test labels: use "
                              "wikinews_mentions-test.jsonl as google-research's get-mewsli-x.sh writes it)")
        rows.append({"id": _field(mention, "example_id", at), "query": mewslix_mention_text(text, spans, start, end),
                     "answers": [entity], "language": language})
    return rows


def read_mewslix_mentions(path: str | Path) -> list[dict]:
    """Mewsli-X WikiNews mentions, `wikinews_mentions-{dev,test}.jsonl` (one article per line: `context` with
    `language`, `text`, `sentence_spans` [{start, end}], and its `mentions`, each with `example_id`,
    `mention_span` {start, end, text} and the gold `entity_id`), as query rows of every language."""
    path = Path(path)

    def numbered_rows():
        for n, record in _numbered_jsonl(path):
            mentions = _field(record, "mentions", f"{path}:{n}")
            for row in _mention_rows(record, "", [(f"mentions[{i}]", m) for i, m in enumerate(mentions)],
                                     f"{path}:{n}"):
                yield n, row

    return _unique_ids(numbered_rows(), path, "example_id")


def read_mewslix_entities(path: str | Path) -> list[dict]:
    """Mewsli-X `candidate_set_entities.jsonl` (one entity per line: `entity_id`, `description`,
    `sentence_spans`, ...) as candidate rows {id, candidate}."""
    path = Path(path)
    return _unique_ids(((n, _entity_row(record, f"{path}:{n}")) for n, record in _numbered_jsonl(path)),
                       path, "entity_id")


def _unique_ids(numbered_rows, path: Path, field: str) -> list[dict]:
    """The rows of (line number, row) pairs, each row's id checked to appear once in the file."""
    rows, seen = [], set()
    for n, row in numbered_rows:
        if row["id"] in seen:
            raise FormatError(f"{path}:{n}: {field} {row['id']!r} appears twice")
        seen.add(row["id"])
        rows.append(row)
    return rows


def _entity_ids(path: Path) -> frozenset:
    return frozenset(row["id"] for row in _cached(read_mewslix_entities, path))


def read_mewslix_pairs(path: str | Path) -> list[dict]:
    """Mewsli-X Wikipedia pairs, `wikipedia_pairs-{train,dev}.jsonl` (one `contextual_mention` {context, mention}
    and its `entity` per line), as query rows followed by candidate rows of their distinct entities."""
    path = Path(path)
    queries, entities = [], {}
    for n, record in _numbered_jsonl(path):
        where = f"{path}:{n}"
        mention = _field(record, "contextual_mention.mention", where)
        queries += _mention_rows(record, "contextual_mention.", [("contextual_mention.mention", mention)], where)
        entity = _entity_row(_field(record, "entity", where), f"{where}: entity")
        entities.setdefault(entity["id"], entity)
    return queries + list(entities.values())


def _break(item, text: str, where: str) -> tuple[int, int]:
    if not (isinstance(item, list) and len(item) == 2):
        raise FormatError(f"{where}: expected [start, end], got {item!r}")
    return _span(item[0], item[1], text, where)


def read_xquad_r(*paths: str | Path) -> tuple[dict[str, list[dict]], list[dict]]:
    """LAReQA's XQuAD-R files (google-research-datasets/lareqa `xquad-r/<lang>.json`: XQuAD's SQuAD JSON, each
    paragraph with `sentence_breaks`, [start, end) character offsets into its context; the file's stem is its
    language) as (query rows by language, the multilingual candidate pool), as xtreme's
    third_party/utils_lareqa.py builds them:
    - candidates: every sentence of every paragraph of every file, id `<lang>_<paragraph>_<sentence>`
      (paragraphs counted from 1 through the file, sentences from 0), text: the sentence, then its paragraph
      (the baseline embeds sentence + context; XLT puts a space between them);
    - queries: each question, id `<question id>_<lang>`; its gold candidates are, in every language, the
      sentences equal to the one holding that language's answer start (XQuAD-R question ids are parallel
      across languages). A question whose answer starts outside every sentence is skipped, as there."""
    questions: dict[str, dict[str, str]] = {}  # lang -> question id -> question
    candidates, gold = [], {}
    for path in map(Path, paths):
        lang, data, number = path.stem, read_json(path), 0
        questions[lang] = {}
        for a, article in enumerate(_field(data, "data", str(path))):
            for p, paragraph in enumerate(_field(article, "paragraphs", f"{path}: data[{a}]")):
                number += 1
                where = f"{path}: data[{a}].paragraphs[{p}]"
                context = _field(paragraph, "context", where)
                breaks = [_break(b, context, f"{where}.sentence_breaks[{k}]")
                          for k, b in enumerate(_field(paragraph, "sentence_breaks", where))]
                sentences = {f"{lang}_{number}_{k}": context[s:e] for k, (s, e) in enumerate(breaks)}
                candidates += [{"id": cid, "candidate": f"{s} {context}"} for cid, s in sentences.items()]
                for q, qa in enumerate(_field(paragraph, "qas", where)):
                    at = f"{where}.qas[{q}]"
                    qid, answers = _field(qa, "id", at), _field(qa, "answers", at)
                    if not isinstance(answers, list) or len(answers) != 1:
                        raise FormatError(f"{at}: XQuAD-R has exactly one answer per question, got {answers!r}")
                    start = _field(answers[0], "answer_start", f"{at}.answers[0]")
                    holding = [context[s:e] for s, e in breaks if s <= start < e]
                    if not holding:
                        continue
                    if qid in questions[lang]:
                        raise FormatError(f"{at}: question id {qid!r} appears twice in {path}")
                    questions[lang][qid] = _field(qa, "question", at)
                    gold.setdefault(qid, []).extend(cid for cid, s in sentences.items() if s == holding[0])
    queries = {lang: [{"id": f"{qid}_{lang}", "query": text, "answers": gold[qid]} for qid, text in items.items()]
               for lang, items in questions.items()}
    return queries, candidates


@functools.lru_cache(maxsize=4)
def _memo(reader, keys):
    return reader(*(Path(key[0]) for key in keys))


def _cached(reader, *paths: Path):
    """reader(*paths), parsed once per file version (path, mtime, size) and shared by the callers: every language
    of a ranking task ranks against one candidate pool (Mewsli-X: about a million entities), held once."""
    return _memo(reader, tuple((str(Path(p).resolve()), Path(p).stat().st_mtime_ns, Path(p).stat().st_size)
                               for p in paths))


# Mewsli-X files found beside the mentions (`--data-dir` layouts of google-research's get-mewsli-x.sh output and
# of xtreme's download_data.sh, which moves them into mewslix/).
MEWSLIX_CANDIDATES = ("mewslix/candidate_set_entities.jsonl", "**/candidate_set_entities.jsonl")
MEWSLIX_PAIRS = ("mewslix/wikipedia_pairs-{split}.jsonl", "**/wikipedia_pairs-{split}.jsonl")


def load_mewslix(data_dir: str | Path, lang: str, split: str = "test") -> list[dict]:
    """Mewsli-X rows of `lang`. dev / test: the WikiNews mention queries of `lang` (from the all-language
    `wikinews_mentions-{split}.jsonl`, or xtreme's per-language `wikinews_mentions/{split}-{lang}.jsonl`), then
    the whole candidate set (`candidate_set_entities.jsonl`). train: the Wikipedia pairs of `lang`
    (`wikipedia_pairs-train.jsonl`, English), then their entities."""
    if split == "train":
        return load_mewslix_pairs(data_dir, lang, split)
    mentions_path = find_local("mewslix", data_dir, lang, split)
    candidates_path = find_local("mewslix", data_dir, lang, split, MEWSLIX_CANDIDATES)
    queries = [r for r in _cached(read_mewslix_mentions, mentions_path) if r["language"] == lang]
    if not queries:
        raise DataUnavailable(f"mewslix {lang} {split}: {mentions_path} has no mention whose context.language is "
                              f"{lang!r}")
    candidates = _cached(read_mewslix_entities, candidates_path)
    known = _cached(_entity_ids, candidates_path)  # built once, not per language
    lost = [r for r in queries if r["answers"][0] not in known]
    if lost:
        raise FormatError(f"{mentions_path}: the gold entities of {len(lost)} {lang} mentions are not in "
                          f"{candidates_path} (e.g. {lost[0]['id']} -> {lost[0]['answers'][0]})")
    return queries + candidates


def load_mewslix_pairs(data_dir: str | Path, lang: str, split: str = "train") -> list[dict]:
    """Mewsli-X Wikipedia pairs of `lang` (`wikipedia_pairs-{train,dev}.jsonl`, English): the XTREME-R baseline's
    dual-encoder training data (train) and its English model-selection set (dev), as query rows followed by the
    entities they name."""
    rows = _cached(read_mewslix_pairs, find_local("mewslix", data_dir, lang, split, MEWSLIX_PAIRS))
    queries = [r for r in rows if "query" in r and r.get("language", lang) == lang]
    if not queries:
        raise DataUnavailable(f"mewslix {lang} {split}: the Wikipedia pairs have no mention whose context.language "
                              f"is {lang!r}")
    return queries + [r for r in rows if "candidate" in r]


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s+)")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the sentences of `text`, split after ., ! or ? (and closing quotes or
    brackets) followed by whitespace; every character but the separating whitespace is in a span."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start(1)))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def squad_as_retrieval(rows: list[dict]) -> list[dict]:
    """SQuAD rows in LAReQA's retrieval form, as the XTREME-R baseline trains its dual encoder: each question a
    query whose answer is the sentence holding its (first) answer's start; candidates are the sentences of every
    context, each followed by its context as in XQuAD-R (`read_xquad_r`). Sentences are split by
    `sentence_spans` (SQuAD has no sentence breaks); questions whose answer starts outside every sentence, and
    unanswerable ones, are skipped. Candidate ids: `<context number>_<sentence number>`."""
    contexts: dict[str, int] = {}
    candidates, queries = [], []
    spans_of: dict[int, list[tuple[int, int]]] = {}
    for r in rows:
        c = contexts.setdefault(r["context"], len(contexts))
        if c not in spans_of:
            spans_of[c] = sentence_spans(r["context"])
            candidates += [{"id": f"{c}_{k}", "candidate": f"{r['context'][a:b]} {r['context']}"}
                           for k, (a, b) in enumerate(spans_of[c])]
        if not r["answers"]["answer_start"]:
            continue
        start = r["answers"]["answer_start"][0]
        k = next((k for k, (a, b) in enumerate(spans_of[c]) if a <= start < b), None)
        if k is not None:
            queries.append({"id": r["id"], "query": r["question"], "answers": [f"{c}_{k}"]})
    return queries + candidates


LAREQA_LAYOUT = "<data-dir>/lareqa/xquad-r/<lang>.json, as in google-research-datasets/lareqa"


def load_lareqa(data_dir: str | Path, lang: str, split: str = "test") -> list[dict]:
    """LAReQA rows of `lang`: its XQuAD-R questions as queries, then the candidate pool of every XQuAD-R
    language's sentences (all 11 files are needed: the pool is multilingual)."""
    pool = any_task("lareqa").languages
    if split != "test":
        raise DataUnavailable(f"lareqa {lang} {split}: XQuAD-R is a test set only (the XTREME-R baseline trains on "
                              "SQuAD v1.1 in retrieval form, which XLT does not build)")
    if lang not in pool:
        raise DataUnavailable(f"lareqa: no XQuAD-R language {lang!r}; expected one of {', '.join(pool)}")
    paths = []
    for other in pool:
        try:
            paths.append(find_local("lareqa", data_dir, other, split))
        except DataUnavailable as err:
            raise DataUnavailable(f"lareqa {lang}: the candidate pool needs XQuAD-R in all of {', '.join(pool)}: "
                                  f"{err}; expected {LAREQA_LAYOUT}") from None
    queries, candidates = _cached(read_xquad_r, *paths)
    if not queries[lang]:
        raise DataUnavailable(f"lareqa {lang}: {paths[pool.index(lang)]} has no question whose answer starts inside "
                              "a sentence (sentence_breaks)")
    return queries[lang] + candidates


# ----- local files: official names per task ------------------------------------------------------------------
# Glob patterns under data_dir, first match wins ({lang}, {iso3}, {name}: the language's code, Tatoeba code,
# English name; {split}: train / dev / test, with the official spellings in SPLIT_NAMES).
LOCAL_PATTERNS: dict[str, tuple[str, ...]] = {
    "xnli": ("xnli/{split}-{lang}.tsv", "XNLI-1.0/xnli.{split}.tsv", "**/xnli.{split}.tsv"),
    "pawsx": ("pawsx/{split}-{lang}.tsv", "x-final/{lang}/{split}_2k.tsv", "x-final/{lang}/{split}.tsv"),
    "panx": ("panx/{split}-{lang}.tsv", "panx_dataset/{lang}/{split}", "**/{lang}/{split}"),
    "udpos": ("udpos/{split}-{lang}.tsv", "**/{lang}_*-ud-{split}.conllu"),
    "xquad": ("xquad/xquad.{lang}.json", "**/xquad.{lang}.json"),
    "mlqa": ("**/{split}-context-{lang}-question-{lang}.json",),
    # test: XTREME's TyDiQA test set is TyDiQA-GoldP dev, per language (xtreme's download blanks its answers: use
    # the release's tydiqa-goldp-dev-<language>.json or tydiqa-goldp-v1.1-dev.json)
    "tydiqa": ("**/tydiqa-goldp-{split}-{lowername}.json", "**/tydiqa-goldp-v1.1-{split}.json"),
    "tatoeba": ("tatoeba/tatoeba.{iso3}-eng.{iso3}", "**/tatoeba.{iso3}-eng.{iso3}"),
    "bucc2018": ("bucc2018/{lang}-en.{split}.{lang}", "**/{lang}-en.{split}.{lang}"),
    "xcopa": ("xcopa/{lang}/{split}.{lang}.jsonl", "**/{split}.{lang}.jsonl"),
    "squad": ("**/{split}-v1.1.json",),
    "squad_v2": ("**/{split}-v2.0.json",),
    "mnli": ("**/MNLI/{split}.tsv", "**/mnli/{split}.tsv"),
    "qqp": ("**/QQP/{split}.tsv", "**/qqp/{split}.tsv"),
    "anli": ("**/R1/{split}.jsonl", "**/ANLI_analysis_r1_{split}.csv"),
    "hellaswag": ("**/hellaswag_{split}.jsonl",),
    "cosmosqa": ("**/cosmosqa/{split}.csv", "**/{split}.csv"),
    "siqa": ("siqa/{split}.jsonl", "**/socialiqa-train-dev/{split}.jsonl", "**/socialiqa/{split}.jsonl"),
    "copa": ("copa/{split}.jsonl", "**/COPA/{split}.jsonl"),
    "commonsenseqa": ("**/{split}_rand_split.jsonl",),
    "ccg": ("ccg/{split}.tsv", "**/ccg/{split}.tsv"),
    "mewslix": ("mewslix/wikinews_mentions-{split}.jsonl", "mewslix/wikinews_mentions/{split}-{lang}.jsonl",
                "**/wikinews_mentions-{split}.jsonl", "**/wikinews_mentions/{split}-{lang}.jsonl"),
    "lareqa": ("lareqa/xquad-r/{lang}.json", "**/xquad-r/{lang}.json"),
}
# Each dataset's own name for a split, tried in order.
SPLIT_NAMES = {
    "xnli": {"dev": ("dev",)}, "pawsx": {"dev": ("dev",), "train": ("train",)},
    "udpos": {"dev": ("dev",)}, "tydiqa": {"dev": ("dev",), "test": ("dev",)}, "xcopa": {"dev": ("val", "dev")},
    "bucc2018": {"dev": ("dev", "sample"), "train": ("training",)}, "mnli": {"dev": ("dev_matched",)},
    "squad": {"dev": ("dev",)}, "squad_v2": {"dev": ("dev",)}, "hellaswag": {"dev": ("val",)},
    "cosmosqa": {"dev": ("valid", "dev")}, "commonsenseqa": {"dev": ("dev",)}, "copa": {"dev": ("val", "dev")},
}
SPLITS = ("train", "dev", "test")


def find_local(task: str, data_dir: str | Path, lang: str, split: str, patterns: tuple[str, ...] | None = None) -> Path:
    """The local file for (task, lang, split) under data_dir (by the task's LOCAL_PATTERNS, or `patterns`), or
    DataUnavailable listing what was tried."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if patterns is None and task not in LOCAL_PATTERNS:
        raise ValueError(f"task {task!r} has no local file patterns; known: {', '.join(LOCAL_PATTERNS)}")
    entry = language(lang)
    tried = []
    for split_name in SPLIT_NAMES.get(task, {}).get(split, (split,)):
        for pattern in patterns or LOCAL_PATTERNS[task]:
            glob = pattern.format(lang=lang, split=split_name, iso3=entry.iso3 or lang, name=entry.name,
                                  lowername=entry.name.lower())
            tried.append(glob)
            matches = sorted(p for p in data_dir.glob(glob) if p.is_file())
            if matches:
                return matches[0]
    raise DataUnavailable(f"{task} {lang} {split}: no local file under {data_dir} (tried {', '.join(tried)})")


def load_local(task_name: str, data_dir: str | Path, lang: str, split: str = "test") -> list[dict]:
    """Rows of (task, lang, split) from the official raw files under data_dir."""
    task = any_task(task_name)
    if task_name == "mewslix":
        return load_mewslix(data_dir, lang, split)
    if task_name == "lareqa":
        return load_lareqa(data_dir, lang, split)
    if task_name == "udpos":
        # XTREME concatenates every treebank of the language (English training: EWT, GUM, LinES, ParTUT).
        files = sorted(p for p in Path(data_dir).glob(f"**/{lang}_*-ud-{split}.conllu") if p.is_file())
        if files:
            return [row for f in files for row in read_conllu(f)]
    path = find_local(task_name, data_dir, lang, split)
    if task_name == "tatoeba":
        return read_tatoeba(path, path.with_suffix(".eng"))
    if task_name == "bucc2018":
        return read_bucc(path.parent, lang, path.name.split(".")[1])
    if path.suffix == ".conllu":
        return read_conllu(path)
    if task.format == "qa":
        rows = read_squad_json(path)
        if task_name == "tydiqa":
            rows = language_slice(rows, "en" if split == "train" else lang)
        if split == "test" and rows and not any(t.strip() for r in rows for t in r["answers"]["text"]):
            raise FormatError(f"{path}: every gold answer is empty: xtreme's download_data.sh blanks the test answers; "
                              "give the original release's file")
        return rows
    if task.format == "tagging":
        return read_conll(path)
    if task_name == "siqa":
        return read_siqa(path)
    if task.format == "choice":
        return read_xcopa_jsonl(path) if task_name in ("xcopa", "copa") else read_choice_records(path, task)
    if task_name == "anli":
        return read_nli_records(path, task)
    return read_pair_tsv(path, task, lang)


def language_slice(rows: list[dict], lang: str) -> list[dict]:
    """TyDiQA-GoldP rows of one language: ids are '<language name>-<number>...'. XTREME fine-tunes on the English
    slice only (jiant's downloader mixed every language in, which is not zero-shot) and tests on each language's
    slice of GoldP dev."""
    prefix = language(lang).name.lower() + "-"
    return [r for r in rows if r["id"].startswith(prefix)]


def english_slice(rows: list[dict]) -> list[dict]:
    return language_slice(rows, "en")


# ----- Hugging Face hub ---------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_config(task_name: str, lang: str) -> str:
    source = HUB[task_name]
    iso = iso3(lang) if "{iso3}" in source.config else ""
    return source.config.format(lang=lang, name=language(lang).name, iso3=iso)


def _unavailable(task_name: str, lang: str, reason: str) -> DataUnavailable:
    source = HUB[task_name]
    config = hub_config(task_name, lang)
    what = f"{source.dataset}" + (f" (config {config})" if config else "")
    patterns = ", ".join(LOCAL_PATTERNS.get(task_name, ()))
    return DataUnavailable(f"{task_name} {lang}: the Hugging Face dataset {what} cannot be loaded: {reason}. "
                           f"Download it where the hub is reachable, or pass the official files with --data-dir DIR "
                           f"(looked up as {patterns})")


# Where the tasks that have no Hugging Face hub dataset come from.
NOT_ON_HUB = {
    "ccg": "CCGbank is licensed",
    "mewslix": "Mewsli-X: run get-mewsli-x.sh of google-research/google-research "
               "dense_representations_for_entity_retrieval/mel, or xtreme's scripts/download_data.sh",
    "lareqa": "XQuAD-R: the xquad-r/ folder of github.com/google-research-datasets/lareqa",
}


def load_hub(task_name: str, lang: str, split: str = "test") -> list[dict]:
    """Rows of (task, lang, split) from the Hugging Face hub; DataUnavailable when offline or unreachable."""
    task = any_task(task_name)
    if task_name not in HUB:
        raise DataUnavailable(f"{task_name}: not on the Hugging Face hub ({NOT_ON_HUB.get(task_name, 'no hub copy')}); "
                              f"pass the official files with --data-dir DIR (looked up as "
                              f"{', '.join(LOCAL_PATTERNS.get(task_name, ()))})")
    if task_name == "bucc2018":
        raise DataUnavailable("bucc2018: the hub config holds the gold pairs only, and mining needs the whole "
                              "corpora: pass the BUCC 2018 files with --data-dir DIR "
                              "(<lang>-en.{dev,test}.<lang>, .en, .gold)")
    if _offline():
        raise _unavailable(task_name, lang, "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set")
    source = HUB[task_name]
    hub_split = {"dev": "validation", "test": "test", "train": "train"}[split]
    if task_name in ("xquad", "tatoeba", "tydiqa") and split == "test":
        hub_split = "validation"  # the benchmark's test set (TyDiQA: GoldP dev, per language)
    if task_name == "mnli" and split == "dev":
        hub_split = "validation_matched"
    try:
        import datasets

        ds = datasets.load_dataset(source.dataset, hub_config(task_name, lang) or None, split=hub_split)
    except Exception as err:  # network, missing config or split: all mean "not here"
        raise _unavailable(task_name, lang, f"{type(err).__name__}: {err}") from None
    names = {}
    for key, feature in ds.features.items():
        if hasattr(feature, "names"):
            names[key] = feature.names
        elif hasattr(getattr(feature, "feature", None), "names"):
            names[key] = feature.feature.names
    rows = [from_hub_row(task, r, names, lang) for r in ds]
    rows = [r for r in rows if r is not None]
    return rows


def from_hub_row(task: TaskSpec, r: dict, label_names: dict[str, list[str]], lang: str) -> dict | None:
    """One hub row as an XLT row (None: a row of another language). ClassLabel ids are turned into names with
    the dataset's own `label_names` first, then into the task's ids, so label orders never get mixed up."""
    def named(key):
        value = r[key]
        return label_names[key][value] if key in label_names and isinstance(value, int) else str(value)

    name = task.name
    if task.format == "qa":
        if name == "tydiqa" and not r["id"].startswith(language(lang).name.lower() + "-"):
            return None
        return {"id": r["id"], "context": r["context"], "question": r["question"],
                "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])}}
    if task.format == "pair":
        if name == "xnli" and r.get("language", lang) != lang:
            return None
        first = next(k for k in ("sentence1", "premise", "question1") if k in r)
        second = next(k for k in ("sentence2", "hypothesis", "question2") if k in r)
        label_key = "gold_label" if "gold_label" in r else "label"
        if r[label_key] == -1:  # GLUE/ANLI test rows carry no label
            return None
        return {"sentence1": r[first], "sentence2": r[second],
                "label": _label_id(task, named(label_key), f"{name} hub row")}
    if task.format == "tagging":
        key = "ner_tags" if "ner_tags" in r else "pos_tags"
        tags = [label_names[key][t] if isinstance(t, int) else t for t in r[key]]
        return {"tokens": list(r["tokens"]), "tags": tags}
    if task.format == "retrieval":
        return {"source": r["source_sentence"].strip(), "target": r["target_sentence"].strip()}
    if name in ("xcopa", "copa"):
        return copa_row(r, f"{name} hub row")
    if name == "siqa":
        return {"context": f"{r['context']} {r['question']}", "endings": [r["answerA"], r["answerB"], r["answerC"]],
                "label": int(r["label"]) - 1}
    if name == "hellaswag":
        return {"context": r["ctx"], "endings": list(r["endings"]), "label": int(r["label"])}
    if name == "cosmosqa":
        return {"context": f"{r['context']} {r['question']}", "endings": [r[f"answer{i}"] for i in range(4)],
                "label": int(r["label"])}
    if name == "commonsenseqa":
        keys = list(r["choices"]["label"])
        return {"context": r["question"], "endings": list(r["choices"]["text"]), "label": keys.index(r["answerKey"])}
    raise ValueError(f"{name}: no hub conversion for format {task.format}")


def load(task_name: str, lang: str, split: str = "test", data_dir: str | Path | None = None) -> list[dict]:
    """Local files when data_dir is given, the hub otherwise."""
    if data_dir is not None:
        return load_local(task_name, data_dir, lang, split)
    return load_hub(task_name, lang, split)


__all__ = ["DataUnavailable", "FormatError", "LANGUAGES", "load", "load_local", "load_hub", "find_local",
           "from_hub_row", "read_squad_json", "read_pair_tsv", "read_conll", "read_conllu", "read_tatoeba",
           "tatoeba_sorted_positions", "read_bucc", "read_xcopa_jsonl", "read_nli_records", "read_choice_records",
           "english_slice", "read_mewslix_mentions", "read_mewslix_entities", "read_mewslix_pairs", "read_xquad_r",
           "load_mewslix", "load_mewslix_pairs", "load_lareqa", "read_siqa", "sentence_spans", "squad_as_retrieval",
           "mewslix_mention_text", "mewslix_entity_text", "language_slice"]
