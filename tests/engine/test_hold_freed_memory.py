"""engine.trainer.hold_freed_memory: on glibc, the freed activation memory of one training step is reused by the
next instead of page-faulted in again (counted as minor page faults, not timed)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from engine.trainer import hold_freed_memory
    held = hold_freed_memory() if sys.argv[1] == "hold" else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                                    torch.nn.Linear(1024, 256)) for _ in range(4)])
    x = torch.randn(4096, 256)
    def step():
        mlp(x).square().mean().backward()
    for _ in range(3):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(held, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
""").format(root=str(ROOT))


def _faults(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_not_faulted_in_again():
    held, with_setting = _faults("hold")
    _, default = _faults("default")
    assert held == "True"
    assert default > 500, f"the default allocator faulted only {default} pages per step: nothing to show"
    assert with_setting < 0.5 * default, f"{with_setting} minor faults per step held vs {default} by default"
