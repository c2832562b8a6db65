"""Configuration: defaults <- TOML <- dotted CLI overrides; every mistake names itself and exits 2."""
import pytest

from engine import config as C
from engine.train import main, parse_args


def test_overrides_are_typed_and_layered(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[run]\nname = "x"\nseed = 3\n[target]\nlr = 0.001\noverrides = {syn-pos = {epochs = 1}}\n')
    cfg = C.load(str(f), [("run.seed", "5"), ("target.epochs", "2.5"), ("protocol.conditions", "baseline,syn-swag"),
                          ("world.languages", '["en", "qso"]'), ("run.console", "false")])
    assert (cfg.run.name, cfg.run.seed, cfg.target.lr, cfg.target.epochs) == ("x", 5, 0.001, 2.5)
    assert cfg.protocol.conditions == ["baseline", "syn-swag"] and cfg.world.languages == ["en", "qso"]
    assert cfg.run.console is False
    assert cfg.target.for_task("syn-pos").epochs == 1 and cfg.target.for_task("syn-xnli").epochs == 2.5


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load(None, [("target.overrides", "{syn-pos = {epochs = 1}}"), ("run.name", 'a "quoted" name')])
    f = tmp_path / "resolved.toml"
    f.write_text(C.to_toml(cfg))
    assert C.load(str(f), []) == cfg


@pytest.mark.parametrize("overrides,message", [
    ([("run.bogus", "1")], "unknown key 'bogus'"),
    ([("nosection.key", "1")], "unknown section 'nosection'"),
    ([("run.seed", "abc")], r"--run.seed: expected an integer, got 'abc'"),
    ([("target.lr", "true")], "expected a number"),
    ([("run.console", "maybe")], "expected true or false"),
    ([("seed", "1")], "options take the form --section.key value"),
])
def test_bad_overrides_name_the_option(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, overrides)


def test_bad_file_names_the_file_and_key(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\npreset = 3\n")
    with pytest.raises(C.ConfigError, match=r"bad.toml: model.preset: expected a string"):
        C.load(str(f), [])
    f.write_text("[model\n")
    with pytest.raises(C.ConfigError, match="invalid TOML"):
        C.load(str(f), [])
    with pytest.raises(C.ConfigError, match="no such file"):
        C.load(str(tmp_path / "missing.toml"), [])


@pytest.mark.parametrize("argv,message", [
    (["--protocol.targets", "syn-bogus"], "unknown target task 'syn-bogus'"),
    (["--protocol.languages", "en,xx"], "unknown language 'xx'"),
    (["--protocol.conditions", "baseline,syn-xnli"], "unknown condition 'syn-xnli'"),
    (["--world.languages", "en,zz"], "unknown synthetic language"),
    (["--model.preset", "huge"], "unknown model preset 'huge'"),
    (["--target.overrides", "{syn-nope = {epochs = 1}}"], "unknown task 'syn-nope'"),
    (["--frobnicate", "1"], "unknown option --frobnicate"),
    (["stray"], "unexpected argument 'stray'"),
    (["--target.epochs"], "needs a value"),
])
def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out)] if argv[-1] != "--target.epochs" else argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_parse_args_forms():
    cfg, overrides, printing = parse_args(["--config", "a.toml", "--target.lr=0.1", "--out", "d", "--print-config"])
    assert cfg == "a.toml" and printing and overrides == [("target.lr", "0.1"), ("run.out", "d")]


def test_print_config_validates_and_prints(capsys):
    assert main(["--print-config", "--target.epochs", "4"]) == 0
    printed = capsys.readouterr().out
    assert "[target]" in printed and "epochs = 4.0" in printed


def test_window_settings_are_checked_per_task(tmp_path):
    from engine.protocol import plan

    cfg = C.load(None, [("run.out", str(tmp_path / "o")), ("target.overrides", "{syn-xquad = {doc_stride = 0}}")])
    with pytest.raises(C.ConfigError, match=r"target.overrides.syn-xquad.doc_stride: must be >= 1, got 0"):
        plan(cfg)


