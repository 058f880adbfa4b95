import math

import pytest
import torch

import unnoise
from unnoise.modalities.toy.data import GaussianMixture, ring_mixture
from unnoise.sampling.grids import TUNED, density_grid, make_grid, tuned_parameters
from unnoise.schedules import make_schedule

f64 = torch.float64


def test_karras_grid_is_edm_equation_5():
    n, lo, hi, rho = 7, 0.002, 80.0, 7.0
    g = make_grid("karras", n, lo, hi)
    want = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    torch.testing.assert_close(g, torch.tensor(want, dtype=f64), rtol=1e-12, atol=0)


def test_log_snr_grid_is_uniform_in_log_sigma():
    g = make_grid("log_snr", 9, 0.01, 100.0)
    steps = g[:-1].log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(1e-4) / 8))
    assert g[0].item() == pytest.approx(100.0) and g[-2].item() == pytest.approx(0.01) and g[-1] == 0


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_uniform_t_grids_visit_diffusers_timesteps(spacing):
    diffusers = pytest.importorskip("diffusers")
    sched = make_schedule("linear", 1000)
    for n in (7, 10, 50):
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
        ref.set_timesteps(n)
        g = make_grid(spacing, n, sched.sigma_min, sched.sigma_max, schedule=sched)
        t = sched.t_from_sigma(g[:-1])  # our steps are diffusers' indices + 1
        torch.testing.assert_close(t, ref.timesteps.double() + 1, rtol=0, atol=1e-6)


def test_linspace_grid_visits_eulers_fractional_timesteps():
    diffusers = pytest.importorskip("diffusers")
    sched = make_schedule("cosine", 1000)
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="squaredcos_cap_v2")
    ref.set_timesteps(12)
    g = make_grid("linspace", 12, sched.sigma_min, sched.sigma_max, schedule=sched)
    torch.testing.assert_close(sched.t_from_sigma(g[:-1]), ref.timesteps.double() + 1, rtol=0, atol=1e-4)


def test_density_grid_with_only_the_floor_is_log_uniform():
    a = density_grid(9, 0.01, 100.0, center=1.0, width=1.0, floor=1.0, tail=0.0)
    torch.testing.assert_close(a, make_grid("log_snr", 9, 0.01, 100.0), rtol=1e-9, atol=0)
    # tail = 1 stops one step short: the quantiles i / n instead of i / (n - 1)
    b = density_grid(4, 0.01, 100.0, center=1.0, width=1.0, floor=1.0, tail=1.0)
    torch.testing.assert_close(b[:-1].log(), torch.tensor([4.0, 2.0, 0.0, -2.0], dtype=f64) * math.log(10) * 0.5)


def test_density_grid_puts_steps_where_the_density_is():
    g = density_grid(20, 0.002, 80.0, center=0.5, width=0.5, floor=0.0, tail=0.0)
    near = ((g[:-1] > 0.5 * math.exp(-1)) & (g[:-1] < 0.5 * math.exp(1))).sum().item()
    assert near >= 12  # about 68% of the mass within one width, plus the end points elsewhere


@pytest.mark.parametrize("sampler", [*TUNED, "ddim", None])
def test_tuned_grids_are_valid_at_every_step_count(sampler):
    sched = make_schedule("cosine", 1000)
    for n in range(1, 61):
        g = make_grid("tuned", n, sched.sigma_min, sched.sigma_max, sampler=sampler)
        assert g.shape == (n + 1,) and g[-1] == 0 and (g[:-1] > 0).all() and (g[1:] < g[:-1]).all()
        assert g[0].item() == pytest.approx(sched.sigma_max) and g[-2].item() >= sched.sigma_min * (1 - 1e-9)


