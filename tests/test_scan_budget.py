"""Launch-count and memory targets of the bidirectional mixer at Dimba-L-2 width (checked on the CPU).

Ops are counted on fake tensors (no memory, no compute) under a dispatch mode that sees every aten op
below autograd; views and ops that launch no kernel are left out, so the count is what a GPU would launch.
"""
import collections
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dimba_core.mamba import BiMambaMixer

D_MODEL, BATCH = 1152, 2  # Dimba-L-2: d_inner 2304, d_state 16
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach",
             "lift_fresh", "alias"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops that return a fresh tensor or write one (no views, no allocation-only ops)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        rets = func._schema.returns
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in rets)
        tensor = any("Tensor" in str(r.type) for r in rets)
        if func.namespace == "aten" and tensor and not view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def mixer_ops(backend: str, length: int) -> collections.Counter:
    """Ops of one inference call of a Dimba-L-2 mixer on (BATCH, length, D_MODEL) float32 fake tensors."""
    with FakeTensorMode():
        mixer = BiMambaMixer(D_MODEL, backend=backend)
        x = torch.randn(BATCH, length, D_MODEL)
        with torch.no_grad(), OpCounter() as counter:
            mixer(x)
    return counter.ops


@pytest.mark.parametrize("length, budget", [(4096, 1000), (16384, 3000)])
def test_parallel_mixer_launch_count(length, budget):
    ops = mixer_ops("parallel", length)
    total = sum(ops.values())
    print(f"parallel mixer, L {length}: {total} ops {dict(ops.most_common(6))}")
    assert total <= budget


def test_counter_sees_the_per_step_loop():
    """Control: the `torch` scan's per-position addcmul shows up (2 directions x L); 8,6xx ops at L 4096."""
    ops = mixer_ops("torch", 512)
    assert ops["addcmul"] == 2 * 512 and sum(ops.values()) > 2 * 512


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from dimba_core.mamba import BiMambaMixer

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    torch.manual_seed(0)
    mixer = BiMambaMixer({d_model}, backend="parallel")
    x = torch.randn({batch}, {length}, {d_model})
    base = rss()
    with torch.no_grad():
        y = mixer(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # high-water mark of the whole process
    print(peak - base, bool(torch.isfinite(y).all()))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in bytes/KiB (Linux)")
def test_parallel_mixer_peak_memory():
    """One real call at L 4096 grows the process's peak RSS by at most 1.5 GiB (an upper bound: the
    high-water mark after the call minus the resident size before it)."""
    script = MEMORY_SCRIPT.format(d_model=D_MODEL, batch=BATCH, length=4096)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    growth, finite = run.stdout.split()
    print(f"parallel mixer, L 4096: peak RSS growth {int(growth) / 2 ** 30:.2f} GiB")
    assert finite == "True"
    assert int(growth) <= 1.5 * 2 ** 30
