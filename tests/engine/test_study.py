"""A tiny configuration of the whole protocol, end to end: pretrain -> intermediate -> targets -> zero-shot
evaluation, with the output contract checked and the scores sane (English above chance, retrieval above
chance). Runs in well under a minute on 2 CPU cores."""
import json
import math

import pytest
import torch

from engine import config as C
from engine.protocol import run_study

SIZES = {"syn-xnli": [1500, 100, 100], "syn-pos": [200, 60, 60], "syn-panx": [200, 60, 60],
         "syn-xquad": [200, 40, 40], "syn-tatoeba": [0, 0, 60], "syn-mnli": [200, 40, 0],
         "syn-squad": [100, 20, 0], "syn-swag": [100, 20, 0]}
LANGS = ["en", "qsv", "qcy"]


def tiny_config(out, cache) -> C.Config:
    return C.load(None, _overrides(out, cache))


def _overrides(out, cache) -> list[tuple[str, str]]:
    return [
        ("run.out", str(out)), ("run.cache_dir", str(cache)), ("run.console", "false"),
        ("world.languages", json.dumps(LANGS)), ("world.sizes", _toml_table(SIZES)),
        ("model.preset", "tiny"),
        ("pretrain.steps", "60"), ("pretrain.batch_size", "32"), ("pretrain.documents_per_language", "400"),
        ("pretrain.vocab_size", "600"), ("pretrain.lr", "1e-3"),  # pinned: the default is tuned for xlt-tiny
        ("intermediate.epochs", "1"), ("intermediate.lr", "2e-3"),
        ("target.epochs", "4"), ("target.lr", "3e-3"), ("target.batch_size", "16"), ("run.precision", "fp32"),
        ("protocol.conditions", "baseline,syn-mnli"),
    ]


def _toml_table(d):
    return "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)
    results = run_study(tiny_config(root / "run", root / "cache"))
    return root, results


