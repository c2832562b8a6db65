"""Encoder configuration, size presets, and exact parameter / FLOP counts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


FAMILIES = ("roberta", "bert")


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # "roberta": positions count real tokens from pad_token_id + 1 (XLM-R); "absolute": 0, 1, 2, ... (BERT)
    position_style: str = "roberta"
    pre_layer_norm: bool = False  # XLM-R XL/XXL normalise before each sublayer, with a final norm
    embedding_layer_norm: bool = True  # XLM-R XL/XXL have none after the embeddings
    # Which Hugging Face family the weights and heads follow: "roberta" (XLM-R: classification head with
    # its own dense layer) or "bert" (BERT / mBERT: classification on the pooler output).
    family: str = "roberta"
    kernel_backend: str = "auto"  # kernels.dispatch: auto | torch | triton

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.family not in FAMILIES:
            raise ValueError(f"model: family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.position_style not in ("roberta", "absolute"):
            raise ValueError(f"model: position_style {self.position_style!r}: expected roberta or absolute")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"model: {f} must be >= 1, got {getattr(self, f)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_seq_len(self) -> int:
        """Longest input the position table allows (XLM-R reserves pad_token_id + 1 rows)."""
        offset = self.pad_token_id + 1 if self.position_style == "roberta" else 0
        return self.max_position_embeddings - offset

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    # ----- size accounting ---------------------------------------------------------------------------
    def num_parameters(self, include_embeddings: bool = True, include_pooler: bool = True) -> int:
        """Exact parameter count of models.Encoder with this config (tied MLM decoder not counted)."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * (2 * h)
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h
        emb_norm = 2 * h if self.embedding_layer_norm else 0
        final_norm = 2 * h if self.pre_layer_norm else 0
        total = L * layer + emb_norm + final_norm
        if include_embeddings:
            total += emb
        if include_pooler:
            total += h * h + h
        return total

    def active_parameters(self) -> int:
        """Parameters used per token (equal to the total for dense models)."""
        return self.num_parameters()

    def flops_per_token(self, seq_len: int, training: bool = True) -> int:
        """Matmul FLOPs per token of the encoder stack: 2 per multiply-add in the linear layers plus the
        attention scores and weighted sum (4 * seq_len * hidden per layer); x3 for forward + backward."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        linear = 2 * (4 * h * h + 2 * h * f)
        attention = 4 * seq_len * h
        forward = L * (linear + attention)
        return 3 * forward if training else forward


PRESETS: dict[str, EncoderConfig] = {
    # CPU sizes: the embedded default and the tests (vocab_size is set from the tokenizer when trained).
    "tiny": EncoderConfig(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=128, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12,
                          position_style="absolute", family="bert"),
    "xlt-tiny": EncoderConfig(vocab_size=2000, hidden_size=128, num_layers=4, num_heads=4,
                              intermediate_size=512, max_position_embeddings=256, type_vocab_size=2,
                              pad_token_id=0, layer_norm_eps=1e-12, position_style="absolute", family="bert"),
    "xlt-small": EncoderConfig(vocab_size=8000, hidden_size=256, num_layers=6, num_heads=4,
                               intermediate_size=1024, max_position_embeddings=512, type_vocab_size=2,
                               pad_token_id=0, layer_norm_eps=1e-12, position_style="absolute", family="bert"),
    # Real architectures (parameter counts match the Hugging Face checkpoints).
    "xlmr-base": EncoderConfig(vocab_size=250002),
    "xlmr-large": EncoderConfig(vocab_size=250002, hidden_size=1024, num_layers=24, num_heads=16,
                                intermediate_size=4096),
    "xlmr-xl": EncoderConfig(vocab_size=250880, hidden_size=2560, num_layers=36, num_heads=32,
                             intermediate_size=10240, pre_layer_norm=True, embedding_layer_norm=False),
    "xlmr-xxl": EncoderConfig(vocab_size=250880, hidden_size=4096, num_layers=48, num_heads=32,
                              intermediate_size=16384, pre_layer_norm=True, embedding_layer_norm=False),
    "mbert-base": EncoderConfig(vocab_size=119547, max_position_embeddings=512, type_vocab_size=2,
                                pad_token_id=0, layer_norm_eps=1e-12, position_style="absolute", family="bert"),
}


def preset(name: str, **overrides) -> EncoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
