"""Samplers: one pure function per algorithm over any denoiser and a decreasing sigma grid.

Contract (DESIGN.md): ``sample_<name>(denoise, x, sigmas, *, generator=None, callback=None) -> x``.
``denoise(x, sigma) -> x0_hat`` works in sigma-space (x = x0 + sigma n) and gets ``sigma`` as a
0-dim tensor; ``sigmas`` is 1-D, strictly decreasing, positive, and ends in 0; ``x`` is the
sample at ``sigmas[0]``. ``callback(i, sigma_i, x_i, x0_hat_i)`` sees every model evaluation
on the grid. ``generator`` is a ``torch.Generator`` or a list of them, one per sample, so that
a sample does not depend on the batch it was drawn in (EDM's per-sample seeds).

One algorithm, one implementation: a name that is another sampler with a parameter fixed is a
small wrapper around it, listed in :data:`ALIASES` (e.g. ``euler`` is ``ddim`` with eta = 0,
``dpmpp_2m`` is ``dpmpp_2m_sde`` with eta = 0), and gives the same result to the last bit or
to float64 round-off. The shared pieces (types, grid checks, per-sample noise, the exact
first-order step) live in :mod:`unnoise.sampling.core`, UniPC in :mod:`unnoise.sampling.unipc`,
LMS and RK45 in :mod:`unnoise.sampling.classical`; :data:`SAMPLERS` names them all.
No sampler disables autograd or shows a progress bar: that is the caller's choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from unnoise.sampling.classical import lms_coefficients, sample_lms, sample_rk45
from unnoise.sampling.core import (
    Callback,
    Denoiser,
    Generator,
    ancestral_step,
    check_sigmas,
    evaluate,
    first_order_step,
    randn_like,
)
from unnoise.sampling.unipc import sample_unipc, sample_unipc_3, sample_unipc_bh1, sample_unipc_bh2

__all__ = ["ALIASES", "SAMPLERS", "Callback", "Denoiser", "Generator", "check_sigmas", "lms_coefficients", "randn_like"]


# ---------------------------------------------------------------------------------------------
# DDIM / ancestral: Euler (eta = 0), Euler-ancestral and DDPM fixed-small (eta = 1)
# ---------------------------------------------------------------------------------------------


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) in sigma-space: eta = 0 is Euler, eta = 1 ancestral DDPM.

    x' = D + sigma_down (x - D) / sigma + sigma_up z, with (sigma_down, sigma_up) from
    :func:`ancestral_step`: DDIM's sigma_t(eta) and k-diffusion's Euler-ancestral eta are the same
    parameter. At eta = 1, sigma_down = sigma'^2 / sigma and sigma_up^2 = sigma'^2 (sigma^2 -
    sigma'^2) / sigma^2: DDPM's posterior mean and fixed-small variance. No noise is added on the
    last step (to sigma = 0). At eta = 0 the step is exactly Euler's (sigma_down = sigma').
    """
    s = check_sigmas(sigmas).tolist()
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    for i in range(len(s) - 1):
        x0 = evaluate(denoise, x, sigmas[i], i, callback)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = first_order_step(x, x0, s[i], down)
        if up > 0:
            x = x + randn_like(x, generator) * (up * s_noise)
    return x


def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None, callback=None) -> Tensor:
    """Euler on the PF-ODE in sigma-space (Karras et al. 2022, Alg. 1); N steps, N evaluations.

    Alias: :func:`sample_ddim` with eta = 0 (x' = D + (sigma' / sigma)(x - D)), bit for bit.
    """
    return sample_ddim(denoise, x, sigmas, eta=0.0, generator=generator, callback=callback)


