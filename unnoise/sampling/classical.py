"""Classical integrators of the probability-flow ODE: Adams-Bashforth LMS in sigma, adaptive RK45 in log sigma.

Unlike the exponential integrators of :mod:`unnoise.sampling.samplers`, these treat
dx/dsigma = (x - D) / sigma as a generic ODE. Both keep the sampler contract
``sample_<name>(denoise, x, sigmas, *, generator=None, callback=None, ...)`` and are listed in
:data:`unnoise.sampling.samplers.SAMPLERS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from torch import Tensor

from unnoise.sampling.core import Denoiser, Generator, check_sigmas, evaluate
from unnoise.sampling.ode import solve_rk45


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


def sample_rk45(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_nfe: int | None = None,
    info: dict | None = None,
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """Adaptive Dormand-Prince 5(4) on the PF-ODE in log sigma: dx / dlog(sigma) = x - D(x, sigma).

    Integrates from sigmas[0] to the smallest positive sigma of the grid (the rest of the grid is
    ignored), then takes the final step to 0 as D(x, sigma_min). The number of evaluations used is
    written to ``info["nfe"]``; ``max_nfe`` bounds it (ValueError when the tolerance needs more).
    """
    s = check_sigmas(sigmas)
    s_max, s_min = float(s[0]), float(s[-2])
    count = {"i": 0}

    def f(log_sigma: float, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        sig = torch.tensor(math.exp(log_sigma), dtype=torch.float64)
        x0 = evaluate(denoise, y[0], sig, count["i"], callback)
        count["i"] += 1
        return (y[0] - x0,)

    budget = None if max_nfe is None else max_nfe - 1
    (x,), stats = solve_rk45(f, (x,), math.log(s_max), math.log(s_min), rtol=rtol, atol=atol, max_nfe=budget)
    x = evaluate(denoise, x, s[-2], count["i"], callback)
    if info is not None:
        info["nfe"] = stats.nfe + 1
        info["steps"] = stats.accepted
        info["rejected"] = stats.rejected
    return x