def test_tuned_parameters_interpolate_between_fits():
    fits = TUNED["dpmpp_2m"]
    steps = sorted(fits)
    assert tuned_parameters("dpmpp_2m", steps[0]) == fits[steps[0]]
    mid = tuned_parameters("dpmpp_2m", round(math.sqrt(steps[0] * steps[1])))
    for key in ("floor", "tail"):
        lo, hi = sorted((fits[steps[0]][key], fits[steps[1]][key]))
        assert lo - 1e-12 <= mid[key] <= hi + 1e-12
    assert tuned_parameters("no_such_sampler", 10) == tuned_parameters("dpmpp_2m", 10)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        (("cubic", 5, 0.01, 10.0), {}, "unknown grid 'cubic'; allowed: tuned, karras"),
        (("karras", 0, 0.01, 10.0), {}, "integer >= 1"),
        (("karras", 5, 10.0, 1.0), {}, "0 < sigma_min < sigma_max"),
        (("karras", 5, 0.01, float("inf")), {}, "sigma_max < inf"),
        (("trailing", 5, 0.01, 10.0), {}, "pass schedule="),
        (("trailing", 20, 0.01, 10.0), {"schedule": make_schedule("linear", 10)}, "at most T = 10 steps"),
        (("tuned", 5, 0.01, 10.0), {"sigma_data": 0.0}, "sigma_data .* must be a finite number > 0"),
        (("tuned", 5, 0.01, 10.0), {"sigma_data": float("nan")}, "sigma_data .* must be a finite number > 0"),
    ],
)
def test_bad_grid_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        make_grid(*args, **kw)


