"""How much the embedded default's sentence-pair transfer moves with the seeds: for each pretraining seed
(`run.seed`), one MLM pretraining (cached like the default's), then the English fine-tuning of the target
task in the baseline condition with each fine-tuning seed, scored in every language; plus the pretrained
encoder's syn-tatoeba retrieval.

    python -m bench.transfer_spread [--pretrain-seeds 0,1,2,3] [--finetune-seeds 0,1] [--task syn-xnli]
        [--split dev|test] [--cache DIR] [--results bench/results/transfer_spread_cpu.jsonl] [engine.train options]

Fine-tuning seed k trains as the default's baseline condition does with run.seed = k, so pretraining seed
s with fine-tuning seed s is the default run's own baseline cell. Appends one JSONL row per pretraining
seed (per fine-tuning: English, zero-shot mean, ratio, every language) and prints the mean over all
fine-tunings. Transfer (and syn-tatoeba retrieval) is measured on `--split`: by default the synthetic
languages' dev sets, held apart from the test sets the default reports, so that design choices for the
default (world, presets, schedules) are made without looking at its test scores.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from engine.config import ConfigError, load
from engine.evaluate import evaluate_task
from engine.protocol import (TaskData, encoder_config, evaluate_retrieval, finetune, for_finetuning, new_task_model,
                             plan, resolve_device, target_seed, use_bf16)
from engine.pretrain import default_cache_dir, pretrain
from engine.train import parse_args

from .env import environment


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"transfer_spread: seeds must be comma-separated integers, got {text!r}") from None


def spread_row(cfg, task_name: str, finetune_seeds: list[int], cache: Path, work: Path, split: str = "dev") -> dict:
    """One pretraining (cfg.run.seed), every fine-tuning seed, scores in every language on `split`."""
    p = plan(cfg)
    world = p.world
    if task_name not in {t.name for t in p.targets} or world.tasks[task_name].format != "pair":
        raise ConfigError(f"--task {task_name!r}: expected a sentence-pair target task of the default")
    device = resolve_device(cfg.run.device)
    bf16 = use_bf16(cfg.run, device)
    encoder, tokenizer, info = pretrain(world, encoder_config(cfg.model), cfg.pretrain, cfg.run.seed, cache,
                                        None, bf16, device)
    encoder = for_finetuning(encoder, cfg.model, device)
    task, ft = world.tasks[task_name], cfg.target.for_task(task_name)
    training = next(g.training for g in p.groups if g.targets[0].name == task_name)
    task_data = TaskData(p.source)
    task_data.tokenizer = tokenizer
    finetunes = []
    for seed in finetune_seeds:
        run_seed = target_seed(seed, training, task_name)  # the default's baseline cell with run.seed = seed
        model = new_task_model(copy.deepcopy(encoder), task, run_seed)
        finetune(model, task, task_data, ft, run_seed, work / f"{cfg.run.seed}-{seed}", cfg.run, cfg.eval.batch_size,
                 bf16)
        scores = {}
        for lang in p.languages[task_name]:
            rows, feats = task_data.get(task, split, lang, ft)
            scores[lang] = evaluate_task(model, task, rows, tokenizer, ft.max_len, cfg.eval.batch_size, lang,
                                         feats)[0]["score"]
        zero_shot = [v for lang, v in scores.items() if lang != "en"]
        mean = sum(zero_shot) / len(zero_shot)
        finetunes.append({"finetune_seed": seed, "en": scores["en"], "zero_shot_mean": mean,
                          "ratio": mean / scores["en"], "scores": scores})
    retrieval = world.tasks["syn-tatoeba"]
    langs = p.languages.get(retrieval.name, [c for c in world.codes if c in retrieval.languages])
    evaluate_retrieval(encoder, retrieval, langs, cfg, task_data, work / f"{cfg.run.seed}-retrieval", split)
    from eval.score import evaluate as score_folders
    from eval.suites import SUITES

    _, detailed = score_folders(work / f"{cfg.run.seed}-retrieval" / "predictions",
                                work / f"{cfg.run.seed}-retrieval" / "labels", SUITES["synthetic"], partial=True)
    tatoeba = detailed[retrieval.name]["accuracy"]
    return {"task": task_name, "split": split, "pretrain_seed": cfg.run.seed, "pretrain_cached": info["cached"],
            "pretrain_loss": info.get("final_loss"), "finetunes": finetunes,
            "tatoeba_mean": sum(tatoeba.values()) / max(1, len(tatoeba)), "tatoeba": tatoeba}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-seeds", default="0,1,2,3")
    ap.add_argument("--finetune-seeds", default="0,1")
    ap.add_argument("--task", default="syn-xnli")
    ap.add_argument("--split", default="dev", choices=("dev", "test"),
                    help="where zero-shot transfer is measured: dev (held apart from the reported test sets)")
    ap.add_argument("--cache", default="", help="pretraining cache (default: the user's, as engine.train)")
    ap.add_argument("--results", default="bench/results/transfer_spread_cpu.jsonl")
    args, extra = ap.parse_known_args(argv)
    pretrain_seeds, finetune_seeds = _seeds(args.pretrain_seeds), _seeds(args.finetune_seeds)
    try:
        path, overrides, _ = parse_args(extra)
        base = load(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = Path(args.cache) if args.cache else default_cache_dir()
    if base.run.threads:
        torch.set_num_threads(base.run.threads)
    out = Path(args.results)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in pretrain_seeds:
            cfg = copy.deepcopy(base)
            cfg.run.seed, cfg.run.console = seed, False
            try:
                row = spread_row(cfg, args.task, finetune_seeds, cache, Path(work), args.split)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            row = {"bench": "transfer_spread", **environment(), "args": extra, **row}
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            cells = ", ".join(f"{f['en']:.1f}/{f['zero_shot_mean']:.1f}" for f in row["finetunes"])
            print(f"pretraining seed {seed}: {cells}; tatoeba {row['tatoeba_mean']:.1f}", flush=True)
    cells = [f for r in rows for f in r["finetunes"]]
    en = sum(f["en"] for f in cells) / len(cells)
    zs = sum(f["zero_shot_mean"] for f in cells) / len(cells)
    print(f"mean over {len(cells)} fine-tunings: {en:.1f} / {zs:.1f} (ratio {zs / en:.2f}); single fine-tunings "
          f"{min(f['ratio'] for f in cells):.2f}-{max(f['ratio'] for f in cells):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
