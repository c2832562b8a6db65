"""Never lose work: a run killed with a real SIGKILL (in the middle of a phase, and while a checkpoint is being
written) and resumed with --resume gives bit for bit what the uninterrupted run gives: weights, optimizer
state, logged losses (in the JSONL and in the TensorBoard events), scores. A corrupt checkpoint is reported and
the one before it is used. A non-finite step is skipped, and too many in a row stop the phase with the last
checkpoint intact."""
import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.trainer import Checkpoints, LoopConfig, NonFiniteTraining, train_loop
from engine.progress import PhaseLogger

SIZES = "{syn-xnli = [300, 40, 40], syn-tatoeba = [0, 0, 30], syn-mnli = [160, 30, 0]}"
ARGS = ["--world.languages", "en,qsv", "--world.sizes", SIZES, "--model.preset", "tiny",
        "--pretrain.steps", "30", "--pretrain.batch_size", "16", "--pretrain.documents_per_language", "150",
        "--pretrain.vocab_size", "400", "--pretrain.lr", "1e-3", "--pretrain.log_every", "4",
        "--protocol.conditions", "baseline,syn-mnli", "--protocol.targets", "syn-xnli,syn-tatoeba",
        "--target.epochs", "2", "--target.batch_size", "16", "--target.log_every", "3", "--target.evals_per_epoch", "2",
        "--intermediate.epochs", "1", "--intermediate.batch_size", "16", "--intermediate.log_every", "3",
        "--run.precision", "fp32", "--run.threads", "1", "--run.console", "false", "--run.cache_dir", "none",
        "--run.checkpoint_every", "5", "--run.keep_finished_state", "true"]
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # in the dev extras; optional elsewhere
if TENSORBOARD:
    ARGS += ["--run.tensorboard", "true"]

# A child that runs engine.train and SIGKILLs itself at a chosen point: when the n-th checkpoint of a phase is
# saved (mode "after"), or between writing a checkpoint's temporary file and renaming it (mode "during").
KILLER = textwrap.dedent("""
    import os, signal, sys
    phase, nth, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import engine.trainer as trainer
    real_replace, real_save, seen = os.replace, trainer.Checkpoints.save, [0]

    def in_phase(path):
        return f"/{phase}/state/" in str(path) and "step-" in str(path)

    def save(self, step, state, *args):
        if in_phase(self.folder / "step-"):
            seen[0] += 1
            if mode == "during" and seen[0] == nth:
                def replace(src, dst):
                    if in_phase(dst):
                        os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written, not yet renamed
                    return real_replace(src, dst)
                os.replace = replace
        path = real_save(self, step, state, *args)
        if mode == "after" and in_phase(path) and seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer.Checkpoints.save = save
    from engine.train import main
    sys.exit(main(sys.argv[4:]))
""")


def _train(args, cwd):
    return subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=cwd, capture_output=True, text=True)


def _killed(args, phase, nth, mode, tmp):
    script = tmp / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), phase, str(nth), mode, *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    return proc


def _losses(path: Path):
    """The logged training curve without wall-clock fields."""
    keep = ("step", "loss", "lr", "dev_score", "best", "skipped_steps")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, path.read_text().splitlines())]


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of one phase's folder, as TensorBoard shows them (a resumed writer's purge
    applied): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same_curve_in_tensorboard(phase_dir: Path):
    """Every numeric field of the JSONL, at every step, once, in the events (stored as float32)."""
    records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
    events = _events(phase_dir)
    tags = [t for t in ("loss", "lr", "tokens_per_s", "dev_score") if any(t in r for r in records)]
    assert "loss" in tags and "lr" in tags
    for tag in tags:
        logged = [(r["step"], r[tag]) for r in records if tag in r]
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in logged] == events.get(tag), (phase_dir, tag)


