"""Hugging Face interop: tiny random HF models built at test time (no download). Our encoder reproduces
their hidden states, our heads reproduce theirs after export, HF -> XLT -> HF is bit-identical, and bad
checkpoints fail with messages that name the tensor or field."""
import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from models import PRESETS, TaskModel, hf, make_head
from models.encoder import Encoder

FAMILIES = {  # name -> (base class, config kwargs)
    "xlm-roberta": (T.XLMRobertaModel, dict(type_vocab_size=1)),
    "bert": (T.BertModel, dict(pad_token_id=0)),
    "xlm-roberta-xl": (T.XLMRobertaXLModel, dict(type_vocab_size=1)),
}
HEAD_CLASSES = {"pair": "ForSequenceClassification", "tagging": "ForTokenClassification",
                "qa": "ForQuestionAnswering", "choice": "ForMultipleChoice", "mlm": "ForMaskedLM"}
STEMS = {"xlm-roberta": "XLMRoberta", "bert": "Bert", "xlm-roberta-xl": "XLMRobertaXL"}


def _hf_config(family, **kw):
    cls, extra = FAMILIES[family]
    return cls.config_class(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=40, **extra, **kw)


def _hf_model(family, kind=None, **kw):
    cfg = _hf_config(family, **kw)
    cls = getattr(T, STEMS[family] + (HEAD_CLASSES[kind] if kind else "Model"))
    return cls(cfg).eval()


