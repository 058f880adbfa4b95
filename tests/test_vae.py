"""The KL autoencoder: shapes, the KL and likelihood terms against closed forms, the reparameterisation, training."""

import math
from dataclasses import replace

import pytest
import torch

from unnoise.nets.vae import (
    AutoencoderKL,
    VAEConfig,
    gaussian_kl_standard,
    gaussian_nll,
    latent_scale_factor,
    reparameterize,
    vae_loss,
)
from unnoise.schema import from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> VAEConfig:
    return replace(VAEConfig.preset("tiny", image_size=8), **kw)


def test_shapes_56_to_14x14x4_and_tiny():
    cfg = VAEConfig()
    assert cfg.latent_shape == (4, 14, 14) and cfg.factor == 4
    vae = AutoencoderKL(cfg)
    mean, logvar = vae.encode(torch.rand(2, 1, 56, 56) * 2 - 1)
    assert mean.shape == logvar.shape == (2, 4, 14, 14)
    assert vae.decode(mean).shape == (2, 1, 56, 56)
    assert 100_000 < sum(p.numel() for p in vae.parameters()) < 2_000_000
    small = AutoencoderKL(tiny(in_channels=3))
    x_hat, mean, _ = small(torch.randn(3, 3, 8, 8))
    assert x_hat.shape == (3, 3, 8, 8) and mean.shape == (3, 2, 4, 4)


