"""The Gaussian mixtures the sampler benchmarks run on: fixed cases and two random families.

Fixed cases: the demo's 2-D ring, and :func:`mixture_32d` (8 anisotropic components in 32-D,
unequal weights) at separation 0.5 and 1.5. Random families (:func:`family`): mixture ``i`` of
the family with seed ``s`` is drawn by ``torch.Generator().manual_seed(s * 100_003 + i)``:

- dimension d = round(2^u), u ~ U(1, 7)                (2 to 128, log-uniform);
- components K ~ uniform integer in [2, 20];
- mean scale m = 10^u, u ~ U(-1, 0.5); means = m * N(0, I_d) / sqrt(d) (distances ~ m sqrt 2);
- separation r = 10^u, u ~ U(-0.5, 2): component std s0 = m / r (overlapping at r ~ 0.3, about
  100 stds apart at r = 100);
- covariance: isotropic s0^2 I with probability 1/2, else Q diag(s0^2 e^{2v}) Q^T with
  v ~ U(-2, 2) per direction (stds over e^4) and Q a random rotation (QR of a Gaussian matrix);
- weights: equal with probability 1/2, else Dirichlet(0.3) (very unequal), floored at 1e-3.

FIT_SEED (benchmarks/tune_grids.py) and VALIDATION_SEED (benchmarks/samplers.py) differ, so
no validation draw is ever used in fitting.
"""

from __future__ import annotations

import math

import torch

from unnoise.modalities.toy.data import GaussianMixture

f64 = torch.float64
FIT_SEED = 1
VALIDATION_SEED = 2


def mixture_32d(separation: float = 0.5) -> GaussianMixture:
    """8 anisotropic components in 32-D (per-dimension stds over ~e^4), weights 0.3 down to 0.03.

    ``separation`` scales the means: 0.5 puts neighbouring components a few of their largest
    stds apart, like classes of real data; 1.5 separates them by ~100 stds (the "far" stress case,
    where the RMS error is dominated by the rare samples that end in another mode).
    """
    g = torch.Generator().manual_seed(32)
    k, d = 8, 32
    means = separation * torch.randn(k, d, generator=g, dtype=f64)
    a = 0.25 * torch.randn(k, d, d, generator=g, dtype=f64) / math.sqrt(d)
    scales = torch.exp(torch.randn(k, d, generator=g, dtype=f64))  # anisotropic: stds over ~e^4
    covs = a @ a.transpose(1, 2) + torch.diag_embed(0.01 * scales**2)
    weights = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03], dtype=f64)
    return GaussianMixture(weights, means, covs)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=f64).item()


def random_mixture(g: torch.Generator) -> tuple[str, GaussianMixture]:
    """One draw of the family described in the module docstring, with a label naming its traits."""
    d = round(2 ** _uniform(g, 1, 7))
    k = int(torch.randint(2, 21, (), generator=g))
    m, r = 10 ** _uniform(g, -1, 0.5), 10 ** _uniform(g, -0.5, 2)
    s0 = m / r
    means = m * torch.randn(k, d, generator=g, dtype=f64) / math.sqrt(d)
    isotropic = torch.rand((), generator=g).item() < 0.5
    if isotropic:
        covs = (s0**2 * torch.eye(d, dtype=f64)).expand(k, d, d).clone()
    else:
        q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=f64))
        lam = s0**2 * torch.exp(2 * (4 * torch.rand(k, d, generator=g, dtype=f64) - 2))
        covs = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
    equal = torch.rand((), generator=g).item() < 0.5
    if equal:
        w = torch.ones(k, dtype=f64)
    else:
        gam = torch._standard_gamma(torch.full((k,), 0.3, dtype=f64), generator=g)
        w = (gam / gam.sum()).clamp_min(1e-3)
    label = f"d{d}k{k}r{r:.2g}{'i' if isotropic else 'a'}{'e' if equal else 'u'}"
    return label, GaussianMixture(w, means, covs)


def family(seed: int, count: int) -> list[tuple[str, GaussianMixture]]:
    """``count`` mixtures of the random family with ``seed`` (draw i depends only on seed and i)."""
    return [random_mixture(torch.Generator().manual_seed(seed * 100_003 + i)) for i in range(count)]
