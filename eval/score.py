"""Score a leaderboard submission as google-research/xtreme `evaluate.py` does: same folder layout, same JSON.

    python -m eval.score PRED_DIR LABEL_DIR [--suite xtreme|xtreme-r|synthetic] [--partial] [--out FILE]

Both folders hold `<task>/test-<lang>.<ext>` (tsv for classification, tagging and retrieval, json for QA and
Mewsli-X / LAReQA, jsonl for XCOPA). A task is scored when both folders have its subfolder, so a partial
submission (some tasks only) gets its task scores, and group / suite scores appear only when all their tasks
are there, as in the official script. The JSON is the official one: `all_task` (the suite score), the group
scores, then per task `{metric: {lang: value}}`, `avg_<metric>` and `avg_metric`.

One deliberate difference: `evaluate.py` sums the task scores for `all_task` in the iteration order of a
Python set, so its last digits change with PYTHONHASHSEED (62.17319850507246 or ...248 on its mock data); XLT
sums in the official task-list order (the order of the JSON), which gives 62.17319850507248 every time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import metrics
from .loaders import read_json
from .suites import SUITES, Suite, suite as get_suite
from .tasks import TaskSpec


class ScoreError(ValueError):
    """A submission or label file that cannot be scored; the message names the file."""


# ----- leaderboard file readers (evaluate.py's READER_FUNCTION) ----------------------------------------------
def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def read_tags(path: Path) -> list[list[str]]:
    """One tag per line, sentences separated by blank lines."""
    sentences, current = [], []
    for line in read_lines(path):
        if line:
            current.append(line)
        else:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def read_qa_labels(path: Path) -> dict[str, list[str]]:
    """Question id -> gold answer texts, in file order, from a SQuAD-format JSON file."""
    data = read_json(path, ScoreError)
    articles = data["data"] if isinstance(data, dict) and "data" in data else data
    answers: dict[str, list[str]] = {}
    try:
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    if qa["id"] in answers:
                        raise ScoreError(f"{path}: question id {qa['id']!r} appears twice")
                    answers[qa["id"]] = [a["text"] for a in qa["answers"]]
    except (KeyError, TypeError) as err:
        raise ScoreError(f"{path}: not SQuAD-format JSON (data -> paragraphs -> qas -> answers): {err!r}") from None
    return answers


def read_mapping(path: Path) -> dict:
    data = read_json(path, ScoreError)
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object mapping ids to answers")
    return data


def read_xcopa(path: Path) -> list:
    labels = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                labels.append(json.loads(line)["label"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ScoreError(f"{path}:{n}: expected a JSON object with a 'label' field") from None
    return labels


# ----- one file pair ----------------------------------------------------------------------------------------
def score_file(task: TaskSpec, pred_path: Path, label_path: Path, lang: str) -> dict[str, float]:
    """The official per-language result dict (same keys, same key order) for one prediction/label pair."""
    name = task.name
    try:
        if task.metric in ("squad", "mlqa"):
            gold, pred = read_qa_labels(label_path), read_mapping(pred_path)
            out = metrics.squad_scores(pred, gold) if task.metric == "squad" else metrics.mlqa_scores(pred, gold, lang)
            return {"exact_match": out["exact_match"], "f1": out["f1"]}
        if task.metric == "map@20":
            return {"map@20": metrics.map_at_k(read_mapping(pred_path), read_mapping(label_path), 20)}
        if task.metric == "bucc_f1":
            return metrics.bucc_f1(read_lines(pred_path), read_lines(label_path))
        if task.format == "choice":
            pred, gold = read_xcopa(pred_path), read_xcopa(label_path)
        elif task.format == "tagging":
            pred, gold = read_tags(pred_path), read_tags(label_path)
        else:
            pred, gold = read_lines(pred_path), read_lines(label_path)
        if len(pred) != len(gold):
            raise ScoreError(f"{pred_path}: {len(pred)} examples but {len(gold)} in {label_path}")
        if task.format == "tagging":
            out = metrics.span_f1(pred, gold)
            return {"f1": out["f1"], "precision": out["precision"], "recall": out["recall"]}
        # Tatoeba too: evaluate.py compares the index lines as text.
        return {"accuracy": metrics.accuracy(pred, gold)}
    except ScoreError:
        raise
    except ValueError as err:
        raise ScoreError(f"{name} {lang}: {pred_path}: {err}") from None


def score_task(suite: Suite, name: str, pred_dir: Path, label_dir: Path, languages=None) -> dict:
    """Per-metric, per-language scores of one task, their averages and `avg_metric` (the task score).
    `languages` (default: all of the task's) scores a subset, for partial runs."""
    task, ext = suite.task(name), suite.extension(name)
    per_metric: dict[str, dict[str, float]] = {}
    for lang in languages or task.languages:
        pred_path, label_path = pred_dir / name / f"test-{lang}.{ext}", label_dir / name / f"test-{lang}.{ext}"
        for path in (pred_path, label_path):
            if not path.is_file():
                raise ScoreError(f"{path} is missing: task {name} in {suite.name} needs test-<lang>.{ext} for "
                                 f"every language: {', '.join(task.languages)}")
        for metric, value in score_file(task, pred_path, label_path, lang).items():
            per_metric.setdefault(metric, {})[lang] = value
    result: dict = dict(per_metric)
    for metric, values in per_metric.items():
        result[f"avg_{metric}"] = sum(values.values()) / len(values)
    if task.format == "qa":
        result["avg_metric"] = (result["avg_exact_match"] + result["avg_f1"]) / 2
    else:
        key = next(k for k in ("avg_f1", "avg_accuracy", "avg_map@20") if k in result)
        result["avg_metric"] = result[key]
    return result


def evaluate(pred_dir: str | Path, label_dir: str | Path, suite: str | Suite = "xtreme",
             partial: bool = False) -> tuple[dict, dict]:
    """(group scores, per-task scores) exactly as evaluate.py's `evaluate` returns them. With `partial`, a task
    is scored on the languages that have a prediction file (a run on some languages only); group and suite
    scores still need every language of their tasks."""
    spec = get_suite(suite) if isinstance(suite, str) else suite
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    for folder in (pred_dir, label_dir):
        if not folder.is_dir():
            raise ScoreError(f"{folder}: not a folder")
    detailed, scored = {}, {}
    for name in spec.tasks:
        if not ((pred_dir / name).is_dir() and (label_dir / name).is_dir()):
            continue
        languages = list(spec.task(name).languages)
        if partial:
            ext = spec.extension(name)
            languages = [lang for lang in languages if (pred_dir / name / f"test-{lang}.{ext}").is_file()]
            if not languages:
                continue
        detailed[name] = score_task(spec, name, pred_dir, label_dir, languages)
        scored[name] = languages
    return suite_scores(spec, detailed, scored), detailed


def suite_scores(spec: Suite, detailed: dict, scored: dict[str, list[str]]) -> dict:
    """`all_task` and the group scores (evaluate.py's `group_scores`) over the tasks scored on all their
    languages; `scored` maps each task in `detailed` to the languages it was scored on."""
    complete = {t for t in detailed if list(scored[t]) == list(spec.task(t).languages)}
    overall = {}
    if complete == set(spec.tasks):
        overall["all_task"] = sum(detailed[t]["avg_metric"] for t in spec.tasks) / len(spec.tasks)
    for group, tasks in spec.groups.items():
        if set(tasks) <= complete:
            overall[group] = sum(detailed[t]["avg_metric"] for t in tasks) / len(tasks)
    return overall


def write_json_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def summary_lines(overall: dict, detailed: dict) -> list[str]:
    lines = [f"{task}: {scores['avg_metric']:.2f}" for task, scores in detailed.items()]
    lines += [f"[{group}]: {value:.2f}" for group, value in overall.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("pred_dir", type=Path, help="predictions: <task>/test-<lang>.<ext>")
    parser.add_argument("label_dir", type=Path, help="gold labels in the same layout")
    parser.add_argument("--suite", default="xtreme", choices=sorted(SUITES), help="language lists and groups")
    parser.add_argument("--out", type=Path, help="write the official JSON here (default: print it)")
    parser.add_argument("--partial", action="store_true",
                        help="score each task on the languages that have a prediction file (runs on some languages)")
    args = parser.parse_args(argv)
    try:
        overall, detailed = evaluate(args.pred_dir, args.label_dir, args.suite, args.partial)
    except (ScoreError, OSError) as err:
        print(f"eval.score: {err}", file=sys.stderr)
        return 2
    if not detailed:
        print(f"eval.score: no task of {args.suite} ({', '.join(SUITES[args.suite].tasks)}) has a folder in both "
              f"{args.pred_dir} and {args.label_dir}", file=sys.stderr)
        return 2
    result = {**overall, **detailed}
    if args.out:
        write_json_atomically(args.out, result)
        print("\n".join(summary_lines(overall, detailed)))
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
