"""Training objectives and settings: EDM's loss against its closed forms, the DDPM family through the
generic objective against the functions it composes, and the settings each objective accepts."""

import math

import pytest
import torch

from unnoise.denoisers import EDMPrecond, edm_coefficients, edm_training_target
from unnoise.diffusion import reverse_table
from unnoise.elbo import vlb_term_bpd
from unnoise.losses import diffusion_loss, edm_loss
from unnoise.modalities.text.diffusion_lm import diffusion_lm_loss
from unnoise.modalities.text.pipeline import DiffusionLM
from unnoise.nets.transformer import TransformerConfig
from unnoise.schedules import make_schedule
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import Draws
from unnoise.training.objectives import Encoded, make_objective

f64 = torch.float64


def test_edm_loss_is_the_unit_weighted_mse_of_the_raw_network():
    """lambda(sigma) c_out(sigma)^2 = 1 (Karras et al. 2022, Table 1): with D = EDMPrecond(F), the
    loss is ||F(c_in x, c_noise) - target||^2, Eq. 8's target, at every sigma."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g, dtype=f64), torch.randn(6, 3, 4, 4, generator=g, dtype=f64)
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 10.0, 80.0], dtype=f64)
    W = torch.randn(3, 3, generator=g, dtype=f64)

    def F(x, c_noise):
        return torch.einsum("ij,bj...->bi...", W, x) * (1 + c_noise).reshape(-1, 1, 1, 1)

    sd = 0.7
    loss = edm_loss(EDMPrecond(F, sd), x0, sigma, noise, sd)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    c = edm_coefficients(sigma, sd)
    raw = F(c.c_in.reshape(-1, 1, 1, 1) * x, c.c_noise)
    want = ((raw - edm_training_target(x0, x, sigma, sd)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_edm_loss_of_the_exact_denoiser_on_gaussian_data():
    """x0 ~ N(mu, s^2 I): E||D*(x, sigma) - x0||^2 = s^2 sigma^2 / (s^2 + sigma^2) per dimension, so the
    expected loss is lambda(sigma) times that; Monte Carlo within 4 standard errors."""
    mu, s, sd, d = 0.3, 0.5, 0.5, 64
    g = torch.Generator().manual_seed(1)
    for sigma_value in (0.01, 0.3, 2.0, 40.0):
        sigma = torch.full((4000,), sigma_value, dtype=f64)
        x0 = mu + s * torch.randn(4000, d, generator=g, dtype=f64)
        noise = torch.randn(4000, d, generator=g, dtype=f64)

        def exact(x, sig):
            return mu + s**2 / (s**2 + sig.reshape(-1, 1) ** 2) * (x - mu)

        loss = edm_loss(exact, x0, sigma, noise, sd)
        weight = (sigma_value**2 + sd**2) / (sigma_value * sd) ** 2
        want = weight * s**2 * sigma_value**2 / (s**2 + sigma_value**2)
        assert abs(loss.mean().item() - want) < 4 * loss.std().item() / math.sqrt(len(loss))


def test_vlb_term_has_finite_gradients_at_every_step():
    """The discretized decoder's log(0) at high t must not reach the gradient (it made --loss hybrid
    NaN at the first step on images)."""
    table = reverse_table(make_schedule("cosine", 1000))
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (5, 1, 4, 4), generator=g) / 127.5 - 1).float()
    t = torch.tensor([1, 2, 500, 999, 1000])
    mean = torch.randn(5, 1, 4, 4, generator=g).requires_grad_()
    log_var = (torch.randn(5, 1, 4, 4, generator=g) - 3).requires_grad_()
    x_t = torch.randn(5, 1, 4, 4, generator=g)
    vlb_term_bpd(mean, log_var, x0, x_t, t, table).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_var.grad).all()


def test_the_text_objective_is_diffusion_lm_loss():
    """The generic DDPM objective on text (x0-prediction, L_simple, EMB(w) in, rounding added) is
    Diffusion-LM's loss, term for term, at the same t and noise."""
    from unnoise.modalities.text.modality import MODALITY as text

    torch.manual_seed(0)
    schedule = make_schedule("sqrt", 50)
    model = DiffusionLM(TransformerConfig.preset("tiny", 6, 4), vocab_size=9)
    ids = torch.randint(0, 9, (5, 6))
    t = torch.tensor([1, 2, 10, 30, 50])
    noise = torch.randn(5, 6, 4)
    want = diffusion_lm_loss(model.net, model.embedding, ids, schedule, t, noise).loss
    x0, net, rounding = text.encode(model, ids)
    terms = diffusion_loss(lambda x_t, tt: net(x_t, tt, None), x0, t, noise, reverse_table(schedule), prediction="x0")
    torch.testing.assert_close(terms.loss + rounding, want, rtol=1e-6, atol=1e-6)


