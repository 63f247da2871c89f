"""The Dimba denoiser: PixArt-style attention blocks interleaved with bidirectional Mamba blocks."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import DimbaConfig
from .dtypes import cast_to, table_dtype
from .mamba import MambaBlock


def flat_mask(mask: torch.Tensor) -> torch.Tensor:
    """A caption mask given as B x L, B x 1 x L or B x 1 x 1 x L (1 = valid token), as B x L."""
    return mask.reshape(mask.shape[0], -1)


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, pe_interpolation: float) -> torch.Tensor:
    """PixArt's 2-D sin-cos position embedding for an h x w grid, row-major, in float64: (h*w, dim)."""
    gh = torch.arange(h, dtype=torch.float64) / (h / base_size) / pe_interpolation
    gw = torch.arange(w, dtype=torch.float64) / (w / base_size) / pe_interpolation
    grid_h, grid_w = torch.meshgrid(gh, gw, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def sincos(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([sincos(grid_w), sincos(grid_h)], dim=1)


def sdpa(q, k, v, mask=None, options=None):
    """The default attention: PyTorch's SDPA over B x heads x N x head_dim; mask B x 1 x 1 x L (True = attend).

    Another attention function with this signature can be handed to Dimba (`attention=`); `options` is what the
    caller passes to Dimba.forward as `attention_options` (ComfyUI's transformer_options, for its dispatch).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Mlp(nn.Module):
    """Two linear layers with tanh-GELU."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.fc1 = operations.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, out or dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens: B x C x H x W -> B x (H/p * W/p) x D."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = operations.Conv2d(in_channels, dim, patch_size, stride=patch_size, dtype=dtype, device=device)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """256-dim sinusoidal [cos | sin] timestep features -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(operations.Linear(freq_dim, dim, dtype=dtype, device=device), nn.SiLU(),
                                 operations.Linear(dim, dim, dtype=dtype, device=device))

    def forward(self, t, dtype: torch.dtype):
        """Features of timesteps t (B,) through the MLP in the compute dtype `dtype` (not the storage dtype)."""
        half = self.freq_dim // 2  # float32 whatever the weights, as the reference does
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the model width; y_embedding is the training-time null caption (unused here)."""

    def __init__(self, caption_channels: int, dim: int, length: int, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, dim, operations=operations, dtype=dtype, device=device)
        y_embedding = torch.randn(length, caption_channels, device=device) / caption_channels ** 0.5
        self.register_buffer("y_embedding", y_embedding.to(dtype=table_dtype(dtype)))

    def forward(self, y):
        return self.y_proj(y)


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, *, operations=nn, attention=sdpa, dtype=None, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.attention = attention
        self.qkv = operations.Linear(dim, 3 * dim, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, options=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self.attention(q, k, v, None, options)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head cross-attention to caption tokens; key_mask (B x L, True = valid) hides padding."""

    def __init__(self, dim: int, num_heads: int, *, operations=nn, attention=sdpa, dtype=None, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.attention = attention
        self.q_linear = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.kv_linear = operations.Linear(dim, 2 * dim, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, y, key_mask=None, options=None):
        b, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        q = self.q_linear(x).view(b, n, heads, hd).transpose(1, 2)
        k, v = self.kv_linear(y).view(b, y.shape[1], 2, heads, hd).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        x = self.attention(q, k, v, attn_mask, options)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
    """PixArt block: adaLN-single modulated self-attention, cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, operations=nn, attention=sdpa, dtype=None,
                 device=None):
        super().__init__()
        kw = {"operations": operations, "dtype": dtype, "device": device}
        self.norm1 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.attn = SelfAttention(dim, num_heads, attention=attention, **kw)
        self.cross_attn = CrossAttention(dim, num_heads, attention=attention, **kw)
        self.norm2 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)
        self.scale_shift_table = nn.Parameter((torch.randn(6, dim, device=device) / dim ** 0.5).to(table_dtype(dtype)))

    def forward(self, x, y, t0, key_mask=None, options=None):
        mod = cast_to(self.scale_shift_table, t0)[None] + t0.reshape(x.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), options)
        x = x + self.cross_attn(x, y, key_mask, options)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and the linear map to p*p*out_channels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.norm_final = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.linear = operations.Linear(dim, patch_size * patch_size * out_channels, dtype=dtype, device=device)
        self.scale_shift_table = nn.Parameter((torch.randn(2, dim, device=device) / dim ** 0.5).to(table_dtype(dtype)))

    def forward(self, x, t):
        shift, scale = (cast_to(self.scale_shift_table, t)[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Dimba(nn.Module):
    """Dimba denoiser: model(x, timestep, y, mask) -> B x 2C x H x W (eps | learned variance).

    Layers come from `operations` (a namespace with Linear, Conv1d, Conv2d, LayerNorm taking dtype and device,
    such as ComfyUI's comfy.ops classes; default torch.nn), built with `dtype` and `device`; attention is
    `attention(q, k, v, mask, options)` (default `sdpa`; ComfyUI hands in its own dispatch). The Mamba SSM
    parameters (A, D, delta bias) are float32 in every weight dtype; with float8 weights the parameters read
    directly (norm weights, modulation tables) are float32 too.
    """

    def __init__(self, config: DimbaConfig, scan_backend: str = "auto", *, operations=None, attention=None,
                 dtype=None, device=None):
        super().__init__()
        self.config = c = config
        kw = {"operations": operations or nn, "dtype": dtype, "device": device}
        attention = attention or sdpa
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(c.hidden_size, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), kw["operations"].Linear(c.hidden_size, 6 * c.hidden_size,
                                                                        dtype=dtype, device=device))
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, c.model_max_length, **kw)
        self.register_buffer("pos_embed", torch.zeros(1, c.base_size ** 2, c.hidden_size, dtype=table_dtype(dtype),
                                                      device=device))  # unused, kept for keys
        self.blocks = nn.ModuleList(AttentionBlock(c.hidden_size, c.num_heads, c.mlp_ratio, attention=attention, **kw)
                                    for _ in range(c.depth))
        self.mamba_blocks = nn.ModuleList(
            MambaBlock(c.hidden_size, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=c.dt_rank,
                       backend=scan_backend, **kw) for _ in range(c.mamba_depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels, **kw)
        self._mamba_after = c.mamba_after()
        self._pos_cache: dict = {}
        self.compute_dtype: torch.dtype | None = None  # None: the weights' dtype (float32 for 1-byte weights)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype inputs are cast to: compute_dtype if set, else the weights' (float32 for float8)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        weight = self.x_embedder.proj.weight.dtype
        return torch.float32 if weight.itemsize == 1 else weight

    @property
    def scan_backend(self) -> str:
        """The scan backend setting of the Mamba mixers (`auto`, `cuda`, `parallel`, `torch`, `ref` or `triton`)."""
        return self.mamba_blocks[0].mixer.backend if len(self.mamba_blocks) else "none"

    def set_scan_backend(self, name: str) -> "Dimba":
        """Select the scan backend of every Mamba mixer (see dimba_core.ops for what `auto` picks)."""
        for block in self.mamba_blocks:
            block.mixer.backend = ops.check_backend(name)
        return self

    def pos_embed_for(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """Position embedding for an h x w token grid, cached per grid, device and dtype."""
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            c = self.config
            pe = sincos_pos_embed_2d(c.hidden_size, h, w, c.base_size, c.pe_interpolation)
            self._pos_cache[key] = pe.to(device=device, dtype=dtype)[None]
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor, timestep, y: torch.Tensor, mask: torch.Tensor | None = None, *,
                dtype: torch.dtype | None = None, attention_options: dict | None = None) -> torch.Tensor:
        """eps | variance for latents x (B x C x H x W), timesteps (B or scalar), T5 features y (B x L x C) and
        their mask (B x L, 1 = token); computed in `dtype` (default self.dtype), returned in x's dtype.
        `attention_options` go to every attention call (ComfyUI's transformer_options)."""
        in_dtype = x.dtype
        x, t, y, key_mask = self._check_inputs(x, timestep, y, mask, dtype or self.dtype)
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.x_embedder(x) + self.pos_embed_for(h, w, x.device, x.dtype)
        t = self.t_embedder(t, x.dtype)
        t0 = self.t_block(t)
        y = self.y_embedder(y)
        residual = None
        for i, block in enumerate(self.blocks):
            x = block(x, y, t0, key_mask, attention_options)
            j = self._mamba_after.get(i)
            if j is not None:
                x, residual = self.mamba_blocks[j](x, residual)
        x = self.final_layer(x, t)
        return self.unpatchify(x, h, w).to(in_dtype)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """B x (h*w) x (p*p*C) tokens -> B x C x (h*p) x (w*p)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x, timestep, y, mask, dtype):
        """Validate shapes, cast to the compute dtype, build the key-padding mask; returns x, t, y, key_mask.

        No host synchronisation on accelerators or while compiling (CUDA graphs, torch.compile can capture it).
        """
        c = self.config
        c.check_latent(x.shape)
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device).reshape(-1)
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        t = t.expand(b) if t.numel() == 1 else t
        if y.ndim == 4:
            y = y.squeeze(1)
        if y.ndim != 3 or y.shape[-1] != c.caption_channels:
            raise ValueError(f"y must be B x 1 x L x {c.caption_channels} caption features, got {tuple(y.shape)}")
        if y.shape[0] != b or t.shape[0] != b:
            raise ValueError(f"batch sizes differ: x {b}, y {y.shape[0]}, timestep {t.shape[0]}")
        key_mask = None
        if mask is not None:
            mask = flat_mask(mask).to(x.device) != 0
            if mask.shape[0] == 1 and b > 1:
                mask = mask.expand(b, -1)  # one mask for the batch; any other batch mismatch is an error
            if mask.shape != y.shape[:2]:
                raise ValueError(f"mask must be B x L = {tuple(y.shape[:2])}, got {tuple(mask.shape)}")
            if x.device.type == "cpu" and not torch.compiler.is_compiling():
                # eager CPU only: drop padding no sample attends to (reads the mask on the host, free there)
                valid = mask.any(0).nonzero()
                last = int(valid[-1]) + 1 if len(valid) else 1
                y, mask = y[:, :last], mask[:, :last]
                if bool(mask.all()):
                    mask = None
            if mask is not None:  # elsewhere no host sync: the key-padding mask alone hides the padding
                key_mask = mask | ~mask.any(1, keepdim=True)  # a caption with no valid token sees all
        return x.to(dtype), t, y.to(device=x.device, dtype=dtype), key_mask
