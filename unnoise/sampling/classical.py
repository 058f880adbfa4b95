"""Classical integrators of the probability-flow ODE: Adams-Bashforth LMS in sigma, adaptive RK45 in log sigma.

RK45 keeps an evaluation budget when given one (``max_nfe``): see :func:`sample_rk45`.

Unlike the exponential integrators of :mod:`unnoise.sampling.samplers`, these treat
dx/dsigma = (x - D) / sigma as a generic ODE. Both keep the sampler contract
``sample_<name>(denoise, x, sigmas, *, generator=None, callback=None, ...)`` and are listed in
:data:`unnoise.sampling.samplers.SAMPLERS`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from torch import Tensor

from unnoise.sampling.core import Denoiser, Generator, check_sigmas, evaluate
from unnoise.sampling.ode import ODEStats, solve_rk45
from unnoise.sampling.unipc import sample_unipc


def lms_coefficients(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Integrals over [a, b] of the Lagrange basis polynomials on ``nodes``, in closed form.

    c_j = int_a^b prod_{k != j} (tau - t_k) / (t_j - t_k) d tau, computed by integrating the
    polynomial exactly (numpy.polynomial), instead of numerical quadrature at every step.
    """
    out = []
    for j, tj in enumerate(nodes):
        others = [tk for k, tk in enumerate(nodes) if k != j]
        poly = P.polyfromroots(others) / np.prod([tj - tk for tk in others]) if others else np.array([1.0])
        integral = P.polyint(poly)
        out.append(float(P.polyval(b, integral) - P.polyval(a, integral)))
    return out


def sample_lms(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 4, generator: Generator = None, callback=None
) -> Tensor:
    """Linear multistep in sigma (Karras/k-diffusion 'lms'): Adams-Bashforth on dx/dsigma; N evaluations."""
    s = check_sigmas(sigmas).tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        x0 = evaluate(denoise, x, sigmas[i], i, callback)
        ds = ([(x - x0) / s[i]] + ds)[:order]  # newest first: ds[j] is dx/dsigma at s[i - j]
        coefs = lms_coefficients([s[i - j] for j in range(len(ds))], s[i], s[i + 1])
        x = x + sum(c * d for c, d in zip(coefs, ds, strict=True))
    return x


# Budgets: at least RK45_MIN_NFE evaluations; from RK45_ADAPTIVE_NFE on, error control is tried.
RK45_MIN_NFE = 2
RK45_ADAPTIVE_NFE = 150


class AccuracyWarning(UserWarning):
    """rk45 could not keep its error control over the whole range within the evaluation budget."""


def budget_tolerance(max_nfe: int) -> float:
    """rtol = atol that Dormand-Prince in log sigma is expected to meet within ``max_nfe`` calls.

    Measured on the benchmark's mixtures (linear and cosine schedules): at most about
    152 (tol / 1e-4)^(-1/5) evaluations (the step count of a 5th-order method grows as
    tol^(-1/5)); with a 20% margin, tol = 1e-4 (0.8 max_nfe / 152)^-5, capped at 0.1.
    """
    return min(0.1, 1e-4 * (0.8 * max_nfe / 152) ** -5)


