"""Test-wide environment, the `cuda` marker and the run seed. Set before anything imports triton or the hub
clients.

- TRITON_INTERPRET=1 (the Triton interpreter on CPU tensors) is the default only where no CUDA device is
  present: it must be set before triton is imported (importing torch does not import triton), and on a GPU
  machine the `cuda`-marked tests need the compiled kernels. There, run the interpreter tests on their own:
  `TRITON_INTERPRET=1 pytest -m "not cuda"`; without it they are skipped, with that reason.
- Tests marked `cuda` are skipped without a CUDA device, and under the interpreter.
- One run seed per session: XLT_TEST_SEED if set, else random; printed in the header. The `seed` fixture
  gives each test its own seed derived from the run seed and the test's node id (reported on failure), so
  `XLT_TEST_SEED=<run seed> pytest <node id>` redraws the failing inputs.
"""
import hashlib
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any kernel import (see DESIGN.md)
os.environ["HF_HUB_OFFLINE"] = "1"  # a mistaken download fails fast instead of retrying for 25 s
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
RUN_SEED = int(os.environ["XLT_TEST_SEED"]) if os.environ.get("XLT_TEST_SEED") else random.SystemRandom().randrange(
    2**31)
_NEEDS_INTERPRETER = ("needs TRITON_INTERPRET=1", "cpu tensor?")  # the dispatcher's and Triton's messages


def pytest_report_header(config):
    mode = "interpreter (TRITON_INTERPRET=1)" if INTERPRETING else "compiled kernels"
    return [f"xlt: run seed {RUN_SEED} (reproduce with XLT_TEST_SEED={RUN_SEED}); triton: {mode}; "
            f"cuda: {torch.cuda.is_available()}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The header is hidden under -q (pyproject's addopts): the run seed also closes every report.
    terminalreporter.write_line(f"xlt: run seed {RUN_SEED} (XLT_TEST_SEED={RUN_SEED} draws the same inputs)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not INTERPRETING:
        return
    why = "needs a CUDA device" if not torch.cuda.is_available() else \
        "needs the compiled kernels: run without TRITON_INTERPRET=1"
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # On a GPU machine without the interpreter, a test that runs Triton on CPU tensors is skipped, not failed.
    try:
        return (yield)
    except (ValueError, RuntimeError) as e:
        if not INTERPRETING and "cuda" not in item.keywords and any(m in str(e) for m in _NEEDS_INTERPRETER):
            pytest.skip(f"runs Triton on CPU tensors: run it with TRITON_INTERPRET=1 ({str(e).splitlines()[0]})")
        raise


def derive_seed(nodeid: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{RUN_SEED}:{nodeid}".encode()).digest()[:4], "little") & 0x7FFFFFFF


@pytest.fixture
def seed(request) -> int:
    """This test's seed (from the run seed and its node id); it appears in the report when the test fails."""
    s = derive_seed(request.node.nodeid)
    request.node.user_properties.append(("seed", s))
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU torch.Generator seeded with this test's `seed`."""
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("xlt seed", f"seed {seeds[0]} from run seed {RUN_SEED}: reproduce with "
                                                f"XLT_TEST_SEED={RUN_SEED} pytest '{item.nodeid}'"))
    return report
