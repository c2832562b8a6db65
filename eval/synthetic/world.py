"""The synthetic multilingual world: corpora for masked-LM pretraining and the tasks of the suite.

Everything is generated from one seed. Test (and dev) sets are parallel across languages, as XNLI,
XQuAD and Tatoeba are: the same events rendered in every language, so languages are compared on the
same items. Pretraining corpora are not parallel: every language samples its own events.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

from ..tasks import TaskSpec
from . import lexicon as lx
from .languages import SPECS, Language, Word, build_languages, detokenize
from .semantics import NLI_LABELS, OPTIONAL_FIELDS, Event, nli_label, nli_label_multi

POS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "DET", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT", "VERB")
NER_TAGS = ("B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O")  # PAN-X's tag set
SPLITS = ("train", "dev", "test")


def text(words: list[Word]) -> str:
    return detokenize(words)[0]

DEFAULT_LANGUAGES = tuple(SPECS)
QA_ROLES = ("agent", "object", "count", "place", "time")


def task_specs(languages: tuple[str, ...]) -> dict[str, TaskSpec]:
    L = languages
    specs = [
        TaskSpec("syn-xnli", "pair", "accuracy", L, NLI_LABELS, category="classification",
                 description="XNLI-like: does the sentence entail, contradict or say nothing about the other"),
        TaskSpec("syn-pos", "tagging", "span_f1", L, POS_TAGS, category="structured prediction",
                 description="UD-POS-like: universal part-of-speech tag of every word"),
        TaskSpec("syn-panx", "tagging", "span_f1", L, NER_TAGS, category="structured prediction",
                 description="PAN-X-like: person, location and organisation names (BIO)"),
        TaskSpec("syn-xquad", "qa", "squad", L, category="question answering",
                 description="XQuAD-like: extractive questions over a 2-3 sentence paragraph"),
        TaskSpec("syn-tatoeba", "retrieval", "retrieval_accuracy", tuple(c for c in L if c != "en"),
                 category="retrieval", description="Tatoeba-like: find the English translation (no training)"),
        TaskSpec("syn-mnli", "pair", "accuracy", ("en",), NLI_LABELS, role="intermediate",
                 description="MNLI-like: NLI with two-sentence premises"),
        TaskSpec("syn-squad", "qa", "squad", ("en",), role="intermediate",
                 description="SQuAD-like: extractive questions over 3-5 sentence stories"),
        TaskSpec("syn-swag", "choice", "accuracy", ("en",), num_choices=4, role="intermediate",
                 description="HellaSwag-like: pick the plausible continuation (verbs select their objects)"),
    ]
    return {s.name: s for s in specs}


TARGET_TASKS = ("syn-xnli", "syn-pos", "syn-panx", "syn-xquad", "syn-tatoeba")
INTERMEDIATE_TASKS = ("syn-mnli", "syn-squad", "syn-swag")
DEFAULT_SIZES = {  # (train, dev, test) rows; dev and test per language
    "syn-xnli": (4000, 300, 600), "syn-pos": (1500, 200, 400), "syn-panx": (1500, 200, 400),
    "syn-xquad": (3000, 300, 500), "syn-tatoeba": (0, 500, 500), "syn-mnli": (4000, 300, 0),
    "syn-squad": (3000, 300, 0), "syn-swag": (3000, 300, 0),
}


class SyntheticWorld:
    """The languages, the event sampler, the corpora and the tasks, all from one seed."""

    def __init__(self, seed: int = 0, languages: tuple[str, ...] = DEFAULT_LANGUAGES,
                 sizes: dict[str, tuple[int, int, int]] | None = None, code_switch_rate: float = 0.2,
                 sentence_switch_rate: float = 0.1):
        for name, rate in (("code_switch_rate", code_switch_rate), ("sentence_switch_rate", sentence_switch_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        self.seed = seed
        self.code_switch_rate = code_switch_rate
        self.sentence_switch_rate = sentence_switch_rate
        self.languages = build_languages(tuple(languages), seed)
        self.codes = tuple(languages)
        self.tasks = task_specs(self.codes)
        self._world_facts()
        self.sizes = dict(DEFAULT_SIZES)
        for name, size in (sizes or {}).items():
            if name not in self.tasks:
                raise ValueError(f"sizes: unknown synthetic task {name!r}; known: {', '.join(self.tasks)}")
            self.sizes[name] = tuple(size)

    def rng(self, *key) -> random.Random:
        return random.Random("-".join(map(str, ("xlt", self.seed) + key)))

    # ----- events ------------------------------------------------------------------------------------
    def _world_facts(self) -> None:
        """Regularities of the world, the same in every language: each person has a home city, an
        employer and favourite activities; each verb has favourite objects; each noun typical
        adjectives. They give every concept a distinctive context, which is what lets masked-LM
        pretraining align words across languages through the shared names (as it does for real text)."""
        rng = self.rng("facts")
        verbs = tuple(lx.VERBS)
        self.home = {p: rng.choice(lx.CITIES) for p in lx.FIRST_NAMES}
        self.employer = {p: rng.choice(lx.ORGS) for p in lx.FIRST_NAMES}
        self.habits = {p: rng.sample(verbs, 3) for p in lx.FIRST_NAMES}
        self.favourites = {v: rng.sample([n for n in lx.NOUNS if lx.verb_accepts(v, n)], 2) for v in verbs}
        self.typical_adjs = {n: rng.sample(lx.ADJECTIVES, 2) for n in lx.NOUN_FORMS}

    def sample_event(self, rng: random.Random, negated_p=0.15, count_p=0.4, adj_p=0.4, place_p=0.4, source_p=0.2,
                     time_p=0.3, hypernym_p=0.1, verb: str | None = None, typical_p=0.9,
                     agent: tuple[str, ...] | None = None) -> Event:
        """A random event (about `agent` when given); with probability typical_p each detail follows the
        world's regularities."""
        def typical() -> bool:
            return rng.random() < typical_p

        if agent is None:
            first = rng.choice(lx.FIRST_NAMES)
            agent = (first, rng.choice(lx.LAST_NAMES)) if rng.random() < 0.3 else (first,)
        first = agent[0]
        verb = verb or (rng.choice(self.habits[first]) if typical() else rng.choice(tuple(lx.VERBS)))
        if rng.random() < hypernym_p:
            noun = rng.choice([h[0] for c, (h, _) in lx.NOUN_CLASSES.items() if not lx.VERBS[verb][3]
                               or c in lx.VERBS[verb][3]])
        else:
            noun = rng.choice(self.favourites[verb] if typical()
                              else [n for n in lx.NOUNS if lx.verb_accepts(verb, n)])
        return Event(
            agent=agent, verb=verb, noun=noun, tense=rng.choice(lx.TENSES),
            negated=rng.random() < negated_p,
            count=rng.choice(lx.COUNTS) if rng.random() < count_p else None,
            adj=(rng.choice(self.typical_adjs[noun]) if typical() else rng.choice(lx.ADJECTIVES))
            if rng.random() < adj_p else None,
            place=(self.home[first] if typical() else rng.choice(lx.CITIES)) if rng.random() < place_p else None,
            source=(self.employer[first] if typical() else rng.choice(lx.ORGS)) if rng.random() < source_p else None,
            time_word=rng.random() < time_p)

    # ----- pretraining corpus ------------------------------------------------------------------------
    def corpus(self, lang: str, num_documents: int, stream: int = 0) -> list[str]:
        """Documents of 1-4 sentences in one language: statements, questions, and 'then' continuations in
        which a verb that selects the object's class follows (the world knowledge behind syn-swag). They keep
        to a topic (`_next_event`); non-English ones switch to English, as bilingual web text does, between
        sentences (`sentence_switch_rate`) and within them (`code_switch_rate`). Not parallel: each
        language's documents are drawn independently."""
        if lang not in self.languages:
            raise ValueError(f"unknown language {lang!r}; this world has {', '.join(self.codes)}")
        rng, L = self.rng("corpus", lang, stream), self.languages[lang]
        en = self.languages["en"]

        def say(ev: Event, render: Callable[[Language], list[Word]]) -> str:
            """One sentence, `render(language)`, of a document in `lang`, code-switched as described above."""
            if lang == "en":
                return text(render(L))
            if rng.random() < self.sentence_switch_rate:
                return text(render(en))
            return text(self._code_switch(render(L), ev, rng))

        docs = []
        for _ in range(num_documents):
            sentences, ev = [], None
            for _ in range(rng.randint(1, 4)):
                ev = self._next_event(rng, ev)
                r = rng.random()
                if r < 0.12 and not ev.negated:
                    ask = rng.choice([a for a in QA_ROLES if self._has_role(ev, a)])
                    sentences.append(say(ev, lambda lg: lg.sentence(ev, ask)))
                    continue
                sentences.append(say(ev, lambda lg: lg.sentence(ev)))
                if r > 0.75 and not ev.negated and not lx.is_hypernym(ev.noun):
                    verbs = [v for v in lx.specific_verbs_for(ev.noun) if v != ev.verb] or [ev.verb]
                    follow = replace(ev, verb=rng.choice(verbs), count=None, adj=None,
                                     place=None, source=None, time_word=False)
                    sentences.append(say(follow, lambda lg: lg.then_sentence(follow)))
            docs.append(" ".join(sentences))
        return docs

    def _next_event(self, rng: random.Random, previous: Event | None) -> Event:
        """Documents keep to a topic, as real ones do: after the first sentence, most sentences go on about
        the same person and repeat some details of the previous one. The same cross-sentence contexts occur
        in every language, so masked-LM pretraining gets more signal to align the languages' words with."""
        if previous is None or rng.random() < 0.3:
            return self.sample_event(rng)
        ev = self.sample_event(rng, agent=previous.agent)
        carried = {f: getattr(previous, f) for f in ("place", "source", "count", "adj") if rng.random() < 0.4}
        if rng.random() < 0.3 and lx.verb_accepts(ev.verb, previous.noun):
            carried["noun"] = previous.noun
        return replace(ev, **carried)

    def _code_switch(self, words: list[Word], ev: Event, rng: random.Random) -> list[Word]:
        """Real web text mixes in English words ("compré apples ayer"): each content word of a
        non-English corpus sentence is, with probability code_switch_rate, written in English."""
        en = self.languages["en"].forms
        suffix = {"past": ":past", "present": ":3sg", "future": ""}[ev.tense]
        out = []
        for w in words:
            if w.role == "verb" and rng.random() < self.code_switch_rate:
                w = Word(en[f"v:{ev.verb}{suffix}"], w.pos, w.ner, w.role)
            elif w.role == "object" and w.pos == "NOUN" and rng.random() < self.code_switch_rate:
                w = Word(en[f"n:{ev.noun}" + ("" if ev.count == 1 else ":pl")], w.pos, w.ner, w.role)
            elif w.role == "object" and w.pos == "ADJ" and rng.random() < self.code_switch_rate:
                w = Word(en[f"a:{ev.adj}"], w.pos, w.ner, w.role)
            out.append(w)
        return out

    @staticmethod
    def _has_role(ev: Event, role: str) -> bool:
        return {"agent": True, "object": True, "count": ev.count is not None, "place": ev.place is not None,
                "time": ev.time_word}[role]

    # ----- tasks -------------------------------------------------------------------------------------
    def load(self, task: str, split: str, lang: str) -> list[dict]:
        """Rows of `task` for one split and language (layouts in eval.tasks)."""
        if task not in self.tasks:
            raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(self.tasks)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if lang not in self.languages:
            raise ValueError(f"task {task}: unknown language {lang!r}; this world has {', '.join(self.codes)}")
        n = self.sizes[task][SPLITS.index(split)]
        if n == 0:
            raise ValueError(f"task {task} has no {split} split")
        if split == "train" and lang != "en":
            raise ValueError(f"task {task}: training data is English only (zero-shot transfer), not {lang!r}")
        # The same rng stream for every language: dev and test are parallel translations.
        rng, L = self.rng(task, split), self.languages[lang]
        make: Callable = getattr(self, "_" + task.replace("syn-", "").replace("-", "_"))
        return [make(rng, L, i) for i in range(n)] if task != "syn-tatoeba" else make(rng, L, n)

    def _nli_hypothesis(self, rng: random.Random, premise: Event, max_edits: int) -> Event:
        """1..max_edits random edits of the premise: drop, add or change a detail, flip negation, change
        the tense, the agent, or the noun's generality. The label is computed afterwards from the two
        events, never assumed from the edit."""
        h = premise
        for _ in range(rng.randint(1, max_edits)):
            present = [f for f in OPTIONAL_FIELDS if getattr(h, f) is not None]
            absent = [f for f in OPTIONAL_FIELDS if getattr(h, f) is None]
            ops = ["negate", "tense", "agent", "noun"] + ["drop", "change"] * bool(present) + ["add"] * bool(absent)
            op = rng.choice(ops)
            if op == "drop":
                h = replace(h, **{rng.choice(present): None})
            elif op in ("add", "change"):
                field = rng.choice(absent if op == "add" else present)
                while True:
                    value = getattr(self.sample_event(rng, count_p=1, adj_p=1, place_p=1, source_p=1), field)
                    if value != getattr(h, field):
                        break
                h = replace(h, **{field: value})
            elif op == "negate":
                h = replace(h, negated=not h.negated)
            elif op == "tense":
                h = replace(h, tense=rng.choice([t for t in lx.TENSES if t != h.tense]))
            elif op == "agent":
                h = replace(h, agent=rng.choice([a for a in self._agents() if a != h.agent]))
            else:  # a member noun becomes its class ("food"), a class becomes one of its members
                cls = lx.noun_class(h.noun)
                h = replace(h, noun=rng.choice([n for n in lx.NOUNS if lx.NOUNS[n] == cls])
                            if lx.is_hypernym(h.noun) else lx.NOUN_CLASSES[cls][0][0])
        return h

    @staticmethod
    def _agents() -> list[tuple[str, ...]]:
        return [(f,) for f in lx.FIRST_NAMES]

    def _nli_pair(self, rng: random.Random, make_premises, label_fn, max_edits: int):
        """(premises, hypothesis, label id) with the label drawn first, so classes are balanced; premises
        that cannot yield the wanted label within a few edits are redrawn."""
        want = rng.choice(NLI_LABELS)
        while True:
            premises = make_premises()
            for _ in range(20):
                hyp = self._nli_hypothesis(rng, rng.choice(premises), max_edits)
                if label_fn(premises, hyp) == want:
                    return premises, hyp, NLI_LABELS.index(want)

    def _xnli(self, rng, L: Language, i: int) -> dict:
        (premise,), hyp, label = self._nli_pair(  # SNLI-like: one positive premise, one edit
            rng, lambda: [self.sample_event(rng, negated_p=0.0, hypernym_p=0.15)],
            lambda ps, h: nli_label(ps[0], h), max_edits=1)
        return {"sentence1": text(L.sentence(premise)),
                "sentence2": text(L.sentence(hyp)), "label": label}

    def _two_agents(self, rng) -> list[Event]:
        first = self.sample_event(rng, negated_p=0.1, hypernym_p=0.15)
        while True:
            second = self.sample_event(rng, negated_p=0.1, hypernym_p=0.15)
            if second.agent != first.agent:
                return [first, second]

    def _mnli(self, rng, L: Language, i: int) -> dict:
        premises, hyp, label = self._nli_pair(rng, lambda: self._two_agents(rng), nli_label_multi, max_edits=2)
        return {"sentence1": " ".join(text(L.sentence(e)) for e in premises),
                "sentence2": text(L.sentence(hyp)), "label": label}

    def _tagged(self, rng, L: Language, **probs) -> dict:
        words = L.sentence(self.sample_event(rng, **probs))
        return {"tokens": [w.text for w in words], "pos_tags": [w.pos for w in words],
                "ner_tags": [w.ner for w in words]}

    def _pos(self, rng, L, i):
        row = self._tagged(rng, L)
        return {"tokens": row["tokens"], "tags": row["pos_tags"]}

    def _panx(self, rng, L, i):
        row = self._tagged(rng, L, place_p=0.6, source_p=0.5)
        return {"tokens": row["tokens"], "tags": row["ner_tags"]}

    def _qa(self, rng, L: Language, qid: str, num_sentences: tuple[int, int]) -> dict:
        n = rng.randint(*num_sentences)
        verbs = rng.sample(tuple(lx.VERBS), n)  # distinct verbs and agents: every question has one answer
        events: list[Event] = []
        while len(events) < n:
            ev = self.sample_event(rng, negated_p=0.0, verb=verbs[len(events)])
            if all(ev.agent != e.agent for e in events):
                events.append(ev)
        target = rng.randrange(n)
        ev = events[target]
        ask = rng.choice([a for a in QA_ROLES if self._has_role(ev, a)])
        answer_roles = {"object": ("count", "object")}.get(ask, (ask,))
        context, answer, start = "", "", -1
        for j, e in enumerate(events):
            words = L.sentence(e)
            sentence, starts = detokenize(words)
            if context:
                context += " "
            if j == target:
                idx = [k for k, w in enumerate(words) if w.role in answer_roles]
                start = len(context) + starts[idx[0]]
                answer = sentence[starts[idx[0]]:starts[idx[-1]] + len(words[idx[-1]].text)]
            context += sentence
        return {"id": qid, "context": context, "question": text(L.sentence(ev, ask)),
                "answers": {"text": [answer], "answer_start": [start]}}

    def _xquad(self, rng, L, i):
        return self._qa(rng, L, f"syn-xquad-{i}", (2, 3))

    def _squad(self, rng, L, i):
        return self._qa(rng, L, f"syn-squad-{i}", (3, 5))

    def _swag(self, rng, L: Language, i: int) -> dict:
        ev = self.sample_event(rng, negated_p=0.0, hypernym_p=0.0)
        right = rng.choice(lx.specific_verbs_for(ev.noun))
        wrong = [v for v, spec in lx.VERBS.items() if spec[3] and not lx.verb_accepts(v, ev.noun)]
        verbs = rng.sample(wrong, 3) + [right]
        rng.shuffle(verbs)
        endings = [text(L.then_sentence(Event(agent=ev.agent, verb=v, noun=ev.noun, tense=ev.tense)))
                   for v in verbs]
        return {"context": text(L.sentence(ev)), "endings": endings, "label": verbs.index(right)}

    def _tatoeba(self, rng, L: Language, n: int) -> list[dict]:
        en, rows, seen = self.languages["en"], [], set()
        while len(rows) < n:
            ev = self.sample_event(rng)
            target = text(en.sentence(ev))
            if target not in seen:  # distinct sentences: the gold neighbour is well defined
                seen.add(target)
                rows.append({"source": text(L.sentence(ev)), "target": target})
        return rows
