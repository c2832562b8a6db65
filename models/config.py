"""Encoder configuration, size presets, and exact parameter / FLOP counts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


FAMILIES = ("roberta", "bert")
ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid")


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
    # Mixture-of-Experts (0 experts = dense). Every `moe_every`-th layer (1 = all, 2 = every other, as
    # GShard / Switch) replaces its FFN with `num_experts` experts of width `moe_expert_size` (0 = the dense
    # intermediate_size), top-k routed; dropless unless moe_capacity_factor > 0 (for comparison only).
    num_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_expert_size: int = 0
    moe_router: str = "topk_softmax"  # softmax_topk | topk_softmax (renormalised) | sigmoid
    moe_shared_expert: bool = False
    moe_capacity_factor: float = 0.0
    # Auxiliary losses added to the task loss (as Switch Transformer / HF router_aux_loss_coef): the
    # load-balancing loss and the router z-loss, each averaged over the sparse layers.
    moe_balance_coef: float = 0.01
    moe_z_coef: float = 0.001

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.family not in FAMILIES:
            raise ValueError(f"model: family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.position_style not in ("roberta", "absolute"):
            raise ValueError(f"model: position_style {self.position_style!r}: expected roberta or absolute")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "moe_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"model: {f} must be >= 1, got {getattr(self, f)}")
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.moe_top_k <= self.num_experts):
            raise ValueError(f"model: need num_experts >= 0 and 1 <= moe_top_k <= num_experts, got "
                             f"{self.num_experts} experts, top-{self.moe_top_k}")
        if self.moe_router not in ROUTERS:
            raise ValueError(f"model: moe_router {self.moe_router!r}: expected one of {', '.join(ROUTERS)}")
        if self.moe_expert_size < 0 or self.moe_capacity_factor < 0:
            raise ValueError("model: moe_expert_size and moe_capacity_factor must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def expert_size(self) -> int:
        return self.moe_expert_size or self.intermediate_size

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has a Mixture-of-Experts FFN: every moe_every-th, ending at the last."""
        return self.num_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.is_sparse(i) for i in range(self.num_layers))

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
    def _ffn_parameters(self) -> tuple[int, int]:
        """(total, active per token) parameters of all FFNs together, dense and sparse layers."""
        h, f = self.hidden_size, self.intermediate_size
        dense = 2 * h * f + f + h
        sparse_layers = self.num_sparse_layers
        total = active = (self.num_layers - sparse_layers) * dense
        if sparse_layers:
            fe = self.expert_size
            expert = 2 * h * fe + fe + h
            shared = expert if self.moe_shared_expert else 0
            router = h * self.num_experts
            total += sparse_layers * (self.num_experts * expert + shared + router)
            active += sparse_layers * (self.moe_top_k * expert + shared + router)
        return total, active

    def _other_parameters(self, include_embeddings: bool, include_pooler: bool) -> int:
        h, L = self.hidden_size, self.num_layers
        attention_and_norms = L * (4 * (h * h + h) + 2 * (2 * h))
        total = attention_and_norms + (2 * h if self.embedding_layer_norm else 0)
        total += 2 * h if self.pre_layer_norm else 0
        if include_embeddings:
            total += (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h
        if include_pooler:
            total += h * h + h
        return total

    def num_parameters(self, include_embeddings: bool = True, include_pooler: bool = True) -> int:
        """Exact parameter count of models.Encoder with this config (tied MLM decoder not counted)."""
        return self._other_parameters(include_embeddings, include_pooler) + self._ffn_parameters()[0]

    def active_parameters(self, include_embeddings: bool = True, include_pooler: bool = True) -> int:
        """Parameters one token uses: all of a dense model; the router and top-k experts of a sparse one."""
        return self._other_parameters(include_embeddings, include_pooler) + self._ffn_parameters()[1]

    def flops_per_token(self, seq_len: int, training: bool = True) -> int:
        """Matmul FLOPs per token of the encoder stack: 2 per multiply-add in the linear layers (for MoE
        layers: the router and the top-k experts a token uses) plus the attention scores and weighted sum
        (4 * seq_len * hidden per layer); x3 for forward + backward."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attention = 2 * 4 * h * h + 4 * seq_len * h
        dense_ffn = 2 * 2 * h * f
        k_experts = self.moe_top_k * 2 * 2 * h * self.expert_size + (2 * 2 * h * self.expert_size
                                                                      if self.moe_shared_expert else 0)
        sparse_ffn = k_experts + 2 * h * self.num_experts
        forward = L * attention + (L - self.num_sparse_layers) * dense_ffn + self.num_sparse_layers * sparse_ffn
        return 3 * forward if training else forward


PRESETS: dict[str, EncoderConfig] = {
    # CPU sizes: the embedded default and the tests (vocab_size is set from the tokenizer when trained).
    "tiny": EncoderConfig(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=128, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12,
                          position_style="absolute", family="bert"),
    # xlt-tiny is the embedded default's encoder. Its FFN is 2x hidden, not BERT's 4x: on the synthetic
    # corpus the narrower encoder pretrained in half the time and transferred better (README, "Spread").
    "xlt-tiny": EncoderConfig(vocab_size=2000, hidden_size=128, num_layers=4, num_heads=4,
                              intermediate_size=256, max_position_embeddings=256, type_vocab_size=2,
                              pad_token_id=0, layer_norm_eps=1e-12, position_style="absolute", family="bert"),
    # The synthetic study's size ladder: xlt-tiny's shape (4 layers, FFN 2x hidden) at hidden 64 and 256.
    "xlt-64": EncoderConfig(vocab_size=2000, hidden_size=64, num_layers=4, num_heads=2, intermediate_size=128,
                            max_position_embeddings=256, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12,
                            position_style="absolute", family="bert"),
    "xlt-256": EncoderConfig(vocab_size=2000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512,
                             max_position_embeddings=256, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12,
                             position_style="absolute", family="bert"),
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


MATCHES = ("active", "total", "none")


# The presets that are the shapes of public Hugging Face checkpoints (the counts are checked against
# transformers' models in tests/models/test_hf.py): a study's dry run counts them without the hub.
HUB_PRESETS = {"xlm-roberta-base": "xlmr-base", "FacebookAI/xlm-roberta-base": "xlmr-base",
               "xlm-roberta-large": "xlmr-large", "FacebookAI/xlm-roberta-large": "xlmr-large",
               "facebook/xlm-roberta-xl": "xlmr-xl", "facebook/xlm-roberta-xxl": "xlmr-xxl",
               "bert-base-multilingual-cased": "mbert-base", "google-bert/bert-base-multilingual-cased": "mbert-base"}


def moe_variant(dense: EncoderConfig, num_experts: int = 8, top_k: int = 2, match: str = "active",
                every: int = 1) -> EncoderConfig:
    """The Mixture-of-Experts twin of a dense config, matched on `active` parameters (experts of width
    intermediate_size / top_k: the same FLOPs per token), on `total` parameters (width intermediate_size /
    num_experts: the same FFN parameter count), or on neither ("none": experts as wide as the dense FFN)."""
    if match not in MATCHES:
        raise ValueError(f"moe_variant: match {match!r}: expected one of {', '.join(MATCHES)}")
    width = dense.intermediate_size // {"active": top_k, "total": num_experts, "none": 1}[match]
    return replace(dense, num_experts=num_experts, moe_top_k=top_k, moe_every=every, moe_expert_size=width)


def upcycled_config(dense: EncoderConfig, num_experts: int, top_k: int, every: int = 1, router: str = "topk_softmax",
                    match: str = "active") -> EncoderConfig:
    """The config of `dense` upcycled as Encoder.upcycled makes it: experts as wide as the dense FFN (full
    copies; match "active" or "none"), or a num_experts-th of it (cut from its neurons; match "total")."""
    width = dense.intermediate_size // num_experts if match == "total" else 0
    return replace(dense, num_experts=num_experts, moe_top_k=top_k, moe_every=every, moe_router=router,
                   moe_expert_size=width)


# MoE variants of every dense preset: <name>-moe8 (E=8, top-2, same active parameters / FLOPs per token) and
# <name>-moe8-total (E=8, top-2, same total parameters).
PRESETS |= {f"{name}-moe8{suffix}": moe_variant(cfg, 8, 2, match)
            for name, cfg in list(PRESETS.items()) for suffix, match in (("", "active"), ("-total", "total"))}


def preset(name: str, **overrides) -> EncoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
