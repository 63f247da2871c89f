"""Selective-scan backends against the naive reference scan."""
import functools

import pytest
import torch

from dimba_core.ops import causal_conv1d, selective_scan_ref, selective_scan_torch
from dimba_core.ops.causal_conv1d import causal_conv1d_torch
from dimba_test_helpers import scan_inputs


inputs = functools.partial(scan_inputs, d=24)


@pytest.mark.parametrize("length, chunk", [(1, 8), (37, 8), (64, 16), (100, 128)])
def test_torch_scan_matches_reference(length, chunk):
    kw = inputs(length=length, seed=length)
    ref = selective_scan_ref(**kw)
    out = selective_scan_torch(**kw, chunk_size=chunk)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_scan_without_optional_inputs_and_float64():
    kw = inputs(dtype=torch.float64)
    for k in ("D", "z", "delta_bias"):
        kw[k] = None
    kw["delta_softplus"] = False
    kw["delta"] = kw["delta"].abs()
    out, ref = selective_scan_torch(**kw, chunk_size=5), selective_scan_ref(**kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_scan_is_stable_for_large_steps_and_half_inputs():
    kw = inputs(length=300, dtype=torch.bfloat16)
    kw["delta_bias"] = kw["delta_bias"] + 30.0  # softplus(> 20) = identity: decays of exp(-30 * |A|)
    out = selective_scan_torch(**kw, chunk_size=64)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = selective_scan_ref(**kw)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


def test_causal_conv_sees_only_the_past():
    x, w, b = torch.randn(2, 6, 10), torch.randn(6, 4), torch.randn(6)
    y = causal_conv1d(x, w, b, "torch")
    x2 = x.clone()
    x2[..., 5:] = 7.0
    torch.testing.assert_close(causal_conv1d_torch(x2, w, b)[..., :5], y[..., :5])
    manual = torch.nn.functional.silu(sum(w[:, k, None] * torch.nn.functional.pad(x, (3 - k, 0))[..., :10]
                                          for k in range(4)) + b[:, None])
    torch.testing.assert_close(y, manual)
