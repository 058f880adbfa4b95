import math

import numpy as np
import pytest
import torch

from unnoise.schedules import (
    SCHEDULE_NAMES,
    ContinuousVP,
    EDMRange,
    make_schedule,
    rescale_zero_terminal_snr,
)


def test_cosine_matches_the_formula_written_out():
    T, s = 1000, 0.008
    sched = make_schedule("cosine", T)
    t = np.arange(T + 1)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    ab = f / f[0]
    # beta is clipped at 0.999 only in the last step; before it alpha_bar follows the formula.
    np.testing.assert_allclose(sched.alpha_bar[: T - 1].numpy(), ab[: T - 1], rtol=1e-12)
    assert sched.betas.max().item() == pytest.approx(0.999)
    assert 1e4 < sched.sigma_max < 1e5  # about 2e4, the low-NFE stress case


def test_linear_endpoints_and_scaling_with_T():
    s = make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # iDDPM scaling keeps the end point alpha_bar_T about the same for any T.
    ends = [make_schedule("linear", T).alpha_bar[-1].item() for T in (100, 1000, 4000)]
    assert all(1e-5 < e < 1e-4 for e in ends)


@pytest.mark.parametrize(
    "name, diffusers_name, kw",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("sigmoid", "sigmoid", {}),
        ("cosine", "squaredcos_cap_v2", {}),
    ],
)
def test_betas_equal_diffusers(name, diffusers_name, kw):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, **kw).betas.double()
    ours = make_schedule(name, 1000).betas
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-9)  # diffusers is float32


def test_zero_terminal_snr_equals_diffusers_and_lin_et_al():
    sched = make_schedule("linear", 1000, zero_terminal_snr=True)
    base = make_schedule("linear", 1000)
    assert sched.alpha_bar[-1].item() == 0.0 and sched.betas[-1].item() == pytest.approx(1.0)
    assert sched.alpha_bar[1].item() == pytest.approx(base.alpha_bar[1].item(), rel=1e-12)
    assert (sched.alpha_bar[1:] < sched.alpha_bar[:-1]).all()
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as reference

    ref = reference(base.betas.clone())  # float64 in, float64 out
    np.testing.assert_allclose(rescale_zero_terminal_snr(base.betas).numpy(), ref.numpy(), rtol=1e-12, atol=1e-15)


def test_t_over_T_warns_and_destroys_signal():
    with pytest.warns(UserWarning, match="beta_T = 1"):
        s = make_schedule("t_over_T", 50)
    assert s.alpha_bar[-1].item() == 0.0 and math.isinf(s.sigma_max)
    assert s.alpha_bar[25].item() < 1e-3  # half-way through, little signal is left


@pytest.mark.parametrize("name", [n for n in SCHEDULE_NAMES if n != "t_over_T"])
def test_sigma_logsnr_and_inverse_at_fractional_t(name):
    s = make_schedule(name, 1000)
    t = torch.tensor([0.0, 0.5, 1.0, 1.25, 17.5, 500.0, 999.9, 1000.0], dtype=torch.float64)
    sig = s.sigma(t)
    ab = s.alpha_bar_at(t)
    torch.testing.assert_close(sig, ((1 - ab) / ab).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(s.log_snr(t[1:]), (ab[1:] / (1 - ab[1:])).log(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.t_from_sigma(sig), t, rtol=0, atol=1e-8)
    # integer t reproduce the table; fractional t lie in between (monotone)
    torch.testing.assert_close(s.alpha_bar_at(torch.arange(1001.0)), s.alpha_bar, rtol=1e-12, atol=0)
    assert (s.sigma(t[1:]) > s.sigma(t[:-1])).all()


def test_custom_array_and_function():
    betas = torch.linspace(1e-3, 0.05, 20, dtype=torch.float64)
    a = make_schedule(betas)
    b = make_schedule(lambda u: 1e-3 + (0.05 - 1e-3) * (u * 20 - 1) / 19, T=20)
    torch.testing.assert_close(a.alpha_bar, b.alpha_bar, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.alpha_bar, torch.cat([torch.ones(1, dtype=torch.float64), (1 - betas).cumprod(0)]))


def test_continuous_vp_and_edm():
    vp = ContinuousVP(0.1, 20.0)
    t = torch.tensor([0.01, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.alpha_bar_at(t), torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2)))
    torch.testing.assert_close(vp.t_from_sigma(vp.sigma(t)), t, rtol=1e-10, atol=0)
    edm = EDMRange()
    assert edm.sigma(3.0).item() == 3.0 and edm.alpha_bar_at(1.0).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args, match",
    [
        (("nope", 10), "unknown beta schedule 'nope'; allowed: linear, cosine"),
        (("linear", 0), "T must be an integer >= 1"),
        (("linear", 2.5), "T must be an integer >= 1"),
        (([0.1, 0.0, 0.2],), r"beta_2 = 0 is outside \(0, 1\]"),
        (([0.1, 1.5],), r"beta_2 = 1.5 is outside \(0, 1\]"),
        (([0.1, float("nan")],), r"outside \(0, 1\]"),
        (([],), "betas is empty"),
        ((lambda u: u[:3], 10), r"beta function returned shape \(3,\); expected \(10,\)"),
    ],
)
def test_bad_input_names_what_is_allowed(args, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(*args)


def test_bad_continuous_ranges():
    with pytest.raises(ValueError, match="beta_min <= beta_max"):
        ContinuousVP(5.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMRange(1.0, 0.5)


def test_diffwave_schedule_is_the_papers_base_process():
    """Kong et al. (2021): T = 50, betas linspace(1e-4, 0.05); other T keep the process (alpha_bar_T)."""
    s = make_schedule("diffwave", 50)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.05, 50, dtype=torch.float64), rtol=0, atol=1e-15)
    ab_T = torch.prod(1 - torch.linspace(1e-4, 0.05, 50, dtype=torch.float64))
    assert s.alpha_bar[-1].item() == pytest.approx(ab_T.item(), rel=1e-12)
    # 50 / T scaling keeps the sum of betas exactly, so log alpha_bar_T agrees to first order in beta.
    finer = make_schedule("diffwave", 200)
    assert finer.betas.sum().item() == pytest.approx(s.betas.sum().item(), rel=1e-12)
    assert math.log(finer.alpha_bar[-1].item() / ab_T.item()) == pytest.approx(0.0, abs=(s.betas**2).sum().item())
