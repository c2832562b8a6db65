"""The benchmarks as data: XTREME (Hu et al. 2020), XTREME-R (Ruder et al. 2021) and the English intermediate
tasks of Phang et al. (2020). Per task: its format, metric, languages exactly as the official scorer
(google-research/xtreme `evaluate.py`) lists them, the English task it is trained on, and where its data
lives on the Hugging Face hub. Task names are the leaderboard folder names (`xnli`, `panx`, ...), so a
prediction folder `<task>/test-<lang>.<ext>` is read without any renaming.

Suite scores, as the official scorer computes them (`group_scores`): a task's score is the mean over its
languages (English included where listed); a group (category) score the mean of its tasks' scores; the
suite score (`all_task`) the mean of all its task scores. Groups and their keys follow `evaluate.py`
exactly (`classification`, `tagging`, `qa`, `retrieval`, and XTREME-R's `multi_choice`), so the JSON is the
official one. XTREME-R: the official script can never produce `all_task` (LAReQA has no language list and
no reader there); XLT defines it as the XTREME-R paper does, the mean of its 10 task scores (LAReQA
scored as a `lareqa/test-<lang>.json` file in Mewsli-X's layout: query id -> ranked candidate ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .synthetic.world import DEFAULT_LANGUAGES as SYNTHETIC_LANGUAGES, TARGET_TASKS as SYNTHETIC_TARGETS, task_specs
from .tasks import TaskSpec

UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X")
PANX_TAGS = ("B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O")  # utils_tag.get_labels order
XNLI_LABELS = ("contradiction", "entailment", "neutral")  # XTREME's (alphabetical) order, not HF's


def _langs(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


# Language lists copied from evaluate.py (XTREME_TASK2LANGS / XTREME_R_TASK2LANGS), in its order: the
# order matters, since the official task average sums languages in it.
XTREME_LANGS = {
    "pawsx": _langs("de,en,es,fr,ja,ko,zh"),
    "xnli": _langs("ar,bg,de,el,en,es,fr,hi,ru,sw,th,tr,ur,vi,zh"),
    "panx": _langs("ar,he,vi,id,jv,ms,tl,eu,ml,ta,te,af,nl,en,de,el,bn,hi,mr,ur,fa,fr,it,pt,es,bg,ru,ja,ka,ko,"
                   "th,sw,yo,my,zh,kk,tr,et,fi,hu"),
    "udpos": _langs("af,ar,bg,de,el,en,es,et,eu,fa,fi,fr,he,hi,hu,id,it,ja,kk,ko,mr,nl,pt,ru,ta,te,th,tl,tr,ur,"
                    "vi,yo,zh"),
    "bucc2018": _langs("de,fr,ru,zh"),
    "tatoeba": _langs("ar,he,vi,id,jv,tl,eu,ml,ta,te,af,nl,de,el,bn,hi,mr,ur,fa,fr,it,pt,es,bg,ru,ja,ka,ko,th,"
                      "sw,zh,kk,tr,et,fi,hu"),
    "xquad": _langs("en,es,de,el,ru,tr,ar,vi,th,zh,hi"),
    "mlqa": _langs("en,es,de,ar,hi,vi,zh"),
    "tydiqa": _langs("en,ar,bn,fi,id,ko,ru,sw,te"),
}
XTREME_R_LANGS = {
    "xnli": XTREME_LANGS["xnli"],
    "panx": XTREME_LANGS["panx"] + _langs("qu,pl,uk,az,lt,pa,gu,ro"),
    "udpos": XTREME_LANGS["udpos"] + _langs("lt,pl,uk,wo,ro"),
    "tatoeba": XTREME_LANGS["tatoeba"] + _langs("az,lt,pl,uk,ro"),
    "xcopa": _langs("et,ht,id,it,qu,sw,ta,th,tr,vi,zh"),
    # Not listed in evaluate.py (an empty list there); the XTREME-R paper's LAReQA XQuAD-R languages.
    "lareqa": _langs("ar,de,el,en,es,hi,ru,th,tr,vi,zh"),
    "mewslix": _langs("ar,de,en,es,fa,ja,pl,ro,ta,tr,uk"),
    "xquad": XTREME_LANGS["xquad"] + ("ro",),
    "mlqa": XTREME_LANGS["mlqa"],
    "tydiqa": XTREME_LANGS["tydiqa"],
}

_COMMON = dict(role="target")
_TASKS = [
    TaskSpec("pawsx", "pair", "accuracy", XTREME_LANGS["pawsx"], labels=("0", "1"), category="classification",
             train_task="PAWS-X English train", display_name="PAWS-X", **_COMMON),
    TaskSpec("xnli", "pair", "accuracy", XTREME_LANGS["xnli"], labels=XNLI_LABELS, category="classification",
             train_task="MNLI", display_name="XNLI", **_COMMON),
    TaskSpec("xcopa", "choice", "accuracy", XTREME_R_LANGS["xcopa"], num_choices=2, category="classification",
             train_task="SIQA, then COPA", display_name="XCOPA", **_COMMON),
    TaskSpec("udpos", "tagging", "span_f1", XTREME_LANGS["udpos"], labels=UPOS, category="structured prediction",
             train_task="UD-POS English (EWT, GUM, LinES, ParTUT)", display_name="UD-POS", **_COMMON),
    TaskSpec("panx", "tagging", "span_f1", XTREME_LANGS["panx"], labels=PANX_TAGS,
             category="structured prediction", train_task="PAN-X English train", display_name="PAN-X", **_COMMON),
    TaskSpec("xquad", "qa", "squad", XTREME_LANGS["xquad"], category="question answering",
             train_task="SQuAD v1.1", display_name="XQuAD", **_COMMON),
    TaskSpec("mlqa", "qa", "mlqa", XTREME_LANGS["mlqa"], category="question answering",
             train_task="SQuAD v1.1", display_name="MLQA", **_COMMON),
    TaskSpec("tydiqa", "qa", "squad", XTREME_LANGS["tydiqa"], category="question answering",
             train_task="TyDiQA-GoldP English train", display_name="TyDiQA-GoldP", **_COMMON),
    TaskSpec("bucc2018", "mining", "bucc_f1", XTREME_LANGS["bucc2018"], category="retrieval",
             display_name="BUCC 2018", **_COMMON),
    TaskSpec("tatoeba", "retrieval", "retrieval_accuracy", XTREME_LANGS["tatoeba"], category="retrieval",
             display_name="Tatoeba", **_COMMON),
    TaskSpec("mewslix", "ranking", "map@20", XTREME_R_LANGS["mewslix"], category="retrieval",
             train_task="Mewsli-X English Wikipedia mentions", display_name="Mewsli-X", **_COMMON),
    TaskSpec("lareqa", "ranking", "map@20", XTREME_R_LANGS["lareqa"], category="retrieval",
             train_task="SQuAD v1.1 (retrieval form)", display_name="LAReQA", **_COMMON),
]
TARGET_TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}


def _intermediate(name, fmt, display, labels=(), num_choices=0, description="", metric=""):
    metric = metric or ("accuracy" if fmt in ("pair", "choice") else ("squad" if fmt == "qa" else "span_f1"))
    return TaskSpec(name, fmt, metric, ("en",), labels=labels, num_choices=num_choices, role="intermediate",
                    display_name=display, description=description)


# Label names in Hugging Face order; loaders map labels by name, so the order only fixes the head's ids.
INTERMEDIATE_TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _intermediate("squad", "qa", "SQuAD v1.1"),
    _intermediate("squad_v2", "qa", "SQuAD v2.0", description="unanswerable questions have no gold answer",
                  metric="squad_v2"),
    _intermediate("mnli", "pair", "MNLI", labels=("entailment", "neutral", "contradiction")),
    _intermediate("qqp", "pair", "QQP", labels=("not_duplicate", "duplicate")),
    _intermediate("anli", "pair", "ANLI", labels=("entailment", "neutral", "contradiction")),
    _intermediate("hellaswag", "choice", "HellaSwag", num_choices=4),
    _intermediate("cosmosqa", "choice", "Cosmos QA", num_choices=4),
    _intermediate("commonsenseqa", "choice", "CommonsenseQA", num_choices=5),
    _intermediate("ccg", "tagging", "CCG supertagging", description="CCGbank is licensed: local files only; "
                  "the tag set is read from the training file"),
    # Training stages of XTREME-R's XCOPA (Social IQa, then English COPA); usable as conditions too.
    _intermediate("siqa", "choice", "Social IQa", num_choices=3),
    _intermediate("copa", "choice", "COPA", num_choices=2, description="English COPA, XCOPA's training set"),
]}


@dataclass(frozen=True)
class EnglishTraining:
    """How a benchmark trains a target task on English: the task whose English train split trains it, the
    task whose English dev split chooses the checkpoint ("" = a held-out slice of the training rows, for
    TyDiQA-GoldP, whose dev set is XTREME's test set), and tasks trained before it (each selected on its own
    English dev)."""
    train: str
    dev: str
    before: tuple[str, ...] = ()


ENGLISH_TRAINING: dict[str, EnglishTraining] = {
    "xnli": EnglishTraining("mnli", "xnli"),  # MNLI train; XNLI's English dev chooses (labels mapped by name)
    "pawsx": EnglishTraining("pawsx", "pawsx"),
    "udpos": EnglishTraining("udpos", "udpos"),  # every English treebank, concatenated
    "panx": EnglishTraining("panx", "panx"),
    "xquad": EnglishTraining("squad", "squad"),  # one SQuAD v1.1 model serves XQuAD and MLQA
    "mlqa": EnglishTraining("squad", "squad"),
    "tydiqa": EnglishTraining("tydiqa", ""),  # the English slice of TyDiQA-GoldP train
    "xcopa": EnglishTraining("copa", "copa", before=("siqa",)),
    "mewslix": EnglishTraining("mewslix", "mewslix"),  # wikipedia_pairs-{train,dev}: English mention/entity pairs
    "lareqa": EnglishTraining("squad", "squad"),  # SQuAD v1.1 in retrieval form (question -> answer sentence)
}


@dataclass(frozen=True)
class Suite:
    name: str
    languages: dict[str, tuple[str, ...]]  # task -> languages, in the official order
    groups: dict[str, tuple[str, ...]]  # official group key -> tasks
    specs: dict[str, TaskSpec] = field(default_factory=dict)  # the suite's own tasks (default: TARGET_TASKS)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.languages)

    def task(self, name: str) -> TaskSpec:
        """The task with this suite's language list (XTREME-R extends some of XTREME's)."""
        if name not in self.languages:
            raise ValueError(f"suite {self.name}: unknown task {name!r}; expected one of {', '.join(self.tasks)}")
        spec = self.specs.get(name) or TARGET_TASKS[name]
        if spec.languages == self.languages[name]:
            return spec
        return TaskSpec(**{**spec.__dict__, "languages": self.languages[name]})

    def extension(self, name: str) -> str:
        """File extension of the task's leaderboard files (evaluate.py `get_suffix`)."""
        if name in self.groups["qa"] or name in ("mewslix", "lareqa"):
            return "json"
        if name in self.groups.get("multi_choice", ()):
            return "jsonl"
        return "tsv"


