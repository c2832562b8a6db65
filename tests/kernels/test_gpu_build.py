"""The Triton kernels build for NVIDIA GPUs, checked on a machine without one.

`bench.kernel_resources` compiles every kernel x every config its autotuner may pick (or its host code
launches) x fp32 / bf16 x sm_80 / sm_90 with `triton.compile` and a `GPUTarget` (no GPU, no driver), in worker
processes with the interpreter off; ptxas -v gives registers and spills, the kernel's metadata its shared
memory. Asserted: every kernel is covered and compiles; shared memory fits the chip (A100: 163 KiB per block,
H100: 227 KiB); at the presets' head dims (64: XLM-R base / large; 80, padded to 128: XL; 128: XXL) no
attention config autotune can pick spills, on either target, in either dtype, with or without dropout; bf16
dots run on tensor cores; and the autotuners choose among exactly the configs compiled here.

Slow: a cold Triton cache costs minutes of compiling; Triton's on-disk cache makes a rerun take seconds.
"""
import re
from pathlib import Path

import pytest

from bench import kernel_resources as kr

WHY_NOT = kr.toolchain_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
ATTENTION = {"_fwd": "fwd", "_bwd_dkdv": "dkdv", "_bwd_dq": "dq"}  # the autotuned kernels and their kinds


@pytest.fixture(scope="module")
def rows():
    return kr.compile_all(kr.jobs())


def _name(r):
    return (f"{r['kernel']} d={r['head_dim']} {r['dtype']} {r['variant'] or '-'} {r['config']} "
            f"sm_{r['capability']}")


def test_every_kernel_is_compiled_for_both_targets_and_dtypes(rows):
    defined = set()
    for path in KERNELS.glob("*.py"):
        defined |= set(re.findall(r"@triton\.jit\b[^\n]*\n\s*def (\w+_kernel)\(", path.read_text()))
    assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_ce_rows_kernel", "_grouped_mm_kernel"} <= defined
    compiled = {(r["jit"], r["capability"], r["dtype"]) for r in rows if "jit" in r}
    for name in defined:
        dtypes = {dt for jit, _, dt in compiled if jit == name}
        assert dtypes, f"{name} has no job in bench/kernel_resources.py (or none compiled)"
        for cap in kr.CAPABILITIES:
            for dt in dtypes:
                assert (name, cap, dt) in compiled, f"{name} {dt}: not compiled for sm_{cap}"
    assert {r["dtype"] for r in rows if r["op"] == "attention"} >= {"fp32", "bf16"}


def test_everything_compiles(rows):
    errors = [f"{_name(r)}: {r['error'].splitlines()[0] if r['error'] else ''}" for r in rows if "error" in r]
    assert not errors, f"{len(errors)} of {len(rows)} compiles failed:\n" + "\n".join(errors)


def test_shared_memory_fits_the_chip(rows):
    over = [f"{_name(r)}: {r['shared']} B > {r['shared_limit']} B" for r in rows
            if "error" not in r and r["shared"] > r["shared_limit"]]
    assert not over, "shared memory over the per-block limit:\n" + "\n".join(over)


def test_attention_configs_autotune_can_pick_do_not_spill(rows):
    att = [r for r in rows if r["kernel"] in ATTENTION and "error" not in r]
    assert {r["head_dim"] for r in att} >= {64, 80, 128}
    spilled = [f"{_name(r)}: {r['registers']} registers, spill stores {r['spill_stores']} B / loads "
               f"{r['spill_loads']} B, stack {r['stack']} B" for r in att if kr.spills(r)]
    assert not spilled, f"{len(spilled)} of {len(att)} attention compiles spill:\n" + "\n".join(spilled)


def test_bf16_dots_run_on_tensor_cores(rows):
    for r in rows:
        if r["kernel"] in ATTENTION and r["dtype"] == "bf16" and "error" not in r:
            assert r["mma"] != "none", f"{_name(r)}: no mma instruction in the PTX"
            if r["capability"] == 90 and r["kernel"] == "_fwd":  # Q K^T and P V over >= 64 query rows
                assert r["mma"] == "wgmma", f"{_name(r)}: {r['mma']}, not wgmma"


def test_autotuners_choose_among_the_configs_compiled_here():
    cases = [(kind, d, dt, drop) for kind in ATTENTION.values() for d in kr.HEAD_DIMS + (32, 256)
             for dt in kr.DTYPES for drop in (False, True)]
    picks = kr.autotune_picks(cases)
    for case in cases:
        assert picks[case] == kr.attention_choices(*case), case
        assert picks[case], f"{case}: autotune has nothing to pick"
