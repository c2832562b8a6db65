"""The study's report, rewritten after every finished cell: per size x architecture x condition the suite,
English and zero-shot scores, the analysis view (transfer gap, chance-corrected ratio), each condition's paired
delta against the baseline of the same size, architecture and seed (mean +- std over seeds, and the per-seed
deltas), cost next to quality (parameters, FLOPs per token, training seconds and tokens / s measured in the
cells), as Markdown and CSV, and PNG plots.

Scores per cell (from its results.json): a task's score is the mean over the languages run (English included,
as XTREME averages); `suite` the mean of the task scores (XTREME's all_task when every language of the suite
was run, otherwise the same mean over the languages run), categories the means of their tasks; `zero_shot`
the mean over tasks of the zero-shot mean (languages other than English), `english` the mean English score,
`gap` english - zero_shot over the tasks that have English, `chance_corrected` the mean chance-corrected
ratio. Standard deviations are over seeds (n - 1 in the denominator; "-" for one seed).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from statistics import mean, stdev

BASELINE = "baseline"
METRICS = ("suite", "english", "zero_shot", "gap", "chance_corrected")


def cell_row(cell, results: dict) -> dict:
    """One cell's flat row: identity, size and cost, scores."""
    (condition, by_task), = results["scores"].items()
    summary = results["summary"]["by_condition"][condition]
    model = results["model"]["model"]
    phases = results["phases"]
    pretrain = phases.get("pretrain", {})
    finetune = [v for k, v in phases.items() if k != "pretrain" and isinstance(v.get("seconds"), (int, float))]
    finetune_s = sum(v["seconds"] for v in finetune)
    tokens = sum(v.get("tokens", 0) for v in finetune)
    task_scores = {t: mean(v.values()) for t, v in by_task.items()}
    with_en = [s for s in summary.values() if s["en"] is not None and s["zero_shot_mean"] is not None]
    corrected = [s["chance_corrected_ratio"] for s in summary.values() if s.get("chance_corrected_ratio") is not None]
    row = {"size": cell.size, "arch": cell.arch, "condition": cell.condition, "seed": cell.seed,
           "parameters": model["parameters"], "active_parameters": model["active_parameters"],
           "flops_per_token": model["flops_per_token"], "pretrain_s": pretrain.get("seconds"),
           "finetune_s": round(finetune_s, 1), "tokens_per_s": round(tokens / finetune_s, 1) if finetune_s else None,
           "suite": mean(task_scores.values()),
           "english": mean(s["en"] for s in with_en) if with_en else None,
           "zero_shot": mean(s["zero_shot_mean"] for s in summary.values() if s["zero_shot_mean"] is not None),
           "gap": mean(s["gap"] for s in with_en) if with_en else None,
           "chance_corrected": mean(corrected) if corrected else None}
    for task, s in summary.items():
        row[f"{task}:en"], row[f"{task}:zero_shot"] = s["en"], s["zero_shot_mean"]
    return row


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": mean(values), "std": stdev(values) if len(values) > 1 else None, "n": len(values)}


def aggregate(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(summary per size x arch x condition, paired deltas vs baseline per size x arch x condition)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["arch"], r["condition"]), []).append(r)
    score_keys = [k for k in rows[0] if k in METRICS or ":" in k] if rows else []
    summary = []
    for (size, arch, condition), members in groups.items():
        out = {"size": size, "arch": arch, "condition": condition, "seeds": sorted(m["seed"] for m in members)}
        for key in ("parameters", "active_parameters", "flops_per_token"):
            out[key] = members[0][key]
        for key in ("pretrain_s", "finetune_s", "tokens_per_s"):
            out[key] = _stats([m[key] for m in members])["mean"]
        for key in score_keys:
            out[key] = _stats([m.get(key) for m in members])
        summary.append(out)
    by_cell = {(r["size"], r["arch"], r["condition"], r["seed"]): r for r in rows}
    deltas = []
    for (size, arch, condition), members in groups.items():
        if condition == BASELINE:
            continue
        out = {"size": size, "arch": arch, "condition": condition, "active_parameters": members[0]["active_parameters"]}
        paired = [(m, by_cell.get((size, arch, BASELINE, m["seed"]))) for m in members]
        paired = [(m, b) for m, b in paired if b is not None]
        out["seeds"] = sorted(m["seed"] for m, _ in paired)
        for key in score_keys:
            per_seed = [m[key] - b[key] for m, b in paired if m.get(key) is not None and b.get(key) is not None]
            out[key] = _stats(per_seed) | {"per_seed": per_seed}
        deltas.append(out)
    return summary, deltas


