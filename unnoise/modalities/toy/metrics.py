"""Toy metrics of a run against the mixture's closed form: negative log-likelihood bounds in bits/dim.

DDPM runs: the discrete-time ELBO (continuous Gaussian decoder); EDM runs: the exact NLL through
the probability-flow ODE (exact trace in 2-D). Both beside the mixture's true NLL of the same
held-out points, so the gap is the model's.
"""

from __future__ import annotations

import math

import torch

from unnoise.elbo import elbo_terms
from unnoise.likelihood import log_likelihood
from unnoise.modalities.run import Run
from unnoise.modalities.toy.pipeline import mixture, points, sample_points


def evaluate_toy(run: Run, *, n: int | None = None, seed: int = 0, **sampling) -> list[str]:
    """The held-out bound (or NLL) of the first ``n`` test points against the truth, and the mean
    distance of ``n`` samples' moments to the data's."""
    n = n or 500
    test = points(run.cfg, "test")[:n]
    true_nll = -mixture(run.cfg).log_prob(test.double()).mean().item() / (2 * math.log(2))
    net = run.modality.network(run.model)
    g = torch.Generator().manual_seed(seed)
    if run.cfg.objective == "ddpm":
        kw = dict(prediction=run.cfg.prediction, variance=run.cfg.variance, decoder="gaussian", generator=g)
        bound = elbo_terms(lambda x_t, t: net(x_t, t, None), test, run.schedule, **kw).bpd.mean().item()
        what = f"test negative ELBO (T = {run.cfg.T})"
    else:
        D = run.denoiser(None, None)
        kw = dict(sigma_min=run.sigma_min, sigma_max=run.sigma_max, trace="exact", prior_std=test.std().item())
        bound = log_likelihood(D, test, **kw).bpd.mean().item()
        what = "test NLL by the probability-flow ODE"
    drawn = sample_points(run, n=n, seed=seed, **sampling)
    gap = (drawn.mean(0) - test.mean(0)).norm().item(), (drawn.std(0) - test.std(0)).norm().item()
    return [
        f"{what}: {bound:.4f} bits/dim on {n} points; true NLL (mixture) {true_nll:.4f}; gap {bound - true_nll:.4f}",
        f"{n} samples ({sampling['sampler']}, {sampling['nfe']} NFE): |mean - data mean| {gap[0]:.3f}, "
        f"|std - data std| {gap[1]:.3f}",
    ]