def _draws(batch: int, seed: int = 0) -> Draws:
    return Draws(torch.Generator().manual_seed(seed), batch)


def test_ddpm_objective_is_diffusion_loss_at_its_draws():
    cfg = TrainConfig(T=100, schedule="linear", prediction="v", loss="min_snr", p_uncond=0.0)
    net = torch.nn.Linear(3, 3).double()

    def encode(model, x):
        return Encoded(x, lambda x_t, t, cond: model(x_t))

    objective = make_objective(cfg, encode, None)
    x0 = torch.randn(8, 3, dtype=f64)
    got = objective(net, x0, torch.zeros(8, dtype=torch.long), _draws(8))
    # the same draws by hand: t, then the noise
    draws = _draws(8)
    t, _ = objective.sampler.sample(8, draws.generator)
    noise = draws.randn(3, dtype=f64)
    table = reverse_table(make_schedule("linear", 100))
    want = diffusion_loss(lambda x_t, tt: net(x_t), x0, t, noise, table, prediction="v", min_snr_gamma=5.0).loss
    torch.testing.assert_close(got, want.mean())


def test_label_dropout_sends_rows_to_the_null_condition():
    seen = []
    cfg = TrainConfig(T=10, p_uncond=0.5)

    def encode(model, x):
        return Encoded(x, lambda x_t, t, cond: seen.append(cond) or x_t)

    objective = make_objective(cfg, encode, torch.tensor(7))
    objective(None, torch.randn(400, 2), torch.zeros(400, dtype=torch.long), _draws(400))
    dropped = (seen[0] == 7).double().mean().item()
    assert set(seen[0].tolist()) == {0, 7} and abs(dropped - 0.5) < 0.1


def test_edm_objective_draws_log_normal_noise_levels():
    cfg = TrainConfig(objective="edm", sigma_data=1.0, p_uncond=0.0)
    levels = []

    def encode(model, x):
        def net(x_in, c_noise, cond):
            levels.append(c_noise)
            return torch.zeros_like(x_in)

        return Encoded(x, net)

    loss = make_objective(cfg, encode, None)(None, torch.randn(4000, 2), torch.zeros(4000), _draws(4000))
    log_sigma = 4 * levels[0]  # c_noise = ln(sigma) / 4
    assert abs(log_sigma.mean().item() + 1.2) < 0.1 and abs(log_sigma.std().item() - 1.2) < 0.1
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(objective="edm", loss="hybrid"), "loss apply to objective 'ddpm', not 'edm'"),
        (dict(objective="edm", schedule="cosine", prediction="v"), "schedule, prediction apply to objective 'ddpm'"),
        (dict(sigma_data=0.5), "sigma_data apply to objective 'edm', not 'ddpm'"),
        (dict(objective="ve"), "unknown objective 've'; allowed: ddpm, edm"),
        (dict(loss="simple", min_snr_gamma=3.0), "min_snr_gamma applies to loss='min_snr'"),
        (dict(objective="edm", sigma_min=1.0, sigma_max=0.5), "need 0 < sigma_min < sigma_max"),
    ],
)
def test_settings_of_the_other_objective_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**settings)


def test_each_objective_records_only_its_own_settings():
    ddpm, edm = TrainConfig(), TrainConfig(objective="edm")
    assert (ddpm.schedule, ddpm.prediction, ddpm.loss, ddpm.T) == ("cosine", "eps", "simple", 1000)
    assert ddpm.sigma_max is ddpm.P_mean is ddpm.min_snr_gamma is None
    assert edm.schedule is edm.prediction is edm.loss is edm.T is None
    assert (edm.P_mean, edm.P_std, edm.sigma_min, edm.sigma_max) == (-1.2, 1.2, 0.002, 80.0)
    assert TrainConfig(loss="min_snr").min_snr_gamma == 5.0
    assert TrainConfig(min_snr_gamma=5.0).min_snr_gamma is None  # configs of earlier versions load
