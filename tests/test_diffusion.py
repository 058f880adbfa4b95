import math

import numpy as np
import pytest
import torch

from unnoise import diffusion as D
from unnoise.schedules import make_schedule

f64 = torch.float64


def test_markov_chain_has_the_moments_of_the_closed_form():
    """Run x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps step by step; compare with q(x_t | x0)."""
    sched = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = torch.tensor([-1.0, 0.3, 2.0], dtype=f64).repeat(n, 1)  # (n, 3): three starting points
    x = x0.clone()
    for t in range(1, sched.T + 1):
        x = D.q_step(x, sched.betas[t - 1], torch.randn(x.shape, generator=g, dtype=f64))
        if t in (1, 10, 100, 500, 1000):
            ab = sched.alpha_bar[t]
            mean, var = ab.sqrt() * x0[0], 1 - ab
            se_mean = (var / n).sqrt()
            se_var = var * math.sqrt(2 / (n - 1))
            assert ((x.mean(0) - mean).abs() < 5 * se_mean).all(), t
            assert ((x.var(0) - var).abs() < 5 * se_var).all(), t
            # and q_sample draws from the same law
            y = D.q_sample(x0, ab, torch.randn(x.shape, generator=g, dtype=f64))
            assert ((y.mean(0) - x.mean(0)).abs() < 5 * math.sqrt(2) * se_mean).all()


@pytest.mark.parametrize("t", [2, 3, 50, 500, 1000])
def test_posterior_equals_bayes_rule_on_a_grid(t):
    """q(x_{t-1} | x_t, x0) proportional to q(x_{t-1} | x0) q(x_t | x_{t-1}), integrated numerically."""
    sched = make_schedule("cosine", 1000)
    ab_prev, ab_t, beta = sched.alpha_bar[t - 1], sched.alpha_bar[t], sched.betas[t - 1]
    x0 = torch.tensor(0.7, dtype=f64)
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * 0.4
    # Grid around the likelihood's peak, 40 of its widths each side (the posterior is narrower).
    centre, width = x_t / (1 - beta).sqrt(), (beta / (1 - beta)).sqrt()
    y = torch.linspace(float(centre - 40 * width), float(centre + 40 * width), 400_001, dtype=f64)
    log_prior = -0.5 * (y - ab_prev.sqrt() * x0) ** 2 / (1 - ab_prev)
    log_lik = -0.5 * (x_t - (1 - beta).sqrt() * y) ** 2 / beta
    w = torch.softmax(log_prior + log_lik, 0)
    num_mean = (w * y).sum()
    num_var = (w * (y - num_mean) ** 2).sum()
    post = D.posterior_coefficients(ab_t, ab_prev)
    mean, var = D.q_posterior(x0.reshape(1), x_t.reshape(1), post)
    assert mean.item() == pytest.approx(num_mean.item(), abs=1e-6 * max(1.0, abs(num_mean.item())))
    assert var.item() == pytest.approx(num_var.item(), rel=1e-6)


def test_reverse_table_clips_the_first_log_variance():
    sched = make_schedule("linear", 100)
    table = D.reverse_table(sched)
    assert table.posterior.variance[0].item() == 0.0  # beta_tilde_1 = 0 ...
    assert table.log_beta_tilde_clipped[0].item() == pytest.approx(table.posterior.variance[1].log().item())


