"""Guidance combinators against closed forms: Gaussian classes, a two-class mixture, a 2-D Gaussian."""

import math

import pytest
import torch

from unnoise.guidance import autoguidance, classifier_free, classifier_guidance, conditioned, inpaint
from unnoise.modalities.toy.data import GaussianMixture

f64 = torch.float64

# Three classes x0 ~ N(mu_y, s^2 I) in d = 3; label 3 is the null ("no condition") label.
MU = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.0, 2.0], [0.0, 3.0, -1.0]], dtype=f64)
S = 0.7
NULL = 3
UNCOND = GaussianMixture(torch.ones(3), MU, S**2 * torch.eye(3, dtype=f64).expand(3, 3, 3))


def gaussian_denoiser(mu: torch.Tensor, s: float):
    """D*(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) for x0 ~ N(mu, s^2 I) (DESIGN.md)."""

    def d(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return d


class Counting:
    """The exact conditional denoiser (labels 0..2: class, 3: the unconditional mixture), counting calls."""

    def __init__(self):
        self.calls = 0
        self.batches = []

    def __call__(self, x, sigma, labels):
        self.calls += 1
        self.batches.append(x.shape[0])
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        out = torch.empty_like(x)
        null = labels == NULL
        out[~null] = gaussian_denoiser(MU[labels[~null]], S)(x[~null], sigma if sigma.ndim == 0 else sigma[~null])
        if null.any():
            out[null] = UNCOND.denoise(x[null], sigma if sigma.ndim == 0 else sigma[null])
        return out


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(B, 3, generator=g, dtype=f64)
    labels = torch.arange(B) % 3
    return x, labels


@pytest.mark.parametrize("sigma", [torch.tensor(0.8, dtype=f64), torch.linspace(0.1, 5.0, 6, dtype=f64)])
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_classifier_free_is_the_linear_combination_with_one_call(sigma, scale):
    x, labels = _batch()
    net = Counting()
    guided = classifier_free(net, labels, torch.tensor(NULL), scale)
    out = guided(x, sigma)
    assert net.calls == 1 and net.batches == [2 * x.shape[0]]  # once, on the doubled batch
    sig = sigma if sigma.ndim == 0 else sigma
    d_c = gaussian_denoiser(MU[labels], S)(x, sig)
    d_u = UNCOND.denoise(x, sig)
    torch.testing.assert_close(out, d_u + scale * (d_c - d_u), rtol=0, atol=1e-12)
    if scale == 1.0:
        torch.testing.assert_close(out, d_c, rtol=0, atol=1e-12)
    if scale == 0.0:
        torch.testing.assert_close(out, d_u, rtol=0, atol=1e-12)


def test_guidance_interval_switches_guidance_off_outside():
    x, labels = _batch()
    lo, hi = 0.5, 2.0
    sigma = torch.tensor([0.1, 0.5, 0.6, 1.9, 2.0, 7.0], dtype=f64)  # outside, edge, in, in, edge, out
    net = Counting()
    out = classifier_free(net, labels, NULL, 3.0, interval=(lo, hi))(x, sigma)
    d_c = gaussian_denoiser(MU[labels], S)(x, sigma)
    d_u = UNCOND.denoise(x, sigma)
    inside = torch.tensor([False, False, True, True, True, False])  # (sigma_lo, sigma_hi]
    expected = torch.where(inside[:, None], d_u + 3.0 * (d_c - d_u), d_c)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert net.calls == 1

    # A scalar sigma outside the interval: one call on the un-doubled batch, the conditional output.
    net = Counting()
    out = classifier_free(net, labels, NULL, 3.0, interval=(lo, hi))(x, torch.tensor(5.0, dtype=f64))
    assert net.calls == 1 and net.batches == [x.shape[0]]
    torch.testing.assert_close(out, gaussian_denoiser(MU[labels], S)(x, torch.tensor(5.0, dtype=f64)))


def test_classifier_free_rejects_bad_input():
    x, labels = _batch()
    with pytest.raises(ValueError, match="scale"):
        classifier_free(Counting(), labels, NULL, -1.0)
    with pytest.raises(ValueError, match="interval"):
        classifier_free(Counting(), labels, NULL, 2.0, interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="batch"):
        classifier_free(Counting(), labels[:4], NULL, 2.0)(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="null labels"):
        classifier_free(Counting(), labels, torch.tensor([3, 3]), 2.0)(x, torch.tensor(1.0))


def _two_class_mixture():
    means = torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=f64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]]], dtype=f64)
    return GaussianMixture([0.3, 0.7], means, covs)


