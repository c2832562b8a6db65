"""Events (what a sentence means) and the exact entailment relation between them.

Every label in the synthetic suite is computed here or read off an event, never from surface text, so
labels are exact in every language. NLI follows the usual "same situation" convention (as SNLI/MNLI
annotators do): two positive descriptions of the same agent doing the same thing that disagree on a
detail both mention contradict each other.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .lexicon import noun_subsumes

OPTIONAL_FIELDS = ("count", "adj", "place", "source")


@dataclass(frozen=True)
class Event:
    agent: tuple[str, ...]  # a person's name, one or two words
    verb: str
    noun: str  # a member noun or a class hypernym ("food")
    tense: str  # past | present | future
    negated: bool = False
    count: int | None = None
    adj: str | None = None
    place: tuple[str, ...] | None = None  # a city
    source: tuple[str, ...] | None = None  # an organisation ("from acme")
    time_word: bool = False  # spell out the time adverb ("yesterday"); redundant with the tense

    def positive(self) -> "Event":
        return replace(self, negated=False)


def at_least_as_specific(a: Event, b: Event) -> bool:
    """a ⊑ b: every situation that `a` describes is one that `b` describes (negation ignored)."""
    if (a.agent, a.verb, a.tense) != (b.agent, b.verb, b.tense) or not noun_subsumes(b.noun, a.noun):
        return False
    return all(getattr(b, f) is None or getattr(b, f) == getattr(a, f) for f in OPTIONAL_FIELDS)


def conflict(a: Event, b: Event) -> bool:
    """Same agent doing the same thing to compatible objects, but a detail both give differs."""
    if (a.agent, a.verb) != (b.agent, b.verb):
        return False
    if not (noun_subsumes(a.noun, b.noun) or noun_subsumes(b.noun, a.noun)):
        return False
    if a.tense != b.tense:
        return True
    return any(getattr(a, f) is not None and getattr(b, f) is not None and getattr(a, f) != getattr(b, f)
               for f in OPTIONAL_FIELDS)


NLI_LABELS = ("contradiction", "entailment", "neutral")  # XTREME's (alphabetical) order


def nli_label(premise: Event, hypothesis: Event) -> str:
    p, h = premise.positive(), hypothesis.positive()
    if not premise.negated and not hypothesis.negated:
        if at_least_as_specific(p, h):
            return "entailment"
        return "contradiction" if conflict(p, h) else "neutral"
    if not premise.negated and hypothesis.negated:  # P happened; H says nothing like H happened
        return "contradiction" if at_least_as_specific(p, h) else "neutral"
    if premise.negated and not hypothesis.negated:  # nothing like P happened; H claims such an event
        return "contradiction" if at_least_as_specific(h, p) else "neutral"
    # both negated: "not P" entails "not H" when every H-situation is a P-situation (monotonicity)
    return "entailment" if at_least_as_specific(h, p) else "neutral"


def nli_label_multi(premises: list[Event], hypothesis: Event) -> str:
    """A premise of several sentences about different agents: the one about the hypothesis' agent decides."""
    about = [p for p in premises if p.agent == hypothesis.agent]
    if len(about) > 1:
        raise ValueError("premise sentences must have distinct agents")
    return nli_label(about[0], hypothesis) if about else "neutral"
