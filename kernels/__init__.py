"""XLT kernels: one public entry per op. Each dispatches to its Triton kernel (CUDA, or the interpreter
when asked) or to its pure-PyTorch twin (`*_reference`, the test oracle and the CPU path; attention's CPU path is
`attention_torch`, the twin's function through PyTorch SDPA)."""
from .attention import attention, attention_reference, attention_torch, attention_varlen
from .cross_entropy import (cross_entropy, cross_entropy_reference, linear_cross_entropy,
                            linear_cross_entropy_reference)
from .dispatch import BACKENDS, triton_ops
from .moe import (Dispatch, Routing, moe_expert_ffn, moe_expert_ffn_reference, moe_permute, moe_permute_reference,
                  moe_route, moe_route_reference, moe_unpermute, moe_unpermute_reference)

__all__ = [
    "BACKENDS", "Dispatch", "Routing", "attention", "attention_reference", "attention_torch", "attention_varlen",
    "cross_entropy", "cross_entropy_reference", "linear_cross_entropy", "linear_cross_entropy_reference",
    "moe_expert_ffn", "moe_expert_ffn_reference", "moe_permute", "moe_permute_reference", "moe_route",
    "moe_route_reference", "moe_unpermute", "moe_unpermute_reference", "triton_ops",
]
