"""Dimba built from an `operations` namespace (as ComfyUI builds its models): every layer, dtype/device, fp8 storage."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dimba_core import Dimba, DimbaConfig
from dimba_test_helpers import TINY
from dimba_core.dtypes import cast_to

CFG = TINY
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)


def counting_operations():
    """A namespace of nn subclasses that record (class name, dtype, device) of every construction."""
    built = []

    def counted(base):
        class Counted(base):
            def __init__(self, *args, dtype=None, device=None, **kw):
                built.append((base.__name__, dtype, device))
                super().__init__(*args, dtype=dtype, device=device, **kw)

        Counted.__name__ = "Counted" + base.__name__
        return Counted

    return types.SimpleNamespace(**{b.__name__: counted(b) for b in LAYERS}), built


def _cast_params(module, x):
    return cast_to(module.weight, x), cast_to(module.bias, x)


class CastLinear(nn.Linear):
    """Like comfy.ops' manual cast: weights stored in any dtype, cast to the input's at use."""

    def forward(self, x):
        return F.linear(x, *_cast_params(self, x))


class CastConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, *_cast_params(self, x))


class CastConv1d(nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, *_cast_params(self, x))


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, *((None, None) if self.weight is None
                                                         else _cast_params(self, x)), self.eps)


CAST_OPS = types.SimpleNamespace(Linear=CastLinear, Conv1d=CastConv1d, Conv2d=CastConv2d, LayerNorm=CastLayerNorm)


def inputs():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 1, 8, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 5 + [0] * 3])
    return x, torch.tensor([10.0, 700.0]), y, mask


def reference(backend="torch"):
    torch.manual_seed(0)
    return Dimba(DimbaConfig(**CFG), scan_backend=backend).eval()


def test_every_layer_comes_from_operations_with_dtype_and_device():
    operations, built = counting_operations()
    torch.manual_seed(0)
    model = Dimba(DimbaConfig(**CFG), operations=operations, dtype=torch.float64, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    assert layers and all(type(m).__name__.startswith("Counted") for m in layers)  # no nn layer built directly
    assert len(built) == len(layers)
    assert all(dtype == torch.float64 and device == "cpu" for _, dtype, device in built)
    assert all(t.dtype == torch.float64 for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("backend", ["torch", "parallel", "ref"])
def test_outputs_unchanged_with_operations(backend):
    operations, _ = counting_operations()
    ref = reference(backend)
    torch.manual_seed(0)
    model = Dimba(DimbaConfig(**CFG), scan_backend=backend, operations=operations).eval()
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))  # same init, same numbers


class Allocations(TorchDispatchMode):
    """Records the devices of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


def test_meta_construction_allocates_nothing():
    with Allocations() as seen:
        model = Dimba(DimbaConfig(**CFG), operations=CAST_OPS, dtype=torch.bfloat16, device="meta")
    assert seen.devices == {"meta"}
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    ssm = {k for k in dtypes if k.rsplit(".", 1)[-1] in SSM or ".dt_proj" in k}
    assert len(ssm) == 8 * CFG["depth"] and all(t.is_meta for t in model.state_dict().values())
    assert {dtypes[k] for k in ssm} == {torch.float32}  # the SSM parameters and delta projection: float32 always
    assert {dtypes[k] for k in set(dtypes) - ssm} == {torch.bfloat16}


