"""Gradient accumulation and torchrun (gloo on CPU): k micro-batches of b give the step of one batch of k.b,
2 ranks x b that of 1 rank x 2b, with DDP and with FSDP2 (fp32 tolerance), and a checkpoint of a 2-rank run
(DDP's whole state, FSDP2's torch.distributed.checkpoint shards) resumes in one process as if it had run there;
every run ends with gloo's threads joined (dist_train.py fails otherwise)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("dist_train.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, nproc: int = 1, *args, timeout: int = 300) -> tuple[dict, list[float]]:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(SCRIPT), "--out", str(out), *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.load(out / "weights.pt", weights_only=True), losses


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: dict, b: dict, tol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1, "--steps", 6)


def test_micro_batches_give_the_one_batch_step(single, tmp_path):
    weights, losses = _run(tmp_path, 1, "--steps", 6, "--micro", 4)
    _close(weights, single[0])
    assert losses == pytest.approx(single[1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_give_the_one_rank_step(single, tmp_path, mode):
    weights, losses = _run(tmp_path, 2, "--steps", 6, "--mode", mode)
    _close(weights, single[0])
    assert losses == pytest.approx(single[1], rel=1e-5)  # the logged loss is the global batch's
    assert json.loads((tmp_path / "world.json").read_text()) == {"world": 2, "mode": mode}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_two_rank_checkpoint_resumes_in_one_process(single, tmp_path, mode):
    state = tmp_path / "state"
    _run(tmp_path / "first", 2, "--steps", 6, "--mode", mode, "--state", state, "--every", 3)
    steps = sorted(p.name for p in state.iterdir() if p.name.startswith("step-"))
    if mode == "fsdp2":
        assert "step-00000003.dcp" in steps  # torch.distributed.checkpoint shards
    # drop the final checkpoint: the one-process run continues from step 3 to step 6
    for name in ("step-00000006.pt", "step-00000006.dcp"):
        target = state / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    weights, losses = _run(tmp_path / "second", 1, "--steps", 6, "--state", state, "--every", 3)
    _close(weights, single[0])
    assert losses == pytest.approx(single[1][3:], rel=1e-5)


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("batch", [1, 5, 16, 17, 23])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_every_rank_runs_the_same_number_of_micro_batches(monkeypatch, world, batch, micro):
    """FSDP2 gathers weights in every forward: ranks with different numbers of micro-batches would hang. The
    real pieces of all ranks are the global batch, once each."""
    from engine import data, distributed

    group, counts, seen = list(range(batch)), set(), []
    for rank in range(world):
        monkeypatch.setattr(distributed, "_CURRENT", distributed.Dist("fsdp2", rank, world))
        parts = data.micro_groups(group, micro)
        counts.add(len(parts))
        seen += [i for items, dummy in parts if not dummy for i in items]
        assert all(items for items, _ in parts)  # no empty piece: a dummy holds one row, weighed 0
    assert len(counts) == 1 and counts.pop() <= micro
    assert sorted(seen) == group


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_uneven_micro_batches_on_two_ranks_give_the_one_rank_step(tmp_path, mode):
    """A global batch of 17 in 4 micro-batches: 9 and 8 rows per rank, which used to cut into 3 and 4 pieces
    (FSDP2 then hung in its all-gathers)."""
    one = _run(tmp_path / "one", 1, "--steps", 3, "--batch", 17)
    weights, losses = _run(tmp_path / "two", 2, "--steps", 3, "--batch", 17, "--micro", 4, "--mode", mode,
                           timeout=150)
    _close(weights, one[0])
    assert losses == pytest.approx(one[1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_moe_routing_is_logged_for_the_whole_global_batch(tmp_path, mode):
    """The routing logged under torchrun is that of every rank's last micro-batch, read from the module that
    trains (FSDP2 trains a copy: reading the plain model failed with a KeyError), summed over the ranks: each
    sparse layer routes every real token of the global batch to its top 2 experts."""
    _run(tmp_path / "two", 2, "--steps", 2, "--moe", 4, "--mode", mode, timeout=200)
    _run(tmp_path / "one", 1, "--steps", 2, "--moe", 4)

    def routed(out):  # per step, per sparse layer: the assignments counted (2 per real token, whatever the routing)
        return [[sum(layer) for layer in r["tokens_per_expert"]] for r in _records(out)]
    one, two = routed(tmp_path / "one"), routed(tmp_path / "two")
    assert len(one) == 2 and all(len(step) == 2 for step in one)
    assert two == one  # the whole global batch: not one rank's half


TRAIN = ["--world.languages", "en,qsv", "--world.sizes", "{syn-xnli = [300, 40, 40], syn-tatoeba = [0, 0, 30], "
         "syn-mnli = [160, 30, 0]}", "--model.preset", "tiny", "--pretrain.steps", "30", "--pretrain.batch_size", "16",
         "--pretrain.documents_per_language", "150", "--pretrain.vocab_size", "400", "--protocol.conditions",
         "baseline,syn-mnli,multi:syn-mnli+mlm", "--protocol.targets", "syn-xnli,syn-tatoeba", "--target.epochs", "2",
         "--target.batch_size", "16", "--intermediate.epochs", "1", "--intermediate.batch_size", "16",
         "--run.precision", "fp32", "--run.console", "false", "--run.cache_dir", "none", "--model.hidden_dropout", "0"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "one"
    proc = subprocess.run([sys.executable, "-m", "engine.train", *TRAIN, "--run.threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_engine_train_under_torchrun(one_process_run, tmp_path, mode):
    """The whole protocol on 2 ranks, a multi-task condition included: rank 0 alone writes (one log line per
    step), and the scores are the one process's (up to an example flipped by fp32 summation order)."""
    out = tmp_path / "two"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "engine.train", *TRAIN, "--run.distributed", mode, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two, one = (json.loads((d / "results.json").read_text()) for d in (out, one_process_run))
    assert two["environment"]["world_size"] == 2 and two["environment"]["distributed"] == mode
    for condition, by_task in one["scores"].items():
        for task, by_lang in by_task.items():
            for lang, value in by_lang.items():
                assert abs(two["scores"][condition][task][lang] - value) <= 100 / 30 + 1e-9, (condition, task, lang)
    # the multi-task condition: every rank takes the dev scores rank 0 computed (the others used to have none)
    multi = {name: info for name, info in two["phases"].items() if "dev_en_by_task" in info}
    assert multi and all(set(info["dev_en_by_task"]) == {"syn-mnli"} for info in multi.values()), two["phases"]
    for phase in ("pretrain", "baseline/syn-xnli", "syn-mnli/intermediate-syn-mnli"):
        lines = [json.loads(x) for x in (out / phase / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in lines if "loss" in r]
        assert steps == sorted(set(steps))  # logged once, by rank 0


def test_no_distribution_under_torchrun_is_refused(monkeypatch):
    """run.distributed none with WORLD_SIZE > 1 would make every process rank 0, writing the same files."""
    from engine import distributed
    from engine.config import ConfigError
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="run.distributed 'none' under torchrun"):
        distributed.setup("none", "cpu")
