"""Schedules and samplers for Dimba: each sampler a short function over a guided denoiser and a schedule.

Latents are in the model's (scaled) latent space. A denoiser maps (x, t) with t in discrete model time
[0, 1000) to (eps, v): the guided noise prediction and the learned-variance channels (or None).
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch

from .config import CAPTION_LENGTH
from .model import flat_mask

# The reference's discrete schedule: linear betas from beta_start to beta_end over num_timesteps steps.
SCHEDULE = {"num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


# --- schedule -------------------------------------------------------------------------------------

class DiscreteSchedule:
    """The reference's discrete VP schedule: N = 1000 linear betas from 1e-4 to 0.02, kept in float64."""

    def __init__(self, num_timesteps: int = SCHEDULE["num_timesteps"], beta_start: float = SCHEDULE["beta_start"],
                 beta_end: float = SCHEDULE["beta_end"]):
        self.N = num_timesteps
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.log_alphas = 0.5 * torch.log(1 - self.betas).cumsum(0)  # log sqrt(alpha_bar) per step
        self.t_array = torch.linspace(0.0, 1.0, num_timesteps + 1, dtype=torch.float64)[1:]

    # continuous time t in [1/N, 1], as DPM-Solver uses it; knots at t = (n + 1) / N
    def log_alpha(self, t):
        """Piecewise-linear log sqrt(alpha_bar) at continuous time t (extrapolated linearly at the ends)."""
        return _interp(torch.as_tensor(t, dtype=torch.float64), self.t_array, self.log_alphas)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(1 - torch.exp(2 * self.log_alpha(t)))

    def lambda_(self, t):
        """Half log-SNR: log(alpha / sigma)."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1 - torch.exp(2 * la))

    def model_time(self, t):
        """Continuous t -> the model's discrete timestep input (t - 1/N) * N."""
        return (torch.as_tensor(t, dtype=torch.float64) - 1.0 / self.N) * self.N

    def respace(self, steps: int, start: int | None = None) -> list[int]:
        """IDDPM's evenly spaced subset of `steps` discrete timesteps in [0, start], ascending."""
        last = self.N - 1 if start is None else start
        if steps > last + 1:
            raise ValueError(f"{steps} steps is more than the {last + 1} timesteps available")
        if steps == 1:
            return [last]
        stride, pos, taken = last / (steps - 1), 0.0, []
        for _ in range(steps):  # accumulate the stride as IDDPM's space_timesteps does
            taken.append(round(pos))
            pos += stride
        return sorted(set(taken))


def _interp(x, xp, fp):
    """Linear interpolation of fp(xp) at x, with linear extrapolation beyond the ends (xp ascending)."""
    idx = torch.searchsorted(xp, x.reshape(-1)).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return (y0 + (x.reshape(-1) - x0) * (y1 - y0) / (x1 - x0)).reshape(x.shape)


# --- guided denoiser ------------------------------------------------------------------------------

def cfg_denoiser(model, cond, uncond, mask=None, uncond_mask=None, cfg_scale: float = 4.5, batch: int | None = None):
    """Wrap a Dimba model as (x, t) -> (guided eps, variance channels of the conditional half).

    CFG batches [uncond, cond] in one call; the prompt's mask serves both halves unless uncond_mask is
    given (the reference applies the prompt's mask to the T5("") embedding too).
    """
    b = batch or cond.shape[0]
    cond = _caption(cond, b)
    mask = None if mask is None else _mask(mask, b, cond.device)

    def split(out, c):
        return out[:, :c], (out[:, c:] if out.shape[1] > c else None)

    def conditional(x, t):
        return split(model(x, _times(t, x), cond, mask), x.shape[1])

    if uncond is None or cfg_scale == 1.0:
        return conditional
    uncond = _caption(uncond, b)
    u_mask = mask if uncond_mask is None else _mask(uncond_mask, b, cond.device)
    y = torch.cat([uncond, cond])
    both = None if mask is None and u_mask is None else torch.cat(
        [_ones_if_none(u_mask, uncond), _ones_if_none(mask, cond)])

    def guided(x, t):
        t = _times(t, x)
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), y, both).chunk(2)
        (eps_u, _), (eps_c, v) = split(out_u, x.shape[1]), split(out_c, x.shape[1])
        return eps_u + cfg_scale * (eps_c - eps_u), v

    return guided


