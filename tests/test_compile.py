"""torch.compile captures the whole Dimba forward (no host synchronisation, no graph break) with `parallel`, and
mamba-ssm's kernel as the opaque op `dimba::mamba_scan`.

DIMBA_TEST_DEVICE=cuda runs it on a GPU (there `auto` is mamba-ssm's kernel when installed).
"""
import os

import pytest
import torch

from dimba_core import Dimba, DimbaConfig
from dimba_core import ops
from dimba_core.ops import selective_scan
from dimba_test_helpers import TINY, scan_inputs

DEVICE = os.environ.get("DIMBA_TEST_DEVICE", "cpu")


def setup(backend):
    cfg = DimbaConfig(**TINY)
    torch.manual_seed(0)
    model = Dimba(cfg, scan_backend=backend).to(DEVICE)
    x, y = torch.randn(2, 4, 8, 8, device=DEVICE), torch.randn(2, 1, 8, 16, device=DEVICE)
    t = torch.tensor([10.0, 700.0], device=DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 5 + [0] * 3], device=DEVICE)  # padding at the end
    return model, (x, t, y, mask)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_inference_compiles_fullgraph():
    model, args = setup("parallel")
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(*args)  # on the CPU this trims the caption padding; the compiled graph does not
        out = compiled(*args)
        again = compiled(args[0] + 1, *args[1:])  # same shapes, new values: the same graph
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(again, model(args[0] + 1, *args[1:]), rtol=1e-5, atol=1e-5)


def test_training_step_compiles_fullgraph():
    """Gradients recording: auto's differentiable scan (`parallel` with checkpointed blocks, or mamba-ssm's kernel
    on CUDA) inside the compiled graph too."""
    model, args = setup("auto")
    model(*args).square().mean().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend="aot_eager")(*args).square().mean().backward()
    for got, want in zip((p.grad for p in model.parameters()), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def mamba_twin(monkeypatch):
    """mamba-ssm's forward and backward kernels replaced by the naive reference scan and its vjp."""
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return ops.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    def vjp(grad, inputs, delta_softplus):
        _, pullback = torch.func.vjp(lambda *xs: selective_scan_fn(*xs, delta_softplus=delta_softplus), *inputs)
        return pullback(grad)

    monkeypatch.setattr(selective_scan, "_mamba_scan_fn", lambda: selective_scan_fn)
    monkeypatch.setattr(selective_scan, "_mamba_scan_vjp", vjp)


def test_mamba_scan_op_passes_opcheck(mamba_twin):
    """The custom op's fake (meta) function, schema and autograd registration agree with what it computes."""
    kw = scan_inputs(b=2, d=8, n=4, length=13, device=DEVICE)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    for t in args:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.dimba.mamba_scan.default, (*args, True))


def test_mamba_scan_compiles_fullgraph_with_gradients(mamba_twin):
    """Inside torch.compile selective_scan_cuda is one opaque op: no graph break, eager outputs and gradients."""
    kw = scan_inputs(b=2, d=8, n=4, length=13, device=DEVICE)
    for k in ("u", "delta", "B", "C", "D", "z", "delta_bias"):
        kw[k].requires_grad_()

    def loss(**kw):
        return selective_scan.selective_scan_cuda(**kw).square().sum()

    eager = torch.autograd.grad(loss(**kw), [kw[k] for k in ("u", "delta", "B", "C", "D", "z", "delta_bias")])
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(**kw), [kw[k] for k in ("u", "delta", "B", "C", "D", "z", "delta_bias")])
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