def _component(mix: GaussianMixture, y: int) -> GaussianMixture:
    return GaussianMixture([1.0], mix.means[y : y + 1], mix.covs[y : y + 1])


@pytest.mark.parametrize("y", [0, 1])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_classifier_guidance_turns_the_unconditional_denoiser_into_the_conditional_one(y, per_sample_sigma):
    """Bayes: grad log p(x | y) = grad log p(x) + grad log p(y | x), at every noise level."""
    mix = _two_class_mixture()
    comp = _component(mix, y)

    def log_prob(x, sigma):  # the exact noise-aware classifier log p(y | x_sigma)
        return math.log(mix.weights[y]) + comp.log_prob(x, sigma) - mix.log_prob(x, sigma)

    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(16, 2, generator=g, dtype=f64)
    sigma = torch.logspace(-2, 1, 16, dtype=f64) if per_sample_sigma else torch.tensor(0.7, dtype=f64)
    with torch.no_grad():  # as inside a sampler
        out = classifier_guidance(mix.denoise, log_prob, 1.0)(x, sigma)
    torch.testing.assert_close(out, comp.denoise(x, sigma), rtol=0, atol=1e-8)
    assert not out.requires_grad

    # scale 0: the unguided denoiser
    torch.testing.assert_close(classifier_guidance(mix.denoise, log_prob, 0.0)(x, sigma), mix.denoise(x, sigma))


def test_classifier_guidance_rejects_bad_input():
    mix = _two_class_mixture()
    with pytest.raises(ValueError, match="scale"):
        classifier_guidance(mix.denoise, lambda x, s: x.sum(-1), float("nan"))
    with pytest.raises(ValueError, match="log_prob must return shape"):
        classifier_guidance(mix.denoise, lambda x, s: x, 1.0)(torch.zeros(3, 2, dtype=f64), torch.tensor(1.0))


# A correlated 2-D Gaussian: coordinate 1 is known, coordinate 0 is imputed.
RHO = 0.8
MU2 = torch.tensor([0.5, -0.3], dtype=f64)
C2 = torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=f64)
K = 1.0
COND_MEAN = MU2[0] + RHO * (K - MU2[1])  # E[x0_0 | x0_1 = K] = 1.54
COND_VAR = 1 - RHO**2