def _times(t, x):
    """A scalar model time as a float32 vector over the batch of x."""
    return torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).to(x.device)


def _caption(y, b):
    y = y if y.ndim == 4 else y[:, None]
    return y.expand(b, *y.shape[1:]) if y.shape[0] == 1 and b > 1 else y


def _mask(mask, b, device):
    mask = flat_mask(mask).to(device)
    return mask.expand(b, -1) if mask.shape[0] == 1 and b > 1 else mask


def _ones_if_none(mask, y):
    return torch.ones(y.shape[0], y.shape[2], dtype=torch.long, device=y.device) if mask is None else mask.long()


# --- samplers -------------------------------------------------------------------------------------
# Each takes (denoise, noise, schedule, steps) and optionally a callback, an init latent with the
# fraction t_start of the schedule to run (img2img); the stochastic ones (STOCHASTIC) also a generator.

def _noised(noise, init, alpha: float, sigma: float):
    """The starting latent: pure noise, or the init latent noised to (alpha, sigma)."""
    return noise if init is None else alpha * init + sigma * noise


def continuous_grid(schedule, steps: int, t_start: float) -> torch.Tensor:
    """steps + 1 time-uniform points of continuous time from t_start down to 1/N (DPM-Solver's grid)."""
    return torch.linspace(t_start, 1.0 / schedule.N, steps + 1, dtype=torch.float64)


def discrete_grid(schedule, steps: int, t_start: float) -> tuple[list[int], list[float]]:
    """Descending IDDPM-respaced timesteps from round(t_start * N) - 1 to 0, and their alpha_bar (+ 1.0 at the end)."""
    start = max(0, min(schedule.N - 1, round(t_start * schedule.N) - 1))
    ts = schedule.respace(steps, start)[::-1]
    return ts, [float(schedule.alphas_cumprod[t]) for t in ts] + [1.0]


def sample_dpmpp_2m(denoise, noise, schedule, steps, callback=None, init=None, t_start=1.0):
    """DPM-Solver++ (data prediction) multistep order 2, time-uniform from t_start to 1/N, lower order final."""
    ts = continuous_grid(schedule, steps, t_start)
    lam, alpha, sigma = schedule.lambda_(ts), schedule.alpha(ts), schedule.sigma(ts)
    x = _noised(noise, init, float(alpha[0]), float(sigma[0]))
    x0_prev = None
    for i in range(steps):
        x0 = (x - float(sigma[i]) * denoise(x, schedule.model_time(ts[i]))[0]) / float(alpha[i])
        h = float(lam[i + 1] - lam[i])
        ratio, a_phi = float(sigma[i + 1] / sigma[i]), float(alpha[i + 1]) * math.expm1(-h)
        if x0_prev is None or i == steps - 1:  # first and last step first order (lower_order_final)
            x = ratio * x - a_phi * x0
        else:
            r = float(lam[i] - lam[i - 1]) / h
            x = ratio * x - a_phi * x0 - 0.5 * a_phi * (x0 - x0_prev) / r
        x0_prev = x0
        if callback is not None:
            callback(i, steps, x, x0)
    return x


def sample_ddim(denoise, noise, schedule, steps, callback=None, init=None, t_start=1.0):
    """DDIM with eta 0 on IDDPM-respaced discrete timesteps."""
    ts, ac = discrete_grid(schedule, steps, t_start)
    x = _noised(noise, init, math.sqrt(ac[0]), math.sqrt(1 - ac[0]))
    for i, t in enumerate(ts):
        eps = denoise(x, float(t))[0]
        x0 = (x - math.sqrt(1 - ac[i]) * eps) / math.sqrt(ac[i])
        x = math.sqrt(ac[i + 1]) * x0 + math.sqrt(1 - ac[i + 1]) * eps
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


