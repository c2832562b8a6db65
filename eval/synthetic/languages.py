"""Languages of the synthetic world: how each one spells concepts and orders a sentence.

English ("en") uses real English words. The other languages get their own word forms, generated from a
seed and a sound inventory of their own, and differ from English the way real languages do: word order
(SOV, VSO, OSV), adjective placement, prepositions vs postpositions vs case suffixes, tense and negation
as suffixes or particles, wh-words fronted or left in place, and in one case another script. They share
with English what real languages share: digits, punctuation, personal and place names (transliterated
in the other script), and a few loanwords. Codes start with "q" (ISO 639 reserves qaa-qtz for local use).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from . import lexicon as lx
from .semantics import Event


@dataclass(frozen=True)
class LanguageSpec:
    code: str
    description: str
    order: str  # SVO | SOV | VSO | OSV
    adj_after_noun: bool = False
    article: bool = True  # a definite article before a bare noun phrase
    adposition: str = "pre"  # how place/source are marked: pre | post | suffix
    object_marker: str = "none"  # none | post (a particle after the object) | suffix (accusative)
    plural: str = "suffix"  # suffix | none
    tense: str = "suffix"  # suffix | particle
    negation: str = "particle"  # particle (before the verb) | suffix
    wh: str = "front"  # front | in_situ
    question_particle: bool = False
    script: str = "latin"  # latin | cyrillic
    loan_rate: float = 0.0  # share of content words borrowed from English (same stem, native morphology)
    consonants: str = "bdfglmnprstv"
    vowels: str = "aeiou"
    syllable: str = "CV"  # CV | CVC


SPECS = {
    "en": LanguageSpec("en", "English: SVO, prepositions, auxiliaries (does/did/will), wh-fronting", "SVO"),
    "qsv": LanguageSpec("qsv", "Romance-like: SVO, noun-adjective, tense suffixes, wh-fronting", "SVO",
                        adj_after_noun=True, loan_rate=0.5, consonants="bdfglmnprstv", vowels="aeiou"),
    "qso": LanguageSpec("qso", "Japanese-like: SOV, postpositions, object particle, no articles, no "
                        "plural, wh-in-situ with a question particle", "SOV", article=False,
                        adposition="post", object_marker="post", plural="none", wh="in_situ",
                        question_particle=True, loan_rate=0.4, consonants="kstnhmyrwgzdbp", vowels="aiueo"),
    "qvs": LanguageSpec("qvs", "Celtic/Arabic-like: VSO, noun-adjective, tense particles", "VSO",
                        adj_after_noun=True, tense="particle", loan_rate=0.45, consonants="bcdfghlmnrstwy",
                        vowels="aeiouy", syllable="CVC"),
    "qos": LanguageSpec("qos", "OSV (rare order): postpositions, negation suffix, wh-in-situ", "OSV",
                        article=False, adposition="post", negation="suffix", wh="in_situ", loan_rate=0.35,
                        consonants="kqxztrln", vowels="aiu", syllable="CVC"),
    "qag": LanguageSpec("qag", "Turkic/Finnic-like: SVO, agglutinative case suffixes (names take "
                        "them after an apostrophe), negation suffix", "SVO", article=False,
                        adposition="suffix", object_marker="suffix", negation="suffix", loan_rate=0.45,
                        consonants="ktslmnrvbdy", vowels="aeiouäöü"),
    "qcy": LanguageSpec("qcy", "another script (Cyrillic letters, names transliterated): SVO, "
                        "noun-adjective, tense particles", "SVO", adj_after_noun=True, tense="particle",
                        script="cyrillic", loan_rate=0.45, consonants="bdgkmnprstvz", vowels="aeiou"),
}

_CYRILLIC = dict(zip("abcdefghijklmnopqrstuvwxyzäöü", "абцдефгхийклмнопқрстувшҳызәөү"))

# Grammatical morphemes each non-English language needs a form for (suffixes are written attached).
_FUNCTION_CONCEPTS = ("the", "in", "from", "not", "then", "who", "what", "where", "how_many", "when", "q",
                      "acc_particle")
_SUFFIX_CONCEPTS = ("pl", "past", "present", "future", "neg", "acc", "loc", "abl")


@dataclass
class Word:
    text: str
    pos: str  # Universal POS tag
    ner: str = "O"  # BIO tag: B-PER, I-LOC, ...
    role: str | None = None  # which part of the event it spells (agent, verb, object, count, place, ...)


def _words(parts: tuple[str, ...], pos: str, ner_type: str | None, role: str) -> list[Word]:
    return [Word(p, pos, ("B-" if i == 0 else "I-") + ner_type if ner_type else "O", role)
            for i, p in enumerate(parts)]


class Language:
    """One language: its lexicon (generated from the world seed) and its grammar."""

    def __init__(self, spec: LanguageSpec, seed: int, taken: set[str]):
        self.spec = spec
        self.code = spec.code
        if spec.code == "en":
            self.forms = self._english_forms()
        else:
            self.forms = self._generate_forms(random.Random(f"xlt-synthetic-{seed}-{spec.code}"), taken)
        taken.update(f for f in self.forms.values() if f)

    # ----- lexicon -----------------------------------------------------------------------------------
    @staticmethod
    def _english_forms() -> dict[str, str]:
        forms = {w: w for w in lx.FUNCTION_WORDS}
        forms.update({"how_many": "how many", "when": "when", "the": "the"})
        for noun, (sg, pl) in lx.NOUN_FORMS.items():
            forms[f"n:{noun}"], forms[f"n:{noun}:pl"] = sg, pl
        for verb, (base, third, past, _) in lx.VERBS.items():
            forms[f"v:{verb}"], forms[f"v:{verb}:3sg"], forms[f"v:{verb}:past"] = base, third, past
        forms.update({f"a:{a}": a for a in lx.ADJECTIVES})
        forms.update({f"t:{t}": w for t, w in lx.TIME_WORDS.items()})
        return forms

    def _generate_forms(self, rng: random.Random, taken: set[str]) -> dict[str, str]:
        spec = self.spec

        def syllable() -> str:
            s = rng.choice(spec.consonants) + rng.choice(spec.vowels)
            return s + rng.choice(spec.consonants) if spec.syllable == "CVC" and rng.random() < 0.5 else s

        def fresh(n_min: int, n_max: int, suffix: bool = False) -> str:
            while True:
                form = "".join(syllable() for _ in range(rng.randint(n_min, n_max)))
                if suffix:  # a suffix starts with a vowel: drop the first consonant
                    form = form[1:]
                if form not in taken and len(form) >= 2:
                    taken.add(form)
                    return form

        forms = {c: fresh(1, 2) for c in _FUNCTION_CONCEPTS}
        forms.update({f"-{c}": fresh(1, 2, suffix=True) for c in _SUFFIX_CONCEPTS})
        forms["how_many"] = fresh(2, 2)
        def content(english_stem: str, always_loan: bool = False) -> str:
            borrowed = rng.random() < spec.loan_rate  # drawn for every concept: forms stay stable
            return english_stem if borrowed or always_loan else fresh(2, 3)

        for noun in lx.NOUN_FORMS:
            forms[f"n:{noun}"] = content(noun, always_loan=noun in lx.LOANWORDS)
        for verb in lx.VERBS:
            forms[f"v:{verb}"] = content(lx.VERBS[verb][0])
        forms.update({f"a:{a}": content(a) for a in lx.ADJECTIVES})
        forms.update({f"t:{t}": fresh(2, 3) for t in lx.TENSES})
        return {k: self.script(v) for k, v in forms.items()}

    def script(self, text: str) -> str:
        if self.spec.script == "cyrillic":
            return "".join(_CYRILLIC.get(ch, ch) for ch in text)
        return text

    def name(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.script(p) for p in parts)

    # ----- phrases -----------------------------------------------------------------------------------
    def noun_phrase(self, ev: Event, wh_count: bool = False) -> list[Word]:
        """[count] [adj] noun (or noun adj), inflected; the object's core, without article/case particle."""
        f, spec = self.forms, self.spec
        plural = ev.count != 1  # a bare noun phrase is a definite plural ("the apples")
        if self.code == "en":
            noun = f[f"n:{ev.noun}:pl"] if plural else f[f"n:{ev.noun}"]
        else:
            noun = f[f"n:{ev.noun}"] + (f["-pl"] if plural and spec.plural == "suffix" else "")
            if spec.object_marker == "suffix":
                noun += f["-acc"]
        head = [Word(noun, "NOUN", role="object")]
        adj = [Word(f[f"a:{ev.adj}"], "ADJ", role="object")] if ev.adj else []
        words = head + adj if spec.adj_after_noun else adj + head
        if wh_count:
            words = [Word(w, "ADV" if i == 0 and self.code == "en" else "ADJ", role="wh")
                     for i, w in enumerate(f["how_many"].split())] + words
        elif ev.count is not None:
            words = [Word(str(ev.count), "NUM", role="count")] + words
        return words

    def object_constituent(self, ev: Event, wh: str | None = None) -> list[Word]:
        f, spec = self.forms, self.spec
        if wh == "object":
            core = [Word(f["what"], "PRON", role="wh")]
        else:
            core = self.noun_phrase(ev, wh_count=wh == "count")
            if spec.article and ev.count is None and wh != "count":
                core = [Word(f["the"], "DET")] + core
        if spec.object_marker == "post":
            core = core + [Word(f["acc_particle"], "ADP")]
        return core

    def oblique(self, parts: tuple[str, ...], concept: str, suffix: str, ner: str, role: str) -> list[Word]:
        """A place ("in paris") or source ("from acme") phrase."""
        f, spec = self.forms, self.spec
        words = _words(self.name(parts), "PROPN", ner, role)
        if spec.adposition == "suffix":  # names take case suffixes after an apostrophe (Turkish-like)
            words[-1].text += "'" + f[suffix]
            return words
        adp = [Word(f[concept], "ADP")]
        return adp + words if spec.adposition == "pre" else words + adp

    def verb_group(self, ev: Event, question: bool = False) -> list[Word]:
        """The verb with its tense and negation; English uses auxiliaries (does/did/will + not)."""
        f, spec = self.forms, self.spec
        if self.code == "en":
            base, third, past = (f[f"v:{ev.verb}"], f[f"v:{ev.verb}:3sg"], f[f"v:{ev.verb}:past"])
            aux = {"past": "did", "present": "does", "future": "will"}[ev.tense]
            if ev.negated or question or ev.tense == "future":
                words = [Word(aux, "AUX")] + ([Word("not", "PART")] if ev.negated else [])
                return words + [Word(base, "VERB", role="verb")]
            return [Word(third if ev.tense == "present" else past, "VERB", role="verb")]
        stem = f[f"v:{ev.verb}"]
        if spec.negation == "suffix" and ev.negated:
            stem += f["-neg"]
        words = []
        if spec.tense == "suffix":
            stem += f[f"-{ev.tense}"]
        elif ev.tense != "present":
            words.append(Word(f[f"-{ev.tense}"], "AUX"))  # tense particles reuse the tense morphemes
        if spec.negation == "particle" and ev.negated:
            words.append(Word(f["not"], "PART"))
        return words + [Word(stem, "VERB", role="verb")]

    # ----- sentences ---------------------------------------------------------------------------------
    def sentence(self, ev: Event, ask: str | None = None) -> list[Word]:
        """The words of a declarative sentence, or of a question about role `ask` (agent | object |
        count | place | time). Questions are about positive events."""
        f, spec = self.forms, self.spec
        if ask is not None and ev.negated:
            raise ValueError("questions are asked about positive events only")
        subj = ([Word(f["who"], "PRON", role="wh")] if ask == "agent"
                else _words(self.name(ev.agent), "PROPN", "PER", "agent"))
        obj = self.object_constituent(ev, wh=ask if ask in ("object", "count") else None)
        verb = self.verb_group(ev, question=ask not in (None, "agent"))
        place = ([Word(f["where"], "ADV", role="wh")] if ask == "place" else
                 self.oblique(ev.place, "in", "-loc", "LOC", "place") if ev.place else [])
        source = self.oblique(ev.source, "from", "-abl", "ORG", "source") if ev.source else []
        show_time = ev.time_word or ask == "time"
        time = ([Word(f["when"], "ADV", role="wh")] if ask == "time" else
                [Word(f[f"t:{ev.tense}"], "ADV", role="time")] if show_time else [])
        wh_part = {"agent": subj, "object": obj, "count": obj, "place": place, "time": time}.get(ask)
        moved = ask is not None and spec.wh == "front"
        if moved:  # the wh-constituent goes first and leaves a gap
            subj, obj, place, time = ([] if c is wh_part else c for c in (subj, obj, place, time))
        if self.code == "en" and moved and ask != "agent":
            aux, main = verb[:1], verb[1:]  # do-support: "what did maria buy ?"
            body = aux + subj + main + obj + source + place + time
        elif spec.order == "SVO":
            body = subj + verb + obj + source + place + time
        elif spec.order == "SOV":
            body = time + subj + place + source + obj + verb
        elif spec.order == "VSO":
            body = verb + subj + obj + source + place + time
        else:  # OSV
            body = obj + subj + time + source + place + verb
        if moved:
            body = wh_part + body
        end = [Word(f["q"], "PART")] if ask is not None and spec.question_particle else []
        return body + end + [Word("?" if ask else ".", "PUNCT")]

    def then_sentence(self, ev: Event) -> list[Word]:
        """'then <sentence>': a continuation, used by the multiple-choice task."""
        return [Word(self.forms["then"], "ADV")] + self.sentence(ev)


