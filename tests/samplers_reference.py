"""Shared fixtures for sampler tests: exact denoisers and closed-form ODE solutions."""

import math

import torch

from unnoise.modalities.toy.data import GaussianMixture

f64 = torch.float64


def small_mixture(d: int = 2) -> GaussianMixture:
    """Three anisotropic components, unequal weights: a nonlinear exact denoiser."""
    g = torch.Generator().manual_seed(7)
    means = torch.randn(3, d, generator=g, dtype=f64)
    a = torch.randn(3, d, d, generator=g, dtype=f64) * 0.3
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=f64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=f64), means, covs)


def gaussian_denoiser(mu: float, s: float):
    def D(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return D


def gaussian_ode_solution(x, sigma_from: float, mu: float, s: float):
    """PF-ODE from sigma_from to 0 for N(mu, s^2) data: mu + sqrt(s^2 / (s^2 + sigma^2)) (x - mu)."""
    return mu + math.sqrt(s**2 / (s**2 + sigma_from**2)) * (x - mu)
