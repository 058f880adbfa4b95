"""The algebra of Gaussian diffusion (Ho et al. 2020; Nichol and Dhariwal 2021).

VP form: ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``. Sigma-space form:
``x = x_t / sqrt(alpha_bar_t) = x0 + sigma n`` with ``sigma^2 = (1 - alpha_bar) / alpha_bar``.
Every function here is pure; ``alpha_bar`` arguments broadcast against ``x`` after
:func:`expand` (a ``(B,)`` tensor becomes ``(B, 1, ..., 1)``).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from unnoise.schedules import DiscreteSchedule

Prediction = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")
VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large", "learned_range")


def expand(a: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or ``(B,)`` tensor against ``x`` of shape ``(B, ...)`` in x's dtype."""
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    if a.ndim == 0:
        return a
    if a.ndim != 1 or a.shape[0] != x.shape[0]:
        raise ValueError(f"per-sample values must have shape () or ({x.shape[0]},), got {tuple(a.shape)}")
    return a.reshape(-1, *([1] * (x.ndim - 1)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def check_finite(x: Tensor, what: str = "data") -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values; all values must be finite")


# ---------------------------------------------------------------------------------------------
# Forward process q
# ---------------------------------------------------------------------------------------------


def q_sample(x0: Tensor, alpha_bar: Tensor | float, noise: Tensor) -> Tensor:
    """Closed form q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (DDPM Eq. 4)."""
    ab = expand(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_step(x_prev: Tensor, beta: Tensor | float, noise: Tensor) -> Tensor:
    """One Markov step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM Eq. 2)."""
    b = expand(beta, x_prev)
    return (1 - b).sqrt() * x_prev + b.sqrt() * noise


class Posterior(NamedTuple):
    """q(x_{t-1} | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, variance)."""

    coef_x0: Tensor
    coef_xt: Tensor
    variance: Tensor


def posterior_coefficients(alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> Posterior:
    """DDPM Eq. 6-7 for any pair s < t (here s = t - 1 or a skipped step).

    coef_x0 = sqrt(ab_s) beta / (1 - ab_t), coef_xt = sqrt(alpha) (1 - ab_s) / (1 - ab_t),
    variance = beta_tilde = (1 - ab_s) / (1 - ab_t) beta, where alpha = ab_t / ab_s, beta = 1 - alpha.
    """
    alpha = alpha_bar_t / alpha_bar_prev
    beta = 1 - alpha
    one_minus = 1 - alpha_bar_t
    return Posterior(
        coef_x0=alpha_bar_prev.sqrt() * beta / one_minus,
        coef_xt=alpha.sqrt() * (1 - alpha_bar_prev) / one_minus,
        variance=(1 - alpha_bar_prev) / one_minus * beta,
    )


def q_posterior(x0: Tensor, x_t: Tensor, post: Posterior) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0), broadcast to x0's shape."""
    mean = expand(post.coef_x0, x0) * x0 + expand(post.coef_xt, x0) * x_t
    return mean, expand(post.variance, x0)


class ReverseTable(NamedTuple):
    """Per-step constants of p(x_{t-1} | x_t) for t = 1..T (index t - 1), float64."""

    alpha_bar: Tensor  # alpha_bar_t
    posterior: Posterior
    log_beta: Tensor  # log beta_t (fixed-large)
    log_beta_tilde_clipped: Tensor  # log beta_tilde_t with t = 1 replaced by t = 2 (beta_tilde_1 = 0)


def reverse_table(schedule: DiscreteSchedule) -> ReverseTable:
    """Constants for every step; beta_tilde_1 = 0, so its log is clipped to beta_tilde_2 (iDDPM)."""
    ab = schedule.alpha_bar
    post = posterior_coefficients(ab[1:], ab[:-1])
    bt = post.variance
    clipped = torch.cat([bt[1:2], bt[1:]]) if schedule.T > 1 else schedule.betas.clone()
    return ReverseTable(ab[1:], post, schedule.betas.log(), clipped.log())


# ---------------------------------------------------------------------------------------------
# Parameterizations: x0 <-> eps <-> v <-> score (all in VP form)
# ---------------------------------------------------------------------------------------------


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    ab = expand(alpha_bar, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    ab = expand(alpha_bar, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Salimans and Ho (2022): v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    ab = expand(alpha_bar, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    ab = expand(alpha_bar, x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    ab = expand(alpha_bar, x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v


def score_from_eps(eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """grad_x log q(x_t) = -eps / sqrt(1 - alpha_bar) (Tweedie; Song et al. 2021)."""
    return -eps / (1 - expand(alpha_bar, eps)).sqrt()


def eps_from_score(score: Tensor, alpha_bar: Tensor | float) -> Tensor:
    return -score * (1 - expand(alpha_bar, score)).sqrt()


def x0_from_prediction(output: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: Prediction) -> Tensor:
    """The network's x0 estimate from an eps, x0 or v prediction."""
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha_bar)
    if prediction == "x0":
        return output
    if prediction == "v":
        return x0_from_v(x_t, output, alpha_bar)
    raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def to_sigma_space(x_t: Tensor, alpha_bar: Tensor | float) -> tuple[Tensor, Tensor]:
    """VP sample -> (x_t / sqrt(alpha_bar), sigma) so that x = x0 + sigma n."""
    ab = torch.as_tensor(alpha_bar, dtype=x_t.dtype)
    return x_t / expand(ab, x_t).sqrt(), ((1 - ab) / ab).sqrt()


def from_sigma_space(x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """Sigma-space sample -> (VP sample x_t, alpha_bar)."""
    ab = 1 / (1 + torch.as_tensor(sigma, dtype=x.dtype) ** 2)
    return x * expand(ab, x).sqrt(), ab


# ---------------------------------------------------------------------------------------------
# Reverse process p(x_{t-1} | x_t)
# ---------------------------------------------------------------------------------------------


class ReverseStep(NamedTuple):
    mean: Tensor
    log_variance: Tensor
    x0: Tensor  # the model's estimate of x0


def p_mean_variance(
    output: Tensor,
    x_t: Tensor,
    t: Tensor,
    table: ReverseTable,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "fixed_small",
    clip_x0: bool = False,
) -> ReverseStep:
    """p(x_{t-1} | x_t) = N(mu_theta, Sigma_theta): mean = posterior mean at the predicted x0.

    ``t`` holds integer steps in 1..T, shape ``(B,)``. With ``variance="learned_range"`` the output
    carries twice the channels on dim 1: ``[prediction, v]`` and the log-variance is
    ``frac log beta_t + (1 - frac) log beta_tilde_t`` with ``frac = (v + 1) / 2`` (iDDPM Eq. 15).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    idx = t.long().cpu() - 1  # the tables live on the CPU in float64
    if variance == "learned_range":
        if output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f"learned_range needs 2 x {x_t.shape[1]} output channels on dim 1, got {output.shape[1]}")
        output, v = output.chunk(2, dim=1)
        frac = (v + 1) / 2
        log_var = frac * expand(table.log_beta[idx], x_t) + (1 - frac) * expand(table.log_beta_tilde_clipped[idx], x_t)
    else:
        if output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} != x_t shape {tuple(x_t.shape)}")
        fixed = table.log_beta_tilde_clipped if variance == "fixed_small" else _log_fixed_large(table)
        log_var = expand(fixed[idx], x_t).expand_as(x_t)
    ab = table.alpha_bar[idx].to(x_t.dtype)
    x0 = x0_from_prediction(output, x_t, ab, prediction)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    post = Posterior(*(c[idx] for c in table.posterior))
    mean, _ = q_posterior(x0, x_t, post)
    return ReverseStep(mean, log_var, x0)


def _log_fixed_large(table: ReverseTable) -> Tensor:
    # DDPM's sigma_t^2 = beta_t, except at t = 1 where iDDPM uses beta_tilde_2 for a better decoder.
    return torch.cat([table.log_beta_tilde_clipped[:1], table.log_beta[1:]])


# ---------------------------------------------------------------------------------------------
# Probability helpers (improved-diffusion's losses.py, in nats)
# ---------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, e^log_var), elementwise, in nats (a continuous decoder)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * (-log_var).exp())


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256) -> Tensor:
    """log P(x) for data on ``bins`` levels in [-1, 1] under N(mean, e^(2 log_scale)) (DDPM Eq. 13).

    Each level owns the interval of width 2 / (bins - 1) around it; the end levels extend to
    -inf / +inf, so the probabilities of all levels sum to one. Uses the exact normal CDF
    (``torch.special.ndtr``) with log-space tails, rather than iDDPM's tanh approximation.
    """
    half = 1.0 / (bins - 1)
    inv_std = (-log_scale).exp()
    upper = (x - mean + half) * inv_std
    lower = (x - mean - half) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # Mass in the middle: Phi(upper) - Phi(lower), computed on the side with more precision.
    mid = torch.where(
        lower > 0,
        torch.log(-torch.expm1(torch.special.log_ndtr(-upper) - log_sf_lower)) + log_sf_lower,
        torch.log(-torch.expm1(torch.special.log_ndtr(lower) - log_cdf_upper)) + log_cdf_upper,
    )
    edge = 1 - half / 2
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, mid))


def p_sample(step: ReverseStep, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_{t-1} ~ p(x_{t-1} | x_t) = mean + exp(log_var / 2) z; no noise at t = 1 (DDPM Alg. 2)."""
    nonzero = expand((t != 1).to(noise.dtype), noise)
    return step.mean + nonzero * (0.5 * step.log_variance).exp() * noise