SSM = ("A_log", "A_b_log", "D", "D_b")


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "parallel"])
def test_low_precision_storage_computes_in_float32(storage, backend):
    """Weights stored in float8 (or bf16) and cast at use equal a float32 model holding the same rounded values."""
    sd = {k: v.to(storage) for k, v in reference().state_dict().items()}
    ref = reference(backend)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    model = Dimba(DimbaConfig(**CFG), scan_backend=backend, operations=CAST_OPS, dtype=storage, device="meta")
    model.to_empty(device="cpu").load_state_dict(sd)
    model.eval()
    mixer = model.mamba_blocks[0].mixer
    assert mixer.in_proj.weight.dtype == storage and mixer.A_log.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert model.blocks[0].scale_shift_table.dtype == (torch.float32 if storage.itemsize == 1 else storage)
    assert model.dtype == (torch.float32 if storage.itemsize == 1 else storage)  # float8: float32 by default
    model.compute_dtype = torch.float32
    with torch.no_grad():
        out, expected = model(*inputs()), ref(*inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compute_dtype_overrides_the_weights_dtype():
    model = Dimba(DimbaConfig(**CFG), operations=CAST_OPS).to(torch.bfloat16).eval()
    model.compute_dtype = torch.float32
    with torch.no_grad():
        out = model(*inputs())
    assert model.dtype == torch.float32 and torch.isfinite(out).all()


def test_cast_to_is_a_no_op_when_dtype_and_device_match():
    w, x = torch.randn(3), torch.randn(2)
    assert cast_to(w, x) is w and cast_to(None, x) is None
    assert cast_to(w.half(), x).dtype == torch.float32 and cast_to(w, x, torch.float64).dtype == torch.float64


class LazyLinear(nn.Linear):
    """ComfyUI's Dynamic VRAM rule for Linear (its newest comfy/ops.py): built holding no tensors, the state
    dict's tensors become the parameters at load time, in the file's dtype (not the constructor's)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.wants_bias = in_features, out_features, bias
        self.weight = self.bias = None
        self.weight_comfy_model_dtype = dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name in ("weight", "bias"):
            value = state_dict.get(prefix + name)
            if value is not None:
                value = value if local_metadata.get("assign_to_params_buffers") else value.clone()
                setattr(self, name, nn.Parameter(value, requires_grad=False))
            elif name == "weight" or self.wants_bias:
                missing.append(prefix + name)

    def forward(self, x):
        return F.linear(x, *_cast_params(self, x))


LAZY_OPS = types.SimpleNamespace(Linear=LazyLinear, Conv1d=CastConv1d, Conv2d=CastConv2d, LayerNorm=CastLayerNorm)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "parallel"])
def test_layers_built_empty_and_filled_by_load_state_dict(file_dtype, backend):
    """Dimba from an operations namespace whose Linear layers start empty (ComfyUI's Dynamic VRAM): the
    constructor reads no layer parameter, load_state_dict fills them, the SSM tensors arrive as float32, and
    the output equals the eager model holding the same values."""
    sd = {k: v.to(file_dtype) for k, v in reference(backend).state_dict().items()}
    model = Dimba(DimbaConfig(**CFG), scan_backend=backend, operations=LAZY_OPS, dtype=torch.float16)
    assert model.blocks[0].attn.qkv.weight is None and model.mamba_blocks[0].mixer.dt_proj.bias is None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    mixer = model.mamba_blocks[0].mixer
    assert mixer.in_proj.weight.dtype == file_dtype  # the file's dtype, as ComfyUI's lazy layers keep it
    assert {mixer.dt_proj.weight.dtype, mixer.dt_proj_b.bias.dtype, mixer.A_log.dtype} == {torch.float32}
    ref = reference(backend)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # the values the model holds
    model.eval().compute_dtype = torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs()), ref(*inputs()), rtol=1e-6, atol=1e-6)


def test_assign_load_keeps_the_ssm_parameters_float32():
    """load_state_dict(assign=True) (ComfyUI's dynamic loads) takes the file's tensors, but SSM ones as float32."""
    sd = {k: v.half() for k, v in reference().state_dict().items()}
    model = Dimba(DimbaConfig(**CFG), dtype=torch.float16, device="meta")
    model.load_state_dict(sd, assign=True)
    mixer = model.mamba_blocks[1].mixer
    assert {mixer.A_b_log.dtype, mixer.D.dtype, mixer.dt_proj_b.weight.dtype, mixer.dt_proj.bias.dtype} == {torch.float32}
    assert mixer.in_proj.weight.dtype == model.blocks[0].scale_shift_table.dtype == torch.float16


@pytest.mark.parametrize("backend", ["torch", "parallel"])
def test_attention_is_handed_in(backend):
    """Every self- and cross-attention call goes through the `attention` function handed to Dimba (as ComfyUI
    hands in its dispatch), with the forward's attention_options; sdpa, the default, gives the same output."""
    from dimba_core.model import sdpa

    calls = []

    def counted(q, k, v, mask, options):
        calls.append((q.shape, None if mask is None else mask.shape, options))
        return sdpa(q, k, v, mask)

    ref = reference(backend)
    torch.manual_seed(0)
    model = Dimba(DimbaConfig(**CFG), scan_backend=backend, attention=counted).eval()
    marker = {"transformer_options": True}
    with torch.no_grad():
        assert torch.equal(model(*inputs(), attention_options=marker), ref(*inputs()))
    assert len(calls) == 2 * CFG["depth"] and all(options is marker for *_, options in calls)
    assert [mask for _, mask, _ in calls[1::2]] == [(2, 1, 1, 5)] * CFG["depth"]  # cross-attention: key mask
