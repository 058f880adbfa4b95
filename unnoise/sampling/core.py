"""What every sampler shares: the denoiser and callback types, grid checks, per-sample noise,
the evaluation hook, and the exact first-order step in sigma-space.

In sigma-space with lambda = -log(sigma), the probability-flow ODE dx/dsigma = (x - D) / sigma
has the exact first-order (exponential-integrator) step x' = D + (sigma' / sigma)(x - D): Euler,
DDIM (eta = 0) and DPM-Solver++(1) at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


def check_sigmas(sigmas: Tensor | Sequence[float]) -> Tensor:
    """Validate a grid: 1-D, >= 2 entries, positive and strictly decreasing, last entry 0."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {tuple(s.shape)}")
    if not torch.isfinite(s[:-1]).all() or s[-1] != 0 or (s[:-1] <= 0).any():
        raise ValueError("sigmas must be finite and positive, and end in 0 (the clean data)")
    if (s[1:] >= s[:-1]).any():
        raise ValueError("sigmas must be strictly decreasing (from sigma_max down to 0)")
    return s


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like x; one generator per sample when given a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}: give one per sample")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator])


def evaluate(denoise: Denoiser, x: Tensor, sigma: Tensor, i: int, callback: Callback | None) -> Tensor:
    s = sigma.to(dtype=x.dtype, device=x.device)
    x0 = denoise(x, s)
    if callback is not None:
        callback(i, s, x, x0)
    return x0


def first_order_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Exact step of the linear part: x' = D + (sigma' / sigma)(x - D)."""
    return x0 + (sigma_next / sigma) * (x - x0)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an eta-ancestral step: sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is DDIM's sigma_t (Song et al.
    2021, Eq. 16) mapped to sigma-space; eta = 1 is DDPM's posterior q(x_{t-1} | x_t, x0). With
    r = sigma_next / sigma, sigma_down = sigma_next sqrt(1 - eta^2 + eta^2 r^2), free of the
    cancellation in sqrt(sigma_next^2 - sigma_up^2) over long steps: sigma_next r at eta = 1 (DDPM's
    posterior mean) and sigma_next exactly at eta = 0. sigma_up is capped at sigma_next (eta > 1).
    """
    r = sigma_next / sigma
    up = eta * sigma_next * math.sqrt(max(0.0, (1 - r) * (1 + r)))
    if up >= sigma_next:
        return 0.0, sigma_next
    return sigma_next * math.sqrt(max(0.0, (1 - eta) * (1 + eta) + (eta * r) ** 2)), up
