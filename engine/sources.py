"""Data sources: where the protocol's tasks and rows come from. The protocol asks a source for task specs and
`(task, split, language)` rows and never which source it is running on.

- `SyntheticSource`: the built-in multilingual world (eval/synthetic), with its own pretraining corpus.
- `BenchmarkSource`: XTREME or XTREME-R (eval.suites) and the English intermediate tasks, read by eval.loaders
  from the official raw files under `data.dir`, or from the Hugging Face hub.

For a target task, `rows(task, "train" | "dev", "en")` are the English rows the benchmark trains and selects it
on (eval.suites.ENGLISH_TRAINING: XNLI trains on MNLI with its labels mapped by name, XQuAD and MLQA on SQuAD
v1.1, LAReQA on SQuAD in retrieval form, ...), and `rows(task, "test", lang)` its evaluation rows. Intermediate
tasks have English train and dev rows only.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from pathlib import Path

from eval import loaders
from eval.languages import language
from eval.suites import ENGLISH_TRAINING, INTERMEDIATE_TASKS, SUITES, Suite
from eval.synthetic import SyntheticWorld
from eval.tasks import TaskSpec

SUITE_NAMES = ("synthetic", "xtreme", "xtreme-r")
HELD_OUT = 10  # TyDiQA-GoldP: 1 in HELD_OUT English training questions (by id hash) chooses the checkpoint


@dataclass(frozen=True)
class Training:
    """How a fine-tuned target is trained: stages in order, each on its own English train rows and chosen on its
    own English dev rows; the last stage is the target itself. Targets with the same `key` share one model."""
    stages: tuple[str, ...]
    key: str


class Source:
    """The interface the protocol uses (see the module docstring)."""
    name: str
    suite: Suite  # the targets, their official language lists and groups, and the leaderboard layout
    intermediates: tuple[str, ...]  # tasks a condition can train on
    default_conditions: tuple[str, ...]
    world: SyntheticWorld | None = None  # a pretraining corpus, where the source has one

    @property
    def targets(self) -> tuple[str, ...]:
        return self.suite.tasks

    def task(self, name: str) -> TaskSpec:
        """A target (with the suite's language list) or an intermediate task; ValueError when unknown."""
        raise NotImplementedError

    def training(self, target: str) -> Training:
        raise NotImplementedError

    def rows(self, task: str, split: str, lang: str) -> list[dict]:
        raise NotImplementedError

    def describe(self, lang: str) -> str:
        raise NotImplementedError


class SyntheticSource(Source):
    name = "synthetic"
    default_conditions = ("baseline", "syn-mnli", "syn-squad")

    def __init__(self, world: SyntheticWorld):
        self.world = world
        # the suite of every synthetic language, as `eval.score --suite synthetic` reads it: group and suite
        # scores appear when every language was run
        self.suite = SUITES["synthetic"]
        self.intermediates = tuple(n for n, t in world.tasks.items() if t.role == "intermediate")

    def task(self, name: str) -> TaskSpec:
        if name not in self.world.tasks:
            raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(self.world.tasks)}")
        return self.world.tasks[name]

    def training(self, target: str) -> Training:
        return Training((target,), target)

    def rows(self, task: str, split: str, lang: str) -> list[dict]:
        return self.world.load(task, split, lang)

    def describe(self, lang: str) -> str:
        return self.world.languages[lang].spec.description


class BenchmarkSource(Source):
    default_conditions = ("baseline", "squad", "mnli")

    def __init__(self, suite_name: str, data_dir: str | Path | None):
        self.name = suite_name
        self.suite = SUITES[suite_name]
        self.data_dir = Path(data_dir) if data_dir else None
        self.intermediates = tuple(INTERMEDIATE_TASKS)
        self._memo: dict = {}
        self._ccg: TaskSpec | None = None

    def task(self, name: str) -> TaskSpec:
        if name in self.suite.tasks:
            return self.suite.task(name)
        if name == "ccg":  # the tag set is the training file's
            if self._ccg is None:
                tags = sorted({t for r in self._load("ccg", "train", "en") for t in r["tags"]})
                self._ccg = replace(INTERMEDIATE_TASKS["ccg"], labels=tuple(tags))
            return self._ccg
        if name in INTERMEDIATE_TASKS:
            return INTERMEDIATE_TASKS[name]
        raise ValueError(f"unknown task {name!r} for {self.name}; targets: {', '.join(self.suite.tasks)}; "
                         f"intermediate tasks: {', '.join(INTERMEDIATE_TASKS)}")

    def training(self, target: str) -> Training:
        how = ENGLISH_TRAINING[target]
        key = f"{how.train}/{how.dev or 'held-out'}/{self.task(target).format}/{'+'.join(how.before)}"
        return Training(how.before + (target,), key)

    def rows(self, task: str, split: str, lang: str) -> list[dict]:
        if task not in ENGLISH_TRAINING or split == "test":  # intermediate tasks, retrieval's own splits, tests
            return self._load(task, split, lang)
        if lang != "en":
            raise ValueError(f"{task}: training data is English only (zero-shot transfer), not {lang!r}")
        how = ENGLISH_TRAINING[task]
        if task == "tydiqa":  # XTREME's TyDiQA test set is TyDiQA-GoldP dev: hold English train rows out instead
            rows = self._load("tydiqa", "train", "en")
            return [r for r in rows if _held_out(r["id"]) == (split == "dev")]
        source = how.train if split == "train" else how.dev
        if task == "mewslix":
            return self._memoised(("mewslix-pairs", split), lambda: loaders.load_mewslix_pairs(
                self._local("mewslix"), "en", split))
        rows = self._load(source, split, "en")
        if task == "lareqa":
            return self._memoised(("lareqa", split), lambda: loaders.squad_as_retrieval(rows))
        if source != task and self.task(task).format == "pair":  # e.g. MNLI rows for XNLI: labels by name
            names, target = self.task(source).labels, self.task(task).labels
            return [r | {"label": target.index(names[r["label"]])} for r in rows]
        return rows

    def describe(self, lang: str) -> str:
        entry = language(lang)
        return f"{entry.name} ({entry.family}, {entry.script} script)"

    def _load(self, task: str, split: str, lang: str) -> list[dict]:
        return self._memoised((task, split, lang), lambda: loaders.load(task, lang, split, self.data_dir))

    def _local(self, task: str) -> Path:
        if self.data_dir is None:
            raise loaders.DataUnavailable(f"{task}: not on the Hugging Face hub ({loaders.NOT_ON_HUB[task]}); "
                                          "pass the official files with --data.dir DIR")
        return self.data_dir

    def _memoised(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def _held_out(example_id: str) -> bool:
    return int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % HELD_OUT == 0


def subset(rows: list[dict], limit: int, key: str) -> list[dict]:
    """At most `limit` rows (0 = all): a fixed random sample in the original order, the same in every run and
    condition (seeded by `key`, not by run.seed, so that conditions and seeds see the same data)."""
    if not limit or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(f"xlt-subset-{key}").sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def make_source(suite: str, world: SyntheticWorld | None, data_dir: str) -> Source:
    if suite == "synthetic":
        return SyntheticSource(world)
    if suite in SUITES:
        return BenchmarkSource(suite, data_dir or None)
    raise ValueError(f"protocol.suite {suite!r}: expected one of {', '.join(SUITE_NAMES)}")
