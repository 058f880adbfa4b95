import math

import numpy as np
import pytest
import torch
from conftest import gaussian_eps_model

from unnoise import diffusion as D
from unnoise.elbo import elbo_bpd, elbo_terms, prior_bpd
from unnoise.losses import LossAwareSampler, UniformSampler, diffusion_loss, min_snr_weight
from unnoise.schedules import make_schedule

f64 = torch.float64
MU, S = 0.3, 0.5


def analytic_gaussian_elbo_bits(T: int, variance: str) -> float:
    """Negative ELBO per dimension of N(MU, S^2) data under the exact optimal model, derived here.

    With the optimal x0_hat = E[x0 | x_t], every KL's mean term averages to coef_x0^2 * mmse_t,
    where mmse_t = S^2 (1 - ab) / (ab S^2 + 1 - ab) is the posterior variance of x0 given x_t.
    """
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    ab = np.concatenate([[1.0], np.cumprod(1 - betas)])
    total = 0.0
    for t in range(1, T + 1):
        a2, b2 = ab[t], 1 - ab[t]
        mmse = S**2 * b2 / (a2 * S**2 + b2)
        if t == 1:
            ab2, ab1 = ab[2], ab[1]
            var_dec = (1 - ab1) / (1 - ab2) * betas[1]  # beta_tilde_2: the clipped decoder variance
            total += 0.5 * math.log(2 * math.pi * var_dec) + mmse / (2 * var_dec)
            continue
        beta_tilde = (1 - ab[t - 1]) / b2 * betas[t - 1]
        coef_x0 = math.sqrt(ab[t - 1]) * betas[t - 1] / b2
        var_p = beta_tilde if variance == "fixed_small" else betas[t - 1]
        total += 0.5 * (math.log(var_p / beta_tilde) + beta_tilde / var_p - 1 + coef_x0**2 * mmse / var_p)
    aT2, bT2 = ab[T], 1 - ab[T]
    total += 0.5 * (aT2 * (S**2 + MU**2) + bT2 - 1 - math.log(bT2))
    return total / math.log(2)


def quadrature_elbo_bits(T: int, variance: str) -> float:
    """unnoise's ELBO, averaged exactly over data and noise by 2-point Gauss-Hermite quadrature.

    Every term is a quadratic in (x0, eps_t), whose mean under N(0, 1) is exact at +-1; the four
    samples below cover every sign pair for each t.
    """
    sched = make_schedule("linear", T)
    x0 = MU + S * torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], dtype=f64)
    eps = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=f64)
    e = elbo_terms(
        gaussian_eps_model(sched, MU, S),
        x0,
        sched,
        variance=variance,
        decoder="gaussian",
        noise_fn=lambda t, x: eps,
    )
    return e.bpd.mean().item()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_gaussian_elbo_matches_analytic_bounds_nll_and_tightens_with_T(variance):
    true_nll = 0.5 * math.log(2 * math.pi * math.e * S**2) / math.log(2)
    gaps = []
    for T in (100, 1000, 4000):
        computed = quadrature_elbo_bits(T, variance)
        analytic = analytic_gaussian_elbo_bits(T, variance)
        assert computed == pytest.approx(analytic, abs=1e-9)  # the issue asks for 1e-4
        assert computed >= true_nll
        gaps.append(computed - true_nll)
        print(f"{variance} T={T}: computed {computed:.6f} analytic {analytic:.6f} true NLL {true_nll:.6f}")
    if variance == "fixed_small":
        assert gaps[0] > gaps[1] > gaps[2] > 0
    # fixed_large's bound does not tighten with T on this data (1.09, 1.21, 1.25 bits/dim); the
    # independent analytic derivation agrees, so that is a property of the variance choice.


