"""The stand-in for XLM-R in the embedded default: a WordPiece tokenizer trained on the synthetic
multilingual corpus, and a small encoder pretrained on it with masked LM. The result is cached on disk,
keyed by everything that determines it (configs and the generator's code), so a second run reuses it."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models as tok_models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from eval.synthetic import SyntheticWorld
from models import IGNORE, Encoder, EncoderConfig, TaskModel, make_head

from . import distributed
from .checkpoint import load_encoder, save_encoder
from .progress import PhaseLogger, say
from .data import EpochStream, split_rows
from .trainer import Checkpoints, LoopConfig, train_loop

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocab(words: Counter, vocab_size: int) -> list[str]:
    """A deterministic WordPiece vocabulary: specials, every character (word-initial and "##"), then
    whole words by frequency and frequent word endings ("##" + 2-6 characters shared by at least 3 word
    types: the suffixes of the synthetic morphology), ties broken by the string. The `tokenizers`
    WordPieceTrainer is not used because its tie-breaking differs between processes, so the same seed
    gave a different vocabulary, model and scores in every run."""
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    budget = max(vocab_size - len(vocab), 0)
    endings = Counter("##" + w[-k:] for w in words for k in range(2, min(6, len(w) - 2) + 1))
    endings = [e for e, n in sorted(endings.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 3]
    whole = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    n_endings = min(len(endings), max(budget // 4, budget - len(whole)))
    return vocab + whole[:budget - n_endings] + endings[:n_endings]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (no lowercasing or accent stripping: scripts stay as written)."""
    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    vocab = {token: i for i, token in enumerate(dict.fromkeys(wordpiece_vocab(words, vocab_size)))}
    tok = Tokenizer(tok_models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


@dataclass
class MLMConfig:
    steps: int = 1000
    batch_size: int = 64
    seq_len: int = 64
    lr: float = 1.5e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    mask_prob: float = 0.15
    dropout: float = 0.0  # hidden and attention dropout while pretraining (fine-tuning sets its own)
    vocab_size: int = 2000
    documents_per_language: int = 8000
    log_every: int = 100
    micro_batches: int = 1  # gradient accumulation (each rank's share of a batch in this many pieces)


def pack_corpus(world: SyntheticWorld, tokenizer, cfg: MLMConfig) -> list[list[int]]:
    """Monolingual sequences of seq_len tokens: [CLS] tokens... [SEP], documents separated by [SEP]."""
    return pack_texts({lang: world.corpus(lang, cfg.documents_per_language) for lang in world.codes}, tokenizer,
                      cfg.seq_len)


def pack_texts(texts: dict[str, list[str]], tokenizer, seq_len: int) -> list[list[int]]:
    """Monolingual sequences of seq_len tokens from each language's documents: the tokenizer's start token,
    tokens, its separator; documents joined by the separator (BERT's [CLS] / [SEP], XLM-R's <s> / </s>)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    body = seq_len - 2
    sequences = []
    for docs in texts.values():
        stream: list[int] = []
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []:
            stream += ids + [sep]
        for i in range(0, len(stream) - body + 1, body):
            sequences.append([start] + stream[i:i + body] + [sep])
    return sequences


def mask_batch(seqs: list[list[int]], tokenizer, mask_prob: float, gen: torch.Generator) -> dict:
    """BERT masking: mask_prob of the non-special tokens are predicted; of those 80% become [MASK],
    10% a random token, 10% stay."""
    ids = torch.tensor(seqs)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    chosen = (torch.rand(ids.shape, generator=gen) < mask_prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=gen)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, tokenizer.mask_token_id), ids)
    random_ids = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), ids.shape, generator=gen)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "labels": labels, "lengths": torch.full((ids.shape[0],), ids.shape[1])}


def mlm_stream(sequences: list[list[int]], tokenizer, batch_size: int, mask_prob: float, seed: int,
               micro_batches: int = 1) -> EpochStream:
    """Masked-LM batches of packed sequences: each epoch shuffled from (seed, epoch), each batch masked with a
    generator seeded from (seed, epoch, batch), so the data position is the whole state (resumable). The
    global batch is masked whole, then cut into this rank's micro-batches (data.split_rows)."""
    if len(sequences) < batch_size:
        raise ValueError(f"masked LM: {len(sequences)} sequences, fewer than one batch of {batch_size}")

    def groups(epoch: int):
        order = list(range(len(sequences)))
        random.Random(f"xlt-mlm-{seed}-{epoch}").shuffle(order)
        return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]

    def make(group, epoch: int, index: int):
        digest = hashlib.sha256(f"{seed}-{epoch}-{index}".encode()).hexdigest()
        gen = torch.Generator().manual_seed(int(digest[:15], 16))
        return split_rows(mask_batch([sequences[j] for j in group], tokenizer, mask_prob, gen), micro_batches)

    return EpochStream(groups, make)


