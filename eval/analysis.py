"""The analysis view of a suite's scores, which XLT calls "XTREME-A".

No public source defines an "XTREME-A"; the name is XLT's own, for this view of any suite (XTREME, XTREME-R,
the synthetic suite). Per task it reports:
- `english`: the English score (absent when English is not among the task's test languages);
- `zero_shot_mean`: the mean over the other languages;
- `gap`: english - zero_shot_mean, the cross-lingual transfer gap as the XTREME paper reports it (Table 3);
- `ratio`: zero_shot_mean / english, and, given the task's chance score, `chance_corrected_ratio`:
  (zero_shot_mean - chance) / (english - chance), the share of the above-chance English skill that transfers
  (absent when English is not above chance);
- `worst`: the lowest-scoring language and its score;
- `by_family` / `by_script`: means over the languages of each family / script (eval.languages).
Scores are the task scores per language (0-100), e.g. `avg_metric`'s parts from eval.score.
"""
from __future__ import annotations

from typing import Mapping

from .languages import language

ANALYSIS_NAME = "XTREME-A (XLT's own analysis view; not a published benchmark)"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _group_means(scores: Mapping[str, float], key) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for lang, value in scores.items():
        groups.setdefault(key(lang), []).append(value)
    return {name: _mean(values) for name, values in sorted(groups.items())}


def task_view(scores: Mapping[str, float], chance: float | None = None) -> dict:
    """The analysis of one task's per-language scores; `chance` (0-100) adds the chance-corrected ratio."""
    if not scores:
        raise ValueError("analysis: a task needs at least one language score")
    others = {lang: v for lang, v in scores.items() if lang != "en"}
    worst = min(scores, key=lambda lang: (scores[lang], lang))
    view: dict = {"languages": len(scores), "mean": _mean(scores.values())}
    if "en" in scores:
        view["english"] = scores["en"]
    if others:
        view["zero_shot_mean"] = _mean(others.values())
        if "en" in scores:
            view["gap"] = scores["en"] - view["zero_shot_mean"]
            if scores["en"]:
                view["ratio"] = view["zero_shot_mean"] / scores["en"]
            if chance is not None and scores["en"] > chance:
                view["chance_corrected_ratio"] = (view["zero_shot_mean"] - chance) / (scores["en"] - chance)
    view["worst"] = {"language": worst, "score": scores[worst]}
    view["by_family"] = _group_means(scores, lambda lang: language(lang).family)
    view["by_script"] = _group_means(scores, lambda lang: language(lang).script)
    return view


def suite_view(task_scores: Mapping[str, Mapping[str, float]], chance: Mapping[str, float] | None = None) -> dict:
    """Per-task views, plus the mean gap over the tasks that have one (the XTREME paper's average gap).
    `chance` maps tasks to their chance score (see task_view)."""
    tasks = {name: task_view(scores, (chance or {}).get(name)) for name, scores in task_scores.items()}
    gaps = [v["gap"] for v in tasks.values() if "gap" in v]
    out: dict = {"name": ANALYSIS_NAME, "tasks": tasks}
    if gaps:
        out["mean_gap"] = _mean(gaps)
    return out


def language_scores(detailed: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """Per task, the per-language score XTREME averages, from eval.score's per-task dicts: (EM + f1) / 2 for
    QA, else f1, accuracy or map@20."""
    out = {}
    for task, result in detailed.items():
        if "exact_match" in result:
            out[task] = {lang: (em + result["f1"][lang]) / 2 for lang, em in result["exact_match"].items()}
        else:
            key = next(k for k in ("f1", "accuracy", "map@20") if k in result)
            out[task] = dict(result[key])
    return out


def markdown(view: dict) -> str:
    """The view as a table: task, English, zero-shot mean, gap, worst language."""
    lines = [f"# {view['name']}", "", "| task | English | zero-shot mean | gap | worst |", "|---|---|---|---|---|"]

    def fmt(v):
        return "–" if v is None else f"{v:.1f}"

    for task, v in view["tasks"].items():
        worst = f"{v['worst']['language']} ({v['worst']['score']:.1f})"
        lines.append(f"| {task} | {fmt(v.get('english'))} | {fmt(v.get('zero_shot_mean'))} | {fmt(v.get('gap'))} "
                     f"| {worst} |")
    if "mean_gap" in view:
        lines += ["", f"Mean transfer gap over tasks with English: {view['mean_gap']:.1f}"]
    return "\n".join(lines) + "\n"
