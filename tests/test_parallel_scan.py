"""The `parallel` scan backend against the naive reference scan, its gradients, the `auto` rule, goldens.

DIMBA_TEST_DEVICE=cuda runs the same tests on a GPU (there the goldens also run the `cuda` and `triton`
backends when they are installed).
"""
import functools
import os

import pytest
import torch

from dimba_core import Dimba, DimbaConfig, ops
from dimba_core.mamba import BiMambaMixer
from dimba_core.ops import selective_scan_parallel, selective_scan_ref
from dimba_test_helpers import TINY, rel_err, scan_inputs

DEVICE = os.environ.get("DIMBA_TEST_DEVICE", "cpu")


inputs = functools.partial(scan_inputs, device=DEVICE)


@pytest.mark.parametrize("length, d, block", [
    (1, 8, None), (2, 8, None), (37, 8, None), (37, 8, 5), (37, 8, 1), (100, 8, 16), (256, 4, 64), (257, 4, 64),
    (1000, 4, None), (1000, 4, 33), (4097, 2, 1000), (16384, 2, None), (16384, 2, 3000)])
def test_matches_reference_fp32(length, d, block):
    kw = inputs(d=d, length=length, seed=length, b=2 if length < 4096 else 1, n=16 if length < 4096 else 4)
    out = selective_scan_parallel(**kw, block_len=block)
    assert out.shape == kw["u"].shape and out.dtype == torch.float32
    assert rel_err(out, selective_scan_ref(**kw)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length, block", [(1, None), (300, 64), (4097, 1000)])
def test_half_inputs_accumulate_in_float32(dtype, length, block):
    kw = inputs(d=4, length=length, dtype=dtype, b=1 if length > 1000 else 2)
    out = selective_scan_parallel(**kw, block_len=block)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, selective_scan_ref(**kw)) <= 1e-2


def test_large_steps_stay_finite():
    """delta_bias + 30: decays exp(-30 |A|) underflow to 0, as in the naive loop; nothing overflows."""
    kw = inputs(length=300, dtype=torch.bfloat16)
    kw["delta_bias"] = kw["delta_bias"] + 30.0
    out = selective_scan_parallel(**kw, block_len=64)
    assert torch.isfinite(out).all() and rel_err(out, selective_scan_ref(**kw)) < 1e-2


def test_without_optional_inputs_float64():
    kw = inputs(dtype=torch.float64, length=50)
    kw.update(A=kw["A"].double(), D=None, z=None, delta_bias=None, delta_softplus=False, delta=kw["delta"].abs())
    out = selective_scan_parallel(**kw, block_len=16)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, selective_scan_ref(**kw), rtol=1e-10, atol=1e-10)