def test_elbo_terms_sum_and_prior():
    sched = make_schedule("cosine", 20)
    x0 = torch.rand(8, 3, dtype=f64) * 2 - 1
    e = elbo_terms(gaussian_eps_model(sched, 0.0, 0.5), x0, sched, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(e.bpd, e.prior + e.terms.sum(1))
    torch.testing.assert_close(e.prior, prior_bpd(x0, sched.alpha_bar[-1]))
    assert e.terms.shape == (8, 20) and torch.isfinite(e.terms).all()


def test_prior_term_against_closed_form():
    x0 = torch.tensor([[0.5, -1.0]], dtype=f64)
    ab = torch.tensor(0.01, dtype=f64)
    want = sum(0.5 * (ab * x**2 + (1 - ab) - 1 - math.log(1 - ab)) for x in (0.5, -1.0)) / 2 / math.log(2)
    assert prior_bpd(x0, ab).item() == pytest.approx(want.item(), rel=1e-12)


def test_dataset_elbo_is_the_mean_over_batches():
    sched = make_schedule("linear", 10)
    model = gaussian_eps_model(sched, 0.0, 0.5)
    x = torch.rand(10, 2, dtype=f64)

    def zero_noise(t, x0):
        return torch.zeros_like(x0)

    whole = elbo_bpd(model, [x], sched, noise_fn=zero_noise)
    parts = elbo_bpd(model, x.split(3), sched, noise_fn=zero_noise)
    assert parts.bpd == pytest.approx(whole.bpd, rel=1e-12)
    torch.testing.assert_close(parts.terms, whole.terms)
    assert parts.stderr == pytest.approx(whole.stderr, rel=1e-12)
    with pytest.raises(ValueError, match="empty"):
        elbo_bpd(model, [], sched)


def _exact_x0_model(sched, x0_hat_fn, prediction):
    """A 'network' that returns, in the requested parameterization, a fixed guess of x0."""

    def model(x_t, t):
        ab = sched.alpha_bar_at(t).to(x_t.dtype)
        x0_hat = x0_hat_fn(x_t)
        eps_hat = D.eps_from_x0(x_t, x0_hat, ab)
        return {"eps": eps_hat, "x0": x0_hat, "v": D.v_from_x0_eps(x0_hat, eps_hat, ab)}[prediction]

    return model


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_min_snr_weighting_is_the_same_loss_in_every_parameterization(gamma):
    """min(SNR, gamma) ||x0 - x0_hat||^2, whatever the network predicts (Hang et al. 2023)."""
    sched = make_schedule("cosine", 1000)
    table = D.reverse_table(sched)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, generator=g, dtype=f64)
    noise = torch.randn(64, 4, generator=g, dtype=f64)
    t = torch.randint(1, 1001, (64,), generator=g)
    ab = sched.alpha_bar[t]
    x_t = D.q_sample(x0, ab, noise)
    guess = lambda x: 0.8 * x  # noqa: E731
    snr = ab / (1 - ab)
    weight = snr if gamma is None else snr.clamp(max=gamma)
    want = weight * ((x0 - guess(x_t)) ** 2).mean(1)
    losses = {}
    for pred in ("eps", "x0", "v"):
        model = _exact_x0_model(sched, guess, pred)
        losses[pred] = diffusion_loss(model, x0, t, noise, table, prediction=pred, min_snr_gamma=gamma).loss
    if gamma is None:  # unweighted: eps-MSE = SNR * x0-MSE
        torch.testing.assert_close(losses["eps"], want, rtol=1e-9, atol=1e-12)
    else:
        for pred, loss in losses.items():
            torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12, msg=pred)
    w = min_snr_weight(ab, "eps", 5.0)
    assert ((w <= 1) & (w > 0)).all()


