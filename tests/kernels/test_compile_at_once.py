"""On a GPU, a new autotune key has its attention configs compiled at once, in threads, before the autotuner
times them (`kernels.attention._launch`); left alone, the autotuner compiles them one by one.

Checked without a GPU through `bench.compile_at_once.run_child`: a child process with the interpreter off and a
stand-in Triton driver reporting an sm_90 target compiles for real and launches nothing (autotuned and plain
launches are recorded; where autotune would time its configs, the child counts those it still had to compile).
Asserted: the forward's and then the backward's configs (dK/dV and dQ together) compile before their launches,
every config autotune may pick and only those, in more than one thread, at overlapping times; the launches keep
their order and find every config compiled; a second launch of the same key compiles nothing; with
`COMPILE_AT_ONCE` off every config compiles in the launching thread, one after another.
"""
import pytest

from bench import compile_at_once as cao
from bench import kernel_resources as kr

WHY_NOT = kr.toolchain_missing()
_COMPILE_MARKS = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]


def _compiling(test):
    """Slow, and skipped where Triton cannot compile for NVIDIA targets."""
    for mark in _COMPILE_MARKS:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def at_once(tmp_path_factory):
    return cao.run_child(True, tmp_path_factory.mktemp("triton"))


@_compiling
def test_the_forward_configs_compile_at_once_before_the_launch(at_once):
    fwd, picks = at_once["steps"]["forward"], at_once["picks"]
    assert [c["kernel"] for c in fwd["compiles"]] == ["_fwd_kernel"] * picks["fwd"]
    assert len({c["thread"] for c in fwd["compiles"]}) > 1
    assert all(c["thread"].startswith("xlt-compile") for c in fwd["compiles"])
    assert cao._overlapping(fwd["compiles"])
    assert fwd["launches"] == [["_fwd_kernel", picks["fwd"], 0]]  # autotune finds every config compiled


@_compiling
def test_the_backward_compiles_dkdv_and_dq_together(at_once):
    bwd, picks = at_once["steps"]["backward"], at_once["picks"]
    kinds = [c["kernel"] for c in bwd["compiles"]]
    assert kinds.count("_bwd_dkdv_kernel") == picks["dkdv"] and kinds.count("_bwd_dq_kernel") == picks["dq"]
    assert len(kinds) == picks["dkdv"] + picks["dq"]
    assert cao._overlapping(bwd["compiles"]) and len({c["thread"] for c in bwd["compiles"]}) > 1
    # the delta kernel is not autotuned: it launches on its own, first
    assert bwd["launches"] == ["_bwd_delta_kernel", ["_bwd_dkdv_kernel", picks["dkdv"], 0],
                               ["_bwd_dq_kernel", picks["dq"], 0]]


@_compiling
def test_a_key_met_before_compiles_nothing(at_once):
    again = at_once["steps"]["forward again"]
    assert again["compiles"] == [] and again["launches"] == [["_fwd_kernel", at_once["picks"]["fwd"], 0]]


@_compiling
def test_switched_off_autotune_compiles_one_by_one_where_it_launches(tmp_path):
    got = cao.run_child(False, tmp_path)
    fwd, picks = got["steps"]["forward"], got["picks"]
    assert fwd["launches"] == [["_fwd_kernel", picks["fwd"], picks["fwd"]]]
    assert {c["thread"] for c in fwd["compiles"]} == {"MainThread"} and not cao._overlapping(fwd["compiles"])


@pytest.mark.parametrize("option", [["--repeats", "0"], ["--head-dim", "300"], ["--dropout", "1.0"]])
def test_the_bench_refuses_what_it_cannot_measure(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cao.main(option)
    assert exit_info.value.code == 2 and option[0] in capsys.readouterr().err
