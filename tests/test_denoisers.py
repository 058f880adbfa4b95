import math

import pytest
import torch

from unnoise.denoisers import (
    EDMPrecond,
    edm_coefficients,
    edm_training_target,
    from_continuous,
    from_diffusers_unet,
    from_discrete,
)
from unnoise.diffusion import v_from_x0_eps
from unnoise.schedules import ContinuousVP, make_schedule

SCHEDULES = {"linear": make_schedule("linear", 1000), "cosine": make_schedule("cosine", 1000)}
# Integer and fractional steps, away from the cosine schedule's huge sigma at t ~ T.
TS = torch.tensor([1.0, 2.5, 10.0, 250.75, 500.0, 900.3], dtype=torch.float64)


class Oracle:
    """A fake network that knows x0: returns the exact eps / x0 / v of x_t at the time it is told.

    ``alpha_bar_at(t + offset)`` is the schedule's alpha_bar at the step the network believes it
    sees; every call's t is recorded.
    """

    def __init__(self, schedule, x0, prediction, offset=0, extra=None):
        self.schedule, self.x0, self.prediction, self.offset, self.extra = schedule, x0, prediction, offset, extra
        self.calls = []

    def __call__(self, x_t, t):
        self.calls.append(t.clone())
        ab = self.schedule.alpha_bar_at((t + self.offset).double()).to(x_t.dtype)
        ab = ab.reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": self.x0, "v": v_from_x0_eps(self.x0, eps, ab.flatten())}[self.prediction]
        return out if self.extra is None else torch.cat([out, self.extra], dim=1)


def _data(B=6, dtype=torch.float64):  # B = len(TS)
    return torch.randn(B, 2, 3, 3, dtype=dtype), torch.randn(B, 2, 3, 3, dtype=dtype)


