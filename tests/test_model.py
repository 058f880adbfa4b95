import math

import pytest
import torch
from conftest import gaussian_eps_model

from unnoise import DiffusionModel
from unnoise.elbo import elbo_bpd
from unnoise.nets.mlp import ResidualMLP

f64 = torch.float64


def test_ancestral_sampling_with_the_exact_model_reproduces_the_data_law():
    mu, s, n = 0.3, 0.5, 20_000
    dm = DiffusionModel(lambda x, t: x, T=1000, data_shape=(1,))
    dm.model = gaussian_eps_model(dm.schedule, mu, s)
    seen = []
    x = dm.sample(n, generator=torch.Generator().manual_seed(0), dtype=f64, callback=lambda t, x, x0: seen.append(t))
    assert seen == list(range(1000, 0, -1))
    assert abs(x.mean().item() - mu) < 5 * s / math.sqrt(n)
    assert abs(x.var().item() - s**2) < 5 * s**2 * math.sqrt(2 / n)


def test_q_sample_is_the_closed_form():
    dm = DiffusionModel(lambda x, t: x, T=100)
    x0 = torch.randn(5, 3, dtype=f64)
    noise = torch.randn(5, 3, dtype=f64)
    t = torch.tensor([0, 1, 10, 50, 100])
    ab = dm.schedule.alpha_bar[t][:, None]
    torch.testing.assert_close(dm.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"prediction": "v", "min_snr_gamma": 5.0},
        {"variance": "learned_range", "loss": "hybrid", "timestep_sampling": "loss_aware"},
        {"variance": "learned_range", "loss": "vlb", "beta_schedule": "cosine"},
    ],
)
def test_training_lowers_the_loss(kw):
    torch.manual_seed(0)
    out = 4 if kw.get("variance") == "learned_range" else 2
    dm = DiffusionModel(ResidualMLP(2, 64, 2, out_dim=out), T=100, decoder="gaussian", data_shape=(2,), **kw)
    opt = torch.optim.Adam(dm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.5, -0.5]]).repeat(256, 1) + 0.05 * torch.randn(256, 2, generator=g)
    losses = []
    for _ in range(150):
        loss = dm.loss(x0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20])
    assert dm.sample(8).shape == (8, 2)


def test_elbo_bpd_composes_the_functional_form():
    dm = DiffusionModel(lambda x, t: x, T=50, decoder="gaussian")
    dm.model = gaussian_eps_model(dm.schedule, 0.0, 0.5)
    x = torch.randn(12, 2, dtype=f64) * 0.5
    a = dm.elbo_bpd(x, batch_size=5, generator=torch.Generator().manual_seed(0))
    b = elbo_bpd(dm.model, x.split(5), dm.schedule, decoder="gaussian", generator=torch.Generator().manual_seed(0))
    assert a.bpd == b.bpd and a.terms.shape == (50,)


def test_bad_options_fail_at_construction():
    net = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown prediction"):
        DiffusionModel(net, prediction="score")
    with pytest.raises(ValueError, match="needs variance='learned_range'"):
        DiffusionModel(net, loss="hybrid")
    with pytest.raises(ValueError, match="unknown timestep_sampling 'x'; allowed: uniform, loss_aware"):
        DiffusionModel(net, timestep_sampling="x")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        DiffusionModel(net, beta_schedule="quadratic")
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        DiffusionModel(net, T=0)
    with pytest.raises(ValueError, match="data_shape"):
        DiffusionModel(net).sample(4)
    with pytest.raises(ValueError, match="NaN"):
        DiffusionModel(net).loss(torch.tensor([[float("nan"), 1.0]]))