SUITES: dict[str, Suite] = {
    "xtreme": Suite("xtreme", XTREME_LANGS, {
        "classification": ("pawsx", "xnli"), "tagging": ("udpos", "panx"), "qa": ("xquad", "mlqa", "tydiqa"),
        "retrieval": ("bucc2018", "tatoeba")}),
    "xtreme-r": Suite("xtreme-r", XTREME_R_LANGS, {
        "classification": ("xnli", "xcopa"), "tagging": ("udpos", "panx"), "qa": ("xquad", "mlqa", "tydiqa"),
        "retrieval": ("tatoeba", "mewslix"), "multi_choice": ("xcopa",)}),
}


def synthetic_suite(languages: tuple[str, ...] = SYNTHETIC_LANGUAGES) -> Suite:
    """The built-in synthetic suite (eval/synthetic) as a Suite, so its predictions are written and scored in the
    leaderboard layout like XTREME's. Groups by the XTREME category each task imitates."""
    specs = task_specs(tuple(languages))
    groups = {"classification": ("syn-xnli",), "tagging": ("syn-pos", "syn-panx"), "qa": ("syn-xquad",),
              "retrieval": ("syn-tatoeba",)}
    return Suite("synthetic", {t: specs[t].languages for t in SYNTHETIC_TARGETS}, groups,
                 {t: specs[t] for t in SYNTHETIC_TARGETS})


