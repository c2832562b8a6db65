"""The synthetic suite: deterministic, parallel across languages, and its labels exact."""
import re

import pytest

from eval.synthetic import SyntheticWorld
from eval.synthetic import lexicon as lx
from eval.synthetic.languages import SPECS, build_languages, detokenize
from eval.synthetic.semantics import Event, nli_label, nli_label_multi

SMALL = {"syn-xnli": (200, 50, 60), "syn-pos": (100, 30, 40), "syn-panx": (100, 30, 40),
         "syn-xquad": (200, 40, 60), "syn-tatoeba": (0, 0, 80), "syn-mnli": (200, 40, 0),
         "syn-squad": (200, 40, 0), "syn-swag": (200, 40, 0)}


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(seed=7, sizes=SMALL)


INVERSE_VERBS = {form: verb for verb, (base, third, past, _) in lx.VERBS.items() for form in (base, third, past)}


def ev(**kw):
    base = dict(agent=("maria",), verb="buy", noun="apple", tense="past")
    return Event(**(base | kw))


# ----- semantics -------------------------------------------------------------------------------------------
def test_nli_label_by_hand():
    p = ev(count=3, place=("paris",), adj="red")
    assert nli_label(p, ev()) == "entailment"  # details dropped
    assert nli_label(p, ev(noun="food")) == "entailment"  # hypernym
    assert nli_label(p, ev(count=3, place=("paris",), adj="red", time_word=True)) == "entailment"
    assert nli_label(p, ev(count=4)) == "contradiction"
    assert nli_label(p, ev(place=("rome",))) == "contradiction"
    assert nli_label(p, ev(tense="future")) == "contradiction"
    assert nli_label(p, ev(negated=True)) == "contradiction"
    assert nli_label(p, ev(source=("acme",))) == "neutral"  # adds a detail
    assert nli_label(p, ev(agent=("john",))) == "neutral"
    assert nli_label(ev(noun="food"), ev(noun="apple")) == "neutral"  # hyponym is more specific
    assert nli_label(p, ev(noun="bread", count=4)) == "neutral"  # other things: no conflict
    # negated premises are downward monotone
    n = ev(negated=True, place=("paris",))
    assert nli_label(n, ev(negated=True, place=("paris",), count=2)) == "entailment"
    assert nli_label(n, ev(negated=True)) == "neutral"
    assert nli_label(ev(negated=True), ev(place=("paris",))) == "contradiction"
    assert nli_label(ev(negated=True, noun="food"), ev(negated=True, noun="apple")) == "entailment"


def test_nli_multi_premise_uses_the_sentence_about_the_agent():
    a, b = ev(count=3), ev(agent=("john",), verb="eat", noun="bread")
    assert nli_label_multi([a, b], ev(agent=("john",), verb="eat", noun="food")) == "entailment"
    assert nli_label_multi([a, b], ev(count=4)) == "contradiction"
    assert nli_label_multi([a, b], ev(agent=("sara",))) == "neutral"


# ----- languages -------------------------------------------------------------------------------------------
def test_forms_are_deterministic_distinct_and_independent_of_the_chosen_set():
    all_langs = build_languages(tuple(SPECS), seed=3)
    again = build_languages(("en", "qso"), seed=3)
    assert again["qso"].forms == all_langs["qso"].forms
    assert build_languages(("en", "qso"), seed=4)["qso"].forms != all_langs["qso"].forms
    seen = {}
    for code, lang in all_langs.items():
        if code == "en":
            continue
        for concept, form in lang.forms.items():
            if ":" in concept and lang.script(concept.split(":")[1]) == form:  # a borrowed English stem
                continue
            assert form not in seen, f"{code}:{concept} and {seen.get(form)} share the form {form!r}"
            seen[form] = f"{code}:{concept}"


def test_word_orders(world):
    e = ev(count=3, place=("paris",))
    for code, lang in world.languages.items():
        words = lang.sentence(e)
        roles = [w.role for w in words]
        verb, agent, obj = roles.index("verb"), roles.index("agent"), roles.index("count")
        order = {"SVO": (agent, verb, obj), "SOV": (agent, obj, verb), "VSO": (verb, agent, obj),
                 "OSV": (obj, agent, verb)}[lang.spec.order]
        assert list(order) == sorted(order), f"{code} is not {lang.spec.order}: {[w.text for w in words]}"
        assert words[-1].text == "."


def test_borrowing_rates_differ_by_language(world):
    def borrowed(code):
        lang = world.languages[code]
        concepts = [c for c in lang.forms if c[:2] in ("n:", "v:", "a:")]
        return sum(lang.forms[c] == lang.script(c.split(":")[1]) for c in concepts) / len(concepts)

    rates = {code: borrowed(code) for code in world.codes if code != "en"}
    assert all(0.1 < r < 0.7 for r in rates.values()), rates
    assert rates["qsv"] > rates["qos"]


def test_other_script_shares_only_digits_and_punctuation(world):
    qcy = world.languages["qcy"]
    text = detokenize(qcy.sentence(ev(count=3, place=("paris",))))[0]
    assert not re.search("[a-z]", text) and "3" in text and text.endswith(".")


# ----- tasks -----------------------------------------------------------------------------------------------
def test_deterministic_and_parallel(world):
    again = SyntheticWorld(seed=7, sizes=SMALL)
    assert world.load("syn-xnli", "test", "qso") == again.load("syn-xnli", "test", "qso")
    en, qvs = world.load("syn-xnli", "test", "en"), world.load("syn-xnli", "test", "qvs")
    assert [r["label"] for r in en] == [r["label"] for r in qvs]
    assert en[0]["sentence1"] != qvs[0]["sentence1"]
    assert SyntheticWorld(seed=8, sizes=SMALL).load("syn-xnli", "test", "en") != en