@pytest.mark.parametrize("overrides,message", [
    ([("target.batch_size", "0")], "target.batch_size: must be >= 1, got 0"),
    ([("intermediate.lr", "-1")], "intermediate.lr: must be > 0"),
    ([("target.warmup_ratio", "1.5")], r"target.warmup_ratio: must be in \[0, 1\)"),
    ([("target.overrides", "{syn-pos = {epochs = \"two\"}}")], "target.overrides.syn-pos.epochs: expected a number"),
    ([("target.overrides", "{syn-pos = {max_len = 1.5}}")], "target.overrides.syn-pos.max_len: expected an integer"),
    ([("target.overrides", "{nope = {epochs = 1}}")], "target.overrides: unknown task 'nope'"),
    ([("eval.retrieval_layer", "5")], "eval.retrieval_layer: 5: expected -1 .* or 0..4"),
    ([("protocol.suite", "xtreme")], "protocol.suite xtreme: needs a pretrained multilingual encoder, model.name"),
    ([("protocol.suite", "glue")], "protocol.suite: 'glue': expected one of synthetic, xtreme, xtreme-r"),
    ([("model.arch", "moe"), ("model.upcycle", "true")], "model.match: 'active' with an upcycled encoder needs"),
    ([("model.match", "both")], "model.match: 'both': expected one of active, total, none"),
    ([("data.max_train_rows", "-1")], "data.max_train_rows: must be >= 0"),
    ([("model.arch", "moe"), ("model.top_k", "9")], "need experts >= 1 and 1 <= top_k <= experts"),
    ([("model.arch", "moe"), ("model.moe_every", "7")], "model.moe_every: 7: expected 1..4"),
    ([("run.distributed", "mpi")], "run.distributed: 'mpi'"),
    ([("run.keep_checkpoints", "0")], "run.keep_checkpoints: must be >= 1"),
    ([("run.collective_timeout_min", "0")], "run.collective_timeout_min: must be >= 1"),
    ([("target.micro_batches", "64")], r"target.micro_batches: must be in 1..batch_size \(32\)"),
    ([("pretrain.mask_prob", "1.5")], "pretrain.mask_prob must be in"),
])
def test_values_are_checked_before_any_work(tmp_path, overrides, message):
    """Every value is checked by plan(), which runs before anything is read, trained or written."""
    from engine.protocol import plan

    cfg = C.load(None, [("run.out", str(tmp_path / "o")), *overrides])
    with pytest.raises(C.ConfigError, match=message):
        plan(cfg)
    assert not (tmp_path / "o").exists()


def test_recipes_extend_each_other(tmp_path):
    (tmp_path / "base.toml").write_text('[run]\nname = "base"\nseed = 3\n[target]\nlr = 0.001\n'
                                        'overrides = {syn-pos = {epochs = 1.0, lr = 0.002}}\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[run]\nname = "child"\n'
                                         '[target.overrides]\nsyn-pos = {epochs = 2.0}\n')
    cfg = C.load(str(tmp_path / "child.toml"), [])
    assert (cfg.run.name, cfg.run.seed, cfg.target.lr) == ("child", 3, 0.001)
    assert cfg.target.overrides == {"syn-pos": {"epochs": 2.0, "lr": 0.002}}  # merged table by table
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(C.ConfigError, match="a cycle of recipes"):
        C.load(str(tmp_path / "loop.toml"), [])
    (tmp_path / "orphan.toml").write_text('extends = "gone.toml"\n')
    with pytest.raises(C.ConfigError, match=r"orphan.toml: extends .*gone.toml: no such file"):
        C.load(str(tmp_path / "orphan.toml"), [])


def test_tensorboard_without_its_package_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    assert main(["--run.tensorboard", "true", "--out", str(out)]) == 2
    assert "run.tensorboard: true needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not out.exists()


def test_a_table_on_the_command_line_merges_into_the_defaults_and_the_file(tmp_path):
    cfg = C.load(None, [("target.overrides", "{syn-pos = {epochs = 1}}")])
    assert cfg.target.overrides == {"syn-xquad": {"lr": 1e-3}, "syn-pos": {"epochs": 1}}  # syn-xquad's lr kept
    recipe = tmp_path / "r.toml"
    recipe.write_text("[target.overrides]\nsyn-panx = { lr = 5e-4, epochs = 3.0 }\n")
    cfg = C.load(str(recipe), [("target.overrides", "{syn-panx = {epochs = 1.0}}")])
    assert cfg.target.overrides == {"syn-panx": {"lr": 5e-4, "epochs": 1.0}}  # the file's table replaces the defaults'
