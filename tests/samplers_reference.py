"""Shared fixtures for sampler tests: exact denoisers and the diffusers loop."""

import math

import torch

from unnoise.data.toy import GaussianMixture

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


def run_diffusers(scheduler, denoise, x_sigma: torch.Tensor, n: int, *, noises=None) -> list[torch.Tensor]:
    """Run a diffusers scheduler on an eps-model built from a sigma-space denoiser.

    Returns the trajectory in sigma-space: the sample at each of the n grid points, then the
    result. The model is exact at the scheduler's own noise level for each step.
    """
    sigmas = diffusers_sigmas(scheduler, n)  # also sets the timesteps
    vp = float(scheduler.init_noise_sigma) == 1.0  # VP samples (x alpha) or sigma-space ones
    sample = x_sigma / math.sqrt(sigmas[0] ** 2 + 1) if vp else x_sigma.clone()
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(sigmas[i])
        trajectory.append(sample * math.sqrt(sigma**2 + 1) if vp else sample)
        x = scheduler.scale_model_input(sample, t) * math.sqrt(sigma**2 + 1)  # sigma-space input
        eps = (x - denoise(x, torch.tensor(sigma, dtype=x.dtype))) / sigma
        kw = {} if noises is None else {"variance_noise": noises[i]}
        sample = scheduler.step(eps, t, sample, **kw).prev_sample
    return trajectory + [sample]


def _set_timesteps_float64(scheduler, n: int) -> None:
    """set_timesteps, then run the scheduler's arithmetic in float64 on the same (float32) values.

    diffusers keeps sigmas and alphas_cumprod in float32; at the cosine schedule's sigma_max ~ 2e4
    that alone moves results by ~1e-3, which would hide what the comparison is about.
    """
    scheduler.set_timesteps(n)
    for name in ("sigmas", "alphas_cumprod"):
        if isinstance(getattr(scheduler, name, None), torch.Tensor):
            setattr(scheduler, name, getattr(scheduler, name).double())


def diffusers_sigmas(scheduler, n: int) -> torch.Tensor:
    """The sigma-space grid a diffusers scheduler visits (final 0 included)."""
    _set_timesteps_float64(scheduler, n)
    if hasattr(scheduler, "sigmas") and len(scheduler.sigmas) == n + 1:
        return scheduler.sigmas.double()
    ab = scheduler.alphas_cumprod.double()
    t = scheduler.timesteps.long()
    return torch.cat([((1 - ab[t]) / ab[t]).sqrt(), torch.zeros(1, dtype=f64)])