def _noisy(x0, n, sigma):
    return x0 + (sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma) * n


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_exact_network_gives_x0(name, prediction):
    schedule = SCHEDULES[name]
    x0, n = _data()
    oracle = Oracle(schedule, x0, prediction)
    D = from_discrete(oracle, schedule, prediction=prediction)
    sigmas = schedule.sigma(TS)
    torch.testing.assert_close(D(_noisy(x0, n, sigmas), sigmas), x0, atol=1e-10, rtol=0)  # sigma (B,)
    for sigma in sigmas:  # sigma 0-dim, one level for the whole batch
        torch.testing.assert_close(D(_noisy(x0, n, sigma), sigma), x0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("offset", [0, 1])
def test_model_receives_t_of_sigma(offset):
    schedule = SCHEDULES["linear"]
    x0, n = _data(dtype=torch.float32)
    oracle = Oracle(schedule, x0, "eps", offset=offset)
    D = from_discrete(oracle, schedule, timestep_offset=offset)
    sigmas = schedule.sigma(TS)
    out = D(_noisy(x0, n, sigmas.float()), sigmas)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    (t,) = oracle.calls
    assert t.shape == (len(TS),) and t.dtype == torch.float32
    torch.testing.assert_close(t.double() + offset, TS, atol=1e-4, rtol=0)
    # In float64 the map is exact: schedule.sigma(t) == sigma.
    D(_noisy(x0, n, sigmas).double(), sigmas)
    torch.testing.assert_close(schedule.sigma(oracle.calls[-1] + offset), sigmas, atol=0, rtol=1e-12)
    D(x0.double(), sigmas[3])  # a 0-dim sigma still reaches the network as a (B,) tensor
    assert oracle.calls[-1].shape == (len(TS),)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_nearest_calls_integer_steps_and_converts_with_actual_sigma(prediction):
    schedule = SCHEDULES["linear"]
    x0, n = _data()
    calls = []

    def network(x_t, t):  # the true eps (= n) or x0 of x_t, whatever t it is told
        calls.append(t)
        return n if prediction == "eps" else x0

    D = from_discrete(network, schedule, prediction=prediction, t_map="nearest")
    sigmas = torch.cat([schedule.sigma(TS), torch.tensor([1e-6, 1e3], dtype=torch.float64)])
    x0, n = x0.repeat(2, 1, 1, 1)[: len(sigmas)], n.repeat(2, 1, 1, 1)[: len(sigmas)]
    torch.testing.assert_close(D(_noisy(x0, n, sigmas), sigmas), x0, atol=1e-10, rtol=0)
    (t,) = calls
    assert torch.equal(t, t.round()) and t.min() >= 1 and t.max() <= schedule.T
    expected = schedule.t_from_sigma(sigmas).round().clamp(1, schedule.T)
    assert torch.equal(t, expected)
    assert t[-2] == 1 and t[-1] == schedule.T


def test_nearest_with_offset():
    schedule = SCHEDULES["linear"]
    seen = []
    D = from_discrete(
        lambda x_t, t: seen.append(t) or torch.zeros_like(x_t), schedule, t_map="nearest", timestep_offset=1
    )
    D(torch.zeros(3, 1, dtype=torch.float64), schedule.sigma(torch.tensor([1.2, 7.6, 1000.0], dtype=torch.float64)))
    assert seen[0].tolist() == [0.0, 7.0, 999.0]


def test_with_variance_one_call():
    schedule = SCHEDULES["linear"]
    x0, n = _data()
    v = 1.5 * torch.randn_like(x0)  # beyond [-1, 1] on purpose: frac must be clamped
    oracle = Oracle(schedule, x0, "eps", extra=v)
    D = from_discrete(oracle, schedule, variance="learned_range")
    sigmas = schedule.sigma(TS)
    x = _noisy(x0, n, sigmas)
    x0_hat, frac = D.with_variance(x, sigmas)
    assert len(oracle.calls) == 1
    assert frac.shape == x.shape and frac.min() >= 0 and frac.max() <= 1
    torch.testing.assert_close(frac, ((v + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(x0_hat, x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(D(x, sigmas), x0_hat, atol=0, rtol=0)
    assert len(oracle.calls) == 2


def test_variance_errors():
    schedule = SCHEDULES["linear"]
    x = torch.zeros(2, 3, 4)
    D = from_discrete(lambda x_t, t: x_t, schedule, variance="learned_range")  # C outputs, not 2C
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        D(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="learned_range"):
        from_discrete(lambda x_t, t: x_t, schedule).with_variance(x, torch.tensor(1.0))


def test_attributes_and_sigma_checks():
    schedule = SCHEDULES["cosine"]
    D = from_discrete(lambda x_t, t: x_t, schedule, prediction="v")
    assert D.schedule is schedule and D.prediction == "v"
    assert D.sigma_min == schedule.sigma_min and D.sigma_max == schedule.sigma_max
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"shape \(\) or \(2,\)"):
        D(x, torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        D(x, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="output shape"):
        from_discrete(lambda x_t, t: x_t[:1], schedule)(x, torch.tensor(1.0))
    assert torch.equal(from_discrete(lambda x_t, t: x_t, schedule)(x + 1, 0.0), x + 1)  # sigma = 0: D(x) = x


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_continuous_vp_round_trip(prediction):
    schedule = ContinuousVP()
    x0, n = _data()
    seen = []

    def network(x_t, t):
        seen.append(t)
        ab = schedule.alpha_bar_at(t).reshape(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]

    D = from_continuous(network, schedule, prediction=prediction)
    ts = torch.tensor([1e-3, 0.01, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    sigmas = schedule.sigma(ts)
    torch.testing.assert_close(D(_noisy(x0, n, sigmas), sigmas), x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(seen[-1], ts, atol=1e-12, rtol=0)
    for sigma in sigmas:
        torch.testing.assert_close(D(_noisy(x0, n, sigma), sigma), x0, atol=1e-10, rtol=0)
    assert D.sigma_min == schedule.sigma_min and D.sigma_max == schedule.sigma_max


def test_edm_coefficients_table_1():
    sd = 0.5
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    c = edm_coefficients(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert c.c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-14)
        assert c.c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert c.c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert c.c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-14)
    # EDM App. B.6: unit-variance input, and a unit-variance target (x0 - c_skip x) / c_out for
    # x0 of variance sd^2: ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1.
    ones = torch.ones_like(sigma)
    torch.testing.assert_close(c.c_in**2 * (sigma**2 + sd**2), ones)
    torch.testing.assert_close(((1 - c.c_skip) ** 2 * sd**2 + c.c_skip**2 * sigma**2) / c.c_out**2, ones)


@pytest.mark.parametrize("batched", [False, True])
def test_edm_precond_recovers_x0_from_target(batched):
    sd = 0.7
    x0, n = _data()
    sigma = torch.tensor([0.01, 0.3, 0.7, 2.0, 10.0, 80.0], dtype=torch.float64) if batched else torch.tensor(3.0)
    sigma = sigma.double()
    x = _noisy(x0, n, sigma)
    seen = []

    def F(inp, c_noise):
        seen.append((inp, c_noise))
        return edm_training_target(x0, x, sigma, sd)

    D = EDMPrecond(F, sigma_data=sd)
    torch.testing.assert_close(D(x, sigma), x0, atol=1e-10, rtol=0)
    inp, c_noise = seen[0]
    s = sigma.reshape(-1, 1, 1, 1) if batched else sigma
    torch.testing.assert_close(inp, x / (s**2 + sd**2).sqrt())
    assert c_noise.shape == (x.shape[0],)
    torch.testing.assert_close(c_noise, (sigma.log() / 4).expand(x.shape[0]))


def test_edm_precond_dtype_and_errors():
    D = EDMPrecond(lambda inp, c_noise: inp)
    x = torch.randn(2, 3)
    assert D(x, torch.tensor(1.0, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(lambda inp, c_noise: inp, sigma_data=0.0)


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"prediction": "epsilon"}, "allowed: eps, x0, v"),
        ({"t_map": "round"}, "allowed: interp, nearest"),
        ({"variance": "fixed_small"}, "allowed: fixed, learned_range"),
        ({"timestep_offset": 0.5}, "timestep_offset"),
    ],
)
def test_bad_options(kwargs, allowed):
    with pytest.raises(ValueError, match=allowed):
        from_discrete(lambda x_t, t: x_t, SCHEDULES["linear"], **kwargs)


def test_bad_continuous_prediction():
    with pytest.raises(ValueError, match="allowed: eps, x0, v"):
        from_continuous(lambda x_t, t: x_t, ContinuousVP(), prediction="score")


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def test_from_diffusers_unet_matches_manual_call():
    unet = _tiny_unet()
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    D = from_diffusers_unet(unet, scheduler)
    assert D.prediction == "eps" and D.timestep_offset == 1 and D.schedule.T == 1000
    torch.testing.assert_close(D.schedule.alpha_bar[1:].float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    t = torch.tensor([1, 10, 500, 1000])
    sigma = D.schedule.sigma(t.double())
    x = torch.randn(4, 1, 8, 8)
    # D = x - sigma eps multiplies the network's float32 rounding (which depends on the thread
    # count) by sigma, 0.01 to 157 here: the bound is 1e-5 of x's scale plus 1e-5 of sigma's.
    with torch.no_grad():
        s = sigma.float().reshape(-1, 1, 1, 1)
        manual = x - s * unet(x / (1 + s**2).sqrt(), t - 1).sample
        assert ((D(x, sigma) - manual).abs() <= 1e-5 * (1 + s)).all()
        s = sigma[1].float()  # one sigma for the batch
        manual = x - s * unet(x / (1 + s**2).sqrt(), t[1] - 1).sample
        assert ((D(x, sigma[1]) - manual).abs() <= 1e-5 * (1 + s)).all()


def test_from_diffusers_prediction_types():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    expected = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    for prediction_type, prediction in expected.items():
        D = from_diffusers_unet(None, DDPMScheduler(prediction_type=prediction_type))
        assert D.prediction == prediction and D.variance == "fixed"
    assert from_diffusers_unet(None, DDPMScheduler(variance_type="learned_range")).variance == "learned_range"
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction, sample"):
        from_diffusers_unet(None, DDPMScheduler(prediction_type="flow"))


def test_bf16_autocast_runs_the_network_in_bf16_and_returns_x_dtype():
    from unnoise.denoisers import bf16_autocast

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    x = torch.randn(32, 64)
    with torch.no_grad():
        exact, fast = net(x), bf16_autocast(net)(x)
    assert fast.dtype == torch.float32
    assert not torch.equal(fast, exact)  # the linear layers did run in bf16
    # bf16 keeps 8 mantissa bits: each rounding errs by at most 2^-9 relative; two layers, a few roundings
    assert (fast - exact).abs().max() <= 2**-5 * exact.abs().max()
