"""rk45 under an evaluation budget: never more calls than ``nfe``, the accuracy it reached in
``info`` and an AccuracyWarning, convergence to the exact PF-ODE solution as the budget grows."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from samplers_reference import gaussian_denoiser

import unnoise
from unnoise.modalities.toy.data import ring_mixture
from unnoise.sampling.classical import RK45_ADAPTIVE_NFE, AccuracyWarning, budget_tolerance
from unnoise.sampling.front import CountingDenoiser
from unnoise.sampling.ode import solve_rk45

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mixtures import mixture_32d  # noqa: E402  (the benchmark's fixed cases)

f64 = torch.float64
MIXTURES = {"2d": ring_mixture, "32d": mixture_32d, "32d-far": lambda: mixture_32d(1.5)}


def _exact(mix, x: torch.Tensor, sched) -> torch.Tensor:
    """The PF-ODE from sigma_max to sigma_min at rtol = atol = 1e-10, then D(x, sigma_min): the
    same end point a budgeted run aims at."""
    sigma = torch.tensor([sched.sigma_max, sched.sigma_min, 0.0], dtype=f64)
    return unnoise.SAMPLERS["rk45"](mix.denoise, x, sigma, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("label", list(MIXTURES))
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_rk45_keeps_every_budget_and_says_what_it_did(label, schedule):
    mix, sched = MIXTURES[label](), unnoise.make_schedule(schedule, 1000)
    x = sched.sigma_max * torch.randn(64, mix.dim, generator=torch.Generator().manual_seed(3), dtype=f64)
    for nfe in (5, 10, 20, 50, RK45_ADAPTIVE_NFE):
        D, info = CountingDenoiser(mix.denoise), {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = unnoise.sample(
                D, x, sampler="rk45", nfe=nfe, sigma_max=sched.sigma_max, sigma_min=sched.sigma_min, info=info
            )
        assert D.nfe <= nfe and info["nfe"] == D.nfe and torch.isfinite(out).all()
        fixed = [w for w in caught if issubclass(w.category, AccuracyWarning)]
        if nfe < RK45_ADAPTIVE_NFE:  # no error control affordable: UniPC with the whole budget
            assert info["method"] == "unipc" and info["fixed_steps"] == nfe == D.nfe
            assert len(fixed) == 1 and "no error control" in str(fixed[0].message)
        else:
            assert info["method"].startswith("dopri5") and info["max_error"] <= 1
            assert info["rtol"] == info["atol"] == budget_tolerance(nfe)
            assert bool(fixed) == (info["method"] != "dopri5")


def test_rk45_below_its_minimum_is_one_line():
    with pytest.raises(ValueError, match=r"^rk45 needs nfe >= 2, got 1$"):
        unnoise.sample(
            gaussian_denoiser(0.0, 1.0), torch.zeros(2, 2), sampler="rk45", nfe=1, sigma_max=80.0, sigma_min=0.01
        )


def test_rk45_out_of_budget_at_a_tight_tolerance_finishes_with_unipc_and_warns():
    mix, sched = mixture_32d(), unnoise.make_schedule("cosine", 1000)
    x = sched.sigma_max * torch.randn(32, mix.dim, generator=torch.Generator().manual_seed(4), dtype=f64)
    D, info = CountingDenoiser(mix.denoise), {}
    with pytest.warns(AccuracyWarning, match=r"error-controlled at rtol=1e-08 down to sigma .*, then \d+ fixed"):
        unnoise.sample(
            D,
            x,
            sampler="rk45",
            nfe=60,
            sigma_max=sched.sigma_max,
            sigma_min=sched.sigma_min,
            rtol=1e-8,
            atol=1e-8,
            info=info,
        )
    assert info["method"] == "dopri5+unipc" and D.nfe == info["nfe"] <= 60
    assert sched.sigma_min < info["sigma_controlled"] < sched.sigma_max and info["fixed_steps"] >= 3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_rk45_approaches_the_exact_solution_as_the_budget_grows(schedule):
    mix, sched = mixture_32d(), unnoise.make_schedule(schedule, 1000)
    x = sched.sigma_max * torch.randn(64, mix.dim, generator=torch.Generator().manual_seed(5), dtype=f64)
    ref = _exact(mix, x, sched)
    errors = []
    for nfe in (200, 400, 800):
        info = {}
        out = unnoise.sample(
            mix.denoise, x, sampler="rk45", nfe=nfe, sigma_max=sched.sigma_max, sigma_min=sched.sigma_min, info=info
        )
        assert info["method"] == "dopri5"
        errors.append((out - ref).pow(2).mean().sqrt().item())
    assert errors[0] > errors[1] > errors[2]
    # Local errors <= tol at each of ~N/6 steps of a contracting flow: the global error stays
    # within a modest multiple of the tolerance times the data scale (|x| ~ 1 here).
    assert errors[2] <= 10 * budget_tolerance(800) * math.sqrt(800 / 6)


def test_solve_rk45_stops_before_a_step_it_cannot_pay_for():
    mu, s, s_max, s_min = 0.3, 0.5, 80.0, 1e-3
    D = gaussian_denoiser(mu, s)
    x = s_max * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=f64)

    def f(log_sigma, y):
        return (y[0] - D(y[0], math.exp(log_sigma)),)

    (y,), stats = solve_rk45(f, (x,), math.log(s_max), math.log(s_min), rtol=1e-9, atol=1e-9, max_nfe=40, stop=True)
    assert stats.nfe <= 40 and math.log(s_min) < stats.t < math.log(s_max)
    sigma = math.exp(stats.t)  # closed form: mu + sqrt((s^2 + sigma^2) / (s^2 + s_max^2)) (x - mu)
    exact = mu + math.sqrt((s**2 + sigma**2) / (s**2 + s_max**2)) * (x - mu)
    torch.testing.assert_close(y, exact, rtol=0, atol=1e-6)
