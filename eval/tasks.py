"""Tasks are data: a task names its format, labels, metric and languages; loaders yield rows.

Row layouts per format (the Hugging Face `datasets` layouts of the XTREME tasks, so real and synthetic
tasks flow through the same pipeline):
- pair:      {"sentence1": str, "sentence2": str | None, "label": int}          (XNLI, PAWS-X)
- tagging:   {"tokens": [str], "tags": [str]}                                  (UD-POS, PAN-X)
- qa:        {"id": str, "context": str, "question": str,
              "answers": {"text": [str], "answer_start": [int]}}               (SQuAD, XQuAD, MLQA)
- choice:    {"context": str, "endings": [str], "label": int}                  (HellaSwag, XCOPA)
- retrieval: {"source": str, "target": str}, row i of a language aligned with row i  (Tatoeba)
- mining:    {"side": "source" | "target", "id": str, "text": str}, plus {"side": "gold", "id": "src<TAB>tgt"}
             rows for the gold pairs                                            (BUCC 2018)
- ranking:   {"id": str, "query": str, "answers": [str]} query rows (Mewsli-X adds "language"), then the
             task's whole pool as {"id": str, "candidate": str} rows; answers are candidate ids
             (Mewsli-X, LAReQA: scored from ranked candidate ids, mAP@20)
"""
from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("pair", "tagging", "qa", "choice", "retrieval", "mining", "ranking")
# The models.heads kind each format trains (retrieval and mining use the bare encoder).
HEADS = {"pair": "pair", "tagging": "tagging", "qa": "qa", "choice": "choice", "retrieval": "", "mining": "",
         "ranking": "dual-encoder"}
CATEGORIES = ("classification", "structured prediction", "question answering", "retrieval")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    format: str
    metric: str  # a name known to eval.metrics.score
    languages: tuple[str, ...]  # languages with test data (English first)
    labels: tuple[str, ...] = ()  # class names (pair, choice has none) or tag set (tagging)
    num_choices: int = 0
    category: str = ""
    role: str = "target"  # target | intermediate
    description: str = ""
    train_task: str = ""  # the English task a zero-shot model is fine-tuned on ("" when none is needed)
    display_name: str = ""  # the benchmark's own name (XNLI, PAN-X, ...); `name` is the leaderboard folder

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"task {self.name}: format {self.format!r}: expected one of {', '.join(FORMATS)}")

    @property
    def head(self) -> str:
        return HEADS[self.format]

    @property
    def needs_training(self) -> bool:
        return self.format not in ("retrieval", "mining")

    @property
    def chance(self) -> float:
        """Score of a uniform random guess (0-100) where it is well defined, for sanity checks."""
        if self.format == "pair":
            return 100.0 / len(self.labels)
        if self.format == "choice":
            return 100.0 / self.num_choices
        return 0.0