def _euler_inpaint(guidance: float, n: int = 4000, steps: int = 60, seed: int = 0) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma over a Karras grid (rho = 7)."""
    gauss = GaussianMixture([1.0], MU2[None], C2[None])
    g = torch.Generator().manual_seed(seed)
    known = torch.tensor([[0.0, K]], dtype=f64)
    mask = torch.tensor([[0.0, 1.0]], dtype=f64)
    D = inpaint(gauss.denoise, known, mask, guidance=guidance, generator=g)
    ramp = torch.linspace(0, 1, steps, dtype=f64)
    sigmas = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=f64)])
    x = MU2 + 80.0 * torch.randn(n, 2, generator=g, dtype=f64)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = x + (s_next - s) * (x - D(x, s)) / s
    return x


def test_inpaint_imputes_roughly_the_conditional_law():
    """With guidance the imputed mean is within 0.1 of E[x0_0 | x0_1]: the bias of the isotropic
    posterior-covariance approximation measures about 0.05 here, the Monte-Carlo standard error
    about 0.01. Plain replacement recovers well under half of the shift (its known limitation)."""
    x = _euler_inpaint(guidance=1.0)
    assert (x[:, 1] == K).all()  # known entries returned exactly
    se = math.sqrt(COND_VAR / x.shape[0])
    assert abs(x[:, 0].mean() - COND_MEAN) < 0.1 and se < 0.015
    assert abs(x[:, 0].var() - COND_VAR) < 0.1

    plain = _euler_inpaint(guidance=0.0)[:, 0].mean()
    frac = (plain - MU2[0]) / (COND_MEAN - MU2[0])  # fraction of the shift recovered
    assert 0.2 < frac < 0.6


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_inpaint_per_sample_generators_make_a_sample_independent_of_its_batch(guidance):
    mix = _two_class_mixture()
    known = torch.tensor([[0.0, 0.7]], dtype=f64)
    mask = torch.tensor([0.0, 1.0], dtype=f64)
    x = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-1.0, 0.4]], dtype=f64)
    sigma = torch.tensor(1.3, dtype=f64)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = inpaint(mix.denoise, known, mask, guidance=guidance, generator=gens)(x, sigma)
    alone = inpaint(mix.denoise, known, mask, guidance=guidance, generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone(x[1:2], sigma), rtol=0, atol=1e-14)
    assert (batch[:, 1] == 0.7).all()

    # a single generator is reproducible too
    a = inpaint(mix.denoise, known, mask, generator=torch.Generator().manual_seed(3))(x, sigma)
    b = inpaint(mix.denoise, known, mask, generator=torch.Generator().manual_seed(3))(x, sigma)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0, 20.0])
def test_inpaint_guidance_is_the_exact_conditional_denoiser_when_its_covariance_model_holds(sigma):
    """Gaussian data: E[x0 | x, x0_k = k] = D + J_{:,k} J_kk^{-1} (k - D_k) with J = C (C + sigma^2 I)^{-1}.
    The guidance replaces J_kk^{-1} by 1 + sigma^2 / sigma_data^2; choosing sigma_data to make that
    exact at this sigma, the guided output must be the conditional Gaussian's denoiser, whatever the
    replacement noise (given x0_k, the noisy x_k carries no information about x0_u)."""
    gauss = GaussianMixture([1.0], MU2[None], C2[None])
    sigma_t = torch.tensor(sigma, dtype=f64)
    J = C2 @ torch.linalg.inv(C2 + sigma**2 * torch.eye(2, dtype=f64))
    sd = math.sqrt(sigma**2 * J[1, 1] / (1 - J[1, 1]))
    known, mask = torch.tensor([0.0, K], dtype=f64), torch.tensor([0.0, 1.0], dtype=f64)
    x = MU2 + math.sqrt(1 + sigma**2) * torch.randn(8, 2, dtype=f64)
    out = inpaint(gauss.denoise, known, mask, sigma_data=sd)(x, sigma_t)
    expected = COND_MEAN + COND_VAR / (COND_VAR + sigma**2) * (x[:, 0] - COND_MEAN)
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-10)
    assert (out[:, 1] == K).all()


def test_inpaint_rejects_bad_input():
    mix = _two_class_mixture()
    known = torch.zeros(4, 2, dtype=f64)
    with pytest.raises(ValueError, match="does not broadcast"):
        inpaint(mix.denoise, known, torch.ones(3, 2))
    with pytest.raises(ValueError, match="only 0"):
        inpaint(mix.denoise, known, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="sigma_data"):
        inpaint(mix.denoise, known, torch.ones(4, 2), sigma_data=0.0)
    with pytest.raises(ValueError, match="must broadcast to x"):
        inpaint(mix.denoise, known, torch.ones(4, 2))(torch.zeros(5, 2, dtype=f64), torch.tensor(1.0))
    with pytest.raises(ValueError, match="generators"):
        gens = [torch.Generator() for _ in range(3)]
        inpaint(mix.denoise, known, torch.ones(4, 2), generator=gens)(torch.zeros(4, 2, dtype=f64), torch.tensor(1.0))


# ---- autoguidance ---------------------------------------------------------------------------------


def _broadened(mix: GaussianMixture, factor: float) -> GaussianMixture:
    """A "bad" model of ``mix``: the same modes, each covariance ``factor`` times wider (an
    under-fitted model spreads its mass, Karras et al. 2024, Sec. 3)."""
    return GaussianMixture(mix.weights, mix.means, factor * mix.covs)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_autoguidance_score_is_that_of_p_good_to_the_w_times_p_bad_to_the_1_minus_w(scale, per_sample_sigma):
    """Karras et al. 2024, Sec. 3: the guided score is grad log (p_good^w p_bad^(1 - w)) at every noise
    level; checked against autograd on the two mixtures' exact noisy log densities."""
    good = _two_class_mixture()
    bad = _broadened(good, 2.0)
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(16, 2, generator=g, dtype=f64)
    sigma = torch.logspace(-2, 1, 16, dtype=f64) if per_sample_sigma else torch.tensor(0.7, dtype=f64)
    out = autoguidance(good.denoise, bad.denoise, scale)(x, sigma)
    xg = x.clone().requires_grad_(True)
    log_p = scale * good.log_prob(xg, sigma) + (1 - scale) * bad.log_prob(xg, sigma)
    (score,) = torch.autograd.grad(log_p.sum(), xg)
    s = sigma if sigma.ndim == 0 else sigma[:, None]
    torch.testing.assert_close(out, x + s**2 * score, rtol=0, atol=1e-10)  # D = x + sigma^2 score