def sample_iddpm(denoise, noise, schedule, steps, callback=None, init=None, t_start=1.0, generator=None):
    """IDDPM ancestral sampling on respaced steps with the learned-range variance (channels 4..7)."""
    ts, ac = discrete_grid(schedule, steps, t_start)
    x = _noised(noise, init, math.sqrt(ac[0]), math.sqrt(1 - ac[0]))
    for i, t in enumerate(ts):
        a_t, a_prev = ac[i], ac[i + 1]
        beta = 1 - a_t / a_prev  # the respaced chain's beta
        eps, v = denoise(x, float(t))
        if v is None:
            raise ValueError("iddpm needs a model with learned variance (8 output channels)")
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = (beta * math.sqrt(a_prev) / (1 - a_t)) * x0 + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)) * x
        if i + 1 < len(ts):  # no noise on the last step
            frac = (v.float() + 1) / 2  # learned range between the posterior and the beta variance
            log_var = frac * math.log(beta) + (1 - frac) * math.log(beta * (1 - a_prev) / (1 - a_t))
            z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            x = x + torch.exp(0.5 * log_var) * z
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


def sample_euler(denoise, noise, schedule, steps, callback=None, init=None, t_start=1.0):
    """Euler on the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar) over respaced steps."""
    ts, ac = discrete_grid(schedule, steps, t_start)
    sigmas = [math.sqrt((1 - a) / a) for a in ac]  # ends at 0
    z = noise * sigmas[0] if init is None else init + sigmas[0] * noise  # VE latent x / alpha
    for i, t in enumerate(ts):
        s = sigmas[i]
        eps = denoise(z / math.sqrt(1 + s ** 2), float(t))[0]
        z = z + eps * (sigmas[i + 1] - s)
        if callback is not None:
            callback(i, len(ts), z / math.sqrt(1 + sigmas[i + 1] ** 2), z - sigmas[i + 1] * eps)
    return z


def _sa_coefficients(nodes, h: float, k: float, rescale: bool = False) -> list[float]:
    """SA-Solver weights b_j = k * int_0^h exp(-k (h - u)) l_j(u) du, u = lambda - lambda_i, k = 1 + tau^2.

    l_j is the Lagrange basis polynomial through `nodes` (the history points' u). With the moments
    M_m = k * int_0^h exp(-k (h - u)) u^m du = h^m - (m / k) M_{m-1}, M_0 = 1 - exp(-k h), each b_j is the
    dot product of l_j's power coefficients with M. rescale: the reference's few-step variant for two
    nodes (paper, Appendix D), which weights the slope with M_1 = k h^2 / 2 (the undamped integral) instead.
    """
    moments = [-math.expm1(-k * h)]
    for m in range(1, len(nodes)):
        moments.append(h ** m - m / k * moments[-1])
    if rescale and len(nodes) == 2:
        moments[1] = k * h * h / 2
    weights = []
    for j, uj in enumerate(nodes):
        poly = [1.0]  # l_j's coefficients, lowest power first
        for m, um in enumerate(nodes):
            if m != j:
                poly = [(lo - um * hi) / (uj - um) for hi, lo in zip(poly + [0.0], [0.0] + poly)]
        weights.append(sum(c * mom for c, mom in zip(poly, moments)))
    return weights