def test_ddpm_on_the_diffwave_grid_is_diffwaves_fast_sampler():
    """DiffWave's fast loop (lmnt-com/diffwave inference.py, VP form) = sample_ddpm on make_grid("diffwave").

    Gaussian data x0 ~ N(mu, s^2), so both sides use the exact model; the same normal draws in
    the same order. float64: equal to rounding.
    """
    from unnoise.sampling.grids import DIFFWAVE_FAST_BETAS
    from unnoise.sampling.samplers import sample_ddpm

    mu, s = 0.3, 0.5
    beta = torch.tensor(DIFFWAVE_FAST_BETAS, dtype=torch.float64)
    alpha = 1 - beta
    ab = torch.cumprod(alpha, 0)

    def eps_vp(x, a_bar):  # E[eps | x_t] for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
        a = a_bar.sqrt()
        x0 = mu + a * s**2 / (a**2 * s**2 + 1 - a_bar) * (x - a * mu)
        return (x - a * x0) / (1 - a_bar).sqrt()

    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2000, generator=g, dtype=torch.float64)
    start = audio.clone()
    for n in range(len(beta) - 1, -1, -1):
        audio = (audio - beta[n] / (1 - ab[n]).sqrt() * eps_vp(audio, ab[n])) / alpha[n].sqrt()
        if n > 0:
            std = ((1 - ab[n - 1]) / (1 - ab[n]) * beta[n]).sqrt()
            audio = audio + std * torch.randn(2000, generator=g, dtype=torch.float64)

    sigmas = make_grid("diffwave", 6, 0.002, 80.0)
    assert len(sigmas) == 7 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(((1 - ab[-1]) / ab[-1]).sqrt().item(), rel=1e-12)

    def D(x, sigma):  # E[x0 | x0 + sigma n = x]
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    g = torch.Generator().manual_seed(0)
    torch.randn(2000, generator=g, dtype=torch.float64)  # the start, drawn above
    ours = sample_ddpm(D, start / ab[-1].sqrt(), sigmas, generator=g)  # VP x_T -> sigma-space x_T / sqrt(ab)
    torch.testing.assert_close(ours, audio, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exactly 6 steps"):
        make_grid("diffwave", 10, 0.002, 80.0)


@pytest.mark.parametrize("sampler", ["unipc", "unipc_3", "dpmpp_2m", "heun"])
def test_tuned_grid_scales_with_the_data(sampler):
    """The PF-ODE is scale-equivariant: data scaled by s has the trajectories scaled by s. So the
    tuned grid for data std s over [s a, s b] is s times the grid for data std 1 over [a, b], and
    sampling the scaled mixture from scaled noise gives the scaled samples."""
    s = 0.03
    base = make_grid("tuned", 10, 0.002, 80.0, sampler=sampler)
    scaled = make_grid("tuned", 10, s * 0.002, s * 80.0, sampler=sampler, sigma_data=s)
    torch.testing.assert_close(scaled, s * base, rtol=1e-9, atol=0)
    mix = ring_mixture()
    small = GaussianMixture(mix.weights, s * mix.means, s**2 * mix.covs)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    nfe = 10
    out = unnoise.sample(mix.denoise, 80.0 * noise, sampler=sampler, nfe=nfe, sigma_max=80.0, sigma_min=0.002)
    small_out = unnoise.sample(
        small.denoise, s * 80.0 * noise, sampler=sampler, nfe=nfe, sigma_max=s * 80.0, sigma_min=s * 0.002, sigma_data=s
    )
    torch.testing.assert_close(small_out, s * out, rtol=1e-7, atol=1e-12)


def test_sample_reads_the_data_scale_from_the_denoiser():
    """A denoiser's ``.sigma_data`` (EDM preconditioning, runs) centres the tuned grid; an explicit
    sigma_data wins; without either the default, 1, is used."""
    seen = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return torch.zeros_like(x)

    x = torch.zeros(1, 2, dtype=f64)

    def grid_of(fn, **kw):
        seen.clear()
        unnoise.sample(fn, x, sampler="euler", nfe=6, sigma_max=80.0, sigma_min=0.002, **kw)
        return torch.tensor(seen, dtype=f64)

    expected = {s: make_grid("tuned", 6, 0.002, 80.0, sampler="euler", sigma_data=s)[:-1] for s in (0.1, 1.0, 3.0)}
    torch.testing.assert_close(grid_of(denoise), expected[1.0])
    torch.testing.assert_close(grid_of(denoise, sigma_data=3.0), expected[3.0])
    denoise.sigma_data = 0.1
    torch.testing.assert_close(grid_of(denoise), expected[0.1])
    torch.testing.assert_close(grid_of(denoise, sigma_data=3.0), expected[3.0])
    assert not torch.allclose(expected[0.1], expected[3.0])
    with pytest.raises(ValueError, match="sigma_data"):
        grid_of(denoise, sigma_data=-1.0)


def test_density_grid_without_a_mode_share_is_the_one_bump_grid():
    one = density_grid(12, 0.002, 80.0, center=0.7, width=1.3, floor=0.05, tail=0.5)
    two = density_grid(12, 0.002, 80.0, center=0.7, width=1.3, floor=0.05, tail=0.5, mode_center=9.0, mode_share=0.0)
    assert torch.equal(one, two)


def test_density_grid_splits_steps_between_its_two_bumps():
    """Equal shares, narrow bumps two decades apart, no floor: about half the steps at each."""
    g = density_grid(
        21, 0.002, 80.0, center=0.05, width=0.3, floor=0.0, tail=0.0, mode_center=5.0, mode_width=0.3, mode_share=0.5
    )[:-1]
    near = lambda c: ((g > c * math.exp(-0.9)) & (g < c * math.exp(0.9))).sum().item()  # noqa: E731
    assert near(0.05) >= 8 and near(5.0) >= 8  # 3 widths each side hold 99.7%; the ends sit outside


def test_tuned_mode_bump_sits_at_sigma_data_sqrt_dim():
    """Fits with a mode bump place it at sigma_data sqrt(d) times the fitted mode_center: the grid for
    (sigma_data s, d coordinates) is density_grid with both centers scaled that way, and d moves it."""
    params = tuned_parameters("unipc_3", 5)
    assert params["mode_share"] > 0
    s, d = 0.3, 784
    want = density_grid(
        5, 0.002, 80.0, **params | {"center": params["center"] * s, "mode_center": params["mode_center"] * s * 28}
    )
    torch.testing.assert_close(make_grid("tuned", 5, 0.002, 80.0, sampler="unipc_3", sigma_data=s, dim=d), want)
    assert not torch.equal(make_grid("tuned", 5, 0.002, 80.0, sampler="unipc_3", sigma_data=s, dim=1), want)
    # without a mode share (UniPC-3 above 5 steps) the dimension does not matter
    ten = [make_grid("tuned", 10, 0.002, 80.0, sampler="unipc_3", sigma_data=s, dim=k) for k in (1, 784)]
    assert torch.equal(*ten)
    with pytest.raises(ValueError, match="dim .* must be an integer >= 1"):
        make_grid("tuned", 5, 0.002, 80.0, sampler="unipc_3", dim=0)


def test_sample_gives_the_tuned_grid_the_coordinates_per_sample():
    seen = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return torch.zeros_like(x)

    x = torch.zeros(2, 3, 4, 4, dtype=f64)
    unnoise.sample(denoise, x, sampler="unipc_3", nfe=5, sigma_max=80.0, sigma_min=0.002, sigma_data=0.5)
    want = make_grid("tuned", 5, 0.002, 80.0, sampler="unipc_3", sigma_data=0.5, dim=48)[:-1]
    assert not torch.equal(want, make_grid("tuned", 5, 0.002, 80.0, sampler="unipc_3", sigma_data=0.5)[:-1])
    torch.testing.assert_close(torch.tensor(seen, dtype=f64), want)
