"""Summaries of a study's scores: English vs zero-shot mean, the transfer gap, deltas vs baseline, and
the Markdown table printed at the end of a run."""
from __future__ import annotations

from statistics import mean

from eval.tasks import TaskSpec

BASELINE = "baseline"


def summarize(scores: dict, chance: dict[str, float]) -> dict:
    """Per condition and task: English score, zero-shot mean over the other languages, gap (en - mean),
    ratio (mean / en), the chance-corrected ratio ((mean - chance) / (en - chance), None unless English is
    above chance), worst language; and each condition's deltas against the baseline."""
    per_condition = {}
    for condition, by_task in scores.items():
        per_condition[condition] = {}
        for task, by_lang in by_task.items():
            others = {lang: s for lang, s in by_lang.items() if lang != "en"}
            en = by_lang.get("en")
            zs = mean(others.values()) if others else None
            worst = min(others, key=others.get) if others else None
            per_condition[condition][task] = {
                "en": en, "zero_shot_mean": zs,
                "gap": en - zs if en is not None and zs is not None else None,
                "ratio": zs / en if en and zs is not None else None,
                "chance_corrected_ratio": ((zs - chance[task]) / (en - chance[task])
                                           if en is not None and zs is not None and en > chance[task] else None),
                "worst_language": worst,
            }
    deltas = {}
    if BASELINE in per_condition:
        base = per_condition[BASELINE]
        for condition, by_task in per_condition.items():
            if condition == BASELINE:
                continue
            deltas[condition] = {}
            for task, s in by_task.items():
                b = base.get(task)
                if b is None:
                    continue
                deltas[condition][task] = {k: (s[k] - b[k] if s[k] is not None and b[k] is not None else None)
                                           for k in ("en", "zero_shot_mean")}
    return {"by_condition": per_condition, "delta_vs_baseline": deltas}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _signed(x) -> str:
    return "-" if x is None else f"{x:+.1f}"


def table(results: dict, tasks: dict[str, TaskSpec]) -> str:
    scores, summary = results["scores"], results["summary"]
    lines = []
    for condition, by_task in scores.items():
        langs = []
        for by_lang in by_task.values():
            langs += [lang for lang in by_lang if lang not in langs]
        lines += [f"### {condition}", "",
                  "| task | metric | " + " | ".join(langs)
                  + " | zero-shot mean | gap (en - mean) | ratio | chance-corrected ratio |",
                  "|---|---|" + "---:|" * (len(langs) + 4)]
        for task, by_lang in by_task.items():
            s = summary["by_condition"][condition][task]
            cells = [_fmt(by_lang.get(lang)) for lang in langs]
            lines.append(f"| {task} | {tasks[task].metric} | " + " | ".join(cells)
                         + f" | {_fmt(s['zero_shot_mean'])} | {_fmt(s['gap'])} | {_ratio(s['ratio'])} "
                         f"| {_ratio(s['chance_corrected_ratio'])} |")
        suite = {k: v for k, v in results.get("suite", {}).get("scores", {}).get(condition, {}).items()
                 if not isinstance(v, dict)}
        if suite:  # the official group and suite scores (eval.score), where every language was run
            lines += ["", "suite scores: " + ", ".join(f"{k} {v:.1f}" for k, v in suite.items())]
        lines.append("")
    deltas = summary["delta_vs_baseline"]
    if deltas:
        conds = list(deltas)
        lines += ["### intermediate task vs baseline (English / zero-shot mean)", "",
                  "| task | " + " | ".join(conds) + " |", "|---|" + "---:|" * len(conds)]
        for task in next(iter(scores.values())):
            cells = [f"{_signed(deltas[c].get(task, {}).get('en'))} / "
                     f"{_signed(deltas[c].get(task, {}).get('zero_shot_mean'))}" for c in conds]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