def test_conversions_round_trip_in_float64():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=f64)
    eps = torch.randn(64, 3, generator=g, dtype=f64)
    ab = torch.rand(64, generator=g, dtype=f64) * 0.98 + 0.01
    x_t = D.q_sample(x0, ab, eps)
    close = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(D.x0_from_eps(x_t, eps, ab), x0, **close)
    torch.testing.assert_close(D.eps_from_x0(x_t, x0, ab), eps, **close)
    v = D.v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(D.x0_from_v(x_t, v, ab), x0, **close)
    torch.testing.assert_close(D.eps_from_v(x_t, v, ab), eps, **close)
    torch.testing.assert_close(D.eps_from_score(D.score_from_eps(eps, ab), ab), eps, **close)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(D.x0_from_prediction(out, x_t, ab, pred), x0, **close)
    x, sigma = D.to_sigma_space(x_t, ab)
    torch.testing.assert_close(x, x0 + D.expand(sigma, x0) * eps, **close)  # x = x0 + sigma n
    back, ab2 = D.from_sigma_space(x, sigma)
    torch.testing.assert_close(back, x_t, **close)
    torch.testing.assert_close(ab2, ab, **close)


def test_score_is_the_gradient_of_the_log_density():
    """For Gaussian data the noisy marginal is Gaussian: check score_from_eps against autograd."""
    mu, s, ab = 0.3, 0.5, torch.tensor(0.6, dtype=f64)
    x_t = torch.linspace(-2, 2, 9, dtype=f64, requires_grad=True)
    var = ab * s**2 + 1 - ab
    logp = -0.5 * (x_t - ab.sqrt() * mu) ** 2 / var
    (grad,) = torch.autograd.grad(logp.sum(), x_t)
    x0_hat = mu + ab.sqrt() * s**2 / var * (x_t.detach() - ab.sqrt() * mu)
    eps = D.eps_from_x0(x_t.detach(), x0_hat, ab)
    torch.testing.assert_close(D.score_from_eps(eps, ab), grad, rtol=1e-12, atol=1e-12)


def test_normal_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(3)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    n = 2_000_000
    x = m1 + math.exp(0.5 * lv1) * torch.randn(n, generator=g, dtype=f64)
    t = torch.tensor
    log_ratio = D.gaussian_log_likelihood(x, t(m1), t(lv1)) - D.gaussian_log_likelihood(x, t(m2), t(lv2))
    kl = D.normal_kl(t(m1, dtype=f64), t(lv1, dtype=f64), t(m2, dtype=f64), t(lv2, dtype=f64)).item()
    assert abs(log_ratio.mean().item() - kl) < 5 * log_ratio.std().item() / math.sqrt(n)
    # and against the textbook formula
    ref = math.log(math.sqrt(1.7 / 0.5)) + (0.5 + (m1 - m2) ** 2) / (2 * 1.7) - 0.5
    assert kl == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("mean, scale", [(0.0, 0.01), (0.5, 0.2), (-0.98, 0.003), (0.99, 1.5), (0.2, 1e-4)])
def test_discretized_decoder_is_a_distribution_over_256_levels(mean, scale):
    levels = torch.linspace(-1, 1, 256, dtype=f64)
    logp = D.discretized_gaussian_log_likelihood(
        levels, torch.full_like(levels, mean), torch.full_like(levels, math.log(scale))
    )
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # each level's mass is the normal CDF over its bin (ends open), here from scipy
    stats = pytest.importorskip("scipy.stats")
    edges = np.concatenate([[-np.inf], (levels[:-1].numpy() + levels[1:].numpy()) / 2, [np.inf]])
    ref = np.diff(stats.norm.cdf(edges, loc=mean, scale=scale))
    big = ref > 1e-300
    np.testing.assert_allclose(logp.exp().numpy()[big], ref[big], rtol=1e-9, atol=1e-15)


def test_discretized_decoder_against_monte_carlo():
    g = torch.Generator().manual_seed(5)
    mean, scale, n = 0.1, 0.02, 1_000_000
    y = mean + scale * torch.randn(n, generator=g, dtype=f64)
    bins = ((y.clamp(-1, 1) + 1) * 127.5).round()  # nearest of the 256 levels
    x = torch.tensor([0.1, 0.1 + 2 / 255, 0.1 - 6 / 255], dtype=f64)
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    p = D.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale))).exp()
    for xi, pi in zip(x, p, strict=True):
        freq = (bins == ((xi + 1) * 127.5).round()).double().mean().item()
        assert abs(freq - pi.item()) < 5 * math.sqrt(pi.item() * (1 - pi.item()) / n) + 1e-12


