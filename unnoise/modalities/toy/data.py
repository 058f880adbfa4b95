"""Gaussian mixtures: data whose every noisy marginal, density and denoiser is known in closed form.

Under x = x0 + sigma n, a mixture sum_k w_k N(mu_k, C_k) becomes sum_k w_k N(mu_k, C_k + sigma^2 I),
so the optimal denoiser D*(x, sigma) = E[x0 | x] is exact. That makes a mixture the oracle for
testing samplers and losses, and the built-in data of the demo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class GaussianMixture:
    """sum_k w_k N(mu_k, C_k) in d dimensions; all math in the dtype of ``means``.

    Args:
        weights: ``(K,)`` positive, normalised here.
        means: ``(K, d)``.
        covs: ``(K, d, d)`` symmetric positive definite.
    """

    def __init__(self, weights: Tensor | Sequence[float], means: Tensor, covs: Tensor) -> None:
        means = torch.as_tensor(means)
        dtype = means.dtype if means.is_floating_point() else torch.float64
        self.means = means.to(dtype)
        self.weights = torch.as_tensor(weights, dtype=dtype)
        self.covs = torch.as_tensor(covs, dtype=dtype)
        K, d = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, d, d):
            raise ValueError(
                f"need weights (K,), means (K, d), covs (K, d, d); got {tuple(self.weights.shape)}, "
                f"{tuple(self.means.shape)}, {tuple(self.covs.shape)}"
            )
        if (self.weights <= 0).any():
            raise ValueError("mixture weights must be positive")
        self.weights = self.weights / self.weights.sum()
        # C_k = U_k diag(lam_k) U_k^T: noisy covariances C_k + sigma^2 I share the eigenvectors.
        self.lam, self.U = torch.linalg.eigh(self.covs)
        if (self.lam <= 0).any():
            raise ValueError("mixture covariances must be positive definite")
        self.dim = d

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return GaussianMixture(self.weights.to(dtype), self.means.to(dtype), self.covs.to(dtype))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, d)`` and their component labels ``(n,)``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.U[k], self.lam[k].sqrt() * z)
        return x, k

    def _components(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-responsibility terms, projections z = U^T (x - mu), and lam + sigma^2."""
        x = x.to(self.means.dtype)
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1) ** 2  # (B or 1, 1, 1)
        z = torch.einsum("kji,nkj->nki", self.U, x[:, None, :] - self.means[None])  # (N, K, d)
        var = self.lam[None] + s2  # (B or 1, K, d)
        logp = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return logp + self.weights.log(), z, var

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log density of the noisy marginal at noise level sigma, ``(N,)`` (sigma = 0: the data)."""
        logp, _, _ = self._components(x, sigma)
        return logp.logsumexp(-1)

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact denoiser E[x0 | x0 + sigma n = x], ``(N, d)``; sigma of shape () or (N,)."""
        logp, z, var = self._components(x, sigma)
        r = logp.softmax(-1)  # (N, K) posterior responsibilities
        shrunk = self.lam[None] / var * z  # C (C + sigma^2 I)^{-1} (x - mu), in eigen-coordinates
        per_k = self.means[None] + torch.einsum("kij,nkj->nki", self.U, shrunk)
        return torch.einsum("nk,nki->ni", r, per_k).to(x.dtype)

    def covariance(self) -> Tensor:
        """The mixture's covariance matrix ``(d, d)``."""
        mean = self.weights @ self.means
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None])
        return second - mean[:, None] * mean[None]


def ring_mixture(k: int = 8, radius: float = 1.0, dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """The demo's 2-D data: k anisotropic Gaussians on a circle, unequal weights (heavier on one side)."""
    angle = torch.arange(k, dtype=dtype) * (2 * math.pi / k)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    # Elongated along the tangent: C = R diag(a^2, b^2) R^T with R the radial frame.
    radial = torch.stack([angle.cos(), angle.sin()], dim=1)
    tangent = torch.stack([-angle.sin(), angle.cos()], dim=1)
    covs = 0.005 * radial[:, :, None] * radial[:, None] + 0.02 * tangent[:, :, None] * tangent[:, None]
    weights = 1.0 + 0.5 * angle.cos()
    return GaussianMixture(weights, means, covs)
