"""The language-independent meanings of the synthetic world, with their English forms.

Concepts carry the semantics that task labels are computed from: nouns belong to a class (whose
hypernym is itself a noun), verbs accept objects of some classes only (selectional restrictions, which
the corpus obeys and the multiple-choice task tests), and names are shared anchors across languages.
"""
from __future__ import annotations

# Proper names are shared across languages (as real names mostly are); some take a second word.
FIRST_NAMES = ("maria", "john", "ahmed", "yuki", "olga", "pedro", "fatima", "anna", "omar", "sara", "ivan",
               "nina", "carlos", "emma", "raj", "leila")
LAST_NAMES = ("lopez", "smith", "khan", "tanaka", "petrov", "garcia")
CITIES = (("paris",), ("tokyo",), ("lima",), ("cairo",), ("oslo",), ("delhi",), ("berlin",), ("nairobi",),
          ("quito",), ("san", "jose"), ("buenos", "aires"), ("hong", "kong"))
ORGS = (("acme",), ("globex",), ("initech",), ("umbrella",), ("nova", "bank"), ("zenith", "group"),
        ("vortex", "labs"), ("apex",))

# class -> (hypernym noun, member nouns). English forms: (singular, plural).
NOUN_CLASSES = {
    "food": (("food", "foods"), (("apple", "apples"), ("bread", "breads"), ("cheese", "cheeses"),
                                ("fish", "fish"), ("banana", "bananas"))),
    "animal": (("animal", "animals"), (("dog", "dogs"), ("cat", "cats"), ("horse", "horses"),
                                       ("bird", "birds"))),
    "vehicle": (("vehicle", "vehicles"), (("car", "cars"), ("bike", "bikes"), ("bus", "buses"),
                                          ("boat", "boats"))),
    "clothing": (("garment", "garments"), (("shirt", "shirts"), ("hat", "hats"), ("shoe", "shoes"),
                                           ("coat", "coats"))),
    "tool": (("tool", "tools"), (("hammer", "hammers"), ("knife", "knives"), ("saw", "saws"),
                                 ("rope", "ropes"))),
    "instrument": (("instrument", "instruments"), (("guitar", "guitars"), ("drum", "drums"),
                                                   ("piano", "pianos"), ("violin", "violins"))),
}
# Loanwords: the same stem in every language (adapted to its morphology and script), as real languages
# share words like "piano" or "bus".
LOANWORDS = ("piano", "guitar", "violin", "bus", "banana")

# verb -> (base, 3sg present, past, object classes it accepts; () = any class)
VERBS = {
    "buy": ("buy", "buys", "bought", ()),
    "sell": ("sell", "sells", "sold", ()),
    "see": ("see", "sees", "saw", ()),
    "find": ("find", "finds", "found", ()),
    "carry": ("carry", "carries", "carried", ()),
    "eat": ("eat", "eats", "ate", ("food",)),
    "cook": ("cook", "cooks", "cooked", ("food",)),
    "feed": ("feed", "feeds", "fed", ("animal",)),
    "ride": ("ride", "rides", "rode", ("animal", "vehicle")),
    "drive": ("drive", "drives", "drove", ("vehicle",)),
    "repair": ("repair", "repairs", "repaired", ("vehicle", "tool", "instrument")),
    "wear": ("wear", "wears", "wore", ("clothing",)),
    "use": ("use", "uses", "used", ("tool",)),
    "play": ("play", "plays", "played", ("instrument",)),
}
ADJECTIVES = ("red", "blue", "green", "black", "white", "big", "small", "old")
TENSES = ("past", "present", "future")
TIME_WORDS = {"past": "yesterday", "present": "today", "future": "tomorrow"}
COUNTS = tuple(range(1, 13))  # 1 takes the singular

# English function words (the other languages generate their own forms for these concepts).
FUNCTION_WORDS = ("the", "in", "from", "not", "then", "who", "what", "where", "how_many", "and",
                  "does", "did", "will")

NOUNS = {noun[0]: cls for cls, (_, members) in NOUN_CLASSES.items() for noun in members}
HYPERNYMS = {hyper[0]: cls for cls, (hyper, _) in NOUN_CLASSES.items()}
NOUN_FORMS = {n[0]: n for _, (h, members) in NOUN_CLASSES.items() for n in (h,) + members}


def noun_class(noun: str) -> str:
    return NOUNS.get(noun) or HYPERNYMS[noun]


def is_hypernym(noun: str) -> bool:
    return noun in HYPERNYMS


def noun_subsumes(general: str, specific: str) -> bool:
    """True if every `specific` is a `general` (equal, or general is the class hypernym of specific)."""
    return general == specific or (is_hypernym(general) and noun_class(specific) == HYPERNYMS[general])


def verb_accepts(verb: str, noun: str) -> bool:
    classes = VERBS[verb][3]
    return not classes or noun_class(noun) in classes


def verbs_for(noun: str) -> list[str]:
    return [v for v in VERBS if verb_accepts(v, noun)]


def specific_verbs_for(noun: str) -> list[str]:
    """Verbs that select this noun's class specifically (not the any-object verbs)."""
    return [v for v, spec in VERBS.items() if spec[3] and noun_class(noun) in spec[3]]