def detokenize(words: list[Word]) -> tuple[str, list[int]]:
    """Join words into text (punctuation attached to the word before it) and return each word's start."""
    text, starts = "", []
    for w in words:
        if text and not (w.pos == "PUNCT"):
            text += " "
        starts.append(len(text))
        text += w.text
    return text, starts


def build_languages(codes: tuple[str, ...], seed: int) -> dict[str, Language]:
    unknown = [c for c in codes if c not in SPECS]
    if unknown:
        raise ValueError(f"unknown synthetic language(s) {', '.join(unknown)}: expected some of "
                         f"{', '.join(SPECS)}")
    if "en" not in codes:
        raise ValueError("the synthetic suite needs 'en' (the training language) among its languages")
    # Every form is unique across languages (no accidental cognates), English and names taken first.
    taken = {p for group in (lx.CITIES, lx.ORGS) for name in group for p in name}
    taken.update(lx.FIRST_NAMES, lx.LAST_NAMES)
    english = Language(SPECS["en"], seed, taken)
    taken.update(w for form in english.forms.values() for w in form.split())
    langs = {"en": english}
    for code in SPECS:  # all, in canonical order, so a language's forms do not depend on the chosen set
        if code != "en":
            langs[code] = Language(SPECS[code], seed, taken)
    return {c: langs[c] for c in codes}
