"""UniPC (Zhao et al. 2023): a unified predictor-corrector for diffusion ODEs, data prediction.

Each new denoiser output first corrects the point it was evaluated at (UniC, no extra
evaluation), then predicts the next point (UniP); orders warm up and fall back at the end.
One implementation, :func:`sample_unipc`; ``unipc_bh1``, ``unipc_bh2`` and ``unipc_3`` fix its
variant and order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from unnoise.sampling.core import Denoiser, Generator, check_sigmas, evaluate


def _unipc_coefficients(rks: list[float], h: float, order: int, variant: str) -> tuple[Tensor, Tensor, float, float]:
    """R (order x order), b (order,), h phi_1 and B(h) of UniPC's Alg. 1-2 (data prediction, hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r = torch.tensor([*rks, 1.0], dtype=torch.float64)
    rows, b, factorial = [], [], 1
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


def _unipc_update(
    x: Tensor,
    history: list[Tensor],
    lambdas: list[float],
    lam_next: float,
    order: int,
    variant: str,
    model_next: Tensor | None = None,
) -> Tensor:
    """One UniP step (model_next None) or UniC correction (model_next = D at the predicted point).

    history / lambdas: past denoiser outputs and their lambda, newest last; x is at lambdas[-1].
    """
    m0, lam0 = history[-1], lambdas[-1]
    h = lam_next - lam0
    rks = [(lambdas[-(k + 1)] - lam0) / h for k in range(1, order)]
    d1s = [(history[-(k + 1)] - m0) / rk for k, rk in zip(range(1, order), rks, strict=True)]
    R, b, h_phi_1, b_h = _unipc_coefficients(rks, h, order, variant)
    x_lin = math.exp(-h) * x - h_phi_1 * m0
    if model_next is None:
        if not d1s:
            return x_lin
        # UniP of order 2 uses rho = 1/2 (the paper's simplification, as the reference code)
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_lin - b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    res = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_lin - b_h * (res + rhos[-1] * (model_next - m0))


def sample_unipc(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    variant: Literal["bh1", "bh2"] = "bh2",
    generator: Generator = None,
    callback=None,
) -> Tensor:
    """UniPC (Zhao et al. 2023, Alg. 1-3): multistep predictor-corrector; N evaluations.

    Each new denoiser output first corrects the point it was evaluated at (UniC, free of extra
    evaluations), then predicts the next point (UniP). Orders warm up from 1 and fall back to
    lower orders over the final steps, as the reference implementation does.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; allowed: bh1, bh2")
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    s = check_sigmas(sigmas).tolist()
    n = len(s) - 1
    history: list[Tensor] = []
    lambdas: list[float] = []
    x_prev, step_order = None, 1
    for i in range(n):
        x0 = evaluate(denoise, x, sigmas[i], i, callback)
        lam = -math.log(s[i])
        if history:  # correct x_i with the output just computed at it
            x = _unipc_update(x_prev, history, lambdas, lam, step_order, variant, model_next=x0)
        history, lambdas = (history + [x0])[-order:], (lambdas + [lam])[-order:]
        if s[i + 1] == 0:
            x = x0
            break
        step_order = min(order, n - i, len(history))
        x_prev = x
        x = _unipc_update(x, history, lambdas, -math.log(s[i + 1]), step_order, variant)
    return x


def sample_unipc_bh1(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None, callback=None):
    """UniPC with B(h) = h (bh1), order 2. Alias: :func:`sample_unipc` with variant="bh1"."""
    return sample_unipc(denoise, x, sigmas, variant="bh1", callback=callback)


def sample_unipc_bh2(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None, callback=None):
    """UniPC with B(h) = e^h - 1 (bh2), order 2: the name ``unipc`` under its variant, bit for bit."""
    return sample_unipc(denoise, x, sigmas, variant="bh2", callback=callback)


def sample_unipc_3(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None, callback=None):
    """UniPC-bh2 of order 3 (UniP-3 with UniC, 4th-order accurate when it settles). Alias: order=3."""
    return sample_unipc(denoise, x, sigmas, order=3, variant="bh2", callback=callback)