def _consistent_outputs(x0, eps, ab):
    return {"eps": eps, "x0": x0, "v": D.v_from_x0_eps(x0, eps, ab)}


def test_reverse_mean_is_the_posterior_mean_for_every_parameterization():
    sched = make_schedule("cosine", 50)
    table = D.reverse_table(sched)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 51, (32,), generator=g)
    x0 = torch.randn(32, 2, generator=g, dtype=f64)
    eps = torch.randn(32, 2, generator=g, dtype=f64)
    ab = sched.alpha_bar[t]
    x_t = D.q_sample(x0, ab, eps)
    post = D.posterior_coefficients(ab, sched.alpha_bar[t - 1])
    want, _ = D.q_posterior(x0, x_t, post)
    for pred, out in _consistent_outputs(x0, eps, ab).items():
        step = D.p_mean_variance(out, x_t, t, table, prediction=pred)
        torch.testing.assert_close(step.mean, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(step.x0, x0, rtol=0, atol=1e-10)


def test_variance_choices():
    sched = make_schedule("linear", 100)
    table = D.reverse_table(sched)
    t = torch.tensor([1, 2, 50, 100])
    x = torch.zeros(4, 3, dtype=f64)
    small = D.p_mean_variance(x, x, t, table, variance="fixed_small").log_variance[:, 0]
    large = D.p_mean_variance(x, x, t, table, variance="fixed_large").log_variance[:, 0]
    torch.testing.assert_close(small[1:], table.posterior.variance[t[1:] - 1].log())
    torch.testing.assert_close(large[1:], sched.betas[t[1:] - 1].log())
    assert large[0] == small[0]  # iDDPM: fixed-large uses beta_tilde_2 at t = 1, too
    # learned range (iDDPM Eq. 15): v = -1 gives beta_tilde, v = +1 gives beta, v = 0 the geometric mean
    beta = sched.betas[t - 1].log()
    for v, want in ((-1.0, small), (1.0, beta), (0.0, (small + beta) / 2)):
        out = torch.cat([x, torch.full_like(x, v)], dim=1)
        got = D.p_mean_variance(out, x, t, table, variance="learned_range").log_variance[:, 0]
        torch.testing.assert_close(got, want)


def test_p_sample_adds_no_noise_at_t_1():
    sched = make_schedule("linear", 10)
    table = D.reverse_table(sched)
    x = torch.ones(2, 1, dtype=f64)
    t = torch.tensor([1, 2])
    step = D.p_mean_variance(torch.zeros_like(x), x, t, table)
    out = D.p_sample(step, t, torch.ones_like(x))
    assert out[0].item() == step.mean[0].item() and out[1].item() > step.mean[1].item()


def test_bad_input():
    sched = make_schedule("linear", 10)
    table = D.reverse_table(sched)
    x = torch.zeros(2, 3)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unknown prediction 'score'; allowed: eps, x0, v"):
        D.p_mean_variance(x, x, t, table, prediction="score")
    with pytest.raises(ValueError, match="unknown variance 'big'; allowed: fixed_small, fixed_large, learned_range"):
        D.p_mean_variance(x, x, t, table, variance="big")
    with pytest.raises(ValueError, match=r"model output shape \(2, 4\) != x_t shape \(2, 3\)"):
        D.p_mean_variance(torch.zeros(2, 4), x, t, table)
    with pytest.raises(ValueError, match="learned_range needs 2 x 3 output channels"):
        D.p_mean_variance(x, x, t, table, variance="learned_range")
    with pytest.raises(ValueError, match=r"per-sample values must have shape \(\) or \(2,\)"):
        D.q_sample(x, torch.ones(3), x)
    with pytest.raises(ValueError, match="NaN"):
        D.check_finite(torch.tensor([0.0, float("nan")]))
