"""A tiny run of bench.transfer_spread: one row per pretraining seed, each fine-tuning scored in every
language, the ratio computed from them; the pretraining is cached and reused; bad options exit 2."""
import json

import pytest

from bench import transfer_spread as bench

TINY = ["--world.languages", "en,qsv,qcy", "--model.preset", "tiny", "--pretrain.steps", "20",
        "--pretrain.batch_size", "16", "--pretrain.documents_per_language", "150", "--pretrain.vocab_size", "500",
        "--world.sizes", "{syn-xnli = [600, 40, 40], syn-tatoeba = [0, 30, 30]}", "--target.epochs", "2",
        "--target.lr", "3e-3", "--target.batch_size", "16",
        "--run.precision", "fp32"]


@pytest.mark.slow
def test_rows_and_cached_pretraining(tmp_path, capsys):
    out, cache = tmp_path / "spread.jsonl", tmp_path / "cache"
    args = ["--pretrain-seeds", "0,1", "--finetune-seeds", "0,2", "--cache", str(cache), "--results", str(out)]
    assert bench.main(args + TINY) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pretrain_seed"] for r in rows] == [0, 1]
    for r in rows:
        assert r["bench"] == "transfer_spread" and r["task"] == "syn-xnli" and not r["pretrain_cached"]
        assert r["split"] == "dev"  # held apart from the test sets the default reports
        assert {"commit", "torch", "cpu"} <= r.keys()
        assert [f["finetune_seed"] for f in r["finetunes"]] == [0, 2]
        for f in r["finetunes"]:
            assert list(f["scores"]) == ["en", "qsv", "qcy"]
            assert all(0 <= v <= 100 for v in f["scores"].values())
            assert f["zero_shot_mean"] == pytest.approx((f["scores"]["qsv"] + f["scores"]["qcy"]) / 2)
            assert f["ratio"] == pytest.approx(f["zero_shot_mean"] / f["en"])
        assert list(r["tatoeba"]) == ["qsv", "qcy"] and 0 <= r["tatoeba_mean"] <= 100
    assert rows[0]["pretrain_loss"] != rows[1]["pretrain_loss"]  # another pretraining seed, another encoder
    assert "mean over 4 fine-tunings" in capsys.readouterr().out
    # a second run reuses both pretrainings and reproduces the scores
    assert bench.main(["--pretrain-seeds", "1", "--finetune-seeds", "0,2", "--cache", str(cache),
                       "--results", str(out)] + TINY) == 0
    again = json.loads(out.read_text().splitlines()[-1])
    assert again["pretrain_cached"] and again["finetunes"] == rows[1]["finetunes"]
    assert again["tatoeba"] == rows[1]["tatoeba"]


def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "spread.jsonl"
    assert bench.main(["--task", "syn-pos", "--results", str(out), "--cache", str(tmp_path)] + TINY) == 2
    assert "sentence-pair target task" in capsys.readouterr().err
    assert bench.main(["--results", str(out), "--target.epoch", "1"]) == 2
    assert "unknown key 'epoch'" in capsys.readouterr().err
    assert not out.exists()