def _final_state(phase_dir: Path) -> dict:
    steps = sorted((phase_dir / "state").glob("step-*.pt"))
    return torch.load(steps[-1], weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "a"
    proc = _train([*ARGS, "--out", str(out)], Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _same_run(a: Path, b: Path):
    ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert ra["scores"] == rb["scores"]  # final scores, bit for bit
    for phase in ("pretrain", "baseline/syn-xnli", "syn-mnli/intermediate-syn-mnli", "syn-mnli/syn-xnli"):
        assert _losses(a / phase / "metrics.jsonl") == _losses(b / phase / "metrics.jsonl"), phase
        if TENSORBOARD:
            _same_curve_in_tensorboard(a / phase)
            _same_curve_in_tensorboard(b / phase)  # the resumed run's events, after the killed run's
    for phase in ("baseline/syn-xnli", "syn-mnli/intermediate-syn-mnli", "syn-mnli/syn-xnli"):
        wa, wb = load_file(a / phase / "checkpoint" / "model.safetensors"), load_file(b / phase / "checkpoint" /
                                                                                       "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), phase
        sa, sb = _final_state(a / phase), _final_state(b / phase)
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
        oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
        assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    return ra, rb


@pytest.mark.slow
@pytest.mark.parametrize("phase,nth,mode", [("syn-mnli/syn-xnli", 3, "after"), ("pretrain", 3, "during")],
                         ids=["killed-mid-target-phase", "killed-while-writing-a-pretraining-checkpoint"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path, phase, nth, mode):
    out = tmp_path / "b"
    proc = _killed([*ARGS, "--out", str(out)], phase, nth, mode, tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]  # really killed
    assert not (out / "results.json").exists()
    states = sorted((out / phase / "state").glob("step-*.pt"))
    assert states  # the checkpoints written before the kill
    if mode == "during":  # the half-written one never got its name: the previous checkpoint is the newest
        assert list((out / phase / "state").glob(".step-*.tmp"))
        assert int(states[-1].stem.split("-")[1]) == 5 * (nth - 1)
    again = _train([*ARGS, "--out", str(out), "--resume"], Path(__file__).resolve().parents[2])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after step" in again.stdout
    _, resumed = _same_run(uninterrupted, out)
    if phase != "pretrain":  # finished phases were not redone
        assert "finished before" in again.stdout or resumed["phases"]["syn-mnli/syn-xnli"]["resumed_after_step"]
        assert resumed["phases"]["syn-mnli/syn-xnli"]["resumed_after_step"] == 5 * nth


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(uninterrupted, tmp_path):
    out = tmp_path / "c"
    proc = _killed([*ARGS, "--out", str(out)], "baseline/syn-xnli", 4, "after", tmp_path)
    assert proc.returncode == -9
    newest = sorted((out / "baseline" / "syn-xnli" / "state").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    again = _train([*ARGS, "--out", str(out), "--resume"], Path(__file__).resolve().parents[2])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{newest} cannot be read" in again.stdout and "resuming after step 15" in again.stdout
    _same_run(uninterrupted, out)


def test_resume_refuses_another_configuration(uninterrupted, capsys):
    from engine.train import main

    assert main([*ARGS, "--out", str(uninterrupted), "--resume", "--target.lr", "0.5"]) == 2
    assert "target.lr: run has 0.0005, now 0.5" in capsys.readouterr().err
    assert main([*ARGS, "--out", str(uninterrupted.parent / "none"), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


# ----- non-finite steps -------------------------------------------------------------------------------------
class _Toy(torch.nn.Module):
    """A linear model whose loss is NaN on chosen steps (counted by forward calls)."""

    def __init__(self, nan_steps):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)
        self.calls, self.nan_steps = 0, set(nan_steps)

    def forward(self, batch):
        self.calls += 1
        loss = (self.w(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()
        return {"loss": loss * math.nan if self.calls in self.nan_steps else loss}


class _Stream:
    def __init__(self):
        self.g, self.i = torch.Generator().manual_seed(0), 0

    def __next__(self):
        self.i += 1
        x = torch.randn(8, 4, generator=self.g)
        return {"x": x, "y": x.sum(1), "lengths": torch.ones(8, dtype=torch.long)}

    def state(self):
        return {"i": self.i}

    def restore(self, state):
        self.i = state["i"]


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = _Toy(nan_steps={3, 4})
    weights = []

    class Watch(_Stream):
        def __next__(self):
            weights.append(model.w.weight.detach().clone())
            return super().__next__()

    logger = PhaseLogger("toy", tmp_path / "m.jsonl", console=False)
    result = train_loop(model, Watch(), LoopConfig(steps=8, lr=0.1, log_every=4, warmup_ratio=0.0), logger)
    assert result.skipped == 2
    assert torch.equal(weights[2], weights[3]) and torch.equal(weights[3], weights[4])  # no update at steps 3, 4
    assert not torch.equal(weights[1], weights[2])  # the others update
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[0]["skipped_steps"] == 2 and math.isfinite(records[0]["loss"]) and "skipped_steps" not in records[1]


def test_too_many_non_finite_steps_in_a_row_stop_with_the_checkpoint_intact(tmp_path):
    model = _Toy(nan_steps=set(range(7, 100)))
    checkpoints = Checkpoints(tmp_path / "state")
    logger = PhaseLogger("toy", tmp_path / "m.jsonl", console=False)
    with pytest.raises(NonFiniteTraining, match=r"3 steps in a row \(up to step 9\).*last checkpoint is in"):
        train_loop(model, _Stream(), LoopConfig(steps=20, lr=0.1, checkpoint_every=5, max_skipped=3), logger,
                   checkpoints=checkpoints)
    state, path = checkpoints.latest()
    assert path.name == "step-00000005.pt" and state["trainer"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_shards_left_without_their_checkpoint_are_pruned(tmp_path):
    """FSDP2 writes step-<n>.dcp/ before step-<n>.pt: a run killed in between leaves shards no checkpoint names,
    which the next save removes (a newer step's shards are left alone: they may be being written)."""
    model = _Toy(nan_steps=set())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = Checkpoints(tmp_path / "state")
    for n in (3, 9):
        (tmp_path / "state" / f"step-{n:08d}.dcp").mkdir(parents=True)
    checkpoints.save(5, {"trainer": {"best_step": None}}, model, model, opt)
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert "step-00000003.dcp" not in names and "step-00000009.dcp" in names and "step-00000005.pt" in names