def sample_euler_ancestral(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """Euler-ancestral (k-diffusion). Alias: :func:`sample_ddim` with eta = 1 by default, bit for bit.

    ``eta`` stays a parameter (the CLI's ``--eta``); any eta gives ``sample_ddim`` with that eta.
    """
    return sample_ddim(denoise, x, sigmas, eta=eta, s_noise=s_noise, generator=generator, callback=callback)


DDPMVariance = Literal["fixed_small", "fixed_large", "learned"]


def sample_ddpm(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    variance: DDPMVariance = "fixed_small",
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, Alg. 2) over any grid: x' ~ N(posterior mean, var).

    The posterior mean in sigma-space is D + (sigma'^2 / sigma^2)(x - D). Variances per step:
    fixed_small = beta_tilde: sigma'^2 (sigma^2 - sigma'^2) / sigma^2, which is exactly
    :func:`sample_ddim` with eta = 1 (so it runs that, equal to float64 round-off with the
    formula); fixed_large = beta: (sigma^2 - sigma'^2)(1 + sigma'^2) / (1 + sigma^2) (both VP
    quantities / alpha_bar'); learned: iDDPM's log-space interpolation, with the weight from
    ``denoise.with_variance``.
    """
    s = check_sigmas(sigmas).tolist()
    if variance not in ("fixed_small", "fixed_large", "learned"):
        raise ValueError(f"unknown variance {variance!r}; allowed: fixed_small, fixed_large, learned")
    if variance == "fixed_small":
        return sample_ddim(denoise, x, sigmas, eta=1.0, generator=generator, callback=callback)
    if variance == "learned" and not hasattr(denoise, "with_variance"):
        raise ValueError("variance='learned' needs a denoiser with with_variance(x, sigma) (a learned_range model)")
    for i in range(len(s) - 1):
        s0, s1 = s[i], s[i + 1]
        if variance == "learned":
            sig = sigmas[i].to(dtype=x.dtype, device=x.device)
            x0, frac = denoise.with_variance(x, sig)
            if callback is not None:
                callback(i, sig, x, x0)
        else:
            x0 = evaluate(denoise, x, sigmas[i], i, callback)
        mean = x0 + (s1**2 / s0**2) * (x - x0)
        if s1 == 0:
            x = mean
            continue
        small = s1**2 * (s0**2 - s1**2) / s0**2
        large = (s0**2 - s1**2) * (1 + s1**2) / (1 + s0**2)
        if variance == "learned":
            std = (0.5 * (frac * math.log(large) + (1 - frac) * math.log(small))).exp()
        else:
            std = math.sqrt(large)
        x = mean + std * randn_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------------
# Heun (EDM)
# ---------------------------------------------------------------------------------------------


def sample_heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    form: Literal["exponential", "sigma"] = "exponential",
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """Karras et al. (2022), Alg. 2: Heun's 2nd-order method with optional churn; 2N - 1 evaluations.

    With s_churn > 0, noise raises sigma to sigma_hat = sigma (1 + gamma), gamma =
    min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax]. The last step (to 0) is Euler.
    ``form="sigma"`` is the paper's trapezoid on dx/dsigma: its correction (sigma_hat -
    sigma')(D1 - D0) / (2 sigma') explodes when one step spans orders of magnitude (cosine's
    sigma_max ~ 2e4 at low NFE). ``form="exponential"`` (default) applies the trapezoid to the
    denoiser in the exact solution x' = D + (sigma' / sigma)(x - D): the correction is divided by
    sigma_hat instead, the step stays a convex combination, and the order is still 2.
    """
    if form not in ("exponential", "sigma"):
        raise ValueError(f"unknown Heun form {form!r}; allowed: exponential, sigma")
    s = check_sigmas(sigmas).tolist()
    n = len(s) - 1
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s[i] <= s_tmax else 0.0
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + randn_like(x, generator) * (s_noise * math.sqrt(s_hat**2 - s[i] ** 2))
        d0 = evaluate(denoise, x, torch.tensor(s_hat, dtype=torch.float64), i, callback)
        x_next = first_order_step(x, d0, s_hat, s[i + 1])
        if s[i + 1] > 0:
            d1 = denoise(x_next, sigmas[i + 1].to(dtype=x.dtype, device=x.device))
            if form == "sigma":
                x_next = x + (s[i + 1] - s_hat) * 0.5 * ((x - d0) / s_hat + (x_next - d1) / s[i + 1])
            else:
                x_next = first_order_step(x, 0.5 * (d0 + d1), s_hat, s[i + 1])
        x = x_next
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022b), multistep, in lambda = -log sigma
# ---------------------------------------------------------------------------------------------


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (k-diffusion; Lu et al. 2022b, App. B); eta = 0 is 2M.

    With h = lambda' - lambda, r = h_{i-1} / h, D_hat = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} and
    rho = (sigma' / sigma) e^{-eta h}: x' = rho x + (1 - rho) D_hat + sigma' sqrt(1 - e^{-2 eta h}) z
    (1 - rho = -expm1(-h (1 + eta)), k-diffusion's coefficient). At eta = 0, rho = sigma' / sigma
    and this is DPM-Solver++(2M), Alg. 2, bit for bit. First order on the first step; the last
    (to 0) returns D. N evaluations. (k-diffusion's 'heun' variant weights (D_i - D_{i-1}) / r by
    1 + expm1(-h)/h instead of (1 - e^{-h}) / 2: another second-order method, not Alg. 2.)
    """
    s = check_sigmas(sigmas).tolist()
    prev, h_prev = None, None
    for i in range(len(s) - 1):
        x0 = evaluate(denoise, x, sigmas[i], i, callback)
        if s[i + 1] == 0:
            x = x0
            break
        h = math.log(s[i] / s[i + 1])
        d = x0 if prev is None else x0 + (x0 - prev) * (h / (2 * h_prev))
        x = first_order_step(x, d, s[i], s[i + 1] * math.exp(-eta * h))
        if eta > 0:
            x = x + randn_like(x, generator) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        prev, h_prev = x0, h
    return x


