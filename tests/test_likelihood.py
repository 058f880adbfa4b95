"""The probability-flow ODE likelihood against closed-form densities of Gaussians and Gaussian mixtures."""

import math

import pytest
import torch

from unnoise.likelihood import log_likelihood
from unnoise.modalities.toy.data import GaussianMixture, ring_mixture

f64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 1e-3, 80.0


def _prior(mix: GaussianMixture) -> dict:
    """The data's mean and RMS standard deviation, for the Gaussian prior at sigma_max."""
    return {"prior_mean": mix.weights @ mix.means, "prior_std": (mix.covariance().trace() / mix.dim).sqrt()}


@pytest.fixture(scope="module")
def ring_points():
    mix = ring_mixture()
    g = torch.Generator().manual_seed(0)
    on, _ = mix.sample(48, generator=g)
    off = 1.5 * torch.randn(16, 2, generator=g, dtype=f64)  # also between and outside the modes
    return mix, torch.cat([on, off])


def test_exact_trace_matches_the_mixture_density_to_0_01_bits_per_dim(ring_points):
    """log p of the sigma_min-noised marginal is known in closed form; measured error ~8e-4 bits/dim."""
    mix, x0 = ring_points
    with torch.no_grad():  # the solver switches grad on where it needs it
        res = log_likelihood(mix.denoise, x0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, trace="exact", **_prior(mix))
    ref = mix.log_prob(x0, SIGMA_MIN)
    bpd_ref = -ref / (2 * math.log(2))
    assert res.log_prob.shape == res.bpd.shape == (64,)
    assert (res.bpd - bpd_ref).abs().mean() < 0.01  # the goal
    assert (res.bpd - bpd_ref).abs().mean() < 2e-3  # it achieves ~8e-4 at rtol = atol = 1e-5
    # per point: ~1e-4 nats on the data; far off it (log p down to -500) the error is relative, ~4e-4
    torch.testing.assert_close(res.log_prob[:48], ref[:48], rtol=0, atol=1e-3)
    torch.testing.assert_close(res.log_prob[48:], ref[48:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(res.bpd, -res.log_prob / (2 * math.log(2)))
    assert 20 < res.nfe < 2000


def test_tighter_tolerances_converge(ring_points):
    mix, x0 = ring_points
    x0 = x0[:48]
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, trace="exact", **_prior(mix))
    loose = log_likelihood(mix.denoise, x0, rtol=1e-4, atol=1e-4, **kw)
    tight = log_likelihood(mix.denoise, x0, rtol=1e-7, atol=1e-7, **kw)
    ref = mix.log_prob(x0, SIGMA_MIN)
    assert (tight.log_prob - ref).abs().max() < 1e-4
    assert (tight.log_prob - ref).abs().max() < (loose.log_prob - ref).abs().max()
    assert tight.nfe > loose.nfe


def test_hutchinson_is_unbiased_for_the_exact_trace(ring_points):
    """Each of 8 points repeated 64 times, one fixed Rademacher probe each: the mean over repeats lies
    within 4 standard errors of the exact-trace result; 4 probes halve the spread (variance / 4)."""
    mix, x0 = ring_points
    pts = x0[:8]
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **_prior(mix))
    exact = log_likelihood(mix.denoise, pts, trace="exact", **kw).log_prob
    reps = 64
    g = torch.Generator().manual_seed(1)
    one = log_likelihood(mix.denoise, pts.repeat(reps, 1), trace="hutchinson", generator=g, **kw)
    lp = one.log_prob.reshape(reps, 8)
    se = lp.std(0) / math.sqrt(reps)
    assert ((lp.mean(0) - exact).abs() < 4 * se + 1e-3).all()
    four = log_likelihood(mix.denoise, pts.repeat(reps, 1), trace="hutchinson", n_probes=4, generator=g, **kw)
    ratio = four.log_prob.reshape(reps, 8).std(0).mean() / lp.std(0).mean()
    assert 0.3 < ratio < 0.75