def test_leading_dims_are_independent_problems():
    """The mixer's layout: (direction, batch, d, L) with A, D, delta_bias (direction, 1, d[, n])."""
    kw = inputs(lead=(2,), length=70)
    out = selective_scan_parallel(**kw, block_len=32)
    for i in range(2):
        one = {k: (v[i] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        one.update(A=one["A"][0], D=one["D"][0], delta_bias=one["delta_bias"][0])
        assert rel_err(out[i], selective_scan_ref(**one)) <= 1e-5


def _grads(fn, kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    out = fn(**{**kw, **leaves})
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    (out * weight).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


def test_gradients_match_reference_float64():
    kw = inputs(length=40, d=3, n=4)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref = _grads(selective_scan_ref, kw)
    for block in (4, 13, 16, None):  # doubling only; ragged last block; grouped (GROUP 8); one grouped block
        got = _grads(lambda **k: selective_scan_parallel(**k, block_len=block), kw)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("length, block", [(6, 4), (20, 16)])
def test_gradcheck(length, block):
    kw = inputs(b=1, d=2, n=2, length=length)
    args = [kw[k].double().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    fn = lambda *a: selective_scan_parallel(*a[:7], delta_bias=a[7], delta_softplus=True,  # noqa: E731
                                            block_len=block)
    assert torch.autograd.gradcheck(fn, args)


def test_auto_rule(monkeypatch):
    r = ops.resolve_backend
    assert r("auto", "cpu") == "torch" and r("auto", torch.device("cpu")) == "torch"
    assert r("auto", "cpu", needs_grad=True) == "parallel"  # training on the CPU must just work
    for device in ("mps", "xpu", "meta"):
        assert r("auto", device) == "parallel"
    monkeypatch.setitem(ops._IMPORTABLE, "mamba_ssm.ops.selective_scan_interface", False)
    monkeypatch.setitem(ops._IMPORTABLE, "triton.language", False)
    assert r("auto", "cuda") == "parallel" and r("auto", "cuda:0", needs_grad=True) == "parallel"
    monkeypatch.setitem(ops._IMPORTABLE, "triton.language", True)
    assert r("auto", "cuda") == "triton" and r("auto", "cuda", needs_grad=True) == "parallel"
    monkeypatch.setattr(ops, "TRITON_VALIDATED", False)  # the switch the GPU validation sets
    assert r("auto", "cuda") == "parallel"
    monkeypatch.setitem(ops._IMPORTABLE, "mamba_ssm.ops.selective_scan_interface", True)
    assert r("auto", "cuda") == "cuda" and r("auto", "cuda", needs_grad=True) == "cuda"
    assert r("parallel", "cpu", needs_grad=True) == "parallel" and r("ref", "cpu", needs_grad=True) == "ref"
    for name, device in (("torch", "cpu"), ("triton", "cuda")):
        with pytest.raises(RuntimeError, match=f"'{name}' has no backward pass.*'parallel'"):
            r(name, device, needs_grad=True)


def mixer(seed=0):
    torch.manual_seed(seed)
    m = BiMambaMixer(16, d_state=8).to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_parallel_matches_ref(dtype):
    m, x = mixer(), torch.randn(2, 56, 16, device=DEVICE)
    with torch.no_grad():
        m.backend = "ref"
        ref = m(x)
        m.backend = "parallel"
        out = m.to(dtype)(x.to(dtype))
        assert m.backend_for(x) == "parallel"
    assert out.dtype == dtype
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_mixer_gradients_match_ref():
    x = torch.randn(2, 45, 16, device=DEVICE)
    grads = {}
    for backend in ("ref", "parallel", "auto"):
        m = mixer()
        m.backend = backend
        xx = x.clone().requires_grad_()
        (m(xx) * torch.linspace(-1, 1, 16, device=DEVICE)).sum().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in m.parameters()] + [xx.grad.flatten()])
        if backend == "auto" and DEVICE == "cpu":
            assert m.backend_for(xx) == "parallel"  # recording autograd: a differentiable scan
    assert rel_err(grads["parallel"], grads["ref"]) <= 1e-5
    assert rel_err(grads["auto"], grads["ref"]) <= 1e-5


def tiny(**kw):
    torch.manual_seed(0)
    return Dimba(DimbaConfig(**{**TINY, **kw})).to(DEVICE)


def test_training_through_auto_and_torch_refuses_backprop():
    model = tiny()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 1, 8, 16)
    x, t, y = x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8], device=DEVICE)
    model(x, t, y, mask).square().mean().backward()
    if DEVICE == "cpu":
        assert model.mamba_blocks[0].mixer.backend_for(x) == "parallel"
    auto = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_scan_backend("ref")(x, t, y, mask).square().mean().backward()
    ref = [p.grad for p in model.parameters()]
    assert rel_err(torch.cat([g.flatten() for g in auto]), torch.cat([g.flatten() for g in ref])) <= 1e-5
    model.set_scan_backend("torch")
    with pytest.raises(RuntimeError, match="'torch' has no backward pass"):
        model(x, t, y, mask)
    with torch.no_grad():
        model(x, t, y, mask)  # inference is fine


@pytest.mark.parametrize("case, x_key, use_mask", [("model_a", "in.x", True), ("model_a_nomask", "in.x", False),
                                                   ("model_a_nonsquare", "in.x_nonsquare", True),
                                                   ("model_b", "in.x", True)])
def test_golden_parity_on_device(golden, golden_model, case, x_key, use_mask):
    """Golden outputs of the published code with `parallel` (and, on CUDA, `cuda` / `triton` when installed)."""
    tensors = golden[0]
    model = golden_model(case.split("_nomask")[0].split("_nonsquare")[0]).to(DEVICE)
    on_cuda = torch.device(DEVICE).type == "cuda"
    backends = ["parallel"] + ["cuda"] * (on_cuda and ops.has_mamba_ssm()) + ["triton"] * (on_cuda and ops.has_triton())
    args = [tensors[k].float().to(DEVICE) for k in (x_key, "in.t", "in.y")]
    mask = tensors["in.mask"].to(DEVICE) if use_mask else None
    for backend in backends:
        with torch.no_grad():
            out = model.set_scan_backend(backend)(*args, mask)
            assert model.mamba_blocks[0].mixer.backend_for(args[0]) == backend
        assert rel_err(out.cpu(), tensors["out." + case]) <= 1e-5, backend