class TwoHeads(torch.nn.Module):
    """Separate parameters for the mean (eps) head and the variance head."""

    def __init__(self):
        super().__init__()
        self.mean = torch.nn.Linear(2, 2, dtype=f64)
        self.var = torch.nn.Linear(2, 2, dtype=f64)

    def forward(self, x, t):
        return torch.cat([self.mean(x), torch.tanh(self.var(x))], dim=1)


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
    sched = make_schedule("linear", 100)
    table = D.reverse_table(sched)
    net = TwoHeads()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 2, generator=g, dtype=f64) * 2 - 1
    noise = torch.randn(16, 2, generator=g, dtype=f64)
    t = torch.randint(1, 101, (16,), generator=g)
    kw = dict(variance="learned_range", decoder="gaussian")

    def grads(kind):
        net.zero_grad()
        terms = diffusion_loss(net, x0, t, noise, table, kind=kind, **kw)
        terms.loss.sum().backward()
        return [p.grad.clone() for p in net.parameters()], terms

    (gm_h, gb_h, gv_h, _), hybrid = grads("hybrid")
    (gm_s, gb_s, gv_s, _), simple = grads("simple")
    torch.testing.assert_close(gm_h, gm_s)  # stop-gradient: the vlb term leaves the mean alone
    torch.testing.assert_close(gb_h, gb_s)
    assert gv_h.abs().sum() > 0 and gv_s.abs().sum() == 0  # ... and trains the variance
    torch.testing.assert_close(hybrid.loss, hybrid.mse + 1e-3 * hybrid.vb)
    (gm_v, *_), vlb = grads("vlb")
    assert gm_v.abs().sum() > 0  # L_vlb alone trains the mean as well
    # vb is T L_{t-1}, the unbiased one-sample estimate of sum_t L_{t-1}
    x_t = D.q_sample(x0, sched.alpha_bar[t], noise)
    step = D.p_mean_variance(net(x_t, t.double()), x_t, t, table, variance="learned_range")
    from unnoise.elbo import vlb_term_bpd

    want = 100 * vlb_term_bpd(step.mean, step.log_variance, x0, x_t, t, table, "gaussian")
    torch.testing.assert_close(vlb.vb, want.detach())


def test_loss_options_are_checked():
    sched = make_schedule("linear", 10)
    table = D.reverse_table(sched)
    x = torch.zeros(2, 2)
    t = torch.tensor([1, 2])
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown loss 'l1'; allowed: simple, hybrid, vlb"):
        diffusion_loss(model, x, t, x, table, kind="l1")
    with pytest.raises(ValueError, match="needs variance='learned_range'"):
        diffusion_loss(model, x, t, x, table, kind="hybrid")
    with pytest.raises(ValueError, match="NaN"):
        diffusion_loss(model, torch.tensor([[float("nan"), 0.0]]), t[:1], x[:1], table)
    with pytest.raises(ValueError, match=r"noise shape \(2, 3\) != data shape \(2, 2\)"):
        diffusion_loss(model, x, t, torch.zeros(2, 3), table)
    with pytest.raises(ValueError, match="unknown target 'score'"):
        diffusion_loss(model, x, t, x, table, prediction="score")


def test_uniform_sampler():
    s = UniformSampler(10)
    t, w = s.sample(1000, torch.Generator().manual_seed(0))
    assert t.min() >= 1 and t.max() <= 10 and (w == 1).all()


def test_loss_aware_sampler_is_uniform_until_warm_then_unbiased():
    T = 5
    s = LossAwareSampler(T, history=3)
    torch.testing.assert_close(s.probabilities(), torch.full((T,), 0.2, dtype=f64))
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=f64)
    for _ in range(4):  # one more than the history: the oldest entry rolls out
        s.update(torch.arange(1, T + 1), losses)
    p = s.probabilities()
    want = losses / losses.sum() * (1 - 1e-3) + 1e-3 / T  # sqrt(E[L^2]) = L for constant losses
    torch.testing.assert_close(p, want)
    # importance weights 1 / (T p_t) make E_p[w_t L_t] the uniform average of L_t
    w = 1 / (T * p)
    assert (p * w * losses).sum().item() == pytest.approx(losses.mean().item(), rel=1e-12)
    t, wt = s.sample(20000, torch.Generator().manual_seed(0))
    freq = torch.bincount(t - 1, minlength=T).double() / 20000
    assert (freq - p).abs().max() < 0.015
    torch.testing.assert_close(wt, w[t - 1])
