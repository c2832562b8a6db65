"""The per-call cost of the CPU attention path, fitted, and what it does to the length grouping.

    python -m bench.group_cost [--presets xlt-tiny,xlt-small] [--precision auto|fp32|bf16] [--repeats R]
                               [--call-costs 4096,16384,65536,262144] [--batches N] [--threads T]
                               [--results bench/results/group_cost_cpu.jsonl]

`models.encoder.length_groups` splits a batch's sequences (sorted by decreasing length) into attention calls
so as to minimise  sum over calls of  GROUP_CALL_COST + sequences x longest^2 x heads : a fixed cost per call
in units of attention-score elements. This bench measures both terms and the choice they make:

1. fit: one attention call as the encoder makes it on the PyTorch path (kernels.attention_varlen, forward +
   backward, packed q / k / v of the preset's heads and head dim, in the training precision) for a grid of
   (sequences, longest) with lengths drawn between half the longest and the longest; least squares of the
   median milliseconds on  a + b x score elements. The fitted call cost is a / b (in score elements), with
   the fit's relative RMS error. One row per preset, `"kind": "fit"`.
2. policy: batches of bench.throughput's XNLI-like and QA-like mixes (QA where the preset holds 384
   positions), each attention layer's work as the encoder does it (q / k / v split into the groups, one call
   each, the outputs concatenated; forward + backward) under the groupings that several call costs choose:
   `--call-costs` (models.encoder.GROUP_CALL_COST among them), the fitted one, and one call for the whole batch
   (no grouping). They run interleaved per batch; the row gives each one's median time over the batches
   relative to the current constant's (per batch, then the median), and the groups per batch.
   `"kind": "policy"`, one row per preset and mix. This is what a choice of the constant rests on.

Timing: time.perf_counter (CPU only: on CUDA attention runs in the Triton kernels, which have no per-group
calls). Rows go to `--results`, keyed by CPU, its features, versions and git commit (bench/env.py).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

from .env import append_row, environment
from .timing import median_ms

SHOW = ("kind", "preset", "precision", "fitted_call_cost", "current_call_cost", "fit_rel_rms", "vs_current")
SIZES = (1, 2, 4, 8, 16, 32)
LONGEST = (8, 16, 32, 48, 64, 96, 128)


def _packed(lengths: list[int], heads: int, head_dim: int, dtype, gen) -> tuple[torch.Tensor, ...]:
    total = sum(lengths)
    return tuple(torch.randn(total, heads, head_dim, generator=gen).to(dtype).requires_grad_() for _ in range(3))


def _grouped_step(q, k, v, lengths: list[int], bounds: list[tuple[int, int]], dout) -> None:
    """Forward + backward of one layer's attention as models.encoder.SelfAttention runs it on grouped calls."""
    import kernels

    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    sizes = [offsets[b] - offsets[a] for a, b in bounds]
    outs = []
    for (qg, kg, vg), (a, b) in zip(zip(*(t.split(sizes) for t in (q, k, v))), bounds):
        cu = torch.tensor(offsets[a:b + 1], dtype=torch.int32) - offsets[a]
        outs.append(kernels.attention_varlen(qg, kg, vg, cu, lengths[a], backend="torch"))
    torch.autograd.backward(torch.cat(outs), dout)