def test_pair_labels_balanced_and_in_range(world):
    for task in ("syn-xnli", "syn-mnli"):
        labels = [r["label"] for r in world.load(task, "train", "en")]
        counts = [labels.count(k) for k in range(3)]
        assert min(counts) > 0.25 * len(labels), (task, counts)


def test_tagging_rows_well_formed(world):
    for lang in world.codes:
        for row in world.load("syn-pos", "test", lang):
            assert len(row["tokens"]) == len(row["tags"])
            for tok, tag in zip(row["tokens"], row["tags"]):
                if tok.isdigit():
                    assert tag == "NUM"
                if tok in ".?":
                    assert tag == "PUNCT"
        for row in world.load("syn-panx", "test", lang):
            prev = "O"
            for tok, tag in zip(row["tokens"], row["tags"]):
                if tag.startswith("I-"):
                    assert prev[2:] == tag[2:], f"{lang}: {tag} after {prev} in {row}"
                if tag == "B-PER":
                    assert tok in {world.languages[lang].script(n) for n in lx.FIRST_NAMES}
                prev = tag


def test_qa_answers_are_exact_spans_of_the_right_kind(world):
    names = set(lx.FIRST_NAMES)
    cities = {" ".join(c) for c in lx.CITIES}
    for lang in world.codes:
        for row in world.load("syn-xquad", "test", lang):
            text, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
            assert row["context"][start:start + len(text)] == text
    for row in world.load("syn-squad", "train", "en"):
        q, a = row["question"], row["answers"]["text"][0]
        if q.startswith("who "):
            assert a.split()[0] in names
        elif q.startswith("how many "):
            assert a.isdigit()
        elif q.startswith("where "):
            assert a in cities
        elif q.startswith("when "):
            assert a in lx.TIME_WORDS.values()
        else:
            assert q.startswith("what ") and a.split()[-1] in {f for n in lx.NOUN_FORMS.values() for f in n}
        # every sentence of a context has its own verb, so a question naming the verb has one answer
        verbs = [next(INVERSE_VERBS[w] for w in s.split() if w in INVERSE_VERBS)
                 for s in row["context"].split(". ")]
        assert len(set(verbs)) == len(verbs)


def test_swag_correct_ending_is_the_only_plausible_one(world):
    inverse = INVERSE_VERBS
    plurals = {pl: n for n, (sg, pl) in lx.NOUN_FORMS.items()}
    for row in world.load("syn-swag", "train", "en"):
        plausible = []
        for ending in row["endings"]:
            words = ending.rstrip(".").split()
            verb = next(inverse[w] for w in words if w in inverse)
            plausible.append(lx.verb_accepts(verb, plurals[words[-1]]))
        assert plausible.count(True) == 1 and plausible[row["label"]]


def test_tatoeba_pairs_are_translations(world):
    for lang in ("qsv", "qos", "qcy"):
        rows = world.load("syn-tatoeba", "test", lang)
        assert len({r["target"] for r in rows}) == len(rows)
        script = world.languages[lang].script
        for r in rows:
            digits = re.findall(r"\d+", r["target"])
            assert re.findall(r"\d+", r["source"]) == digits or lang == "qos"  # OSV moves the object first
            first_name = r["target"].split()[0]
            if first_name in lx.FIRST_NAMES:
                assert script(first_name) in r["source"]


def test_bad_requests_name_what_is_wrong(world):
    with pytest.raises(ValueError, match="unknown synthetic task 'syn-nope'"):
        world.load("syn-nope", "test", "en")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        world.load("syn-xnli", "test", "xx")
    with pytest.raises(ValueError, match="English only"):
        world.load("syn-xnli", "train", "qso")
    with pytest.raises(ValueError, match="no test split"):
        world.load("syn-mnli", "test", "en")
    with pytest.raises(ValueError, match="unknown synthetic language"):
        SyntheticWorld(languages=("en", "zz"))


# ----- pretraining corpus ----------------------------------------------------------------------------------
def _latin_words(doc: str) -> list[str]:
    return re.findall(r"[a-z]{2,}", doc)


def test_corpus_is_seeded_and_keeps_to_a_topic(world):
    docs = world.corpus("en", 300)
    assert docs == world.corpus("en", 300) and docs != world.corpus("en", 300, stream=1)
    # Coherent documents: the next sentence mostly goes on about the same person (by chance: rarely).
    pairs = [(a, b) for d in docs for a, b in zip(d.split(". "), d.split(". ")[1:])]
    names = set(lx.FIRST_NAMES)
    same = sum(bool(names & set(a.split()) & set(b.split())) for a, b in pairs)
    assert len(pairs) > 200 and 0.6 < same / len(pairs) < 0.95


def test_corpus_code_switching_rates():
    # qcy writes in Cyrillic and transliterates names, so Latin-script words in it are English switches.
    def latin_share(**rates):
        docs = SyntheticWorld(seed=7, languages=("en", "qcy"), **rates).corpus("qcy", 200)
        words = [w for d in docs for w in d.split()]
        return sum(bool(_latin_words(w)) for w in words) / len(words)

    assert latin_share(code_switch_rate=0.0, sentence_switch_rate=0.0) == 0.0
    assert latin_share(code_switch_rate=0.0, sentence_switch_rate=1.0) > 0.9  # every sentence in English
    within = latin_share(code_switch_rate=0.3, sentence_switch_rate=0.0)
    assert 0.05 < within < 0.3  # some content words, never function words
    with pytest.raises(ValueError, match="sentence_switch_rate"):
        SyntheticWorld(sentence_switch_rate=1.5)