def sample_dpmpp_2m(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None, callback=None
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. (2022b), Alg. 2: second-order multistep; N evaluations.

    Alias: :func:`sample_dpmpp_2m_sde` with eta = 0, bit for bit: x' = (sigma' / sigma) x -
    expm1(-h) D_hat. First order on the first and the last (to 0) step.
    """
    return sample_dpmpp_2m_sde(denoise, x, sigmas, eta=0.0, generator=generator, callback=callback)


def sample_dpmpp_3m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's form); eta = 0 is the ODE solver. N evaluations.

    Integrates a quadratic through the last three denoiser outputs exactly against the
    exponential kernel: weights phi_2 = expm1(-h) / h + 1 on h D' and 2 phi_3 = 2 (phi_2 / h - 1/2)
    on h^2 D'' / 2 (with h -> h (1 + eta)). Third order; see the comment on the factor 2.
    """
    s = check_sigmas(sigmas).tolist()
    d1 = d2 = None  # previous denoiser outputs
    h1 = h2 = None  # previous step sizes in lambda
    for i in range(len(s) - 1):
        x0 = evaluate(denoise, x, sigmas[i], i, callback)
        if s[i + 1] == 0:
            x = x0
            break
        h = math.log(s[i] / s[i + 1])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * x0
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h2 is not None:
            r0, r1 = h1 / h, h2 / h
            dd0, dd1 = (x0 - d1) / r0, (d1 - d2) / r1
            d1_est = dd0 + (dd0 - dd1) * (r0 / (r0 + r1))  # ~ h D'
            d2_est = (dd0 - dd1) / (r0 + r1)  # ~ h^2 D'' / 2
            # The exact integral term is -h^2 phi_3 D'' = -2 phi_3 d2_est; k-diffusion and
            # diffusers use -phi_3 d2_est, which leaves the method second order.
            x = x + phi_2 * d1_est - 2 * (phi_2 / h_eta - 0.5) * d2_est
        elif h1 is not None:
            x = x + phi_2 * (x0 - d1) / (h1 / h)
        if eta > 0:
            x = x + randn_like(x, generator) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        d1, d2, h1, h2 = x0, d1, h, h1
    return x


def sample_dpmpp_3m(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None, callback=None
) -> Tensor:
    """DPM-Solver++(3M): third-order multistep. Alias: :func:`sample_dpmpp_3m_sde` with eta = 0, bit for bit."""
    return sample_dpmpp_3m_sde(denoise, x, sigmas, eta=0.0, generator=generator, callback=callback)


# Names that are another sampler with parameters fixed: name -> (sampler, the fixed parameters).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("ddim", {"eta": 0.0}),
    "euler_ancestral": ("ddim", {"eta": 1.0}),
    "ddpm": ("ddim", {"eta": 1.0}),  # variance="fixed_small", the default
    "dpmpp_2m": ("dpmpp_2m_sde", {"eta": 0.0}),
    "dpmpp_3m": ("dpmpp_3m_sde", {"eta": 0.0}),
    "unipc_bh1": ("unipc", {"variant": "bh1", "order": 2}),
    "unipc_bh2": ("unipc", {"variant": "bh2", "order": 2}),
    "unipc_3": ("unipc", {"variant": "bh2", "order": 3}),
}


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc": sample_unipc,
    "unipc_bh1": sample_unipc_bh1,
    "unipc_bh2": sample_unipc_bh2,
    "unipc_3": sample_unipc_3,
    "lms": sample_lms,
    "rk45": sample_rk45,
}
