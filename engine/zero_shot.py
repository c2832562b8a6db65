"""Zero-shot evaluation of a model on XTREME / XTREME-R, written in the leaderboard layout.

    python -m engine.zero_shot --model DIR|NAME --suite xtreme|xtreme-r [--tasks tatoeba,bucc2018,...]
        [--checkpoint xnli=DIR ...] [--data-dir DIR] [--languages de,fr] [--layer N] [--pooling mean|cls]
        [--out DIR]

- Retrieval tasks use the encoder `--model` with no fine-tuning: Tatoeba nearest-neighbour accuracy, BUCC
  mining with the ratio margin and the threshold tuned on the dev (sample) split, applied to test. The
  sentence vector is the `--pooling` of hidden layer `--layer` (default: the middle layer; XTREME uses mean
  pooling of layer 14, special tokens included, for XLM-R large).
- XTREME-R's ranking tasks use the same sentence vectors as a zero-shot dual encoder: Mewsli-X ranks the
  ~1M-entity candidate set for each WikiNews mention, LAReQA the sentences of all 11 XQuAD-R languages for
  each question; the top 20 candidate ids by cosine are written and scored by mAP@20. The official XTREME-R
  baselines fine-tune the dual encoder first (Mewsli-X on wikipedia_pairs-train, LAReQA on SQuAD v1.1 in
  retrieval form); this command does not, so its numbers are zero-shot-encoder numbers, not baseline replicas.
- `--checkpoint TASK=DIR` on a retrieval or ranking task embeds with that folder's encoder instead of
  `--model` (e.g. a dual encoder fine-tuned elsewhere, or the encoder after intermediate-task training).
- Fine-tuned tasks (XNLI, PAWS-X, UD-POS, PAN-X, XQuAD, MLQA, TyDiQA, XCOPA) are run with the task model
  exported by the engine for them, `--checkpoint TASK=DIR` (an English-fine-tuned model folder).
- Data come from `--data-dir` (official raw files, see eval.loaders.LOCAL_PATTERNS) or the Hugging Face hub.

Writes, under `--out` (default runs/eval-<suite>): `predictions/<task>/test-<lang>.<ext>` and the matching
`labels/...` (so `python -m eval.score OUT/predictions OUT/labels` rescores them), `scores.json` (eval.score's
JSON), `analysis.json` and `analysis.md` (eval.analysis, "XTREME-A"). Everything is written to a temporary
folder and renamed at the end; errors print a message and exit with code 2 before anything is written.
The models run here (engine.evaluate); eval.run turns their outputs into the leaderboard files."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from eval import analysis, loaders
from eval.run import RANKING, RETRIEVAL, RunError, finetuned_files, run_bucc, run_ranking, run_tatoeba
from eval.score import ScoreError, score_task, suite_scores, write_json_atomically
from eval.suites import SUITES, Suite

from . import evaluate
from .data import featurize


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ----- fine-tuned tasks -------------------------------------------------------------------------------------
def run_finetuned(task, folder: str, rows: list[dict], opts) -> tuple[str, str]:
    """(prediction text, label text) of `task` on `rows` with the task model exported in `folder`."""
    from models import hf

    model, report = hf.load_task_model(folder)
    tokenizer = hf.load_tokenizer(folder)
    labels = list(task.labels)
    gold_names = task.labels  # the rows' label ids index the task's own order
    if task.format in ("pair", "tagging"):
        names = report.labels or labels
        if sorted(names) != sorted(labels):
            raise RunError(f"{task.name}: checkpoint {folder} has labels {names}, the task needs {labels}")
        # the model's ids follow its own label order: map back by name
        task = type(task)(**{**task.__dict__, "labels": tuple(names)})
    feats = featurize(task, rows, tokenizer, opts.max_len, opts.doc_stride)
    preds = evaluate.predict(model, task, rows, feats, opts.batch_size, tokenizer.pad_token_id)
    return finetuned_files(task, rows, preds, gold_names)



# ----- command ----------------------------------------------------------------------------------------------
def _parse_checkpoints(items: list[str], suite: Suite) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, folder = item.partition("=")
        if not sep or not folder:
            raise RunError(f"--checkpoint {item!r}: expected TASK=DIR")
        if task not in suite.tasks:
            raise RunError(f"--checkpoint {item!r}: unknown task {task!r} in {suite.name}")
        if not Path(folder).is_dir():
            raise RunError(f"--checkpoint {item!r}: {folder} is not a folder")
        out[task] = folder
    return out


def plan_tasks(suite: Suite, requested: list[str] | None, checkpoints: dict[str, str]) -> list[str]:
    """The tasks to run: as requested, or every suite task that needs no fine-tuning or has a checkpoint."""
    if requested is None:
        return [t for t in suite.tasks if t in RETRIEVAL + RANKING or t in checkpoints]
    for t in requested:
        if t not in suite.tasks:
            raise RunError(f"--tasks: unknown task {t!r} in {suite.name}; expected some of {', '.join(suite.tasks)}")
        if t not in RETRIEVAL + RANKING and t not in checkpoints:
            raise RunError(f"--tasks: {t} needs a model fine-tuned on its English task: --checkpoint {t}=DIR")
    return requested


def _embedder(source: str, opts):
    """Sentences -> vectors with the encoder `source` (hub name or folder): `--pooling` of hidden layer `--layer`
    (default: its middle layer)."""
    from models import hf

    encoder, tokenizer = hf.load_encoder(source), hf.load_tokenizer(source)
    layer = encoder.cfg.num_layers // 2 if opts.layer is None else opts.layer
    return evaluate.embedder(encoder, tokenizer, layer, opts.pooling, opts.max_len, opts.batch_size)


def run(opts) -> Path:
    suite = SUITES[opts.suite]
    checkpoints = _parse_checkpoints(opts.checkpoint, suite)
    tasks = plan_tasks(suite, opts.tasks, checkpoints)
    if not tasks:
        raise RunError("nothing to run: give --tasks, or --checkpoint TASK=DIR for fine-tuned tasks")
    langs = {t: [lang for lang in suite.task(t).languages if opts.languages is None or lang in opts.languages]
             for t in tasks}
    if opts.languages is not None:
        unknown = sorted(set(opts.languages) - {lang for t in tasks for lang in suite.task(t).languages})
        if unknown:
            raise RunError(f"--languages: {', '.join(unknown)} not in the languages of {', '.join(tasks)}")
    out = Path(opts.out or f"runs/eval-{opts.suite}")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"--out {out}: exists and is not empty")
    # Load all data before running anything, so a missing file fails fast.
    data = {}
    for t in tasks:
        for lang in langs[t]:
            data[t, lang] = loaders.load(t, lang, "test", opts.data_dir)
            if t == "bucc2018":
                data[t, lang, "dev"] = loaders.load(t, lang, "dev", opts.data_dir)
    # Retrieval and ranking tasks embed with --model, or with the encoder of their --checkpoint TASK=DIR.
    sources = {t: checkpoints.get(t, opts.model) for t in tasks if t in RETRIEVAL + RANKING}
    loaded = {source: _embedder(source, opts) for source in dict.fromkeys(sources.values())}
    embedders = {t: loaded[source] for t, source in sources.items()}
    pools = {t: {} for t in tasks}  # a ranking task's embedded candidates, shared by its languages
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for t in tasks:
            ext = suite.extension(t)
            for lang in langs[t]:
                if t == "tatoeba":
                    pred, gold = run_tatoeba(embedders[t], data[t, lang])
                elif t == "bucc2018":
                    pred, gold = run_bucc(embedders[t], data[t, lang, "dev"], data[t, lang])
                elif t in RANKING:
                    pred, gold = run_ranking(embedders[t], data[t, lang], pools[t])
                else:
                    pred, gold = run_finetuned(suite.task(t), checkpoints[t], data[t, lang], opts)
                _write(tmp / "predictions" / t / f"test-{lang}.{ext}", pred)
                _write(tmp / "labels" / t / f"test-{lang}.{ext}", gold)
        detailed = {t: score_task(suite, t, tmp / "predictions", tmp / "labels", langs[t]) for t in tasks}
        overall = suite_scores(suite, detailed, langs)
        write_json_atomically(tmp / "scores.json", {**overall, **detailed})
        view = analysis.suite_view(analysis.language_scores(detailed))
        write_json_atomically(tmp / "analysis.json", view)
        _write(tmp / "analysis.md", analysis.markdown(view))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.zero_shot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="encoder for retrieval and ranking tasks: hub name or folder")
    parser.add_argument("--suite", default="xtreme", choices=sorted(SUITES))
    parser.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], help="comma-separated tasks")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="TASK=DIR",
                        help="fine-tuned model folder for a task; for a retrieval or ranking task, "
                        "the encoder to embed it with instead of --model (repeatable)")
    parser.add_argument("--languages", type=lambda s: [t for t in s.split(",") if t], help="only these languages")
    parser.add_argument("--data-dir", type=Path, help="official raw files (default: the Hugging Face hub)")
    parser.add_argument("--layer", type=int, help="hidden layer for retrieval (0 = embeddings; default: middle)")
    parser.add_argument("--pooling", default="mean", choices=evaluate.POOLINGS)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args(argv)
    try:
        out = run(opts)
    except (RunError, ScoreError, loaders.DataUnavailable, loaders.FormatError) as err:
        print(f"engine.zero_shot: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # e.g. a model folder that cannot be loaded, an out-of-range --layer
        print(f"engine.zero_shot: {err}", file=sys.stderr)
        return 2
    print(analysis.markdown(json.loads((out / "analysis.json").read_text())), end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
