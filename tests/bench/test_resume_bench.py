"""bench.resume_default on a tiny configuration: killed mid target phase, resumed, the row says it agrees."""
import json

from bench import resume_default

TINY = ["--world.languages", "en,qsv", "--world.sizes", "{syn-xnli = [200, 30, 30], syn-tatoeba = [0, 0, 20], "
        "syn-mnli = [100, 20, 0]}", "--model.preset", "tiny", "--pretrain.steps", "20", "--pretrain.batch_size", "16",
        "--pretrain.documents_per_language", "120", "--pretrain.vocab_size", "300", "--protocol.targets",
        "syn-xnli,syn-tatoeba", "--protocol.conditions", "baseline,syn-mnli", "--target.epochs", "1",
        "--target.batch_size", "16", "--intermediate.epochs", "1", "--intermediate.batch_size", "16",
        "--run.precision", "fp32", "--run.threads", "1", "--run.checkpoint_every", "4"]


def test_resume_bench_row(tmp_path):
    out = tmp_path / "resume.jsonl"
    # --run.checkpoint_every 4 comes after the bench's own 50: the later option wins
    assert resume_default.main(["--after", "2", "--results", str(out), *TINY]) == 0
    row = json.loads(out.read_text())
    assert row["killed_exit_code"] == -9 and row["resumed_after_step"] == 8
    assert row["scores_equal"] and row["summary_equal"] and row["logged_losses_equal"]
