"""Real-format fixtures for the XTREME / XTREME-R protocol, built offline.

- `write_data_dir(root, languages, rows_per_split, seed)`: tiny files in the official raw layout of every task
  that `eval.loaders.load_local` reads (the intermediate tasks, XTREME's and XTREME-R's targets), with text and
  exact labels from the synthetic world (`eval.synthetic.SyntheticWorld`). Each real language is written in one
  synthetic language (`LANG_MAP`); dev and test sets are parallel across languages, as the real ones are.
- `languages_of(task, languages)`, `written(...)`, `expected_rows(...)`: which (task, split, language) files were
  written and how many rows `load_local` returns for each.
- `tiny_hf_model(folder, family, texts)`: a random tiny BERT or XLM-R encoder exported as a Hugging Face folder
  with a fast tokenizer trained here on `texts` (WordPiece, or an XLM-R-style SentencePiece Unigram).
- `all_texts(root)`: every text of a written data folder, read back from the raw files (to train tokenizers).

Formats the world lacks are derived from its events and rows, labels computed, never assumed: PAWS-X and QQP
pairs are a sentence (question) and an edit of its event, a paraphrase exactly when the edit keeps the meaning
(the time adverb is redundant with the tense: `eval.synthetic.semantics`); XCOPA, CommonsenseQA and Cosmos QA
choices come from syn-swag / syn-xquad rows; CCG supertags are a fixed function of the UPOS tags; BUCC pairs
are Tatoeba rows with ids, gold pairs and unpaired sentences on both sides; Mewsli-X entities are the world's
people, cities and organisations, described in English from the world's facts.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import replace
from pathlib import Path

from eval.languages import LANGUAGES, iso3, language
from eval.suites import INTERMEDIATE_TASKS, UPOS, any_task
from eval.synthetic import SyntheticWorld
from eval.synthetic import lexicon as lx
from eval.synthetic.languages import detokenize
from eval.synthetic.semantics import NLI_LABELS, Event, at_least_as_specific

DEFAULT_LANGUAGES = ("en", "de", "ru")
DEFAULT_ROWS = {"train": 64, "dev": 16, "test": 16}

# Real language -> the synthetic language its text is written in. The default languages get distinct ones
# (en, de -> qsv Romance-like, ru -> qcy Cyrillic); the rest by script and family. Two real languages that
# share a synthetic language get the same (parallel) text.
_PRIMARY = {"en": "en", "de": "qsv", "ru": "qcy", "ja": "qso", "ar": "qvs", "tr": "qag", "zh": "qos"}


def _synthetic_for(code: str) -> str:
    if code in _PRIMARY:
        return _PRIMARY[code]
    entry = LANGUAGES[code]
    if entry.script == "Cyrillic":
        return "qcy"
    if entry.family in ("Turkic", "Uralic"):
        return "qag"
    if entry.family in ("Japonic", "Koreanic", "Dravidian", "IE:Indo-Aryan", "IE:Iranian"):
        return "qso"  # verb-final languages
    if entry.family in ("Afro-Asiatic", "Basque"):
        return "qvs"
    if entry.family.startswith("IE:"):
        return "qsv"
    return "qos"


LANG_MAP: dict[str, str] = {code: _synthetic_for(code) for code in LANGUAGES}
SYNTHETIC_CODES = ("en", "qsv", "qso", "qvs", "qos", "qag", "qcy")

# The splits written per task (load_local names: train / dev / test).
INTERMEDIATE = ("squad", "squad_v2", "mnli", "qqp", "anli", "hellaswag", "cosmosqa", "commonsenseqa", "ccg", "siqa",
                "copa")
SPLITS_OF: dict[str, tuple[str, ...]] = {
    **{name: ("train", "dev") for name in INTERMEDIATE},
    "xnli": ("dev", "test"), "pawsx": ("train", "dev", "test"), "udpos": ("train", "dev", "test"),
    "panx": ("train", "dev", "test"), "xquad": ("test",), "mlqa": ("dev", "test"),
    "tydiqa": ("train", "dev", "test"), "tatoeba": ("test",), "bucc2018": ("dev", "test"),
    "xcopa": ("dev", "test"), "mewslix": ("train", "dev", "test"), "lareqa": ("test",),
}
TASKS = tuple(SPLITS_OF)
ENGLISH_TRAIN_ONLY = ("pawsx", "udpos", "tydiqa", "mewslix")  # zero-shot: train files hold English only
ENGLISH_PIVOT = ("tatoeba", "bucc2018")  # English is the other side of every pair, never a language of its own

PERSON_IDS = {name: f"Q{1000 + i}" for i, name in enumerate(lx.FIRST_NAMES)}
CITY_IDS = {city: f"Q{2000 + i}" for i, city in enumerate(lx.CITIES)}
ORG_IDS = {org: f"Q{3000 + i}" for i, org in enumerate(lx.ORGS)}
NUM_ENTITIES = len(PERSON_IDS) + len(CITY_IDS) + len(ORG_IDS)

# CCG supertags as a fixed function of the UPOS tag (CCGbank-style categories): learnable, like real supertags
# are from their context.
CCG_OF_UPOS = {"NOUN": "N", "PROPN": "N", "DET": "NP/N", "ADJ": "N/N", "NUM": "N/N", "PRON": "NP",
               "VERB": r"(S[dcl]\NP)/NP", "AUX": r"(S[dcl]\NP)/(S[b]\NP)", "PART": r"(S\NP)\(S\NP)",
               "ADV": r"(S\NP)\(S\NP)", "ADP": "PP/NP", "PUNCT": ".", "CCONJ": "conj", "SCONJ": "S/S",
               "INTJ": "S", "SYM": "N", "X": "N"}


# ----- which languages and splits ----------------------------------------------------------------------------
def languages_of(task: str, languages=DEFAULT_LANGUAGES) -> tuple[str, ...]:
    """The real language codes written for `task`: intermediate tasks English; LAReQA all 11 XQuAD-R languages
    (the candidate pool needs every file); otherwise the requested languages the task has, each one it lacks
    replaced by the first unused code of the task's own list (preferring one written in a synthetic language
    not used yet, so the texts differ). Tatoeba and BUCC skip English (the pivot side of every pair)."""
    spec = any_task(task)
    if task in INTERMEDIATE_TASKS or task in INTERMEDIATE:
        return ("en",)
    if task == "lareqa":
        return spec.languages
    wanted = [c for c in languages if not (task in ENGLISH_PIVOT and c == "en")] or [spec.languages[0]]
    chosen = [c for c in wanted if c in spec.languages]
    out = []
    for code in dict.fromkeys(wanted):
        if code in spec.languages:
            out.append(code)
            continue
        free = [c for c in spec.languages if c not in out and c not in chosen]
        if not free:
            continue
        used = {LANG_MAP[c] for c in out + chosen}
        out.append(next((c for c in free if LANG_MAP[c] not in used), free[0]))
    return tuple(out)


def splits_of(task: str, lang: str) -> tuple[str, ...]:
    return tuple(s for s in SPLITS_OF[task] if not (s == "train" and task in ENGLISH_TRAIN_ONLY and lang != "en"))


def written(languages=DEFAULT_LANGUAGES) -> list[tuple[str, str, str]]:
    """Every (task, split, language) that write_data_dir writes for `languages`."""
    return [(task, split, lang) for task in TASKS for lang in languages_of(task, languages)
            for split in splits_of(task, lang)]


def expected_rows(languages=DEFAULT_LANGUAGES, rows_per_split: dict | None = None,
                  seed: int = 0) -> dict[tuple[str, str, str], int]:
    """(task, split, language) -> the number of rows `load_local` returns from write_data_dir's files (mining
    and ranking tasks: every row, sides / candidates included)."""
    return _Builder(languages, rows_per_split, seed).build()[1]


def _check_languages(languages) -> tuple[str, ...]:
    languages = tuple(languages)
    unknown = [c for c in languages if c not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language code(s) {', '.join(unknown)}; expected codes of eval.languages")
    return languages


# ----- small helpers -----------------------------------------------------------------------------------------
def _hex(*key, n: int = 24) -> str:
    return hashlib.sha1("-".join(map(str, key)).encode()).hexdigest()[:n]


def _digits(*key) -> str:
    return str(int(_hex(*key, n=15), 16))


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence ending in '.' or '?' followed by a space or the end (synthetic sentences
    hold no other full stop)."""
    spans, start = [], 0
    for m in re.finditer(r"[.?](?= |$)", text):
        spans.append((start, m.end()))
        start = m.end() + 1
    return spans


