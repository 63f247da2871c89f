"""The `triton` backend (fused bidirectional scan + conv) against the naive reference.

On a CPU machine the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set only while triton
and dimba_core.ops.triton_scan are imported (that is when their functions are decorated) and, through a
fixture, during these tests, so other test modules in the same process see the environment unchanged.
On a GPU machine, DIMBA_TEST_DEVICE=cuda runs the same tests compiled on the device.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

DEVICE = os.environ.get("DIMBA_TEST_DEVICE", "cpu")
INTERPRET = DEVICE == "cpu"


def _compiled_triton_loaded() -> bool:
    """Whether triton was imported earlier in this process without the interpreter (transformers does)."""
    if "triton.language" not in sys.modules:
        return False
    return type(sys.modules["triton.language"].zeros).__name__ != "InterpretedFunction"


FRESH_PROCESS = INTERPRET and _compiled_triton_loaded()  # then the tests run in a subprocess instead


def _import_kernels():
    """Import triton and the kernels with TRITON_INTERPRET=1 (read when triton.jit decorates a function,
    including triton's own library at its import), then restore the environment."""
    if FRESH_PROCESS:
        return None
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        module = importlib.import_module("dimba_core.ops.triton_scan")
        if INTERPRET and type(module._bidir_scan_kernel).__name__ != "InterpretedFunction":
            module = importlib.reload(module)  # imported earlier without the interpreter
        return module
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


ts = _import_kernels()
from dimba_core import ops  # noqa: E402
from dimba_core.mamba import BiMambaMixer  # noqa: E402
from dimba_core.tiny_assets import tiny_dimba  # noqa: E402
from dimba_test_helpers import bidirectional_conv1d_silu_ref, bidirectional_scan_ref, rel_err  # noqa: E402


def test_module_in_fresh_process():
    """When triton was already imported without the interpreter, run this module again in a new process."""
    if not FRESH_PROCESS:
        pytest.skip("the tests of this module run in this process")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                         cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    if FRESH_PROCESS and request.node.name != "test_module_in_fresh_process":
        pytest.skip("run in a fresh process by test_module_in_fresh_process")
    if DEVICE == "cuda":  # compare against full-precision float32 convs and matmuls
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def scan_inputs(b, d, n, L, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kw = dict(x_f=r(b, d, L), x_b=r(b, d, L), delta_f=0.5 * r(b, d, L), delta_b=0.5 * r(b, d, L),
              A_f=-torch.exp(r(d, n)), A_b=-torch.exp(r(d, n)), B_f=r(b, n, L), B_b=r(b, n, L),
              C_f=r(b, n, L), C_b=r(b, n, L), D_f=r(d), D_b=r(d), z=r(b, d, L),
              delta_bias_f=0.5 * r(d), delta_bias_b=0.5 * r(d))
    return {k: v.to(DEVICE, dtype if v.dim() == 3 else torch.float32) for k, v in kw.items()}


@pytest.mark.parametrize("d, L, block_d, block_l", [(8, 1, 8, 8), (8, 40, 8, 16), (24, 37, 16, 8), (32, 16, 8, 16)])
def test_fused_scan_matches_reference_fp32(d, L, block_d, block_l):
    kw = scan_inputs(2, d, 16, L, seed=d * 100 + L)
    out = ts.bidirectional_selective_scan_triton(**kw, block_d=block_d, block_l=block_l)
    ref = bidirectional_scan_ref(**kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("L, segments", [(37, 2), (40, 3), (33, 5), (16, 8), (9, 1)])
def test_segmented_scan_matches_reference(L, segments):
    """segments > 1: segment end states and delta sums, then each segment rescanned from its carries; ragged last
    segments, more segments than chunks (empty ones) and channel blocks partly past d."""
    kw = scan_inputs(2, 12, 16, L, seed=L + segments)
    out = ts.bidirectional_selective_scan_triton(**kw, block_d=8, block_l=8, segments=segments)
    assert rel_err(out, bidirectional_scan_ref(**kw)) <= 1e-5
    kw = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("x_f", "x_b", "delta_f", "delta_b", "z") else v
          for k, v in kw.items()}  # the mixer's channels-last views
    out = ts.bidirectional_selective_scan_triton(**kw, block_d=8, block_l=8, segments=segments)
    assert out.stride(1) == 1 and rel_err(out, bidirectional_scan_ref(**kw)) <= 1e-5


def test_fused_scan_bf16_large_steps_and_strided_inputs():
    kw = scan_inputs(2, 16, 16, 29, seed=7, dtype=torch.bfloat16)
    kw["delta_bias_b"] = kw["delta_bias_b"] + 30.0  # softplus(> 20) = identity: decays of exp(-30 |A|)
    for k in ("x_f", "x_b", "delta_f", "delta_b", "z"):  # channels-last views, as the mixer passes them
        kw[k] = kw[k].transpose(1, 2).contiguous().transpose(1, 2)
    out = ts.bidirectional_selective_scan_triton(**kw, block_d=8, block_l=16)
    # the interpreter rounds float32 -> bf16 toward zero (twice torch's error); GPUs round to nearest
    assert out.dtype == torch.bfloat16 and out.stride(1) == 1 and torch.isfinite(out).all()
    ref = bidirectional_scan_ref(**{k: v.float() for k, v in kw.items()})
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_bidirectional_conv_matches_flipped_causal_conv(channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 40, generator=g).transpose(1, 2)[:, :20] if channels_last else torch.randn(2, 20, 37)
    w_f, b_f, w_b, b_b = (torch.randn(*s, generator=g).to(DEVICE) for s in ((20, 4), (20,), (20, 4), (20,)))
    x = x.to(DEVICE)
    got = ts.bidirectional_conv1d_silu(x, w_f, b_f, w_b, b_b, block_d=8, block_l=16)
    for a, b in zip(got, bidirectional_conv1d_silu_ref(x, w_f, b_f, w_b, b_b)):
        assert (a.stride(1) == 1) == channels_last
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mixer_triton_matches_reference_backend():
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=16, backend="ref").to(DEVICE)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 40, 16, device=DEVICE)  # two chunks of the default block_l 32
    with torch.no_grad():
        ref = mixer(x)
        mixer.backend = "triton"
        out = mixer(x)
        assert mixer.backend_for(x) == "triton"
    assert rel_err(out, ref) <= 1e-5