def test_kl_matches_the_closed_form_by_hand():
    mu, s = torch.randn(4, 2, 3, 3), torch.rand(4, 2, 3, 3) + 0.1
    # KL(N(mu, s^2) || N(0, 1)) = log(1 / s) + (s^2 + mu^2) / 2 - 1/2, per element
    by_hand = (torch.log(1 / s) + (s**2 + mu**2) / 2 - 0.5).flatten(1).sum(1)
    ours = gaussian_kl_standard(mu, 2 * s.log())
    torch.testing.assert_close(ours, by_hand)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mu, s), torch.distributions.Normal(0, 1))
    torch.testing.assert_close(ours, reference.flatten(1).sum(1))
    assert gaussian_kl_standard(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max() == 0  # q = prior


def test_gaussian_nll_matches_torch_distributions():
    x, m = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for logvar in (torch.tensor(0.0), torch.tensor(-2.3)):
        ref = -torch.distributions.Normal(m, (0.5 * logvar).exp()).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(gaussian_nll(x, m, logvar), ref)


def test_reparameterisation_has_the_posterior_moments():
    mean, logvar = torch.tensor([[-1.0, 0.5, 3.0]]), torch.tensor([[0.0, -2.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    z = torch.stack([reparameterize(mean, logvar, g) for _ in range(20_000)])  # (n, 1, 3)
    n = z.shape[0]
    var = logvar.exp()
    # the sample mean's standard error is sqrt(var / n); 5 of them is a generous bound
    assert ((z.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    # the sample variance's standard error is var * sqrt(2 / (n - 1)) for a Gaussian
    assert ((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(reparameterize(mean, logvar, g1), reparameterize(mean, logvar, g2))


@pytest.mark.parametrize("variance", ["optimal", "learned", "fixed"])
def test_elbo_is_recon_plus_kl_and_recon_is_the_decoder_likelihood_of_the_sample(variance):
    vae = AutoencoderKL(tiny(decoder_variance=variance, logvar_init=-1.0)).eval()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    terms = vae_loss(vae, x, kl_weight=0.1, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(terms.nelbo, terms.recon + terms.kl, rtol=0, atol=0)
    torch.testing.assert_close(terms.loss, terms.recon + 0.1 * terms.kl)
    mean, logvar = vae.encode(x)
    z = reparameterize(mean, logvar, torch.Generator().manual_seed(7))
    x_hat = vae.decode(z)
    # sigma_x: the batch's root mean squared error ("optimal"), else exp(logvar_init / 2)
    sigma = (x - x_hat).square().mean().sqrt() if variance == "optimal" else torch.tensor(math.exp(-0.5))
    torch.testing.assert_close(terms.decoder_logvar, 2 * sigma.log())
    p = torch.distributions.Normal(x_hat, sigma)
    torch.testing.assert_close(terms.recon, -p.log_prob(x).flatten(1).sum(1).mean())
    torch.testing.assert_close(terms.kl, gaussian_kl_standard(mean, logvar).mean())


def test_decoder_variance_is_optimal_learned_or_fixed():
    learned = AutoencoderKL(tiny(decoder_variance="learned"))
    fixed = AutoencoderKL(tiny(decoder_variance="fixed", logvar_init=-4.0))
    assert "decoder_logvar" in dict(learned.named_parameters())
    assert "decoder_logvar" not in dict(fixed.named_parameters()) and fixed.state_dict()["decoder_logvar"] == -4.0
    assert not any("logvar" in k for k in AutoencoderKL(tiny()).state_dict())  # optimal: nothing to store
    vae_loss(learned, torch.randn(2, 1, 8, 8)).loss.backward()
    assert learned.decoder_logvar.grad is not None
    # the optimal sigma_x^2 never drops below the variance of rounding to 256 levels
    x = torch.zeros(1, 1, 8, 8)
    floor = AutoencoderKL(tiny()).likelihood_logvar(x, x + 1e-6)
    assert floor.item() == pytest.approx(math.log((2 / 255) ** 2 / 12))


def test_a_few_hundred_steps_reduce_the_loss():
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny())
    # 8 images of smooth blobs: learnable structure, not noise
    grid = torch.linspace(-1, 1, 8)
    centers = torch.rand(8, 2) * 1.4 - 0.7
    cy, cx = centers[:, 0].reshape(-1, 1, 1), centers[:, 1].reshape(-1, 1, 1)
    d2 = (grid.reshape(1, -1, 1) - cy) ** 2 + (grid.reshape(1, 1, -1) - cx) ** 2  # (8, 8, 8)
    x = (2 * torch.exp(-d2 / 0.2) - 1).unsqueeze(1)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = vae_loss(vae, x, generator=g).nelbo.item()
    for _ in range(300):
        terms = vae_loss(vae, x, generator=g)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
    with torch.no_grad():
        last = torch.stack([vae_loss(vae, x, generator=g).nelbo for _ in range(4)]).mean().item()
    assert last < first - 0.5 * abs(first), (first, last)
    assert terms.decoder_logvar < -2.0  # sigma_x^2, the batch's MSE, is well below the data's variance


def test_the_learned_decoder_variance_is_optimal_at_the_mean_squared_error():
    """d/d logvar of 1/2 sum((x - m)^2 e^-logvar + logvar) = 0 at e^logvar = mean((x - m)^2)."""
    x, m = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    logvar = (x - m).square().mean().log().clone().requires_grad_()
    gaussian_nll(x, m, logvar).sum().backward()
    assert abs(logvar.grad.item()) < 1e-4
    for shift in (-0.1, 0.1):
        assert gaussian_nll(x, m, logvar.detach() + shift).sum() > gaussian_nll(x, m, logvar.detach()).sum()


class LinearEncoder(torch.nn.Module):
    """q(z | x) = N(a x, s^2): the latents' std is sqrt(a^2 var(x) + s^2) in closed form."""

    def __init__(self, a: float, s: float):
        super().__init__()
        self.a, self.s = a, s

    def encode(self, x):
        return self.a * x, torch.full_like(x, 2 * math.log(self.s))


def test_latent_scale_factor_is_one_over_the_latent_std():
    x = torch.randn(4000, 1, 4, 4)  # var(x) = 1
    g = torch.Generator().manual_seed(1)  # not 0: conftest's global seed 0 drew x, and eps = x would give 7x
    f = latent_scale_factor(LinearEncoder(3.0, 4.0), x, batch_size=512, sample=True, generator=g)
    assert f == pytest.approx(1 / 5.0, rel=0.01)  # 1 / sqrt(9 + 16)
    f_mean = latent_scale_factor(LinearEncoder(3.0, 4.0), x)  # the posterior mean by default
    assert f_mean == pytest.approx(1 / 3.0, rel=0.01)
    with pytest.raises(ValueError, match="std 0"):
        latent_scale_factor(LinearEncoder(0.0, 1.0), x, sample=False)


def test_bad_configs_name_what_is_allowed():
    with pytest.raises(ValueError, match="multiples of 4"):
        VAEConfig(image_size=30)
    with pytest.raises(ValueError, match="allowed: 'optimal', 'learned', 'fixed'"):
        VAEConfig(decoder_variance="free")
    with pytest.raises(ValueError, match="z_channels must be >= 1"):
        VAEConfig(z_channels=0)
    with pytest.raises(ValueError, match="'vae.json': unknown settings depth"):
        from_dict(VAEConfig, {"depth": 3}, "'vae.json'")
    assert from_dict(VAEConfig, {"channel_mults": [1, 2], "z_channels": 3}, "x") == VAEConfig(
        channel_mults=(1, 2), z_channels=3
    )
    with pytest.raises(ValueError, match="kl_weight"):
        vae_loss(AutoencoderKL(tiny()), torch.zeros(1, 1, 8, 8), kl_weight=-1)