@pytest.mark.parametrize("sigma", [0.05, 0.8, 10.0])
def test_autoguidance_on_gaussians_has_the_closed_form(sigma):
    """Good N(mu, s_g^2 I), bad N(mu, s_b^2 I), v = s^2 + sigma^2: guided score -(x - mu)(w / v_g -
    (w - 1) / v_b), so D = mu + (1 - sigma^2 (w / v_g - (w - 1) / v_b)) (x - mu)."""
    mu, s_g, s_b, w = MU[0], 0.7, 1.3, 2.0
    x = 3 * torch.randn(5, 3, dtype=f64)
    out = autoguidance(gaussian_denoiser(mu, s_g), gaussian_denoiser(mu, s_b), w)(x, torch.tensor(sigma, dtype=f64))
    v_g, v_b = s_g**2 + sigma**2, s_b**2 + sigma**2
    torch.testing.assert_close(out, mu + (1 - sigma**2 * (w / v_g - (w - 1) / v_b)) * (x - mu), rtol=0, atol=1e-12)


def test_autoguidance_is_the_same_in_eps_space_and_its_ends_are_the_two_models():
    good = _two_class_mixture()
    bad = _broadened(good, 3.0)
    x = torch.randn(8, 2, dtype=f64)
    sigma = torch.linspace(0.1, 4.0, 8, dtype=f64)
    s = sigma[:, None]
    eps_good, eps_bad = (x - good.denoise(x, sigma)) / s, (x - bad.denoise(x, sigma)) / s
    for w in (0.0, 1.0, 1.7, 3.0):
        eps = eps_bad + w * (eps_good - eps_bad)  # the same combination of the noise predictions
        torch.testing.assert_close(
            autoguidance(good.denoise, bad.denoise, w)(x, sigma), x - s * eps, rtol=0, atol=1e-12
        )
    torch.testing.assert_close(autoguidance(good.denoise, bad.denoise, 1.0)(x, sigma), good.denoise(x, sigma))
    torch.testing.assert_close(autoguidance(good.denoise, bad.denoise, 0.0)(x, sigma), bad.denoise(x, sigma))
    # a model guided by itself is itself, at any scale
    torch.testing.assert_close(autoguidance(good.denoise, good.denoise, 2.5)(x, sigma), good.denoise(x, sigma))


class _BadConditional(Counting):
    """A "bad" conditional model: the exact one of classes twice as wide (S * sqrt(2))."""

    def __call__(self, x, sigma, labels):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        wide = GaussianMixture(torch.ones(3), MU, 2 * S**2 * torch.eye(3, dtype=f64).expand(3, 3, 3))
        out = torch.empty_like(x)
        null = labels == NULL
        sig = (lambda m: sigma) if sigma.ndim == 0 else (lambda m: sigma[m])
        out[~null] = gaussian_denoiser(MU[labels[~null]], S * math.sqrt(2))(x[~null], sig(~null))
        if null.any():
            out[null] = wide.denoise(x[null], sig(null))
        return out


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("ag_scale", [1.0, 2.0])
def test_autoguidance_composes_with_classifier_free_guidance(cfg_scale, ag_scale):
    """Conditional good and bad models, each classifier-free guided at the same labels, then
    autoguided: CFG_bad + w_ag (CFG_good - CFG_bad), with CFG = D_u + w_cfg (D_c - D_u)."""
    x, labels = _batch()
    sigma = torch.linspace(0.2, 3.0, 6, dtype=f64)
    good, bad = Counting(), _BadConditional()
    out = autoguidance(conditioned(good, labels, NULL, cfg_scale), conditioned(bad, labels, NULL, cfg_scale), ag_scale)(
        x, sigma
    )

    def cfg(net):
        d_c, d_u = net(x, sigma, labels), net(x, sigma, torch.full_like(labels, NULL))
        return d_u + cfg_scale * (d_c - d_u)

    cfg_good, cfg_bad = cfg(Counting()), cfg(_BadConditional())
    torch.testing.assert_close(out, cfg_bad + ag_scale * (cfg_good - cfg_bad), rtol=0, atol=1e-12)
    assert bad.calls == (0 if ag_scale == 1.0 else 1)  # scale 1 is the good model: the bad one is not run


def test_autoguidance_rejects_bad_scales():
    good = _two_class_mixture()
    for w in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            autoguidance(good.denoise, good.denoise, w)