def test_tiny_dimba_on_triton_matches_torch():
    model = tiny_dimba(seed=1).to(DEVICE)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 1, 8, 64)
    x, t, y = x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)
    with torch.no_grad():
        ref = model.set_scan_backend("torch")(x, t, y)
        out = model.set_scan_backend("triton")(x, t, y)
        assert model.mamba_blocks[0].mixer.backend_for(x) == "triton"
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_custom_ops_fake_layouts_match_the_kernels(channels_last):
    """torch.library.opcheck: schema, fake (meta) outputs with the kernels' strides, no autograd claimed."""
    kw = scan_inputs(2, 8, 16, 21, seed=5)
    if channels_last:
        for k in ("x_f", "x_b", "delta_f", "delta_b", "z"):
            kw[k] = kw[k].transpose(1, 2).contiguous().transpose(1, 2)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.dimba.triton_bidirectional_scan.default, tuple(kw.values()), test_utils=utils)
    w = [torch.randn(8, 4, device=DEVICE), torch.randn(8, device=DEVICE)]
    torch.library.opcheck(torch.ops.dimba.triton_bidirectional_conv.default, (kw["x_f"], *w, *w), test_utils=utils)


def test_tiny_dimba_on_triton_compiles_fullgraph():
    """Inside torch.compile the fused kernels are opaque custom ops (their fake layouts match): no graph break."""
    model = tiny_dimba(seed=1).to(DEVICE).set_scan_backend("triton")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 1, 8, 64)
    x, t, y = x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(x, t, y)
            out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    finally:
        torch._dynamo.reset()
    assert rel_err(out, eager) <= 1e-6


def test_backend_resolution(monkeypatch):
    assert "triton" in ops.BACKENDS
    assert ops.resolve_backend("auto", "cpu") == "torch"  # auto never picks triton
    if INTERPRET:
        assert ops.resolve_backend("triton", "cpu") == "triton" and ops.has_triton()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert not ops.has_triton()
        with pytest.raises(RuntimeError, match="'triton' needs the triton package"):
            ops.resolve_backend("triton", "cpu")


def test_importing_ops_does_not_import_triton_scan():
    code = "import sys, dimba_core.ops; assert 'dimba_core.ops.triton_scan' not in sys.modules; " \
           "assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
