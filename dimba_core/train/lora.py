"""Trainable LoRA adapters on a frozen Dimba: W' = W + alpha / rank * up @ down on chosen linear weights."""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

# the attention projections and the Mamba mixers' projections (both directions)
DEFAULT_TARGETS = (r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj))",
                   r"mamba_blocks\.\d+\.mixer\.(in_proj|out_proj|x_proj(_b)?|dt_proj(_b)?)")
# weights some scan paths read directly (batched matmuls, F.linear(dt, dt_proj.weight)) instead of calling
# the module: their LoRA is a weight parametrization, the others' a cheaper forward hook
DIRECT_WEIGHTS = re.compile(r"\.(x_proj|dt_proj)(_b)?$")


class LoRA(nn.Module):
    """A rank-r update for one linear layer; up starts at zero so training starts from the base model."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x):
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down) * self.scale


class _AddDelta(nn.Module):
    """Parametrization W -> W + lora.delta() for weights read directly; keeps the LoRA out of the module tree."""

    def __init__(self, lora: LoRA):
        super().__init__()
        self._lora = [lora]

    def forward(self, weight):
        return weight + self._lora[0].delta().to(weight.dtype)


class LoRANetwork(nn.Module):
    """LoRA adapters keyed by the Dimba module name; `attach` hooks them into the model."""

    def __init__(self, model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS):
        super().__init__()
        if rank < 1:
            raise ValueError(f"--lora-rank must be at least 1, got {rank}")
        pattern = re.compile("|".join(f"(?:{t})" for t in targets))
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
        if not self.names:
            raise ValueError(f"no linear layer of the model matches the LoRA targets {targets}")
        self.rank = rank
        self.layers = nn.ModuleDict()
        for name in self.names:
            lin = model.get_submodule(name)
            # a layer with fewer than `rank` inputs or outputs gets its full rank (the same update space); its
            # alpha keeps the scale alpha / rank of the others
            r = min(rank, lin.in_features, lin.out_features)
            layer_alpha = (alpha or rank) * (r / rank if r < rank else 1)
            self.layers[name.replace(".", "__")] = LoRA(lin.in_features, lin.out_features, r, layer_alpha)

    def reduced_ranks(self) -> dict:
        """{module name: rank} of the layers whose rank is below the requested one (they allow no more)."""
        return {n: lora.rank for n, lora in self.items() if lora.rank < self.rank}

    def items(self):
        """(module name, LoRA) pairs."""
        return [(n, self.layers[n.replace(".", "__")]) for n in self.names]

    def attach(self, model: nn.Module) -> "LoRANetwork":
        """Add each LoRA to its layer: a forward hook, or a weight parametrization for directly read weights."""
        for name, lora in self.items():
            lin = model.get_submodule(name)
            if DIRECT_WEIGHTS.search(name):
                parametrize.register_parametrization(lin, "weight", _AddDelta(lora), unsafe=True)
            else:
                lin.register_forward_hook(lambda m, inp, out, lora=lora: out + lora(inp[0]))
        return self

    def to_comfy_state_dict(self, dtype=torch.float32) -> dict:
        """Keys diffusion_model.<key>.lora_down.weight / .lora_up.weight / .alpha (ComfyUI, apply_lora)."""
        sd = {}
        for name, lora in self.items():
            key = "diffusion_model." + name
            sd[key + ".lora_down.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
            sd[key + ".lora_up.weight"] = lora.up.detach().to("cpu", dtype).contiguous()
            sd[key + ".alpha"] = torch.tensor(lora.alpha, dtype=dtype)
        return sd
