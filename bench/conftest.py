"""The kernel micro-benchmarks (`pytest bench/ --benchmark-only`): the interpreter only where no GPU is used
(there, the Triton rows are skipped: interpreted kernels time Python, not the kernel)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