def _fmt(stats, signed: bool = False) -> str:
    if not isinstance(stats, dict):
        return "-" if stats is None else f"{stats:.1f}"
    if stats["mean"] is None:
        return "-"
    text = f"{stats['mean']:+.1f}" if signed else f"{stats['mean']:.1f}"
    return text + (f" ± {stats['std']:.1f}" if stats["std"] is not None else "")


def _millions(n) -> str:
    return f"{n / 1e6:.2f}M"


def markdown(name: str, states: dict, summary: list[dict], deltas: list[dict], tasks: list[str],
             plots: list[str]) -> str:
    counts = {}
    for st in states.values():
        counts[st["state"]] = counts.get(st["state"], 0) + 1
    lines = [f"# Study {name}", "", "cells: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())), ""]
    failed = {cid: st for cid, st in states.items() if st["state"] == "failed"}
    if failed:
        lines += ["Failed cells (their scores are missing below):", ""]
        lines += [f"- `{cid}`: {st.get('error', 'failed')} (log: {st.get('log', '-')})" for cid, st in failed.items()]
        lines.append("")
    lines += ["## Scores by size, architecture and condition (mean ± std over seeds)", "",
              "| size | arch | condition | seeds | active params | total params | FLOPs/token | suite | English "
              "| zero-shot | gap | chance-corrected | pretrain s | fine-tune s | tokens/s |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['size']} | {s['arch']} | {s['condition']} | {len(s['seeds'])} "
                     f"| {_millions(s['active_parameters'])} | {_millions(s['parameters'])} "
                     f"| {s['flops_per_token']:.3g} | {_fmt(s['suite'])} | {_fmt(s['english'])} "
                     f"| {_fmt(s['zero_shot'])} | {_fmt(s['gap'])} | {_ratio(s['chance_corrected'])} "
                     f"| {_fmt(s['pretrain_s'])} | {_fmt(s['finetune_s'])} | {_fmt(s['tokens_per_s'])} |")
    if deltas:
        lines += ["", "## Each condition vs the baseline, paired by seed (same size and architecture)", "",
                  "Mean ± std of the per-seed differences; the per-seed values of the zero-shot mean in brackets.",
                  "", "| size | arch | condition | seeds | Δ suite | Δ English | Δ zero-shot | per seed |",
                  "|---|---|---|---|---:|---:|---:|---|"]
        for d in deltas:
            seeds = ", ".join(f"{v:+.1f}" for v in d["zero_shot"]["per_seed"])
            lines.append(f"| {d['size']} | {d['arch']} | {d['condition']} | {len(d['seeds'])} "
                         f"| {_fmt(d['suite'], True)} | {_fmt(d['english'], True)} | {_fmt(d['zero_shot'], True)} "
                         f"| [{seeds}] |")
    if tasks:
        lines += ["", "## Zero-shot mean per task (mean ± std over seeds)", "",
                  "| size | arch | condition | " + " | ".join(tasks) + " |", "|---|---|---|" + "---:|" * len(tasks)]
        for s in summary:
            lines.append(f"| {s['size']} | {s['arch']} | {s['condition']} | "
                         + " | ".join(_fmt(s.get(f"{t}:zero_shot")) for t in tasks) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"


def _ratio(stats) -> str:
    if not isinstance(stats, dict) or stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")


def _csv(rows: list[dict]) -> str:
    def flat(row):
        out = {}
        for k, v in row.items():
            if isinstance(v, dict):
                out |= {f"{k}_{part}": (json.dumps(x) if isinstance(x, list) else x) for part, x in v.items()}
            else:
                out[k] = json.dumps(v) if isinstance(v, list) else v
        return out

    flat_rows = [flat(r) for r in rows]
    keys = list(dict.fromkeys(k for r in flat_rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(flat_rows)
    return buf.getvalue()


def plot(summary: list[dict], deltas: list[dict], folder: Path) -> list[str]:
    """PNG plots (matplotlib, no display): zero-shot score vs active parameters per architecture and condition;
    transfer gap vs size; each condition's paired delta vs size. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = []

    def lines(ax, items, key, label_of):
        series: dict[str, list] = {}
        for s in items:
            if isinstance(s.get(key), dict) and s[key]["mean"] is not None:
                series.setdefault(label_of(s), []).append((s["active_parameters"], s[key]["mean"], s[key]["std"] or 0))
        for label, points in series.items():
            points.sort()
            x, y, e = zip(*points)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label,
                        linestyle="-" if label.endswith(BASELINE) else "--")
        return bool(series)

    for name, items, key, ylabel, label_of in (
            ("score_vs_active_parameters.png", summary, "zero_shot", "zero-shot mean (0-100)",
             lambda s: f"{s['arch']} {s['condition']}"),
            ("transfer_gap_vs_size.png", summary, "gap", "transfer gap: English - zero-shot",
             lambda s: f"{s['arch']} {s['condition']}"),
            ("delta_vs_size.png", deltas, "zero_shot", "zero-shot delta vs baseline (paired)",
             lambda s: f"{s['arch']} {s['condition']}")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if lines(ax, items, key, label_of):
            ax.set_xscale("log")
            ax.set_xlabel("active parameters")
            ax.set_ylabel(ylabel)
            if name.startswith("delta"):
                ax.axhline(0, color="grey", linewidth=0.8)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            tmp = folder / f".{name}.tmp.png"
            fig.savefig(tmp, dpi=110)
            tmp.replace(folder / name)
            names.append(name)
        plt.close(fig)
    return names


def write_report(out: Path, cells: list, states: dict) -> None:
    """report.md, cells.csv, summary.csv, deltas.csv and plots/ from every done cell's results.json."""
    from .checkpoint import atomic_write_text

    rows, tasks = [], []
    for cell in cells:
        path = out / "cells" / cell.id / "results.json"
        if states.get(cell.id, {}).get("state") == "done" and path.is_file():
            results = json.loads(path.read_text())
            rows.append(cell_row(cell, results))
            tasks += [t for t in next(iter(results["scores"].values())) if t not in tasks]
    summary, deltas = aggregate(rows)
    plots = plot(summary, deltas, out / "plots") if rows else []
    name = json.loads((out / "study.json").read_text())["name"] if (out / "study.json").is_file() else out.name
    atomic_write_text(out / "report.md", markdown(name, states, summary, deltas, tasks, plots))
    atomic_write_text(out / "cells.csv", _csv(rows))
    atomic_write_text(out / "summary.csv", _csv(summary))
    atomic_write_text(out / "deltas.csv", _csv(deltas))


def describe_cells(cells: list, s) -> str:
    """The dry-run listing: every cell with its parameter counts (as configured; nothing is loaded)."""
    from .config import load
    from .protocol import planned_architecture
    from .study import cell_args
    from .train import parse_args

    lines = [f"{len(cells)} cells of study {s.name}:", "",
             "| cell | total params | active params | dense twin | FLOPs/token |", "|---|---:|---:|---:|---:|"]
    seen = {}
    for cell in cells:
        key = (cell.size, cell.arch)
        if key not in seen:
            path, overrides, _ = parse_args(cell_args(cell, s, Path(".")))
            cfg = load(path, overrides)
            try:
                model, dense = planned_architecture(cfg)
                seen[key] = (model.num_parameters(), model.active_parameters(), dense.num_parameters(),
                             model.flops_per_token(cfg.target.max_len))
            except Exception as e:  # e.g. a hub model offline: listed without counts
                seen[key] = (math.nan,) * 4
                lines.insert(1, f"({cell.size}: {e})")
        total, active, dense, gflops = seen[key]
        lines.append(f"| {cell.id} | {total / 1e6:.2f}M | {active / 1e6:.2f}M | {dense / 1e6:.2f}M | {gflops:.3g} |")
    return "\n".join(lines)
