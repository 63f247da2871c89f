"""The reference's training objective: IDDPM with learned sigma (eps MSE + variational bound on the variance)."""
from __future__ import annotations

import math

import torch

from ..sampling import DiscreteSchedule

NUM_TIMESTEPS = DiscreteSchedule().N  # the reference's 1000 steps, as the sampler has them


class Coefficients:
    """The sampler's schedule (IDDPM's 1000 linear betas, 1e-4..0.02) and its posterior coefficients, one table per
    dtype.

    The tables are computed in float64 and rounded to float32, as the reference's `_extract_into_tensor`
    does, then cast to the dtype of the latents.
    """

    def __init__(self, schedule: DiscreteSchedule | None = None):
        schedule = schedule or DiscreteSchedule()
        betas, ac = schedule.betas, schedule.alphas_cumprod
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.num_timesteps = schedule.N
        self.tables = dict(
            sqrt_ac=ac.sqrt(), sqrt_1m_ac=(1 - ac).sqrt(),
            sqrt_recip_ac=(1 / ac).sqrt(), sqrt_recipm1_ac=(1 / ac - 1).sqrt(),
            post_coef1=betas * ac_prev.sqrt() / (1 - ac), post_coef2=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
            post_logvar=torch.log(torch.cat([post_var[1:2], post_var[1:]])), log_betas=betas.log())
        self._cache: dict = {}

    def get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient `name` at integer timesteps t, shaped B x 1 x 1 x 1 in like's dtype and device."""
        key = (name, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self.tables[name].float().to(device=like.device, dtype=like.dtype)
        return self._cache[key][t].reshape(-1, *([1] * (like.ndim - 1)))


_COEF = Coefficients()


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by IDDPM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x (data in [-1, 1] on a 255-bin grid) under a discretised Gaussian, elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def q_sample(x_start, t, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
    return _COEF.get("sqrt_ac", t, x_start) * x_start + _COEF.get("sqrt_1m_ac", t, x_start) * noise


def vb_terms_bpd(x_start, x_t, t, eps, var_values):
    """Variational-bound term in bits per dimension: KL of the posteriors for t > 0, decoder NLL at t = 0."""
    c = lambda name: _COEF.get(name, t, x_t)  # noqa: E731
    true_mean = c("post_coef1") * x_start + c("post_coef2") * x_t
    true_logvar = c("post_logvar")
    frac = (var_values + 1) / 2  # learned range between the clipped posterior and beta_t
    model_logvar = frac * c("log_betas") + (1 - frac) * true_logvar
    pred_xstart = c("sqrt_recip_ac") * x_t - c("sqrt_recipm1_ac") * eps
    model_mean = c("post_coef1") * pred_xstart + c("post_coef2") * x_t
    kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_logvar)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(model, x_start, t, y, mask=None, noise=None) -> dict:
    """The reference's per-sample loss terms {"loss", "mse", "vb"} (each shape B) at integer timesteps t.

    x_start: scaled latents B x C x H x W; y: captions B x 1 x L x C; noise: drawn with randn when None.
    mse is the eps error on the first C channels; vb trains only the variance channels (eps detached).
    NaN losses are replaced by zero, as the reference trainer does. The vb term is computed in float64 (its
    t = 0 decoder likelihood and t near 999 KL cancel catastrophically in float32); it is elementwise and cheap.
    """
    t = torch.as_tensor(t, device=x_start.device).long().reshape(-1)
    if t.numel() != x_start.shape[0] or bool((t < 0).any()) or bool((t >= _COEF.num_timesteps).any()):
        raise ValueError(f"t must hold one integer timestep in [0, {_COEF.num_timesteps}) per sample, got {t.tolist()}")
    noise = torch.randn_like(x_start) if noise is None else noise
    x_t = q_sample(x_start, t, noise)
    out = model(x_t, t, y, mask).to(x_start.dtype)
    channels = x_start.shape[1]
    if out.shape[1] != 2 * channels:
        raise ValueError(f"the model must predict eps and variance (learn_sigma): {2 * channels} channels, "
                         f"got {out.shape[1]}")
    eps, var_values = out[:, :channels], out[:, channels:]
    mse = mean_flat((noise - eps) ** 2)
    wide = torch.float32 if x_start.device.type == "mps" else torch.float64  # vb cancels badly in float32
    vb = vb_terms_bpd(*(v.to(wide) for v in (x_start, x_t)), t, eps.detach().to(wide), var_values.to(wide))
    vb = vb.to(x_start.dtype)
    loss = mse + vb
    return {"loss": torch.where(torch.isnan(loss), torch.zeros_like(loss), loss), "mse": mse, "vb": vb}
