"""Depthwise causal 1-D convolution with SiLU, in PyTorch and on causal-conv1d's CUDA kernel."""
from __future__ import annotations

import torch.nn.functional as F


def causal_conv1d_torch(x, weight, bias=None, activation="silu"):
    """x: (batch, dim, L); weight: (dim, width); left-padded so position l sees l-width+1..l."""
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_cuda(x, weight, bias=None, activation="silu"):
    """causal-conv1d's fused kernel (imported lazily)."""
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(x, weight, bias, activation=activation)