def _gaussian_denoiser(mu: torch.Tensor, s: float):
    def d(x, sigma):
        return mu + s**2 / (s**2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2) * (x - mu)

    return d


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_isotropic_gaussian_in_8_dimensions(trace):
    """x0 ~ N(mu, s^2 I): log p_{sigma_min} = log N(x; mu, (s^2 + sigma_min^2) I) and, with the data's
    mean and std as prior, the prior at sigma_max is exact too. J_D is a multiple of I, so even one
    Rademacher probe gives the exact trace (eps^T eps = d)."""
    d, s = 8, 0.5
    mu = torch.linspace(-1.0, 2.0, d, dtype=f64)
    g = torch.Generator().manual_seed(2)
    x0 = mu + 1.5 * s * torch.randn(16, d, generator=g, dtype=f64)
    res = log_likelihood(
        _gaussian_denoiser(mu, s),
        x0,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        trace=trace,
        generator=g,
        prior_mean=mu,
        prior_std=s,
    )
    var = s**2 + SIGMA_MIN**2
    ref = -0.5 * ((x0 - mu) ** 2 / var + math.log(2 * math.pi * var)).sum(-1)
    torch.testing.assert_close(res.log_prob, ref, rtol=0, atol=1e-3)
    assert ((res.bpd + ref / (d * math.log(2))).abs() < 1e-4).all()


def test_correlated_gaussian_in_8_dimensions_with_the_default_prior():
    """A full covariance (exact trace). The default prior N(0, sigma_max^2 I) is off by about
    mean . z / sigma_max nats, z ~ N(0, I) the whitened point (x(sigma_max) ~ mean + sigma_max z)."""
    d = 8
    g = torch.Generator().manual_seed(3)
    A = torch.randn(d, d, generator=g, dtype=f64) / math.sqrt(d)
    gauss = GaussianMixture(
        [1.0], 0.3 * torch.randn(1, d, generator=g, dtype=f64), (A @ A.T + 0.1 * torch.eye(d))[None]
    )
    x0, _ = gauss.sample(16, generator=g)
    ref = gauss.log_prob(x0, SIGMA_MIN)
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, trace="exact")
    with_prior = log_likelihood(gauss.denoise, x0, **kw, **_prior(gauss))
    default = log_likelihood(gauss.denoise, x0, **kw)
    torch.testing.assert_close(with_prior.log_prob, ref, rtol=0, atol=2e-3)
    # The Gaussian's flow: x(sigma) = mean + (C + sigma^2)^(1/2) (C + sigma_min^2)^(-1/2) (x0 - mean).
    mean, lam, U = gauss.means[0], gauss.lam[0], gauss.U[0]
    z = (x0 - mean) @ U / (lam + SIGMA_MIN**2).sqrt() @ U.T
    torch.testing.assert_close(default.log_prob - ref, -z @ mean / SIGMA_MAX, rtol=0, atol=2e-3)
    assert (default.log_prob - ref).abs().max() > 10 * (with_prior.log_prob - ref).abs().max()


def test_float32_and_image_shaped_input():
    """Per-sample dims may be any shape; the dtype is kept."""
    mu, s = 0.2, 0.8
    x0 = (mu + s * torch.randn(4, 1, 3, 3)).float()
    res = log_likelihood(
        _gaussian_denoiser(torch.tensor(mu), s), x0, sigma_min=1e-2, sigma_max=50.0, prior_mean=mu, prior_std=s
    )
    var = s**2 + 1e-4
    ref = -0.5 * ((x0.double() - mu) ** 2 / var + math.log(2 * math.pi * var)).sum((1, 2, 3))
    assert res.log_prob.dtype == torch.float32 and res.log_prob.shape == (4,)
    torch.testing.assert_close(res.log_prob.double(), ref, rtol=0, atol=2e-2)


def test_rejects_bad_input():
    mix = ring_mixture()
    x0 = torch.zeros(3, 2, dtype=f64)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(mix.denoise, x0, sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(mix.denoise, x0, sigma_min=0.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown trace 'skilling'"):
        log_likelihood(mix.denoise, x0, sigma_min=0.1, sigma_max=1.0, trace="skilling")
    with pytest.raises(ValueError, match="n_probes"):
        log_likelihood(mix.denoise, x0, sigma_min=0.1, sigma_max=1.0, n_probes=0)
    with pytest.raises(ValueError, match="floating-point"):
        log_likelihood(mix.denoise, x0.long(), sigma_min=0.1, sigma_max=1.0)
    with pytest.raises(ValueError, match="prior_std"):
        log_likelihood(mix.denoise, x0, sigma_min=0.1, sigma_max=1.0, prior_std=-1.0)