# Everything the cached model is computed by: the corpus generator, the tokenizer builder, the model and its
# kernels, the training loop and the checkpoint format.
PRETRAINING_CODE = ("eval/synthetic/*.py", "eval/tasks.py", "models/*.py", "kernels/*.py", "engine/pretrain.py",
                    "engine/trainer.py", "engine/data.py", "engine/checkpoint.py")


def source_digest(root: Path | None = None) -> str:
    """Hash of the code that determines the pretrained model (PRETRAINING_CODE under the project `root`), so the
    cache never serves a model that the current code would not compute."""
    root = root or Path(__file__).resolve().parent.parent
    files = sorted({f for pattern in PRETRAINING_CODE for f in root.glob(pattern)})
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(world: SyntheticWorld, model_cfg: EncoderConfig, cfg: MLMConfig, seed: int, bf16: bool) -> str:
    blob = json.dumps({"world_seed": world.seed, "languages": world.codes, "code_switch": world.code_switch_rate,
                       "sentence_switch": world.sentence_switch_rate,
                       "model": model_cfg.to_dict(),
                       "mlm": asdict(cfg), "seed": seed, "bf16": bf16, "code": source_digest(),
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XLT_CACHE", Path.home() / ".cache" / "xlt"))


def pretrain(world: SyntheticWorld, model_cfg: EncoderConfig, cfg: MLMConfig, seed: int, cache_dir: Path | None,
             log_dir: Path | None = None, bf16: bool = False, device: torch.device = torch.device("cpu"),
             checkpoint_every: int = 0, tensorboard: bool = False) -> tuple[Encoder, PreTrainedTokenizerFast, dict]:
    """Return (encoder, tokenizer, info), from the cache when this exact pretraining was done before.
    The encoder is returned on the CPU. With log_dir, its training state is checkpointed under
    log_dir/state (every checkpoint_every steps) and a killed pretraining continues from there; with
    tensorboard too, its metrics are written there as TensorBoard events."""
    key = cache_key(world, model_cfg, cfg, seed, bf16)
    target = cache_dir / f"pretrain-{key}" if cache_dir is not None else None
    cached = target is not None and (target / "done.json").exists()
    # Under torchrun every rank must take the same branch (training is collective): the cache is used only where
    # every rank sees it (a cache local to each node may hold it on one node and not on another).
    cached = bool(distributed.all_min(torch.tensor([int(cached)], device=device)).item())
    if cached:
        say(f"[pretrain] reusing cached model {target}")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(target / "tokenizer")
        encoder = load_encoder(target / "encoder")
        return encoder, tokenizer, json.loads((target / "done.json").read_text()) | {"cached": True}

    torch.manual_seed(seed)
    texts = [doc for lang in world.codes for doc in world.corpus(lang, 2000, stream=1)]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model_cfg = replace(model_cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout)
    sequences = pack_corpus(world, tokenizer, cfg)
    say(f"[pretrain] {len(tokenizer)}-token vocabulary; {len(sequences)} sequences of {cfg.seq_len} tokens "
        f"in {len(world.codes)} languages; {model_cfg.num_parameters() / 1e6:.2f}M parameters")
    encoder = Encoder(model_cfg)
    model = TaskModel(encoder, make_head("mlm", model_cfg, encoder)).to(device)
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                      log_every=cfg.log_every, bf16=bf16, checkpoint_every=checkpoint_every)
    logger = PhaseLogger("pretrain", log_dir / "metrics.jsonl" if log_dir else None, tensorboard=tensorboard)
    checkpoints = Checkpoints(log_dir / "state") if log_dir is not None else None
    stream = mlm_stream(sequences, tokenizer, cfg.batch_size, cfg.mask_prob, seed, cfg.micro_batches)
    result = train_loop(model, stream, loop, logger, checkpoints=checkpoints)
    encoder = encoder.cpu()
    info = {"key": key, "steps": result.steps, "final_loss": result.final_loss, "seconds": result.seconds,
            "tokens": result.tokens, "vocab_size": len(tokenizer)}
    if target is not None and distributed.current().is_main:
        _save_atomically(target, encoder, tokenizer, info)
    distributed.barrier()
    return encoder, tokenizer, info | {"cached": False}


def _save_atomically(target: Path, encoder: Encoder, tokenizer, info: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        save_encoder(encoder, tmp / "encoder")
        (tmp / "done.json").write_text(json.dumps(info, indent=1))
        if target.exists():  # another run finished the same pretraining first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
