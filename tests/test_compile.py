"""torch.compile captures the whole Dimba forward (no host synchronisation, no graph break) with `parallel`.

DIMBA_TEST_DEVICE=cuda runs it on a GPU.
"""
import os

import pytest
import torch

from dimba_core import Dimba, DimbaConfig
from dimba_test_helpers import TINY

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
    """Gradients recording: auto picks `parallel` (checkpointed blocks) inside the compiled graph too."""
    model, args = setup("auto")
    model(*args).square().mean().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend="aot_eager")(*args).square().mean().backward()
    for got, want in zip((p.grad for p in model.parameters()), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
