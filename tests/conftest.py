"""Test-wide environment. Set before anything imports triton or the hub clients."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any kernel import (see DESIGN.md)
os.environ["HF_HUB_OFFLINE"] = "1"  # a mistaken download fails fast instead of retrying for 25 s
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
