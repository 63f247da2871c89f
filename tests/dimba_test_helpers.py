"""Helpers the test modules share: tiny model configs, the relative error, scan inputs, the reference's
constructor arguments and the naive twins of the fused Triton kernels."""
import torch

from dimba_core import DimbaConfig
from dimba_core.ops.causal_conv1d import causal_conv1d_torch
from dimba_core.ops.selective_scan import selective_scan_ref

# A tiny Dimba: 2 blocks of width 32, each followed by a Mamba block.
TINY = dict(hidden_size=32, depth=2, num_heads=2, caption_channels=16, model_max_length=8, base_size=4,
            mamba_ratio=1.0)
# Deeper, with 4 heads and Mamba after every second block (the interleaving a partial ratio gives).
TINY_HALF_MAMBA = {**TINY, "depth": 4, "num_heads": 4, "mamba_ratio": 0.5}


def rel_err(a, b) -> float:
    """Relative L2 error of a against b, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def scan_inputs(b=2, d=8, n=16, length=37, seed=0, dtype=torch.float32, lead=(), device="cpu"):
    """Random selective-scan inputs in mamba-ssm's layout; `lead` adds leading dims (A, D, delta_bias get them
    too)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    one = (1,) * (len(lead) > 0)
    kw = dict(u=r(*lead, b, d, length).to(dtype), delta=(0.5 * r(*lead, b, d, length)).to(dtype),
              A=-torch.exp(r(*lead, *one, d, n)), B=r(*lead, b, n, length).to(dtype),
              C=r(*lead, b, n, length).to(dtype), D=r(*lead, *one, d), z=r(*lead, b, d, length).to(dtype),
              delta_bias=0.5 * r(*lead, *one, d), delta_softplus=True)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


# Reference constructor arguments that do not change the inference function.
TRAINING_ONLY_ARGS = {"class_dropout_prob", "drop_path", "window_size", "window_block_indexes", "use_rel_pos",
                      "config"}


def reference_config(input_size: int = 64, **kw) -> DimbaConfig:
    """A DimbaConfig from the reference constructor's arguments (input_size in latent pixels, lewei_scale, ...),
    as the golden file's metadata holds them."""
    aliases = {"lewei_scale": "pe_interpolation", "pred_sigma": "learn_sigma"}
    kw = {aliases.get(k, k): v for k, v in kw.items() if k not in TRAINING_ONLY_ARGS}
    return DimbaConfig(base_size=input_size // kw.get("patch_size", 2), **kw)


def bidirectional_conv1d_silu_ref(x, w_f, b_f, w_b, b_b):
    """The PyTorch twin of triton_scan.bidirectional_conv1d_silu: the mixer's causal conv, and the same on
    flipped x."""
    return causal_conv1d_torch(x, w_f, b_f), causal_conv1d_torch(x.flip(-1), w_b, b_b).flip(-1)


def bidirectional_scan_ref(x_f, x_b, delta_f, delta_b, A_f, A_b, B_f, B_b, C_f, C_b, D_f, D_b, z,
                           delta_bias_f, delta_bias_b):
    """The naive twin of the fused scan: selective_scan_ref forward, plus selective_scan_ref on flipped copies
    flipped back."""
    y_f = selective_scan_ref(x_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f, delta_softplus=True)
    y_b = selective_scan_ref(x_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1), D_b, z.flip(-1),
                             delta_bias_b, delta_softplus=True)
    return y_f + y_b.flip(-1)
