"""engine.zero_shot end to end: a tiny random encoder and a tokenizer built here, on fixture Tatoeba and BUCC files.
An untrained encoder retrieves near chance, so the test checks layout, ranges and consistency, not quality."""
import json

import pytest
import torch

from engine.evaluate import embed
from engine.zero_shot import main
from eval.score import score_task
from eval.suites import SUITES

GERMAN = ["der Hund schläft", "die Katze isst", "ein Haus ist groß", "wir spielen Musik", "Ana liest ein Buch",
          "das Auto ist rot"]
FRENCH = ["le chien dort", "le chat mange", "une maison est grande", "nous jouons de la musique",
          "Ana lit un livre", "la voiture est rouge"]
ENGLISH = ["the dog sleeps", "the cat eats", "a house is big", "we play music", "Ana reads a book", "the car is red"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine.pretrain import train_tokenizer
    from models import Encoder, hf, preset

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    tokenizer = train_tokenizer(GERMAN + FRENCH + ENGLISH, vocab_size=200)
    encoder = Encoder(preset("tiny", vocab_size=len(tokenizer)))
    hf.export(encoder, root / "model", tokenizer=tokenizer)
    data = root / "data"
    for lang, iso, sents in (("de", "deu", GERMAN), ("fr", "fra", FRENCH)):
        (data / "tatoeba").mkdir(parents=True, exist_ok=True)
        (data / "tatoeba" / f"tatoeba.{iso}-eng.{iso}").write_text("\n".join(sents) + "\n")
        (data / "tatoeba" / f"tatoeba.{iso}-eng.eng").write_text("\n".join(ENGLISH) + "\n")
    (data / "bucc2018").mkdir()
    for lang, sents in (("de", GERMAN), ("fr", FRENCH)):
        for split, rng in (("sample", range(0, 3)), ("test", range(3, 6))):
            prefix = data / "bucc2018" / f"{lang}-en.{split}"
            (prefix.parent / f"{prefix.name}.{lang}").write_text("".join(f"{lang}-{i}\t{sents[i]}\n" for i in rng))
            (prefix.parent / f"{prefix.name}.en").write_text("".join(f"en-{i}\t{ENGLISH[i]}\n" for i in rng))
            (prefix.parent / f"{prefix.name}.gold").write_text("".join(f"{lang}-{i}\ten-{i}\n" for i in rng))
    return root


def test_retrieval_run_writes_the_leaderboard_layout(setup, capsys):
    out = setup / "out"
    code = main(["--model", str(setup / "model"), "--tasks", "tatoeba,bucc2018", "--languages", "de,fr",
                 "--data-dir", str(setup / "data"), "--layer", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for sub in ("predictions", "labels"):
        assert sorted(p.name for p in (out / sub / "tatoeba").iterdir()) == ["test-de.tsv", "test-fr.tsv"]
        assert (out / sub / "bucc2018" / "test-de.tsv").is_file()
    labels = (out / "labels" / "tatoeba" / "test-de.tsv").read_text().split()
    # sorted English file (code point order): Ana.., a house.., the car.., the cat.., the dog.., we play..
    assert labels == ["4", "3", "1", "5", "0", "2"]
    preds = [int(x) for x in (out / "predictions" / "tatoeba" / "test-de.tsv").read_text().split()]
    assert len(preds) == 6 and all(0 <= p < 6 for p in preds)
    assert (out / "labels" / "bucc2018" / "test-de.tsv").read_text() == "de-3\ten-3\nde-4\ten-4\nde-5\ten-5\n"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["tatoeba"]["accuracy"].keys() == {"de", "fr"} and "retrieval" not in scores  # partial languages
    for task in ("tatoeba", "bucc2018"):
        assert 0 <= scores[task]["avg_metric"] <= 100
    # the written files rescore to the same numbers with the drop-in scorer (on the languages present)
    again = score_task(SUITES["xtreme"], "tatoeba", out / "predictions", out / "labels", ["de", "fr"])
    assert again == scores["tatoeba"]
    view = json.loads((out / "analysis.json").read_text())
    assert view["tasks"]["tatoeba"]["worst"]["language"] in ("de", "fr")
    assert (out / "analysis.md").read_text().startswith("# XTREME-A")
    assert not [p for p in setup.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_mean_and_cls_pooling_differ_and_layers_are_checked(setup):
    from models import hf

    encoder, tokenizer = hf.load_encoder(setup / "model"), hf.load_tokenizer(setup / "model")
    mean = embed(encoder, tokenizer, GERMAN[:2], layer=2, pooling="mean")
    cls = embed(encoder, tokenizer, GERMAN[:2], layer=2, pooling="cls")
    assert mean.shape == cls.shape == (2, encoder.cfg.hidden_size) and not torch.allclose(mean, cls)
    with pytest.raises(ValueError, match="layer 3: expected 0..2"):
        embed(encoder, tokenizer, GERMAN[:1], layer=3)


def test_errors_exit_2_and_write_nothing(setup, capsys):
    base = ["--model", str(setup / "model"), "--data-dir", str(setup / "data")]
    cases = [(["--tasks", "xnli"], "--checkpoint xnli=DIR"),
             (["--tasks", "nope"], "unknown task 'nope'"),
             (["--suite", "xtreme-r", "--tasks", "mewslix"], "mewslix ar test: no local file"),
             (["--tasks", "tatoeba", "--languages", "xx"], "--languages: xx"),
             (["--tasks", "tatoeba", "--languages", "es"], "tatoeba es test: no local file"),
             (["--tasks", "tatoeba", "--languages", "de", "--layer", "9"], "layer 9"),
             (["--checkpoint", "xnli"], "expected TASK=DIR")]
    for i, (args, message) in enumerate(cases):
        out = setup / f"bad{i}"
        assert main([*base, *args, "--out", str(out)]) == 2, args
        assert message in capsys.readouterr().err, args
        assert not out.exists()


def test_finetuned_tasks_run_from_exported_checkpoints(setup, capsys):
    """A tagging and a pair checkpoint in the layout the engine writes (HF folder + tokenizer); labels are
    matched by name even when the checkpoint orders them differently from the task."""
    from engine.pretrain import train_tokenizer
    from models import Encoder, TaskModel, hf, make_head, preset

    tokenizer = train_tokenizer(GERMAN + FRENCH + ENGLISH, vocab_size=200)
    panx, xnli = SUITES["xtreme"].task("panx"), SUITES["xtreme"].task("xnli")
    for name, kind, labels in (("panx", "tagging", list(panx.labels)), ("xnli", "pair", list(xnli.labels)[::-1])):
        encoder = Encoder(preset("tiny", vocab_size=len(tokenizer)))
        hf.export(TaskModel(encoder, make_head(kind, encoder.cfg, encoder, len(labels))), setup / f"ck-{name}",
                  tokenizer=tokenizer, labels=labels)
    data = setup / "data"
    (data / "panx").mkdir(exist_ok=True)
    (data / "panx" / "test-de.tsv").write_text("de:Ana\tB-PER\nde:liest\tO\n\nde:der\tO\nde:Hund\tO\nde:Paris\tB-LOC\n")
    (data / "xnli").mkdir(exist_ok=True)
    (data / "xnli" / "test-de.tsv").write_text("sentence1\tsentence2\tlabel\n" + "".join(
        f"{GERMAN[i]}\t{GERMAN[i + 1]}\t{lab}\n" for i, lab in enumerate(["entailment", "neutral", "contradiction"])))
    out = setup / "out-ft"
    code = main(["--model", str(setup / "model"), "--checkpoint", f"panx={setup / 'ck-panx'}",
                 "--checkpoint", f"xnli={setup / 'ck-xnli'}", "--tasks", "panx,xnli", "--languages", "de",
                 "--data-dir", str(data), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    tags = [t for t in (out / "predictions" / "panx" / "test-de.tsv").read_text().split("\n\n") if t.strip()]
    assert [len(s.split()) for s in tags] == [2, 3]  # one tag per word, sentences kept apart
    assert all(t in panx.labels for s in tags for t in s.split())
    assert (out / "labels" / "xnli" / "test-de.tsv").read_text().split() == ["entailment", "neutral",
                                                                              "contradiction"]
    assert all(p in xnli.labels for p in (out / "predictions" / "xnli" / "test-de.tsv").read_text().split())
    scores = json.loads((out / "scores.json").read_text())
    assert 0 <= scores["xnli"]["accuracy"]["de"] <= 100 and 0 <= scores["panx"]["f1"]["de"] <= 100


def test_qa_and_multiple_choice_checkpoints_run_end_to_end(setup, capsys):
    """XQuAD (SQuAD JSON, doc-stride windows) and XCOPA (choice) from exported checkpoints: predictions are
    spans of the original context / valid choices, and rescoring the written files gives the same scores."""
    from engine.pretrain import train_tokenizer
    from models import Encoder, TaskModel, hf, make_head, preset

    tokenizer = train_tokenizer(GERMAN + FRENCH + ENGLISH, vocab_size=200)
    for name, kind in (("xquad", "qa"), ("xcopa", "choice")):
        encoder = Encoder(preset("tiny", vocab_size=len(tokenizer)))
        hf.export(TaskModel(encoder, make_head(kind, encoder.cfg, encoder)), setup / f"ck-{name}",
                  tokenizer=tokenizer)
    data = setup / "data"
    context = " ".join(GERMAN) + ". " + " ".join(GERMAN[::-1])  # long enough for two windows at max_len 24
    qas = [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
           for i, (q, a) in enumerate((("wer liest ein Buch", "Ana"), ("was ist rot", "das Auto")))]
    (data / "xquad").mkdir(exist_ok=True)
    (data / "xquad" / "xquad.tr.json").write_text(json.dumps({"version": "1.1", "data": [
        {"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    (data / "xcopa" / "tr").mkdir(parents=True, exist_ok=True)
    (data / "xcopa" / "tr" / "test.tr.jsonl").write_text("".join(json.dumps(
        {"premise": GERMAN[i], "choice1": FRENCH[i], "choice2": ENGLISH[i], "question": q, "label": i % 2}) + "\n"
        for i, q in enumerate(("cause", "effect", "cause"))))
    out = setup / "out-qa"
    code = main(["--model", str(setup / "model"), "--suite", "xtreme-r", "--tasks", "xquad,xcopa",
                 "--checkpoint", f"xquad={setup / 'ck-xquad'}", "--checkpoint", f"xcopa={setup / 'ck-xcopa'}",
                 "--languages", "tr", "--data-dir", str(data), "--max-len", "24", "--doc-stride", "8",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    answers = json.loads((out / "predictions" / "xquad" / "test-tr.json").read_text())
    assert set(answers) == {"q0", "q1"} and all(a in context for a in answers.values())
    choices = [json.loads(line)["label"] for line in
               (out / "predictions" / "xcopa" / "test-tr.jsonl").read_text().splitlines()]
    assert len(choices) == 3 and set(choices) <= {0, 1}
    scores = json.loads((out / "scores.json").read_text())
    suite = SUITES["xtreme-r"]
    for task in ("xquad", "xcopa"):
        again = score_task(suite, task, out / "predictions", out / "labels", ["tr"])
        assert again == scores[task] and all(0 <= v <= 100 for v in _numbers(again))


def _numbers(tree):
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in _numbers(value)]
    return [tree]