def fit(cfg, dtype, repeats: int, rng: random.Random, gen) -> dict:
    """Median ms of one call per (sequences, longest); least squares on a + b x score elements."""
    points = []
    for size in SIZES:
        for longest in LONGEST:
            lengths = [longest] + sorted((rng.randint(max(1, longest // 2), longest) for _ in range(size - 1)),
                                         reverse=True)
            q, k, v = _packed(lengths, cfg.num_heads, cfg.head_dim, dtype, gen)
            dout = torch.randn(q.shape, generator=gen).to(dtype)
            ms = median_ms(lambda: _grouped_step(q, k, v, lengths, [(0, size)], dout), "cpu", repeats, warmup=2)
            points.append((size * longest ** 2 * cfg.num_heads, ms))
    a, b, rel = line_fit(points)
    return {"intercept_ms": round(a, 5), "ms_per_score_element": b, "fitted_call_cost": round(a / b),
            "fit_rel_rms": round(rel, 4), "points": [[e, round(t, 5)] for e, t in points]}


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares of the relative error of t = a + b x e over (e, t) points (the small calls, where the
    fixed cost decides, count as much as the large ones): (a, b, the relative RMS error of the fit)."""
    w = [1.0 / t ** 2 for _, t in points]
    sw = sum(w)
    mx, my = sum(wi * e for wi, (e, _) in zip(w, points)) / sw, sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    b = (sum(wi * (e - mx) * (t - my) for wi, (e, t) in zip(w, points))
         / sum(wi * (e - mx) ** 2 for wi, (e, _) in zip(w, points)))
    a = my - b * mx
    return a, b, (sum(((a + b * e) - t) ** 2 / t ** 2 for e, t in points) / len(points)) ** 0.5


def policy(cfg, dtype, call_costs: dict[str, int | None], batches: list[dict], repeats: int, gen) -> dict:
    """Each grouping's median time over the batches (per batch: the median of `repeats` interleaved calls; None:
    one call), relative to the "current" grouping's."""
    from models.encoder import length_groups

    times = {name: [] for name in call_costs}
    groups = {name: [] for name in call_costs}
    for batch in batches:
        lengths = sorted(batch["lengths"].tolist(), reverse=True)
        q, k, v = _packed(lengths, cfg.num_heads, cfg.head_dim, dtype, gen)
        dout = torch.randn(q.shape, generator=gen).to(dtype)
        bounds = {name: (length_groups(lengths, cfg.num_heads, c) if c is not None else [(0, len(lengths))])
                  for name, c in call_costs.items()}
        per = {name: [] for name in call_costs}
        for r in range(repeats + 1):  # the first round warms up
            for name, bs in bounds.items():
                ms = median_ms(lambda: _grouped_step(q, k, v, lengths, bs, dout), "cpu", 1)
                if r:
                    per[name].append(ms)
        for name in call_costs:
            times[name].append(statistics.median(per[name]))
            groups[name].append(len(bounds[name]))
    current = times["current"]
    out = {}
    for name, c in call_costs.items():
        ratios = [t / ref for t, ref in zip(times[name], current)]
        out[name] = {"call_cost": c, "ms_per_layer": round(statistics.median(times[name]), 4),
                     "vs_current": round(statistics.median(ratios), 4),
                     "vs_current_min": round(min(ratios), 4), "vs_current_max": round(max(ratios), 4),
                     "groups_per_batch": round(statistics.mean(groups[name]), 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="xlt-tiny,xlt-small")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=12, help="batches of each mix for the policy comparison")
    ap.add_argument("--call-costs", default="4096,16384,65536,262144",
                    help="call costs (score elements) whose groupings the policy rows compare")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "group_cost_cpu.jsonl")
    args = ap.parse_args(argv)
    from models import preset
    from models.encoder import GROUP_CALL_COST

    from .throughput import make_batches, mixes, resolve_precision

    presets = [p for p in args.presets.split(",") if p]
    try:
        configs = {p: preset(p) for p in presets}
        candidates = sorted({int(c) for c in args.call_costs.split(",") if c} | {GROUP_CALL_COST})
    except ValueError as e:
        print(f"bench.group_cost: --presets or --call-costs: {e}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.batches < 1 or min(candidates) < 1:
        print("bench.group_cost: --repeats, --batches and every --call-costs must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    env = environment()
    for name, cfg in configs.items():
        rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
        base = env | {"preset": name, "precision": precision, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
                      "repeats": args.repeats, "seed": args.seed, "current_call_cost": GROUP_CALL_COST}
        with torch.autocast("cpu", enabled=False):
            fitted = fit(cfg, dtype, args.repeats, rng, gen)
        append_row(args.results, base | {"kind": "fit"} | fitted, SHOW)
        costs = {"current": GROUP_CALL_COST, "fitted": max(1, fitted["fitted_call_cost"]), "one_call": None}
        costs |= {str(c): c for c in candidates if c != GROUP_CALL_COST}
        for mix in mixes("cpu", tiny=False).values():
            if mix.name == "full" or mix.max_len > cfg.max_seq_len:  # full: one length, nothing to group
                continue
            batches = make_batches(mix, cfg, args.batches, args.seed)
            with torch.autocast("cpu", enabled=False):
                result = policy(cfg, dtype, costs, batches, args.repeats, gen)
            best = min((n for n in result if n != "one_call"), key=lambda n: result[n]["vs_current"])
            append_row(args.results, base | {"kind": "policy", "mix": mix.name, "mix_spec": mix.describe(),
                                             "batches": args.batches,
                                             "fitted_call_cost": costs["fitted"], "best": best,
                                             "vs_current": {n: v["vs_current"] for n, v in result.items()},
                                             "groupings": result}, SHOW + ("mix", "best"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