def _tsv(header: list[str] | None, rows: list[list]) -> str:
    lines = ([header] if header else []) + rows
    for line in lines:
        for field in line:
            if "\t" in str(field) or "\n" in str(field):
                raise ValueError(f"field {field!r} holds a tab or newline")
    return "".join("\t".join(map(str, line)) + "\n" for line in lines)


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _json(data) -> str:
    return json.dumps(data, ensure_ascii=False, indent=1)


def _csv(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _tokens(sentence: str) -> list[str]:
    return sentence.replace(".", " .").replace("?", " ?").split()


def _binary_parse(sentence: str) -> str:
    return "( " + " ".join(_tokens(sentence)) + " )"


def _parse(sentence: str) -> str:
    return "(ROOT (S " + " ".join(f"(X {t})" for t in _tokens(sentence)) + "))"


def _squad(rows: list[dict], title: str, answers_per_question: int = 1, per_article: int = 4,
           version: str = "1.1", impossible: set[int] | None = None) -> dict:
    """SQuAD JSON: articles of `per_article` paragraphs, one question each; rows in `impossible` become
    SQuAD 2.0 unanswerable questions (the sentence holding the answer removed from the context)."""
    data = []
    for a in range(0, len(rows), per_article):
        paragraphs = []
        for i, row in enumerate(rows[a:a + per_article], a):
            context, start = row["context"], row["answers"]["answer_start"][0]
            qa = {"id": row["id"], "question": row["question"]}
            if impossible is not None and i in impossible:
                kept = [context[s:e] for s, e in _sentence_spans(context) if not s <= start < e]
                context = " ".join(kept)
                qa |= {"answers": [], "is_impossible": True}
            else:
                answer = {"text": row["answers"]["text"][0], "answer_start": start}
                qa["answers"] = [dict(answer) for _ in range(answers_per_question)]
                if impossible is not None:
                    qa["is_impossible"] = False
            paragraphs.append({"context": context, "qas": [qa]})
        data.append({"title": f"{title}_{a // per_article}", "paragraphs": paragraphs})
    return {"version": version, "data": data}


def _same_meaning(a: Event, b: Event) -> bool:
    """a and b describe the same situations (mutual specificity, same polarity): a paraphrase."""
    return a.negated == b.negated and at_least_as_specific(a.positive(), b.positive()) and \
        at_least_as_specific(b.positive(), a.positive())


def _edit(rng: random.Random, ev: Event, op: str) -> Event:
    if op == "time":
        return replace(ev, time_word=not ev.time_word)
    if op == "agent":
        return replace(ev, agent=rng.choice([(f,) for f in lx.FIRST_NAMES if (f,) != ev.agent]))
    if op == "place":
        return replace(ev, place=rng.choice([c for c in lx.CITIES if c != ev.place]))
    if op == "tense":
        return replace(ev, tense=rng.choice([t for t in lx.TENSES if t != ev.tense]))
    if op == "negate":
        return replace(ev, negated=not ev.negated)
    if op == "count":
        return replace(ev, count=rng.choice([c for c in lx.COUNTS if c != ev.count]))
    if op == "noun":  # a member noun becomes its class ("food"), a class one of its members
        cls = lx.noun_class(ev.noun)
        members = [n for n in lx.NOUNS if lx.NOUNS[n] == cls]
        return replace(ev, noun=rng.choice(members) if lx.is_hypernym(ev.noun) else lx.NOUN_CLASSES[cls][0][0])
    raise ValueError(op)


# ----- the builder -------------------------------------------------------------------------------------------
class _Builder:
    """All files (relative path -> text) and the row count of every (task, split, language)."""

    def __init__(self, languages, rows_per_split, seed):
        self.languages = _check_languages(languages)
        self.n = dict(DEFAULT_ROWS, **(rows_per_split or {}))
        unknown = set(self.n) - set(DEFAULT_ROWS)
        if unknown or any(not isinstance(v, int) or v < 1 for v in self.n.values()):
            raise ValueError(f"rows_per_split: expected positive ints for train / dev / test, got {rows_per_split}")
        self.seed = seed
        self.k = {s: max(1, v // 4) for s, v in self.n.items()}  # BUCC's unpaired sentences per side
        size = (self.n["train"], self.n["dev"], self.n["test"])
        sizes = {name: size for name in ("syn-xnli", "syn-pos", "syn-panx", "syn-xquad", "syn-mnli", "syn-squad",
                                         "syn-swag")}
        sizes["syn-tatoeba"] = (0, self.n["dev"] + 2 * self.k["dev"], self.n["test"] + 2 * self.k["test"])
        self.world = SyntheticWorld(seed, languages=SYNTHETIC_CODES, sizes=sizes)
        self.en = self.world.languages["en"]
        self.files: dict[str, str] = {}
        self.counts: dict[tuple[str, str, str], int] = {}

    def build(self):
        for task in TASKS:
            getattr(self, "_" + task)(languages_of(task, self.languages))
        return self.files, self.counts

    def rows(self, task: str, split: str, lang: str) -> list[dict]:
        """Synthetic rows of `task` rendered in `lang`'s synthetic language (train of another language than
        English, which SyntheticWorld.load refuses, from the same generator and stream)."""
        syn = LANG_MAP[lang]
        if split == "train" and syn != "en":
            rng, L = self.world.rng(task, split), self.world.languages[syn]
            make = getattr(self.world, "_" + task.replace("syn-", ""))
            return [make(rng, L, i) for i in range(self.n["train"])]
        return self.world.load(task, split, syn)

    def count(self, task, split, lang, n):
        self.counts[(task, split, lang)] = n

    # ----- intermediate tasks (English) ------------------------------------------------------------------
    def _squad(self, _):
        for split, name in (("train", "train"), ("dev", "dev")):
            rows = self.rows("syn-squad", split, "en")
            rows = [r | {"id": _hex("squad", split, i)} for i, r in enumerate(rows)]
            self.files[f"squad/{name}-v1.1.json"] = _json(_squad(rows, "Story", 3 if split == "dev" else 1))
            self.count("squad", split, "en", len(rows))

    def _squad_v2(self, _):
        for split in ("train", "dev"):
            rows = self.rows("syn-squad", split, "en")
            rows = [r | {"id": _hex("squad_v2", split, i)} for i, r in enumerate(rows)]
            data = _squad(rows, "Story", 3 if split == "dev" else 1, version="v2.0",
                          impossible={i for i in range(len(rows)) if i % 3 == 2})
            self.files[f"squad_v2/{split}-v2.0.json"] = _json(data)
            self.count("squad_v2", split, "en", len(rows))

    def _mnli(self, _):
        genres = ("fiction", "government", "slate", "telephone", "travel")
        for split, name in (("train", "train"), ("dev", "dev_matched")):
            votes = 1 if split == "train" else 5
            header = (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                       "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
                      + [f"label{v + 1}" for v in range(votes)] + ["gold_label"])
            lines = []
            for i, r in enumerate(self.rows("syn-mnli", split, "en")):
                label = NLI_LABELS[r["label"]]
                s1, s2 = r["sentence1"], r["sentence2"]
                lines.append([i, 1000 + i, f"{1000 + i}{'cen'[r['label']]}", genres[i % len(genres)],
                              _binary_parse(s1), _binary_parse(s2), _parse(s1), _parse(s2), s1, s2]
                             + [label] * votes + [label])
            self.files[f"glue_data/MNLI/{name}.tsv"] = _tsv(header, lines)
            self.count("mnli", split, "en", len(lines))

    def _qqp(self, _):
        roles = ("agent", "object", "count", "place")  # not "time": the time adverb is what paraphrases toggle

        def key(ev, ask):  # a question's meaning: its English text without the redundant time adverb
            return detokenize(self.en.sentence(replace(ev, time_word=False), ask))[0]

        for split in ("train", "dev"):
            rng = self.world.rng("realdata-qqp", split)
            lines = []
            for i in range(self.n[split]):
                ev = self.world.sample_event(rng, negated_p=0.0)
                ask = rng.choice([a for a in roles if self.world._has_role(ev, a)])
                if rng.random() < 0.5:
                    ev2, ask2 = replace(ev, time_word=not ev.time_word), ask
                elif rng.random() < 0.25:
                    ev2, ask2 = ev, rng.choice([a for a in roles if a != ask and self.world._has_role(ev, a)] or [ask])
                else:
                    ev2, ask2 = _edit(rng, ev, rng.choice(("agent", "place", "tense", "count", "noun"))), ask
                q1 = detokenize(self.en.sentence(ev, ask))[0]
                q2 = detokenize(self.en.sentence(ev2, ask2))[0]
                if q1 == q2:  # the edit hit the asked detail: say it differently
                    ev2 = replace(ev2, time_word=not ev2.time_word)
                    q2 = detokenize(self.en.sentence(ev2, ask2))[0]
                lines.append([i, 2 * i + 1, 2 * i + 2, q1, q2, int(key(ev, ask) == key(ev2, ask2))])
            header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
            self.files[f"glue_data/QQP/{split}.tsv"] = _tsv(header, lines)
            self.count("qqp", split, "en", len(lines))

    def _anli(self, _):
        for split in ("train", "dev"):
            records = [{"uid": _hex("anli", split, i, n=36), "context": r["sentence1"], "hypothesis": r["sentence2"],
                        "label": NLI_LABELS[r["label"]][0], "model_label": "n", "emturk": False, "genre": "synthetic",
                        "reason": "", "tag": ""}
                       for i, r in enumerate(self.rows("syn-xnli", split, "en"))]
            self.files[f"anli_v1.0/R1/{split}.jsonl"] = _jsonl(records)
            self.count("anli", split, "en", len(records))

    def _hellaswag(self, _):
        for split, name in (("train", "train"), ("dev", "val")):
            records = []
            for i, r in enumerate(self.rows("syn-swag", split, "en")):
                then = all(e.startswith("then ") for e in r["endings"])
                ctx_b = "then" if then else ""
                endings = [e[len("then "):] for e in r["endings"]] if then else r["endings"]
                records.append({"ind": i, "activity_label": "Synthetic world", "ctx_a": r["context"], "ctx_b": ctx_b,
                                "ctx": f"{r['context']} {ctx_b}".strip(), "split": name, "split_type": "indomain",
                                "endings": endings, "source_id": f"synthetic~{i}", "label": r["label"]})
            self.files[f"hellaswag/hellaswag_{name}.jsonl"] = _jsonl(records)
            self.count("hellaswag", split, "en", len(records))

    def _cosmosqa(self, _):
        for split, name in (("train", "train"), ("dev", "valid")):
            rows = self.rows("syn-xquad", split, "en")
            rng = random.Random(f"realdata-cosmosqa-{self.seed}-{split}")
            lines = []
            for i, r in enumerate(rows):
                gold = r["answers"]["text"][0]
                pool = [o["answers"]["text"][0] for o in rows] + [" ".join(c) for c in lx.CITIES]  # cities: tiny splits
                others = [a for a in dict.fromkeys(pool) if a != gold]
                answers = rng.sample(others, 3) + [gold]
                rng.shuffle(answers)
                lines.append([_hex("cosmos", split, i, n=12), r["context"], r["question"], *answers,
                              answers.index(gold)])
            header = ["id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label"]
            self.files[f"cosmosqa/{name}.csv"] = _csv(header, lines)
            self.count("cosmosqa", split, "en", len(lines))

    def _commonsenseqa(self, _):
        for split in ("train", "dev"):
            rows = self.rows("syn-swag", split, "en")
            rng = random.Random(f"realdata-commonsenseqa-{self.seed}-{split}")
            records = []
            for i, r in enumerate(rows):
                right = r["endings"][r["label"]]
                agent = r["context"].split()[0]
                # a fifth choice: another story's right ending, about someone else
                extra = next((o["endings"][o["label"]] for o in rows[i + 1:] + rows[:i]
                              if o["context"].split()[0] != agent and o["endings"][o["label"]] not in r["endings"]),
                             "then nothing happens.")
                texts = list(r["endings"])
                texts.insert(rng.randrange(5), extra)
                letters = "ABCDE"
                records.append({"answerKey": letters[texts.index(right)], "id": _hex("csqa", split, i, n=32),
                                "question": {"question_concept": agent, "stem": f"{r['context']} What happens next?",
                                             "choices": [{"label": c, "text": t} for c, t in zip(letters, texts)]}})
            self.files[f"commonsenseqa/{split}_rand_split.jsonl"] = _jsonl(records)
            self.count("commonsenseqa", split, "en", len(records))

    def _ccg(self, _):
        for split in ("train", "dev"):
            rows = self.rows("syn-pos", split, "en")
            self.files[f"ccg/{split}.tsv"] = "\n".join(
                "".join(f"{t}\t{CCG_OF_UPOS[tag]}\n" for t, tag in zip(r["tokens"], r["tags"])) for r in rows)
            self.count("ccg", split, "en", len(rows))

    # ----- XTREME / XTREME-R targets ---------------------------------------------------------------------
    def _xnli(self, langs):
        header = ["language", "gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
                  "sentence2_parse", "sentence1", "sentence2", "promptID", "pairID", "genre", "label1", "label2",
                  "label3", "label4", "label5", "sentence1_tokenized", "sentence2_tokenized", "match"]
        for split in ("dev", "test"):
            lines = []
            for lang in langs:
                rows = self.rows("syn-xnli", split, lang)
                for i, r in enumerate(rows):
                    label, s1, s2 = NLI_LABELS[r["label"]], r["sentence1"], r["sentence2"]
                    parses = [_binary_parse(s1), _binary_parse(s2), _parse(s1), _parse(s2)]
                    parses = parses if lang == "en" else [""] * 4
                    lines.append([lang, label, *parses, s1, s2, i, f"{i}{'cen'[r['label']]}", "synthetic",
                                  *[label] * 5, " ".join(_tokens(s1)), " ".join(_tokens(s2)), "True"])
                self.count("xnli", split, lang, len(rows))
            self.files[f"XNLI-1.0/xnli.{split}.tsv"] = _tsv(header, lines)

    def _paws_pairs(self, split: str) -> list[tuple[Event, Event, int]]:
        rng = self.world.rng("realdata-pawsx", split)
        pairs = []
        for _ in range(self.n[split]):
            ev = self.world.sample_event(rng)
            op = "time" if rng.random() < 0.5 else rng.choice(("agent", "place", "tense", "negate", "count", "noun"))
            ev2 = _edit(rng, ev, op)
            pairs.append((ev, ev2, int(_same_meaning(ev, ev2))))
        return pairs

    def _pawsx(self, langs):
        for split in ("train", "dev", "test"):
            pairs = self._paws_pairs(split)
            for lang in langs:
                if split == "train" and lang != "en":
                    continue
                L = self.world.languages[LANG_MAP[lang]]
                lines = [[i + 1, detokenize(L.sentence(a))[0], detokenize(L.sentence(b))[0], label]
                         for i, (a, b, label) in enumerate(pairs)]
                name = "train.tsv" if split == "train" else f"{split}_2k.tsv"
                self.files[f"x-final/{lang}/{name}"] = _tsv(["id", "sentence1", "sentence2", "label"], lines)
                self.count("pawsx", split, lang, len(lines))

    def _udpos(self, langs):
        for lang in langs:
            name = language(lang).name.replace(" ", "_")
            for split in splits_of("udpos", lang):
                rows = self.rows("syn-pos", split, lang)
                out = []
                for i, r in enumerate(rows):
                    tokens, tags = r["tokens"], r["tags"]
                    assert set(tags) <= set(UPOS), tags
                    root = next((k for k, t in enumerate(tags) if t == "VERB"), 0)
                    text = detokenize_tokens(tokens, tags)
                    lines = [f"# sent_id = synth-{split}-{i}", f"# text = {text}"]
                    for k, (tok, tag) in enumerate(zip(tokens, tags)):
                        head, rel = (0, "root") if k == root else (root + 1, "punct" if tag == "PUNCT" else "dep")
                        space = "SpaceAfter=No" if k + 1 < len(tags) and tags[k + 1] == "PUNCT" else "_"
                        lines.append("\t".join([str(k + 1), tok, tok.lower(), tag, "_", "_", str(head), rel, "_",
                                                space]))
                    out.append("\n".join(lines) + "\n")
                # English as two treebanks (XTREME concatenates EWT, GUM, LinES, ParTUT), others one
                banks = (("SynthA", out[:len(out) // 2]), ("SynthB", out[len(out) // 2:])) if lang == "en" \
                    else (("Synth", out),)
                for bank, part in banks:
                    if part:
                        path = f"udpos/ud-treebanks-v2.5/UD_{name}-{bank}/{lang}_{bank.lower()}-ud-{split}.conllu"
                        self.files[path] = "\n".join(part) + "\n"
                self.count("udpos", split, lang, len(rows))

    def _panx(self, langs):
        for lang in langs:
            for split in ("train", "dev", "test"):
                rows = self.rows("syn-panx", split, lang)
                self.files[f"panx_dataset/{lang}/{split}"] = "\n".join(
                    "".join(f"{lang}:{t}\t{tag}\n" for t, tag in zip(r["tokens"], r["tags"])) for r in rows)
                self.count("panx", split, lang, len(rows))

    def _xquad(self, langs):
        for lang in langs:
            rows = [r | {"id": _hex("xquad", i)} for i, r in enumerate(self.rows("syn-xquad", "test", lang))]
            self.files[f"xquad/xquad.{lang}.json"] = _json(_squad(rows, "Paragraphs", per_article=2))
            self.count("xquad", "test", lang, len(rows))

    def _mlqa(self, langs):
        for lang in langs:
            for split in ("dev", "test"):
                rows = self.rows("syn-squad", split, lang)
                rows = [r | {"id": _hex("mlqa", split, i, n=40)} for i, r in enumerate(rows)]
                path = f"mlqa/MLQA_V1/{split}/{split}-context-{lang}-question-{lang}.json"
                self.files[path] = _json(_squad(rows, "Story", per_article=3))
                self.count("mlqa", split, lang, len(rows))

    def _tydiqa(self, langs):
        def rows_of(split, lang, limit=None):
            name = language(lang).name.lower()
            rows = self.rows("syn-xquad", split, lang)[:limit]
            return [r | {"id": f"{name}-{_digits('tydiqa', split, lang, i)}-0"} for i, r in enumerate(rows)]

        train = rows_of("train", "en")
        for lang in langs:
            if lang != "en":  # the official train file mixes every language; XTREME keeps the English slice
                train += rows_of("train", lang, max(1, self.n["train"] // 4))
        self.files["tydiqa/tydiqa-goldp-v1.1-train/tydiqa-goldp-v1.1-train.json"] = _json(
            _squad(train, "TyDi", per_article=1, version="v1.1"))
        if "en" in langs:
            self.count("tydiqa", "train", "en", self.n["train"])
        for lang in langs:
            # The official per-language files of tydiqa-goldp-v1.1-dev.tgz. They are XTREME's TyDiQA test set too:
            # load_local reads them for both dev and test (its language slice: ids '<language name>-...').
            rows = rows_of("dev", lang)
            self.files[f"tydiqa/tydiqa-goldp-v1.1-dev/tydiqa-goldp-dev-{language(lang).name.lower()}.json"] = _json(
                _squad(rows, "TyDi", per_article=1, version="v1.1"))
            self.count("tydiqa", "dev", lang, len(rows))
            self.count("tydiqa", "test", lang, len(rows))

    def _tatoeba(self, langs):
        n = self.n["test"]
        for lang in langs:
            code = iso3(lang)
            rows = self.rows("syn-tatoeba", "test", lang)[:n]
            self.files[f"tatoeba/tatoeba.{code}-eng.{code}"] = "".join(r["source"] + "\n" for r in rows)
            self.files[f"tatoeba/tatoeba.{code}-eng.eng"] = "".join(r["target"] + "\n" for r in rows)
            self.count("tatoeba", "test", lang, n)

    def _bucc2018(self, langs):
        for split, name in (("dev", "sample"), ("test", "test")):
            n, k = self.n[split], self.k[split]
            for lang in langs:
                rows = self.rows("syn-tatoeba", split, lang)
                assert len(rows) == n + 2 * k
                rng = random.Random(f"realdata-bucc-{self.seed}-{split}-{lang}")
                src_ids = rng.sample(range(1, 10 * (n + k) + 1), n + k)  # ids in no particular relation
                tgt_ids = rng.sample(range(1, 10 * (n + k) + 1), n + k)
                source = [(f"{lang}-{src_ids[j]:09d}", rows[j]["source"]) for j in range(n + k)]  # n+..: unpaired
                target = [(f"en-{tgt_ids[j]:09d}", rows[j if j < n else j + k]["target"]) for j in range(n + k)]
                gold = sorted((source[j][0], target[j][0]) for j in range(n))
                prefix = f"bucc2018/{lang}-en.{name}"
                self.files[f"{prefix}.{lang}"] = "".join(f"{i}\t{s}\n" for i, s in sorted(source))
                self.files[f"{prefix}.en"] = "".join(f"{i}\t{s}\n" for i, s in sorted(target))
                self.files[f"{prefix}.gold"] = "".join(f"{a}\t{b}\n" for a, b in gold)
                self.count("bucc2018", split, lang, 2 * (n + k) + n)

    def _copa_records(self, split: str, lang: str) -> list[dict]:
        """COPA records from syn-swag rows: even ones ask for the effect of the context (its right ending against
        a wrong one), odd ones for the cause of the right ending (the context against a wrong ending, an event
        that cannot happen). Choice order is the same in every language."""
        records = []
        for i, r in enumerate(self.rows("syn-swag", split, lang)):
            rng = random.Random(f"realdata-copa-{self.seed}-{split}-{i}")
            right, wrong = r["endings"][r["label"]], r["endings"][(r["label"] + 1 + i % 3) % 4]
            if i % 2 == 0:
                question, premise, good = "effect", r["context"], right
            else:
                question, premise, good = "cause", right, r["context"]
            label = rng.randrange(2)
            choices = [wrong, good] if label else [good, wrong]
            records.append({"premise": premise, "choice1": choices[0], "choice2": choices[1], "question": question,
                            "label": label, "idx": i + 1, "changed": False})
        return records

    def _xcopa(self, langs):
        for split, name in (("dev", "val"), ("test", "test")):
            for lang in langs:
                records = self._copa_records(split, lang)
                self.files[f"xcopa/{lang}/{name}.{lang}.jsonl"] = _jsonl(records)
                self.count("xcopa", split, lang, len(records))

    def _copa(self, _):
        for split, name in (("train", "train"), ("dev", "val")):  # SuperGLUE's COPA folder
            records = self._copa_records(split, "en")
            self.files[f"COPA/{name}.jsonl"] = _jsonl([{k: v for k, v in r.items() if k != "changed"} for r in records])
            self.count("copa", split, "en", len(records))

    def _siqa(self, _):
        """Social IQa (socialiqa-train-dev/: context, question, answerA/B/C; labels 1-3 in <split>-labels.lst):
        the syn-swag context, its right ending and two wrong ones."""
        for split in ("train", "dev"):
            records, labels = [], []
            for i, r in enumerate(self.rows("syn-swag", split, "en")):
                rng = random.Random(f"realdata-siqa-{self.seed}-{split}-{i}")
                right = r["endings"][r["label"]]
                answers = rng.sample([e for e in r["endings"] if e != right], 2) + [right]
                rng.shuffle(answers)
                agent = r["context"].split()[0]
                records.append({"context": r["context"], "question": f"What will {agent} do next?",
                                "answerA": answers[0], "answerB": answers[1], "answerC": answers[2]})
                labels.append(str(answers.index(right) + 1))
            self.files[f"socialiqa-train-dev/{split}.jsonl"] = _jsonl(records)
            self.files[f"socialiqa-train-dev/{split}-labels.lst"] = "".join(f"{x}\n" for x in labels)
            self.count("siqa", split, "en", len(records))

    # ----- Mewsli-X -------------------------------------------------------------------------------------
    def _entities(self) -> list[dict]:
        w, out = self.world, []

        def record(qid, title, description):
            spans = _sentence_spans(description)
            return {"entity_id": qid, "title": title, "description": description, "description_language": "en",
                    "description_url": f"https://en.wikipedia.org/wiki/{title.replace(' ', '_')}",
                    "sentence_spans": [{"start": s, "end": e} for s, e in spans]}

        for person, qid in PERSON_IDS.items():
            facts = [Event(agent=(person,), verb=v, noun=w.favourites[v][0], tense="present",
                           place=w.home[person] if j == 0 else None, source=w.employer[person] if j == 0 else None)
                     for j, v in enumerate(w.habits[person][:2])]
            out.append(record(qid, person, " ".join(detokenize(self.en.sentence(e))[0] for e in facts)))
        for city, qid in CITY_IDS.items():
            name = " ".join(city)
            people = [p for p in lx.FIRST_NAMES if w.home[p] == city]
            text = f"{name} is a city." + (f" {' and '.join(people)} live in {name}." if people else "")
            out.append(record(qid, name, text))
        for org, qid in ORG_IDS.items():
            name = " ".join(org)
            people = [p for p in lx.FIRST_NAMES if w.employer[p] == org]
            text = f"{name} is an organisation." + (f" {' and '.join(people)} work for {name}." if people else "")
            out.append(record(qid, name, text))
        return out

    def _article(self, events: list[Event], lang: str) -> tuple[str, list[tuple[int, int]], list[tuple]]:
        """Text, sentence spans and mentions (start, end, text, entity id) of `events` rendered in `lang`:
        every person, city and organisation named."""
        L = self.world.languages[LANG_MAP[lang]]
        text, spans, mentions = "", [], []
        for ev in events:
            words = L.sentence(ev)
            sentence, starts = detokenize(words)
            base = len(text) + (1 if text else 0)
            text += (" " if text else "") + sentence
            spans.append((base, base + len(sentence)))
            for role, parts, ids in (("agent", ev.agent, PERSON_IDS), ("place", ev.place, CITY_IDS),
                                     ("source", ev.source, ORG_IDS)):
                if parts is None:
                    continue
                at = [k for k, word in enumerate(words) if word.role == role]
                mention = " ".join(L.name(parts))
                start = base + starts[at[0]]
                if text[start:start + len(mention)] == mention:
                    mentions.append((start, start + len(mention), mention, ids[parts if role != "agent" else parts[0]]))
        return text, spans, mentions

    def _mewslix(self, langs):
        entities = self._entities()
        self.files["mewslix/candidate_set_entities.jsonl"] = _jsonl(entities)
        by_id = {e["entity_id"]: e for e in entities}

        def context(lang, text, spans, doc, site="wikinews"):
            return {"document_title": doc, "document_url": f"https://{lang}.{site}.org/wiki/{doc}",
                    "document_id": f"{lang}-{doc}", "language": lang, "section_title": "", "text": text,
                    "sentence_spans": [{"start": s, "end": e} for s, e in spans]}

        for split in ("dev", "test"):
            rng = self.world.rng("realdata-mewslix", split)
            articles, total = [], 0
            while total < self.n[split]:  # the same events in every language: the same mention count
                first = self.world.sample_event(rng)
                second = self.world.sample_event(rng)
                while second.agent == first.agent:
                    second = self.world.sample_event(rng)
                events = [first, second]
                articles.append(events)
                total += len(self._article(events, "en")[2])
            records = []
            for lang in langs:
                left = self.n[split]
                for a, events in enumerate(articles):
                    text, spans, mentions = self._article(events, lang)
                    mentions = mentions[:left]
                    left -= len(mentions)
                    if not mentions:
                        continue
                    records.append({"context": context(lang, text, spans, f"news_{split}_{a}"), "mentions": [
                        {"example_id": f"{lang}-{split}-{a}-{m}", "entity_id": qid,
                         "mention_span": {"start": s, "end": e, "text": t}, "url": "", "metadata": {}}
                        for m, (s, e, t, qid) in enumerate(mentions)]})
                assert left == 0, (lang, left)
                self.count("mewslix", split, lang, self.n[split] + len(entities))
            self.files[f"mewslix/wikinews_mentions-{split}.jsonl"] = _jsonl(records)
        for split in ("train", "dev"):  # English Wikipedia pairs: one person per pair, cycling through the people
            rng = self.world.rng("realdata-mewslix-pairs", split)
            records = []
            for i in range(self.n[split]):
                person = lx.FIRST_NAMES[i % len(lx.FIRST_NAMES)]
                ev = self.world.sample_event(rng, agent=(person,))
                text, spans, mentions = self._article([ev], "en")
                s, e, t, qid = mentions[0]
                records.append({"contextual_mention": {
                    "context": context("en", text, spans, f"wiki_{split}_{i}", "wikipedia"),
                    "mention": {"example_id": f"wiki-{split}-{i}", "entity_id": qid,
                                "mention_span": {"start": s, "end": e, "text": t}}},
                    "entity": by_id[qid]})
            self.files[f"mewslix/wikipedia_pairs-{split}.jsonl"] = _jsonl(records)
        if "en" in langs:
            self.count("mewslix", "train", "en", self.n["train"] + min(self.n["train"], len(lx.FIRST_NAMES)))

    # ----- LAReQA ---------------------------------------------------------------------------------------
    def _lareqa(self, langs):
        sentences = 0
        for lang in langs:
            rows = self.rows("syn-xquad", "test", lang)
            data = []
            for a in range(0, len(rows), 2):
                paragraphs = []
                for i, r in enumerate(rows[a:a + 2], a):
                    breaks = _sentence_spans(r["context"])
                    paragraphs.append({"context": r["context"], "sentence_breaks": [list(b) for b in breaks],
                                       "sentences": [r["context"][s:e] for s, e in breaks],
                                       "qas": [{"id": _hex("xquad", i), "question": r["question"], "answers": [
                                           {"text": r["answers"]["text"][0],
                                            "answer_start": r["answers"]["answer_start"][0]}]}]})
                    if lang == langs[0]:
                        sentences += len(breaks)
                data.append({"title": f"Paragraphs_{a // 2}", "paragraphs": paragraphs})
            self.files[f"lareqa/xquad-r/{lang}.json"] = _json({"version": "1.1", "data": data})
        for lang in langs:
            self.count("lareqa", "test", lang, self.n["test"] + len(langs) * sentences)


def detokenize_tokens(tokens: list[str], tags: list[str]) -> str:
    """A sentence's text from its tokens, punctuation attached to the word before (as the synthetic world writes)."""
    out = ""
    for tok, tag in zip(tokens, tags):
        out += ("" if not out or tag == "PUNCT" else " ") + tok
    return out


# ----- public API --------------------------------------------------------------------------------------------
def write_data_dir(root: Path, languages=DEFAULT_LANGUAGES, rows_per_split: dict | None = None,
                   seed: int = 0) -> Path:
    """Write tiny files in the official raw layout of every task under `root` (see `written` and
    `expected_rows`); rows_per_split overrides DEFAULT_ROWS (train 64, dev 16, test 16). Returns root."""
    root = Path(root)
    files, _ = _Builder(languages, rows_per_split, seed).build()
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return root


_TEXT_KEYS = {"context", "question", "text", "description", "premise", "choice1", "choice2", "ctx", "endings",
              "hypothesis", "stem", "answerA", "answerB", "answerC"}


def _strings(node, keep: bool = False):
    if isinstance(node, str):
        if keep:
            yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, key in _TEXT_KEYS or (keep and isinstance(value, list)))
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, keep)


def all_texts(root: Path) -> list[str]:
    """Every distinct text of the data folder (sentences, contexts, questions, choices, descriptions),
    read back from the raw files, in file order."""
    out: list[str] = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        content = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            out += _strings(json.loads(content))
        elif path.suffix == ".jsonl":
            out += [s for line in content.splitlines() if line.strip() for s in _strings(json.loads(line))]
        elif path.suffix == ".csv":
            for r in csv.DictReader(io.StringIO(content)):
                out += [r["context"], r["question"]] + [r[f"answer{i}"] for i in range(4)]
        elif path.suffix == ".conllu":
            out += [line[len("# text = "):] for line in content.splitlines() if line.startswith("# text = ")]
        elif path.suffix == ".tsv" and content.split("\n", 1)[0].count("\t") > 1:  # a header row
            lines = list(csv.reader(io.StringIO(content), delimiter="\t", quoting=csv.QUOTE_NONE))
            cols = [lines[0].index(c) for c in ("sentence1", "sentence2", "question1", "question2") if c in lines[0]]
            out += [line[c] for line in lines[1:] for c in cols]
        elif path.parent.name == "bucc2018" and not path.name.endswith(".gold"):
            out += [line.split("\t", 1)[1] for line in content.splitlines() if line]
        elif path.parent.name == "tatoeba":
            out += [line for line in content.splitlines() if line]
        elif path.suffix in ("", ".tsv"):  # PAN-X and CCG: token<TAB>tag lines, sentences between blank lines
            for block in content.split("\n\n"):
                tokens = [line.split("\t")[0] for line in block.splitlines() if line]
                tokens = [t.split(":", 1)[1] if t[:4].find(":") in (2, 3) else t for t in tokens]
                if tokens:
                    out.append(" ".join(tokens))
    return list(dict.fromkeys(s for s in out if s.strip()))


def tiny_hf_model(folder: Path, family: str, texts: list[str], vocab_size: int = 400) -> Path:
    """A random tiny encoder with a fast tokenizer trained on `texts`, exported as a Hugging Face folder that
    `models.hf.load_encoder` / `load_tokenizer` (and transformers' Auto classes) load.
    - "bert": WordPiece (`engine.pretrain.train_tokenizer`), preset "tiny" with 512 positions.
    - "xlm-roberta": a SentencePiece-style Unigram (Metaspace "▁" pre-tokenizer) trained with `tokenizers`, XLM-R's
      special tokens <s>=0, <pad>=1, </s>=2, <unk>=3 and <mask> last, "<s> A </s></s> B </s>" pairs without
      token_type_ids; preset "tiny"'s sizes as an XLM-R encoder (roberta positions, pad 1, one token type, 514
      positions)."""
    import torch

    from models import Encoder, hf, preset

    folder = Path(folder)
    if family == "bert":
        from engine.pretrain import train_tokenizer

        tokenizer = train_tokenizer(texts, vocab_size)
        cfg = preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=512)
    elif family == "xlm-roberta":
        tokenizer = _xlmr_tokenizer(texts, vocab_size)
        cfg = preset("tiny", vocab_size=len(tokenizer), family="roberta", position_style="roberta", pad_token_id=1,
                     type_vocab_size=1, max_position_embeddings=514, layer_norm_eps=1e-5)
    else:
        raise ValueError(f"family {family!r}: expected 'bert' or 'xlm-roberta'")
    tokenizer.model_max_length = 512
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = Encoder(cfg)
    hf.export(encoder, folder, tokenizer=tokenizer)
    return folder


def _xlmr_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 1, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    trainer_tok.train_from_iterator(texts, trainer)
    vocab = [(piece, score) for piece, score in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    if [p for p, _ in vocab[:4]] != specials:
        raise RuntimeError(f"Unigram training put {vocab[:4]} first, expected {specials}")
    vocab.append(("<mask>", 0.0))  # last, as in XLM-R
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                   mask_token=AddedToken("<mask>", lstrip=True, special=True), padding_side="right")
