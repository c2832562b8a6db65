"""Markdown tables and PNG plots from `bench.throughput` rows.

    python -m bench.report [--results bench/results/throughput_cpu.jsonl ...] [--out bench/results/throughput]
                           [--commit COMMIT[,COMMIT...]]

For every machine and precision (device, CPU or GPU name, precision) in the rows: one table of preset x
architecture x mix with tokens/s (real tokens) per implementation, XLT / HF and MoE / dense ratios (medians
of the per-repeat ratios, with their range), MFU and peak memory (and on NVIDIA GPUs energy per real token and
average power); the skipped arms with their reasons; and
three plots: tokens/s vs active parameters, peak memory vs parameters, and the cost exponent vs parameters
(the local slope d ln(seconds per real token) / d ln(active parameters) between consecutive sizes: 1.0 means
the cost grows as fast as the parameters). When a key (machine, precision, preset, architecture, mix,
implementation) has several rows, the newest one is used. Writes `<out>/report.md` and `<out>/*.png`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

IMPL_ORDER = ("xlt", "xlt-torch", "hf")
ARCH_ORDER = ("dense", "moe")
MIX_ORDER = ("xnli", "qa", "full")
MIX_TITLES = {"xnli": "XNLI-like pair mix", "qa": "QA-like (384, stride 128)", "full": "full-length batches"}


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON row ({e})") from None
            if row.get("bench") == "throughput":
                rows.append(row)
    return rows


def machine(row: dict) -> str:
    hw = row.get("gpu") if row.get("device") == "cuda" else row.get("cpu")
    label = f" ({row['label']})" if row.get("label") else ""
    return (f"{row.get('device', '?')}, {hw or 'unknown'}, {row.get('precision', '?')}, {row.get('threads')} "
            f"threads{label}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def latest(rows: list[dict], commit: str | None = None) -> list[dict]:
    """The newest row per (machine, preset, arch, mix, impl); with `commit` (comma-separated prefixes), of the
    rows whose commit starts with one of them."""
    prefixes = tuple(c.strip() for c in (commit or "").split(",") if c.strip())
    chosen: dict[tuple, dict] = {}
    for row in rows:
        if prefixes and not str(row.get("commit", "")).startswith(prefixes):
            continue
        key = (machine(row), row.get("preset"), row.get("arch"), row.get("mix"), row.get("impl"))
        if key not in chosen or str(row.get("date", "")) >= str(chosen[key].get("date", "")):
            chosen[key] = row
    return list(chosen.values())


def _num(x, digits=0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _ratio(r: dict | None) -> str:
    if not r:
        return "-"
    return f"**{r['median']:.2f}×** ({r['min']:.2f}-{r['max']:.2f})"


def _params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _vs_hf(row: dict | None) -> str:
    """The ratio to HF's same architecture, or for MoE (which Transformers lacks) to HF's dense twin, marked."""
    row = row or {}
    if row.get("speedup_vs_hf") is None and row.get("speedup_vs_hf_dense_twin") is not None:
        return f"{_ratio(row['speedup_vs_hf_dense_twin'])} vs dense twin"
    return _ratio(row.get("speedup_vs_hf"))


def table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["dense_twin"], r["arch"], r["mix"])][r["impl"]] = r
    order = sorted(groups, key=lambda k: (_size_of(groups[k]), k[0], ARCH_ORDER.index(k[1]) if k[1] in ARCH_ORDER
                                          else 9, MIX_ORDER.index(k[2]) if k[2] in MIX_ORDER else 9))
    # Energy (NVIDIA GPUs only: nvidia-ml-py's board energy counter) gets its columns where a row has it.
    energy = any(r.get("joules_per_token") is not None for r in rows)
    out = ["| preset | arch | mix | active params | real tok/step (padding) | XLT tok/s | XLT-torch tok/s | HF tok/s "
           "| XLT / HF | XLT-torch / HF | MoE / dense step time (XLT) | XLT step ms (min-max) | MFU XLT | "
           "peak MiB XLT / HF |" + (" mJ / real token XLT / HF | W XLT / HF |" if energy else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if energy else "")]
    for key in order:
        by = groups[key]
        ref = next(iter(by.values()))
        measured = {i: r for i, r in by.items() if "skipped" not in r}
        if not measured:
            continue
        x, xt, h = (measured.get(i) for i in IMPL_ORDER)
        any_row = x or xt or h
        tok = f"{_num(any_row.get('real_tokens_per_step'))} ({100 * any_row.get('padding_share', 0):.0f}%)"
        step = (f"{x['step_ms']:,.1f} ({x['step_ms_min']:,.1f}-{x['step_ms_max']:,.1f})" if x else "-")
        mfu = f"{100 * x['mfu']:.1f}%" if x and x.get("mfu") is not None else "-"
        mem = f"{_num((x or {}).get('peak_mem_mib'))} / {_num((h or {}).get('peak_mem_mib'))}"
        out.append(f"| {ref['preset']} | {key[1]} | {key[2]} | {_params(ref.get('active_parameters'))} | {tok} | "
                   f"{_num((x or {}).get('tokens_per_s'))} | {_num((xt or {}).get('tokens_per_s'))} | "
                   f"{_num((h or {}).get('tokens_per_s'))} | {_vs_hf(x)} | {_vs_hf(xt)} | "
                   f"{_ratio((x or {}).get('step_time_vs_dense'))} | "
                   f"{step} | {mfu} | {mem} |" + (_energy(x, h) if energy else ""))
    return out


def _energy(x: dict | None, h: dict | None) -> str:
    def mj(r):
        return "-" if not r or r.get("joules_per_token") is None else f"{1e3 * r['joules_per_token']:.3g}"

    def watts(r):
        return "-" if not r or r.get("power_w") is None else f"{r['power_w']:.0f}"
    return f" {mj(x)} / {mj(h)} | {watts(x)} / {watts(h)} |"


ABLATIONS = {  # ablation impl -> (the ratio field on the xlt row, the table's title)
    "xlt-all-rows": ("speedup_vs_xlt_all_rows",
                     "the last layer on first tokens only (`xlt`) against every row computed (`xlt-all-rows`)"),
    "xlt-unpadded-rows": ("speedup_vs_xlt_unpadded_rows", "the packed tokens padded to 64 rows (`xlt`) against "
                          "unpadded (`xlt-unpadded-rows`)"),
    "xlt-unbucketed": ("speedup_vs_xlt_unbucketed", "the MoE twin's expert groups padded to 64 rows (`xlt`) against "
                       "unpadded (`xlt-unbucketed`)"),
    "xlt-fp32-scores": ("speedup_vs_xlt_fp32_scores", "attention's (S, S) tensors in bf16 under autocast (`xlt`) "
                        "against autocast's fp32 softmax (`xlt-fp32-scores`)"),
    "xlt-unfused-bias": ("speedup_vs_xlt_unfused_bias", "attention's key-padding bias and scale fused into the score "
                         "matmul (`xlt`) against a matmul, a scale and the bias in passes of their own "
                         "(`xlt-unfused-bias`)"),
    "xlt-sliced-groups": ("speedup_vs_xlt_sliced_groups", "the length groups' q / k / v as pieces of one split "
                          "(`xlt`) against slices (`xlt-sliced-groups`)"),
}


def ablation_table(rows: list[dict], ablation: str = "xlt-all-rows") -> list[str]:
    """XLT against one of its ablation arms (ABLATIONS), where both ran."""
    field, title = ABLATIONS[ablation]
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if "skipped" not in r:
            by[(r["preset"], r["arch"], r["mix"])][r["impl"]] = r
    out = []
    for (preset, arch, mix), impls in sorted(by.items()):
        x, a = impls.get("xlt"), impls.get(ablation)
        if x and a:
            vs_hf = "speedup_vs_hf" if arch == "dense" else "speedup_vs_hf_dense_twin"
            out.append(f"| {preset} | {arch} | {mix} | {_num(x['tokens_per_s'])} | {_num(a['tokens_per_s'])} | "
                       f"{_ratio(x.get(field))} | {_ratio(x.get(vs_hf))} | {_ratio(a.get(vs_hf))} |")
    if not out:
        return []
    return [f"Ablation: {title} (MoE rows: against HF's dense twin):", "",
            f"| preset | arch | mix | XLT tok/s | {ablation} tok/s | XLT / {ablation} | XLT / HF | {ablation} / HF |",
            "|---|---|---|---|---|---|---|---|"] + out + [""]


def _size_of(by_impl: dict) -> int:
    return min((r.get("active_parameters") or 0) for r in by_impl.values())


def skipped(rows: list[dict]) -> list[str]:
    out = []
    for r in sorted(rows, key=lambda r: (r.get("preset", ""), r.get("mix", ""), r.get("impl", ""))):
        if "skipped" in r:
            out.append(f"- {r['preset']} / {r['mix']} / {r['impl']}: {r['skipped']}")
    return out


def _series(rows: list[dict], x_field: str, y_field: str) -> dict[tuple, list[tuple[float, float]]]:
    """(mix, arch, impl) -> sorted [(x, y)] over presets."""
    series: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if "skipped" in r or r.get(y_field) is None or r.get(x_field) is None:
            continue
        series[(r["mix"], r["arch"], r["impl"])].append((float(r[x_field]), float(r[y_field])))
    return {k: sorted(v) for k, v in series.items()}


def cost_exponents(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """[(active params, tokens/s)] -> [(geometric-mean params, d ln(s per token) / d ln(params))]."""
    out = []
    for (p0, t0), (p1, t1) in zip(points, points[1:]):
        if p1 > p0 and t0 > 0 and t1 > 0:
            out.append((math.sqrt(p0 * p1), (math.log(1 / t1) - math.log(1 / t0)) / (math.log(p1) - math.log(p0))))
    return out


def plots(rows: list[dict], out: Path, stem: str, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    mixes = [m for m in MIX_ORDER if any(r.get("mix") == m for r in rows)]
    if not mixes:
        return []
    specs = (("tokens_per_s", "active_parameters", "tokens / s (real tokens)", "active parameters", None),
             ("peak_mem", "parameters", "peak memory (MiB)", "parameters (total)", None),
             ("cost_exponent", "active_parameters", "d ln(s / token) / d ln(params)", "active parameters",
              cost_exponents))
    written = []
    styles = {("dense", "xlt"): ("C0", "-", "o"), ("dense", "xlt-torch"): ("C2", "--", "s"),
              ("dense", "hf"): ("C3", "-", "^"), ("moe", "xlt"): ("C1", "-", "D"),
              ("moe", "xlt-torch"): ("C4", "--", "v")}
    for name, x_field, ylabel, xlabel, transform in specs:
        y_field = "peak_mem_mib" if name == "peak_mem" else "tokens_per_s"
        series = _series(rows, x_field, y_field)
        fig, axes = plt.subplots(1, len(mixes), figsize=(4.6 * len(mixes), 3.8), squeeze=False)
        drew = False
        for ax, mix in zip(axes[0], mixes):
            for (m, arch, impl), pts in sorted(series.items()):
                if m != mix:
                    continue
                pts = transform(pts) if transform else pts
                if not pts:
                    continue
                color, line, marker = styles.get((arch, impl), ("k", ":", "x"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle=line, marker=marker,
                        label=f"{arch} {impl}")
                drew = True
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: the minor ones overlap
            if name != "cost_exponent":
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(MIX_TITLES.get(mix, mix), fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        if drew or name != "cost_exponent":
            path = out / f"{stem}_{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path.name)
        plt.close(fig)
    return written


def report(rows: list[dict], out: Path, sources: list[Path]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    by_machine: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_machine[machine(r)].append(r)
    lines = ["# Training throughput: XLT vs Hugging Face Transformers", "",
             "Generated by `python -m bench.report` from " + ", ".join(f"`{p}`" for p in sources) + ". "
             "Tokens/s count real tokens only; ratios are medians of per-repeat ratios of interleaved arms "
             "(range in brackets); MoE presets are `<preset>-moe8` (8 experts, top-2, matched on active "
             "parameters); Transformers has no MoE encoder, so MoE is compared with its dense twin.", ""]
    for name in sorted(by_machine):
        group = by_machine[name]
        first = group[0]
        commits = sorted({str(r.get("commit")) for r in group})
        lines += [f"## {name}", "",
                  f"- commit(s) {', '.join(commits)}; torch {first.get('torch')}, triton {first.get('triton', '-')}, "
                  f"transformers {first.get('transformers', '-')}, Python {first.get('python')}",
                  f"- threads {first.get('threads')}, CPU features {', '.join(first.get('cpu_features') or []) or '-'}"
                  f", clocks {json.dumps(first.get('clocks', {}))}; load average during the runs "
                  f"{_load_range(group)}"]
        lines += runs(group)
        lines += [""] + table(group) + [""] + [line for a in ABLATIONS for line in ablation_table(group, a)]
        skips = skipped(group)
        if skips:
            lines += ["Not measured:", ""] + skips + [""]
        stem = slug(name)
        for png in plots(group, out, stem, name):
            lines += [f"![{png}]({png})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def runs(rows: list[dict]) -> list[str]:
    """One line per distinct command behind the rows, with its steps, repeats and warm-up and what it covers:
    rows of several runs (say a longer run of the small presets and a shorter one of a large preset) each keep
    their own method."""
    by_run: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        # rows from before the field trained every pass on the same batches
        by_run[(r.get("command"), r.get("steps"), r.get("repeats"), r.get("warmup"),
                r.get("repeat_batches", True))].append(r)
    lines = []
    for (command, steps, repeats, warmup, repeat), group in sorted(by_run.items(), key=lambda kv: str(kv[0])):
        presets = sorted({str(r.get("preset")) for r in group})
        commits = sorted({str(r.get("commit")) for r in group})
        batches = ("the same batches every pass" if repeat
                   else "new sequences each pass, batched in each arm's own order")
        lines.append(f"- {', '.join(presets)} at {', '.join(commits)}: {steps} steps per pass, {repeats} timed "
                     f"passes per arm after {warmup} warm-up, {batches}" + (f"; `{command}`" if command else ""))
    return lines


def _load_range(rows: list[dict]) -> str:
    loads = [x for r in rows for x in (r.get("loadavg_before") or [])[:1] + (r.get("loadavg_after") or [])[:1]]
    return f"{min(loads):.1f}-{max(loads):.1f} (1 min)" if loads else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="*", default=None,
                    help="JSONL files (default: bench/results/throughput_*.jsonl)")
    ap.add_argument("--out", default="bench/results/throughput")
    ap.add_argument("--commit", default=None, help="only rows whose commit starts with this (or with one of "
                    "several, comma-separated)")
    args = ap.parse_args(argv)
    paths = ([Path(p) for p in args.results] if args.results
             else sorted(Path("bench/results").glob("throughput_*.jsonl")))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        ap.error(f"no such results file: {', '.join(missing) or 'bench/results/throughput_*.jsonl'} (run "
                 "python -m bench.throughput first)")
    rows = latest(read_rows(paths), args.commit)
    if not rows:
        ap.error(f"no bench.throughput rows in {', '.join(map(str, paths))}"
                 + (f" for commit {args.commit}" if args.commit else ""))
    path = report(rows, Path(args.out), paths)
    print(f"wrote {path} and {len(list(Path(args.out).glob('*.png')))} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