def _randomise(model):
    """HF initialises LayerNorms to exactly 1/0 and biases to 0: perturb everything so that a swapped or
    skipped tensor shows."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch(pad_id, padded, shape=(3, 11)):
    ids = torch.randint(3, 99, shape)
    mask = torch.ones_like(ids)
    if padded:
        mask[..., 1, 7:] = 0
        mask[..., 2, 3:] = 0
        ids[mask == 0] = pad_id
    return ids, mask


@pytest.mark.parametrize("family,padded,backend", [(f, p, "auto") for f in FAMILIES for p in (False, True)]
                         + [("xlm-roberta", True, "triton"), ("xlm-roberta-xl", True, "triton")])
def test_encoder_matches_transformers(tmp_path, family, padded, backend):
    """backend auto is the PyTorch twin on CPU; triton runs our FlashAttention kernel (interpreter)."""
    ref = _randomise(_hf_model(family))
    ref.save_pretrained(tmp_path)
    enc = hf.load_encoder(tmp_path, kernel_backend=backend).eval()
    ids, mask = _batch(ref.config.pad_token_id, padded)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = enc(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert len(ours) == len(theirs.hidden_states)
    for a, b in zip(ours, theirs.hidden_states):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.pooler(ours[-1]), theirs.pooler_output, atol=1e-5, rtol=1e-5)


def _xlt_task_model(family, kind, num_labels=3):
    cfg = hf.config_from_hf(_hf_config(family).to_dict())
    encoder = Encoder(cfg)
    model = _randomise(TaskModel(encoder, make_head(kind, cfg, encoder, num_labels)).eval())
    return model, cfg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", HEAD_CLASSES)
def test_exported_heads_match_transformers_auto_classes(tmp_path, family, kind):
    model, cfg = _xlt_task_model(family, kind)
    labels = ["a", "b", "c"] if kind in ("pair", "tagging") else None
    hf.export(model, tmp_path / "out", labels=labels)
    auto = getattr(T, hf.AUTO_CLASSES[kind])
    theirs, info = auto.from_pretrained(tmp_path / "out", output_loading_info=True)
    theirs.eval()
    assert type(theirs).__name__ == STEMS[family] + HEAD_CLASSES[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    if labels:
        assert theirs.config.id2label == {0: "a", 1: "b", 2: "c"}

    ids, mask = _batch(cfg.pad_token_id, padded=True, shape=(2, 3, 11) if kind == "choice" else (3, 11))
    batch = {"input_ids": ids.view(-1, ids.shape[-1]), "lengths": mask.view(-1, ids.shape[-1]).sum(-1)}
    if kind == "choice":
        batch["num_choices"] = 3
    with torch.no_grad():
        ours = model(batch)
        ref = theirs(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    if kind == "qa":
        torch.testing.assert_close(ours["start_logits"][real], ref.start_logits[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours["end_logits"][real], ref.end_logits[real], atol=1e-5, rtol=1e-5)
    elif kind in ("tagging", "mlm"):
        torch.testing.assert_close(ours["logits"][real], ref.logits[real], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ours["logits"], ref.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,kind", [("xlm-roberta", None), ("bert", None), ("xlm-roberta-xl", None),
                                         ("xlm-roberta", "pair"), ("bert", "pair"), ("bert", "tagging"),
                                         ("xlm-roberta-xl", "qa"), ("bert", "choice"), ("xlm-roberta", "mlm"),
                                         ("bert", "mlm"), ("xlm-roberta-xl", "mlm")])
def test_round_trip_hf_xlt_hf_is_bit_identical(tmp_path, family, kind):
    ref = _randomise(_hf_model(family, kind, **({"num_labels": 4} if kind in ("pair", "tagging") else {})))
    ref.save_pretrained(tmp_path / "hf")
    if kind is None:
        model, report = hf.load_encoder(tmp_path / "hf"), None
    else:
        model, report = hf.load_task_model(tmp_path / "hf")
        assert model.head.kind == kind and not report.unused
        # HF heads that do not read the pooler do not store it: ours is then fresh, and says so
        pooler = [] if hf.uses_pooler(kind, model.encoder.cfg) else ["encoder.pooler.dense.bias",
                                                                       "encoder.pooler.dense.weight"]
        assert report.fresh == pooler
    hf.export(model, tmp_path / "back")
    again = type(ref).from_pretrained(tmp_path / "back")
    want, got = ref.state_dict(), again.state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_bin_weights_sharded_safetensors_and_tokenizer_load(tmp_path):
    ref = _randomise(_hf_model("xlm-roberta"))
    state = ref.state_dict()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(ref.config.to_json_string())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")  # the format of older hub checkpoints
    enc = hf.load_encoder(tmp_path / "bin")
    assert torch.equal(enc.layers[1].ffn.down.weight, state["encoder.layer.1.output.dense.weight"])

    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text(ref.config.to_json_string())
    keys = sorted(state)
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: state[k].contiguous() for k in part}, str(shard / name))
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    enc = hf.load_encoder(shard)
    assert torch.equal(enc.embeddings.word.weight, state["embeddings.word_embeddings.weight"])


def test_tokenizer_loads_through_auto_tokenizer_and_travels_with_export(tmp_path):
    from engine.pretrain import train_tokenizer

    tok = train_tokenizer(["a small corpus of words", "another line of text"] * 20, 120)
    model, _ = _xlt_task_model("bert", "tagging")
    hf.export(model, tmp_path / "m", tokenizer=tok, labels=["a", "b", "c"])
    loaded = hf.load_tokenizer(tmp_path / "m")
    assert loaded("a small corpus")["input_ids"] == tok("a small corpus")["input_ids"]
    assert loaded.padding_side == "right"
    assert T.AutoTokenizer.from_pretrained(tmp_path / "m")("text")["input_ids"] == tok("text")["input_ids"]


# ----- errors -----------------------------------------------------------------------------------------------
def _saved(tmp_path, family="xlm-roberta", kind=None):
    model = _hf_model(family, kind)
    model.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    del state["encoder.layer.1.attention.self.key.bias"]
    save_file(state, str(path))
    with pytest.raises(hf.ModelLoadError, match=r"missing tensor\(s\) encoder\.layer\.1\.attention\.self\.key\.bias"):
        hf.load_encoder(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(36, 32)
    save_file(state, str(path))
    with pytest.raises(hf.ModelLoadError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(36, 32\).*"
                                                r"\(37, 32\)"):
        hf.load_encoder(tmp_path)


def test_unknown_tensor_inside_the_encoder_is_an_error(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(hf.ModelLoadError, match="unexpected tensor 'encoder.layer.0.attention.self.rotary"):
        hf.load_encoder(tmp_path)


@pytest.mark.parametrize("field,value,message", [("model_type", "gpt2", "model_type 'gpt2' is not supported"),
                                                 ("hidden_act", "relu", "hidden_act 'relu'"),
                                                 ("position_embedding_type", "relative_key",
                                                  "position_embedding_type 'relative_key'")])
def test_unsupported_architecture_names_the_field(tmp_path, field, value, message):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.ModelLoadError, match=message):
        hf.load_encoder(tmp_path)


def test_fresh_head_is_reported_and_other_heads_are_listed_unused(tmp_path):
    _saved(tmp_path, kind="mlm")  # an MLM checkpoint (as xlm-roberta-base is) fine-tuned for tagging
    model, report = hf.load_task_model(tmp_path, "tagging", num_labels=5)
    assert report.fresh == ["encoder.pooler.dense.bias", "encoder.pooler.dense.weight", "head.out.bias",
                            "head.out.weight"]  # HF's MLM models carry no pooler
    assert "lm_head.dense.weight" in report.unused
    assert model.head.out.weight.device.type == "cpu" and model.head.out.weight.std() > 0
    assert torch.count_nonzero(model.head.out.bias) == 0


def test_missing_folder_and_offline_hub_name_say_how_to_pass_a_folder(tmp_path):
    with pytest.raises(hf.ModelLoadError, match="no such folder"):
        hf.load_encoder(tmp_path / "nope" / "x" / "y")
    with pytest.raises(hf.ModelLoadError, match=r"xlm-roberta-base.*could not be fetched.*pass the folder"):
        hf.load_encoder("xlm-roberta-base")  # HF_HUB_OFFLINE=1 (conftest): fails at once
    (tmp_path / "config.json").write_text(json.dumps(_hf_config("bert").to_dict()))
    with pytest.raises(hf.ModelLoadError, match="no weights"):
        hf.load_encoder(tmp_path)


def test_export_refuses_configs_without_a_hf_class(tmp_path):
    cfg = hf.config_from_hf(_hf_config("bert").to_dict())
    from dataclasses import replace
    with pytest.raises(hf.ModelLoadError, match="position_style"):
        hf.export(Encoder(replace(cfg, family="roberta")), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----- sizes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hf_cls,expected", [("xlmr-base", T.XLMRobertaConfig, 278e6),
                                                  ("xlmr-large", T.XLMRobertaConfig, 560e6),
                                                  ("xlmr-xl", T.XLMRobertaXLConfig, 3.48e9),
                                                  ("xlmr-xxl", T.XLMRobertaXLConfig, 10.7e9),
                                                  ("mbert-base", T.BertConfig, 178e6)])
def test_preset_parameter_counts_equal_the_hf_models(name, hf_cls, expected):
    cfg = PRESETS[name]
    hf_cfg = hf_cls.from_dict(hf.config_to_hf(cfg))
    with torch.device("meta"):
        theirs = T.AutoModel.from_config(hf_cfg)
        ours = Encoder(cfg)
    count = sum(p.numel() for p in theirs.parameters())
    assert cfg.num_parameters() == count == sum(p.numel() for p in ours.parameters())
    assert abs(count - expected) / expected < 0.01
    assert cfg.active_parameters() == count