SUITES["synthetic"] = synthetic_suite()


def suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")
    return SUITES[name]


# ----- where the data lives on the Hugging Face hub ----------------------------------------------------------
@dataclass(frozen=True)
class HubSource:
    dataset: str
    config: str = ""  # may contain {lang}, {name} (English language name), {iso3} (Tatoeba code)
    splits: tuple[str, ...] = ("train", "validation", "test")
    note: str = ""


HUB: dict[str, HubSource] = {
    "xnli": HubSource("google/xtreme", "XNLI", ("validation", "test"), "rows of all languages; train is MNLI"),
    "pawsx": HubSource("google/xtreme", "PAWS-X.{lang}"),
    "panx": HubSource("google/xtreme", "PAN-X.{lang}"),
    "udpos": HubSource("google/xtreme", "udpos.{name}"),
    "xquad": HubSource("google/xtreme", "XQuAD.{lang}", ("validation",), "XQuAD's only split is its test set"),
    "mlqa": HubSource("google/xtreme", "MLQA.{lang}.{lang}", ("validation", "test")),
    "tydiqa": HubSource("google/xtreme", "tydiqa", ("train", "validation"),
                        "all languages in one config; XLT keeps the English slice for training"),
    "bucc2018": HubSource("google/xtreme", "bucc18.{lang}", ("validation", "test")),
    "tatoeba": HubSource("google/xtreme", "tatoeba.{iso3}", ("validation",)),
    "xcopa": HubSource("cambridgeltl/xcopa", "{lang}", ("validation", "test")),
    "squad": HubSource("rajpurkar/squad", "", ("train", "validation")),
    "squad_v2": HubSource("rajpurkar/squad_v2", "", ("train", "validation")),
    "mnli": HubSource("nyu-mll/glue", "mnli", ("train", "validation_matched")),
    "qqp": HubSource("nyu-mll/glue", "qqp", ("train", "validation")),
    "anli": HubSource("facebook/anli", "", ("train_r1", "dev_r1", "test_r1")),
    "hellaswag": HubSource("Rowan/hellaswag", "", ("train", "validation")),
    "cosmosqa": HubSource("allenai/cosmos_qa", "", ("train", "validation")),
    "commonsenseqa": HubSource("tau/commonsense_qa", "", ("train", "validation")),
    "siqa": HubSource("allenai/social_i_qa", "", ("train", "validation")),
    "copa": HubSource("super_glue", "copa", ("train", "validation")),
}


def any_task(name: str) -> TaskSpec:
    """A target task (XTREME-R language lists where they are longer) or an intermediate task, by name."""
    if name in INTERMEDIATE_TASKS:
        return INTERMEDIATE_TASKS[name]
    if name in XTREME_R_LANGS:
        return SUITES["xtreme-r"].task(name)
    if name in TARGET_TASKS:
        return TARGET_TASKS[name]
    known = sorted(TARGET_TASKS) + sorted(INTERMEDIATE_TASKS)
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(known)}")
