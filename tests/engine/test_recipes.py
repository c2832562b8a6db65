"""Every shipped recipe resolves (`--print-config`), and a tiny-model run of its task list (all its conditions
and targets, on fixture files in the official formats) passes. Recipes that share a task list share one run."""
import json
from pathlib import Path

import pytest

from engine import config as C
from engine.train import main
from tests import realdata

ALL = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))
RECIPES = [p for p in ALL if not p.name.startswith("study-")]  # engine.train recipes
STUDIES = [p for p in ALL if p.name.startswith("study-")]  # engine.study grids
LANGS = ("en", "de", "ru")
XCOPA = ("et", "ht", "it")  # XCOPA has none of LANGS


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"default.toml", "xtreme-xlmr-large.toml", "xtreme-xlmr-base.toml", "xtreme-mbert-base.toml",
            "xtreme-r-xlmr-large.toml"} <= names
    assert {"study-synthetic.toml", "study-xlmr.toml"} <= {p.name for p in STUDIES}


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_study_recipes_resolve(study, tmp_path, capsys):
    """Every cell of a shipped study resolves (a hub model offline is counted by its preset shape)."""
    from engine.study import grid, load_study
    from engine.study import main as study_main

    assert study_main(["--config", str(study), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    listing = capsys.readouterr().out
    cells = grid(load_study(str(study), []))
    assert f"{len(cells)} cells of study" in listing and all(f"| {c.id} |" in listing for c in cells)
    assert "nanM" not in listing  # every cell counted


def test_the_default_recipe_is_the_embedded_default(capsys):
    """recipes/default.toml is `--print-config` of no arguments: kept up to date with the defaults."""
    default = next(p for p in RECIPES if p.name == "default.toml")
    assert main(["--print-config"]) == 0
    body = "".join(line for line in default.read_text().splitlines(keepends=True) if not line.startswith("#"))
    assert body.strip() == capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    data = realdata.write_data_dir(root / "data", LANGS + XCOPA, {"train": 12, "dev": 6, "test": 6})
    texts = realdata.all_texts(data)
    return root, data, {f: realdata.tiny_hf_model(root / f, f, texts, vocab_size=300) for f in ("xlm-roberta", "bert")}


def _family(recipe: Path) -> str:
    return "bert" if "mbert" in recipe.name else "xlm-roberta"


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name != "default.toml"], ids=lambda p: p.stem)
def test_recipe_resolves(recipe, fixtures, capsys):
    root, data, models = fixtures
    # the tiny model has 2 layers: the recipe's retrieval layer (14 of XLM-R large's 24) is out of its range
    assert main(["--config", str(recipe), "--model.name", str(models[_family(recipe)]), "--eval.retrieval_layer", "-1",
                 "--print-config"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    resolved = root / f"{recipe.stem}.toml"
    resolved.write_text(printed)
    cfg = C.load(str(resolved), [])  # the printed configuration is itself a valid, complete recipe
    assert cfg.protocol.targets and cfg.protocol.conditions[0] == "baseline"
    assert cfg.protocol.suite in ("xtreme", "xtreme-r") and "extends" not in printed


def _task_lists():
    seen, out = set(), []
    for recipe in RECIPES:
        if recipe.name == "default.toml":
            continue
        cfg = C.load(str(recipe), [])
        key = (cfg.protocol.suite, tuple(cfg.protocol.conditions), tuple(cfg.protocol.targets), _family(recipe))
        if key not in seen:
            seen.add(key)
            out.append(recipe)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", _task_lists(), ids=lambda p: p.stem)
def test_a_tiny_model_runs_the_recipes_task_list(recipe, fixtures, tmp_path):
    root, data, models = fixtures
    cfg = C.load(str(recipe), [])
    languages = LANGS + (XCOPA if cfg.protocol.suite == "xtreme-r" else ())
    out = tmp_path / "run"
    code = main(["--config", str(recipe), "--model.name", str(models[_family(recipe)]), "--data.dir", str(data),
                 "--out", str(out), "--run.console", "false", "--run.cache_dir", str(root / "cache"),
                 "--run.precision", "fp32", "--eval.retrieval_layer", "-1",
                 "--protocol.languages", ",".join(languages),
                 "--intermediate.epochs", "1", "--target.epochs", "1"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    resolved = C.load(str(out / "config.toml"), [])
    assert list(results["scores"]) == resolved.protocol.conditions
    for condition, by_task in results["scores"].items():
        assert list(by_task) == resolved.protocol.targets
        assert all(0 <= v <= 100 for by_lang in by_task.values() for v in by_lang.values())