def sample_sa_solver(denoise, noise, schedule, steps, callback=None, init=None, t_start=1.0, generator=None,
                     eta=1.0, predictor_order=2, corrector_order=2):
    """SA-Solver (Xue et al. 2023), data prediction, as the reference runs it ('few_steps', PEC, one call a step).

    Time-uniform from t_start to 1/N; noise scale tau(t) = eta for 0.2 <= t <= 0.8 (t the step's target),
    else 0. Each step x_i -> x_{i+1}, h = lambda_{i+1} - lambda_i, k = 1 + tau^2:
        x_{i+1} = sigma_{i+1} / sigma_i e^{-tau^2 h} x_i + alpha_{i+1} sum_j b_j x0_j
                  + sigma_{i+1} sqrt(1 - e^{-2 tau^2 h}) xi        (b_j from _sa_coefficients, rescaled)
    predicting from the last predictor_order x0's, evaluating the model at the prediction, then correcting
    with the same xi from corrector_order x0's including the new one (which is kept as history). Orders
    drop while history is short; the final step is a first-order predictor alone (no model call).
    eta = 0 solves the probability-flow ODE; order 1 with eta 0 is DDIM (DPM-Solver++ first order).
    """
    ts = continuous_grid(schedule, steps, t_start)
    lam, alpha, sigma = schedule.lambda_(ts).tolist(), schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist()
    x = _noised(noise, init, alpha[0], sigma[0])

    def data(x, i):
        return (x - sigma[i] * denoise(x, schedule.model_time(ts[i]))[0]) / alpha[i]

    def update(x, i, hist, tau, xi):  # x_i -> x_{i+1} with the x0's in hist: (grid index, x0) pairs
        h = lam[i + 1] - lam[i]
        b = _sa_coefficients([lam[j] - lam[i] for j, _ in hist], h, 1 + tau * tau, rescale=True)
        x = (sigma[i + 1] / sigma[i]) * math.exp(-tau * tau * h) * x + alpha[i + 1] * sum(
            bj * x0 for bj, (_, x0) in zip(b, hist))
        return x if xi is None else x + sigma[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * xi

    hist = [(0, data(x, 0))]
    for i in range(steps):
        tau = eta if 0.2 <= float(ts[i + 1]) <= 0.8 else 0.0
        xi = None if tau == 0 else torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x_p = update(x, i, hist[-min(predictor_order, len(hist), steps - i):], tau, xi)
        if i == steps - 1:  # final step: predictor only (lower order final), no evaluation
            x = x_p
        else:
            hist = hist[-max(predictor_order, corrector_order):] + [(i + 1, data(x_p, i + 1))]
            c = min(corrector_order, len(hist), steps - i + 1)
            x = update(x, i, hist[-c:], tau, xi) if c > 0 else x_p
        if callback is not None:
            callback(i, steps, x, hist[-1][1])
    return x


# The samplers, the default first: name -> (function, default steps).
_SAMPLER_TABLE: dict[str, tuple[Callable, int]] = {
    "dpmpp_2m": (sample_dpmpp_2m, 20), "ddim": (sample_ddim, 50), "iddpm": (sample_iddpm, 100),
    "euler": (sample_euler, 30), "sa_solver": (sample_sa_solver, 25)}
SAMPLERS = tuple(_SAMPLER_TABLE)
SAMPLER_FNS = {name: fn for name, (fn, _) in _SAMPLER_TABLE.items()}
DEFAULT_STEPS = {name: steps for name, (_, steps) in _SAMPLER_TABLE.items()}
STOCHASTIC = ("iddpm", "sa_solver")  # samplers that draw step noise (from a generator)


# --- entry point ----------------------------------------------------------------------------------

MAX_SEED = 2**64 - 1  # ComfyUI's seed range: 0 .. 2^64 - 1


def check_seed(seed) -> int:
    """A seed must be an integer from 0 to 2^64 - 1 (the range torch generators and ComfyUI accept)."""
    try:
        value = operator.index(seed)  # ints and numpy integers, not floats
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to 2^64 - 1, got {seed!r}")
    return value


def noise_like(shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise from a CPU generator seeded with `seed` (ComfyUI draws the same values)."""
    g = torch.Generator("cpu").manual_seed(check_seed(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def step_generator(seed: int) -> torch.Generator:
    """The CPU generator of the stochastic samplers' step noise for `seed`: seeded with seed + 1 (mod 2^64)."""
    return torch.Generator("cpu").manual_seed((check_seed(seed) + 1) % 2**64)


@torch.no_grad()
def sample(model, noise, cond, uncond, *, mask=None, steps: int | None = 20, cfg_scale: float = 4.5,
           sampler: str = "dpmpp_2m", seed: int = 0, generator=None, callback=None, init_latent=None,
           denoise: float = 1.0, uncond_mask=None, schedule: DiscreteSchedule | None = None,
           wrap_denoiser=None) -> torch.Tensor:
    """Sample latents from `noise` (B x C x H x W, standard normal) with classifier-free guidance.

    cond/uncond: T5 features B x L x C (or B x 1 x L x C, or batch 1 to broadcast); mask: B x L (1 = valid).
    The stochastic samplers (iddpm, sa_solver) draw their step noise from `generator`, by default
    step_generator(seed), so a call is reproducible. callback(step, total, x, denoised) is called after
    each step; raising from it stops sampling. init_latent with denoise < 1 starts from a noised image
    latent (img2img). wrap_denoiser, if given, maps the guided denoiser (x, model time) -> (eps, variance
    channels or None) to the one the sampler calls (caching, logging: ComfyUI's PREDICT_NOISE wrappers).
    Returns the final latent.
    """
    steps = check_settings(sampler, steps, cfg_scale, denoise)
    if denoise < 1.0 and init_latent is None:
        raise ValueError("denoise < 1 needs init_latent (the encoded image to start from)")
    check_inputs(noise, cond, uncond, mask, uncond_mask, init_latent if denoise < 1.0 else None)
    schedule = schedule or DiscreteSchedule()
    init = None if denoise >= 1.0 else init_latent.float().to(noise.device)
    t_start = max(denoise, 2.0 / schedule.N)
    guided = cfg_denoiser(model, cond, uncond, mask, uncond_mask, cfg_scale, batch=noise.shape[0])
    if wrap_denoiser is not None:
        guided = wrap_denoiser(guided)
    extra = {"generator": step_generator(seed) if generator is None else generator} if sampler in STOCHASTIC else {}
    return SAMPLER_FNS[sampler](guided, noise.float(), schedule, steps, callback=callback, init=init,
                                t_start=t_start, **extra)


def check_settings(sampler: str, steps: int | None, cfg_scale: float = 4.5, denoise: float = 1.0) -> int:
    """Validate the sampler settings; returns the step count (the sampler's default for None)."""
    if sampler not in SAMPLER_FNS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be a whole number from 1 to 1000, got {steps!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg scale must be a finite number, got {cfg_scale!r}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    return steps


def check_inputs(noise, cond, uncond=None, mask=None, uncond_mask=None, init_latent=None) -> None:
    """Raise a ValueError naming the argument when the tensors given to `sample` do not fit together."""
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        raise ValueError(f"noise must be a B x C x H x W tensor, got {_shape(noise)}")
    b = noise.shape[0]

    def caption(name, y):
        if not isinstance(y, torch.Tensor) or not (y.ndim == 3 or (y.ndim == 4 and y.shape[1] == 1)):
            raise ValueError(f"{name} must be T5 features B x L x C (or B x 1 x L x C), got {_shape(y)}")
        if y.shape[0] not in (1, b):
            raise ValueError(f"{name} has batch {y.shape[0]} but the noise has {b}: give 1 (shared) or {b}")
        return y.shape[-2], y.shape[-1]

    length, width = caption("cond", cond)
    if uncond is not None:
        u_length, u_width = caption("uncond", uncond)
        if u_width != width:
            raise ValueError(f"uncond features are {u_width} wide but cond features {width}: encode both "
                             "with the same text encoder")
        if u_length != length:
            raise ValueError(f"uncond has {u_length} tokens but cond has {length}: pad both to one length "
                             f"(T5TextEncoder.encode pads to {CAPTION_LENGTH}) and pass each one's mask")
    for name, m in (("mask", mask), ("uncond_mask", uncond_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.ndim < 1 or m.shape[0] not in (1, b) \
                or flat_mask(m).shape[1] != length:
            raise ValueError(f"{name} must be {b} x {length} (or 1 x {length}) to match the captions, "
                             f"got {_shape(m)}")
    if init_latent is not None and (not isinstance(init_latent, torch.Tensor)
                                    or init_latent.shape[1:] != noise.shape[1:]
                                    or init_latent.shape[0] not in (1, b)):
        raise ValueError(f"init_latent must have the noise's shape {tuple(noise.shape)}, got {_shape(init_latent)}")


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
