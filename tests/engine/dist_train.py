"""A training loop run for tests/engine/test_distributed.py, in one process or under torchrun: a tiny encoder
with a pair head on the synthetic suite's NLI rows, no dropout, `--steps` steps of a global batch of 16 in
`--micro` micro-batches per rank (`--batch`: another global batch; `--moe`: sparse FFNs), optionally checkpointed /
resumed in `--state`. Rank 0 writes the final weights
and the logged losses to `--out`. Every rank checks that shutdown() joined gloo's threads (it runs as many native
threads after it as before setup; see engine.distributed.setup), and fails otherwise."""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its thread pool would fail the thread count below

import torch  # noqa: E402

from engine import distributed  # noqa: E402
from engine.data import featurize, training_stream  # noqa: E402
from engine.pretrain import train_tokenizer  # noqa: E402
from engine.progress import PhaseLogger  # noqa: E402
from engine.trainer import Checkpoints, LoopConfig, train_loop  # noqa: E402
from eval.synthetic import SyntheticWorld  # noqa: E402
from models import Encoder, TaskModel, make_head, preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="none")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--state", default="")
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--moe", type=int, default=0, help="experts per layer (0: dense), top-2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    threads_before = _threads()
    d = distributed.setup(args.mode, "cpu")
    world = SyntheticWorld(0, ("en", "qsv"), {"syn-xnli": (96, 8, 8)})
    rows = world.load("syn-xnli", "train", "en")
    tokenizer = train_tokenizer([r["sentence1"] + " " + r["sentence2"] for r in rows], 300)
    task = world.tasks["syn-xnli"]
    feats = featurize(task, rows, tokenizer, 64)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=len(tokenizer), hidden_dropout=0.0, attention_dropout=0.0, kernel_backend="torch",
                 num_experts=args.moe)
    encoder = Encoder(cfg)
    model = TaskModel(encoder, make_head("pair", cfg, encoder, num_labels=3))
    stream = training_stream(feats, args.batch, tokenizer.pad_token_id, seed=0, micro_batches=args.micro)
    out = Path(args.out)
    logger = PhaseLogger("dist", out / "metrics.jsonl", console=False)
    loop = LoopConfig(steps=args.steps, lr=3e-3, warmup_ratio=0.0, log_every=1, checkpoint_every=args.every)
    train_loop(model, stream, loop, logger, checkpoints=Checkpoints(Path(args.state)) if args.state else None)
    if d.is_main:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights.pt")
        (out / "world.json").write_text(json.dumps({"world": d.world, "mode": d.mode}))
    distributed.shutdown()
    threads_after = _threads()
    assert threads_after == threads_before, (f"rank {d.rank}: {threads_after} threads after shutdown(), "
                                             f"{threads_before} before setup: the process group was not freed")


def _threads() -> int:
    """This process's native threads (Linux); 0 where /proc does not list them (the check then holds trivially)."""
    tasks = Path("/proc/self/task")
    return len(list(tasks.iterdir())) if tasks.is_dir() else 0


if __name__ == "__main__":
    main()