def test_output_contract(study):
    root, results = study
    out = root / "run"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["scores"] == results["scores"]
    scores = results["scores"]
    assert set(scores) == {"baseline", "syn-mnli"}
    for condition, by_task in scores.items():
        assert set(by_task) == {"syn-xnli", "syn-pos", "syn-panx", "syn-xquad", "syn-tatoeba"}
        for task, by_lang in by_task.items():
            expected = [lang for lang in LANGS if task != "syn-tatoeba" or lang != "en"]
            assert list(by_lang) == expected
            assert all(0.0 <= s <= 100.0 and math.isfinite(s) for s in by_lang.values())
    resolved = tiny_config(out, root / "cache")  # the config is saved resolved: the suite's targets named
    resolved.protocol.targets = ["syn-xnli", "syn-pos", "syn-panx", "syn-xquad", "syn-tatoeba"]
    assert C.load(str(out / "config.toml"), []) == resolved
    assert (out / "results.md").read_text().startswith("### baseline")
    for phase in ("syn-mnli/intermediate-syn-mnli", "baseline/syn-xnli", "syn-mnli/syn-xquad"):
        lines = (out / phase / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert any("loss" in r for r in records) and any("dev_score" in r for r in records)
        assert (out / phase / "checkpoint" / "model.safetensors").stat().st_size > 0
    tags = (out / "baseline" / "predictions" / "syn-pos" / "test-qcy.tsv").read_text().split("\n\n")
    assert len([s for s in tags if s.strip()]) == SIZES["syn-pos"][2]  # the leaderboard layout: one sentence each
    assert (out / "baseline" / "labels" / "syn-xquad" / "test-en.json").is_file()
    summary = results["summary"]["by_condition"]["baseline"]["syn-xnli"]
    assert summary["gap"] == pytest.approx(summary["en"] - summary["zero_shot_mean"])
    assert set(results["summary"]["delta_vs_baseline"]) == {"syn-mnli"}
    lineage = results["phases"]["syn-mnli/syn-pos"]["lineage"]
    assert lineage == ["pretrained", "syn-mnli"]


def test_rescoring_the_written_files_gives_the_results(study, capsys):
    """python -m eval.score on a condition's leaderboard folders gives the very numbers of results.json."""
    from eval.score import main

    root, results = study
    for condition in ("baseline", "syn-mnli"):
        folder = root / "run" / condition
        assert main([str(folder / "predictions"), str(folder / "labels"), "--suite", "synthetic", "--partial",
                     "--out", str(root / f"{condition}.json")]) == 0
        official = json.loads((root / f"{condition}.json").read_text())
        assert official == results["suite"]["scores"][condition]
        for task, by_lang in results["scores"][condition].items():
            key = next(k for k in ("f1", "accuracy") if k in official[task]) if task != "syn-xquad" else None
            for lang, value in by_lang.items():
                expected = ((official[task]["exact_match"][lang] + official[task]["f1"][lang]) / 2 if key is None
                            else official[task][key][lang])
                assert value == expected
    assert "all_task" not in results["suite"]["scores"]["baseline"]  # three of the seven languages only


def test_targets_are_paired_across_conditions(study):
    """Every condition fine-tunes a target with the same seed: same head initialisation, same batch order."""
    _, results = study
    for task in ("syn-xnli", "syn-pos", "syn-xquad"):
        base, other = results["phases"][f"baseline/{task}"], results["phases"][f"syn-mnli/{task}"]
        assert base["seed"] == other["seed"]
        assert base["head_init"] == other["head_init"] and base["data_order"] == other["data_order"]
    seeds = {results["phases"][f"baseline/{t}"]["seed"] for t in ("syn-xnli", "syn-pos", "syn-xquad")}
    assert len(seeds) == 3  # tasks differ from each other
    from engine.protocol import target_seed
    from engine.sources import Training

    training = Training(("syn-xnli",), "syn-xnli")
    assert target_seed(0, training, "syn-xnli") == results["phases"]["baseline/syn-xnli"]["seed"]
    assert target_seed(1, training, "syn-xnli") != target_seed(0, training, "syn-xnli")  # run.seed varies it


def test_scores_are_sane(study):
    _, results = study
    base = results["scores"]["baseline"]
    assert base["syn-xnli"]["en"] > results["chance"]["syn-xnli"] + 10  # English learned the pair task
    assert base["syn-pos"]["en"] > 50  # tagging is learned
    # retrieval above chance where names and digits are shared (qcy transliterates them: no anchor)
    assert base["syn-tatoeba"]["qsv"] > 100 / SIZES["syn-tatoeba"][2] * 3
    best = results["phases"]["baseline/syn-xnli"]
    assert best["best_step"] is not None and best["dev_en"] <= 100


def test_second_run_reuses_pretraining_and_is_deterministic(study, tmp_path):
    root, first = study
    torch.manual_seed(123)  # the run seeds itself: global state must not matter
    again = run_study(tiny_config(tmp_path / "again", root / "cache"))
    assert again["phases"]["pretrain"]["cached"] is True
    assert again["scores"] == first["scores"]


def test_phase_checkpoints_load_in_transformers(study):
    import transformers

    from models import hf

    root, _ = study
    folder = root / "run" / "baseline" / "syn-pos" / "checkpoint"
    theirs, info = transformers.AutoModelForTokenClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model, report = hf.load_task_model(folder)
    assert model.head.kind == "tagging" and report.labels == list(theirs.config.id2label.values())
    assert json.loads((folder / "task.json").read_text())["task"] == "syn-pos"
    tok = hf.load_tokenizer(folder)
    assert tok("Ana sees 3 cats")["input_ids"][0] == tok.cls_token_id


def test_a_hugging_face_model_by_name_replaces_pretraining(study, tmp_path):
    """The pretrained encoder exported as a HF folder and named in the config gives the same study."""
    from engine.pretrain import pretrain
    from models import hf, preset

    root, first = study
    cfg = tiny_config(tmp_path / "unused", root / "cache")
    from engine.protocol import plan
    encoder, tokenizer, info = pretrain(plan(cfg).world, preset("tiny"), cfg.pretrain, cfg.run.seed, root / "cache")
    assert info["cached"]
    hf.export(encoder, tmp_path / "hf-model", tokenizer=tokenizer)
    cfg = C.load(None, [*_overrides(tmp_path / "named", root / "cache"), ("model.name", str(tmp_path / "hf-model")),
                        ("protocol.conditions", "baseline"), ("protocol.targets", "syn-xnli,syn-tatoeba")])
    again = run_study(cfg)
    assert again["phases"]["pretrain"]["model"] == str(tmp_path / "hf-model")
    assert not (tmp_path / "named" / "pretrain").exists()
    for task in ("syn-xnli", "syn-tatoeba"):
        assert again["scores"]["baseline"][task] == first["scores"]["baseline"][task]


def test_a_wrong_model_name_fails_before_writing(tmp_path):
    cfg = C.load(None, [("run.out", str(tmp_path / "out")), ("model.name", str(tmp_path / "missing" / "a" / "b"))])
    with pytest.raises(C.ConfigError, match="model.name: .*no such folder"):
        run_study(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("upcycle", [True, False])
def test_moe_encoder_is_one_option(study, tmp_path, upcycle):
    """model.arch = moe: upcycled from the cached dense pretraining, or pretrained sparse from scratch."""
    root, first = study
    cfg = C.load(None, [*_overrides(tmp_path / "moe", root / "cache"), ("model.arch", "moe"),
                        ("model.experts", "4"), ("model.upcycle", str(upcycle).lower()),
                        ("model.top_k", "1" if upcycle else "2"),  # upcycled top-1 copies: active-matched
                        ("protocol.conditions", "baseline"), ("protocol.targets", "syn-xnli"),
                        # At the fixture's 4 epochs of lr 3e-3 this tiny MoE stayed on the ln 3 plateau in 2 of
                        # 8 runs (run seeds 0-3 x both variants: English 35.0, the majority class) and reached
                        # only 43.0 in a third; at 8 epochs of 1e-3 all 8 left it (English 47-60, the
                        # last logged losses 0.61-0.98).
                        ("target.lr", "1e-3"), ("target.epochs", "8")])
    results = run_study(cfg)
    pre = results["phases"]["pretrain"]
    assert pre["experts"] == 4 and pre["top_k"] == (1 if upcycle else 2)
    assert pre["active_parameters"] < pre["parameters"]
    arms = results["model"]  # both arms' counts are recorded
    assert arms["arch"] == "moe" and arms["match"] == "active" and arms["dense"]["experts"] == 0
    router = 4 * 32 * 2  # hidden 32 x 4 experts, 2 sparse layers
    assert abs(arms["model"]["active_parameters"] - arms["dense"]["parameters"] - router) <= 32 * 2 * 2
    assert pre["cached"] is upcycle  # upcycling reuses the dense pretraining
    records = [json.loads(line) for line in (tmp_path / "moe" / "baseline" / "syn-xnli" / "metrics.jsonl")
               .read_text().splitlines()]
    logged = [r for r in records if "balance_loss" in r]
    assert logged and all(r["max_expert_load"] >= 1.0 and len(r["tokens_per_expert"]) == 2 for r in logged)
    last = [r["task_loss"] for r in logged[-3:]]
    assert sum(last) / len(last) < 0.95 * math.log(3)  # it learned: off the uniform-guess plateau (ln 3)
    if not upcycle:
        assert arms["model"]["flops_per_token"] > arms["dense"]["flops_per_token"]  # + the router
    assert 0 <= results["scores"]["baseline"]["syn-xnli"]["qsv"] <= 100
    # 100 test rows: a model stuck on the plateau scores the majority class (35.0); learned ones 47-60
    assert results["scores"]["baseline"]["syn-xnli"]["en"] > results["chance"]["syn-xnli"] + 5


def test_unknown_arch_is_a_config_error(tmp_path):
    cfg = C.load(None, [("run.out", str(tmp_path / "out")), ("model.arch", "sparse")])
    with pytest.raises(C.ConfigError, match="model: arch 'sparse'"):
        run_study(cfg)