def sample_rk45(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    info: dict | None = None,
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """Adaptive Dormand-Prince 5(4) on the PF-ODE in log sigma: dx / dlog(sigma) = x - D(x, sigma).

    Integrates from sigmas[0] to the smallest positive sigma of the grid (the rest of the grid is
    ignored), then takes the final step to 0 as D(x, sigma_min). Without ``max_nfe`` the
    tolerances default to 1e-4 and the work is unbounded. With ``max_nfe`` (>= RK45_MIN_NFE)
    it never makes more than ``max_nfe`` denoiser calls: below RK45_ADAPTIVE_NFE it runs
    UniPC (bh2, order 2, an exponential integrator: exact on the ODE's linear part, where a
    Dormand-Prince in log sigma needs 30 to 50 calls just to stay stable and
    is less accurate than UniPC with the same calls up to about 150) on its default grid; from there on
    error control at rtol = atol = :func:`budget_tolerance` (or the given ones), and if the
    budget runs out first, UniPC finishes the remaining range with the calls left. Whenever
    fixed steps were taken, an :class:`AccuracyWarning` says so and down to which sigma the
    error was controlled. ``info`` (a
    dict) receives ``method``, ``nfe``, ``rtol``, ``atol``, ``sigma_controlled`` (error control
    held from sigmas[0] down to it), ``max_error`` (largest accepted scaled error norm) and
    ``steps`` / ``rejected`` / ``fixed_steps``.
    """
    s = check_sigmas(sigmas)
    s_max, s_min = float(s[0]), float(s[-2])
    if max_nfe is not None and max_nfe < RK45_MIN_NFE:
        raise ValueError(f"rk45 needs nfe >= {RK45_MIN_NFE}, got {max_nfe}")
    adaptive = max_nfe is None or max_nfe >= RK45_ADAPTIVE_NFE or rtol is not None or atol is not None
    default_tol = 1e-4 if max_nfe is None else budget_tolerance(max_nfe)
    rtol = default_tol if rtol is None else rtol
    atol = default_tol if atol is None else atol
    count = {"i": 0}

    def f(log_sigma: float, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        sig = torch.tensor(math.exp(log_sigma), dtype=torch.float64)
        x0 = evaluate(denoise, y[0], sig, count["i"], callback)
        count["i"] += 1
        return (y[0] - x0,)

    reached, stats = s_max, ODEStats()
    if adaptive and s_max > s_min and (max_nfe is None or max_nfe >= 8):
        # Leave 1 call for the final D, and >= 2 for a UniPC finish if the budget runs out.
        budget = None if max_nfe is None else max_nfe - 3
        (x,), stats = solve_rk45(
            f, (x,), math.log(s_max), math.log(s_min), rtol=rtol, atol=atol, max_nfe=budget, stop=budget is not None
        )
        reached = math.exp(stats.t) if stats.t != math.log(s_min) else s_min
    fixed = 0
    if reached > s_min:
        fixed = (max_nfe or 0) - stats.nfe
        x = _finish_unipc(denoise, x, reached, s_min, fixed, count["i"], callback)
        done = (
            f"error-controlled at rtol={rtol:g} down to sigma {reached:g}, then" if stats.nfe else "no error control:"
        )
        warnings.warn(f"rk45 with nfe={max_nfe}: {done} {fixed} fixed UniPC steps", AccuracyWarning, stacklevel=2)
    else:
        x = evaluate(denoise, x, s[-2], count["i"], callback)
    if info is not None:
        method = "dopri5" if not fixed else "unipc" if not stats.nfe else "dopri5+unipc"
        info.update(method=method, nfe=stats.nfe + max(fixed, 1), rtol=rtol, atol=atol, sigma_controlled=reached)
        info.update(max_error=stats.max_error, steps=stats.accepted, rejected=stats.rejected, fixed_steps=fixed)
    return x


def _finish_unipc(denoise: Denoiser, x: Tensor, s_hi: float, s_lo: float, n: int, i0: int, callback) -> Tensor:
    """UniPC-bh2 (order 2) from s_hi to 0 in n calls, on UniPC's default grid restricted to [s_lo, s_hi]."""
    from unnoise.sampling.grids import DEFAULT_SIGMA_DATA, coordinates_per_sample, make_grid

    scale = getattr(denoise, "sigma_data", None) or DEFAULT_SIGMA_DATA  # the data scale, if the denoiser carries one
    grid = (
        make_grid("tuned", n, s_lo, s_hi, sampler="unipc", sigma_data=scale, dim=coordinates_per_sample(x))
        if s_hi > s_lo
        else torch.tensor([s_hi, 0.0])
    )

    def shifted(i: int, sigma: Tensor, x: Tensor, x0: Tensor) -> None:
        callback(i0 + i, sigma, x, x0)

    return sample_unipc(denoise, x, grid, callback=None if callback is None else shifted)
