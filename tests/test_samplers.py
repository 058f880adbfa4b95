import math

import numpy as np
import pytest
import torch
from samplers_reference import gaussian_denoiser, gaussian_ode_solution, small_mixture

import unnoise
from unnoise.modalities.toy.data import ring_mixture
from unnoise.sampling.core import ancestral_step
from unnoise.sampling.front import CountingDenoiser, steps_for_nfe
from unnoise.sampling.grids import make_grid
from unnoise.sampling.interop import run_scheduler as run_diffusers
from unnoise.sampling.interop import scheduler_sigmas as diffusers_sigmas
from unnoise.sampling.ode import solve_rk45
from unnoise.sampling.samplers import ALIASES, SAMPLERS, lms_coefficients

f64 = torch.float64
MU, S = 0.3, 0.5
DETERMINISTIC = ["euler", "ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh1", "unipc_bh2", "lms"]


def _ode_error(name: str, n: int, sigma_max: float = 80.0, sigma_min: float = 1e-4) -> float:
    x = sigma_max * torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=f64)
    grid = make_grid("karras", n, sigma_min, sigma_max)
    out = SAMPLERS[name](gaussian_denoiser(MU, S), x, grid)
    return (out - gaussian_ode_solution(x, sigma_max, MU, S)).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "name, order, steps",
    [("euler", 1, 64), ("heun", 2, 64), ("dpmpp_2m", 2, 64), ("dpmpp_3m", 3, 32), ("unipc", 3, 64), ("lms", 4, 128)],
)
def test_convergence_order_on_the_closed_form_ode(name, order, steps):
    """Doubling the steps divides the error by 2^order (Euler 2, Heun/2M 4, 3M and UniPC-2 with
    its corrector 8, LMS-4 16), on Karras' grid; the reference is the closed-form ODE solution."""
    e1, e2 = _ode_error(name, steps), _ode_error(name, 2 * steps)
    ratio = e1 / e2
    assert 2**order * 0.75 < ratio < 2**order * 1.6, (e1, e2, ratio)


def _trajectory(name, denoise, x, sigmas, **kw):
    xs = []
    out = SAMPLERS[name](denoise, x, sigmas, callback=lambda i, s, x, x0: xs.append(x), **kw)
    return xs + [out]


def test_ddim_eta0_is_euler_and_euler_ancestral_is_ddim():
    x = 80 * torch.randn(64, 3, dtype=f64)
    grid = make_grid("karras", 12, 0.002, 80.0)
    D = gaussian_denoiser(MU, S)
    torch.testing.assert_close(SAMPLERS["ddim"](D, x, grid), SAMPLERS["euler"](D, x, grid), rtol=0, atol=0)
    a = SAMPLERS["ddim"](D, x, grid, eta=0.7, generator=torch.Generator().manual_seed(1))
    b = SAMPLERS["euler_ancestral"](D, x, grid, eta=0.7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _alias_grids():
    schedule = unnoise.make_schedule("cosine", 1000)
    yield make_grid("karras", 8, 0.002, 80.0)
    yield make_grid("log_snr", 15, 0.002, 80.0)
    yield make_grid("trailing", 6, schedule.sigma_min, schedule.sigma_max, schedule=schedule)  # sigma_max ~ 2e4


@pytest.mark.parametrize("alias", list(ALIASES))
def test_each_alias_is_its_general_sampler_with_the_parameter_fixed(alias):
    """One algorithm, one implementation: e.g. dpmpp_2m == dpmpp_2m_sde(eta=0), ddpm == ddim(eta=1),
    on the exact ring-mixture denoiser in float64, every intermediate sample to 1e-12."""
    general, fixed = ALIASES[alias]
    data = ring_mixture()
    for sigmas in _alias_grids():
        x = float(sigmas[0]) * torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=f64)
        a = _trajectory(alias, data.denoise, x, sigmas, generator=torch.Generator().manual_seed(2))
        b = _trajectory(general, data.denoise, x, sigmas, generator=torch.Generator().manual_seed(2), **fixed)
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def _dpmpp_2m_sde_reference(denoise, x, sigmas, eta, generator):
    """k-diffusion's sample_dpmpp_2m_sde, solver_type='midpoint', written out (its own coefficients)."""
    s, old, h_last = sigmas.tolist(), None, None
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        if s[i + 1] == 0:
            return x0
        h = math.log(s[i] / s[i + 1])
        eta_h = eta * h
        x = s[i + 1] / s[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * x0
        if old is not None:
            x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_last) * (x0 - old)
        if eta:
            x = x + torch.randn(x.shape, generator=generator, dtype=f64) * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
        old, h_last = x0, h
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpmpp_2m_sde_is_k_diffusions_midpoint_form_and_2m_at_eta_0(eta):
    """The (sigma'/sigma) e^{-eta h} form of the update is k-diffusion's, first and last steps included;
    at eta = 0 it is DPM-Solver++(2M) (Alg. 2), whose name runs the same code."""
    data = ring_mixture()
    for sigmas in _alias_grids():
        x = float(sigmas[0]) * torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=f64)
        ref = _dpmpp_2m_sde_reference(data.denoise, x, sigmas, eta, torch.Generator().manual_seed(4))
        out = SAMPLERS["dpmpp_2m_sde"](data.denoise, x, sigmas, eta=eta, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        if eta == 0:
            two_m = SAMPLERS["dpmpp_2m"](data.denoise, x, sigmas)
            torch.testing.assert_close(two_m, out, rtol=0, atol=0)


def test_ancestral_step_is_exact_at_eta_0_and_ddpms_posterior_at_eta_1():
    from fractions import Fraction

    for s0, s1 in [(2e4, 12.3), (80.0, 0.05), (1.0, 0.999), (3.0, 1e-3)]:
        assert ancestral_step(s0, s1, 0.0) == (s1, 0.0)
        down, up = ancestral_step(s0, s1, 1.0)
        exact = Fraction(s1) ** 2 / Fraction(s0)  # DDPM's mean D + (s1^2 / s0^2)(x - D): sigma_down = s1^2 / s0
        assert abs(Fraction(down) - exact) <= 4e-16 * exact
        assert up**2 == pytest.approx(s1**2 * (s0**2 - s1**2) / s0**2, rel=1e-14)  # fixed-small variance
        for eta in (0.3, 1.0, 2.0):
            down, up = ancestral_step(s0, s1, eta)
            assert down**2 + up**2 == pytest.approx(s1**2, rel=1e-14) and up <= s1
    assert ancestral_step(1.0, 0.0, 1.0) == (0.0, 0.0)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("ddpm", {"variance": "fixed_small"}),
        ("ddpm", {"variance": "fixed_large"}),
        ("ddim", {"eta": 1.0}),
        ("euler_ancestral", {}),
        ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}),
        ("dpmpp_2m_sde", {}),
        ("dpmpp_3m_sde", {}),
    ],
)
def test_stochastic_samplers_reproduce_mean_and_variance(name, kw):
    n = 20_000
    x = 80 * torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=f64)
    grid = make_grid("log_snr", 400, 1e-3, 80.0)
    out = SAMPLERS[name](gaussian_denoiser(MU, S), x, grid, generator=torch.Generator().manual_seed(3), **kw)
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.var().item() - S**2) < 5 * S**2 * math.sqrt(2 / n)


def test_learned_variance_interpolates_between_small_and_large():
    D = gaussian_denoiser(MU, S)

    class Learned:
        def __init__(self, frac):
            self.frac = frac

        def __call__(self, x, sigma):
            return D(x, sigma)

        def with_variance(self, x, sigma):
            return D(x, sigma), torch.full_like(x, self.frac)

    x = 10 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    grid = make_grid("karras", 6, 0.01, 10.0)
    for frac, variance in ((0.0, "fixed_small"), (1.0, "fixed_large")):
        a = SAMPLERS["ddpm"](Learned(frac), x, grid, variance="learned", generator=torch.Generator().manual_seed(5))
        b = SAMPLERS["ddpm"](D, x, grid, variance=variance, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="with_variance"):
        SAMPLERS["ddpm"](D, x, grid, variance="learned")


@pytest.mark.parametrize(
    "scheduler, kw, ours",
    [
        ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing"}, "ddim"),
        ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, "ddim"),
        ("EulerDiscreteScheduler", {}, "euler"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
        ("UniPCMultistepScheduler", {}, "unipc"),
        ("LMSDiscreteScheduler", {}, "lms"),
    ],
)
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_equivalent_to_diffusers_on_the_same_model_and_grid(scheduler, kw, ours, schedule):
    """Every intermediate sample and the result agree to 1e-5 (diffusers run in float64)."""
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, scheduler)(beta_schedule=schedule, **kw)
    mix = small_mixture(2)
    for n in (8, 20):
        sigmas = diffusers_sigmas(sched, n)
        x = sigmas[0] * torch.randn(32, 2, generator=torch.Generator().manual_seed(n), dtype=f64)
        ref = run_diffusers(sched, mix.denoise, x, n)
        out = _trajectory(ours, mix.denoise, x, sigmas)
        # EulerDiscreteScheduler.step casts the sample to float32 on purpose: at the cosine
        # schedule's sigma_max ~ 2e4 that rounding (sigma_max * 2^-24 ~ 1e-3) is carried along.
        atol = 1e-5 + (float(sigmas[0]) * 2**-22 if scheduler == "EulerDiscreteScheduler" else 0.0)
        for a, b, sigma in zip(out, ref, sigmas.tolist(), strict=True):
            c = max(sigma, 1.0)  # x at sigma is x0 + sigma n: compare relative to its scale
            torch.testing.assert_close(a / c, b.double() / c, rtol=0, atol=atol)


def test_unipc_bh1_matches_diffusers_until_diffusers_returns_nan():
    """diffusers' UniPC-bh1 multiplies B(h) = -inf by 0 on its last step (to sigma = 0): NaN."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(solver_type="bh1")
    mix, n = small_mixture(2), 10
    sigmas = diffusers_sigmas(sched, n)
    x = sigmas[0] * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    ref = run_diffusers(sched, mix.denoise, x, n)
    out = _trajectory("unipc_bh1", mix.denoise, x, sigmas)
    for a, b, c in zip(out[:-1], ref[:-1], sigmas[:-1].clamp(min=1).tolist(), strict=True):
        torch.testing.assert_close(a / c, b.double() / c, rtol=0, atol=1e-5)
    assert ref[-1].isnan().all() and torch.isfinite(out[-1]).all()


def test_dpmpp_3m_is_third_order_where_the_reference_coefficient_gives_second():
    """k-diffusion's and diffusers' 3M weight D2 by phi_3 where the Taylor expansion needs 2 phi_3.

    With D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 D'' / 2, the exact integral term -h^2 phi_3 D''
    is -2 phi_3 D2. unnoise uses 2 phi_3 and converges at third order (ratio ~8 per doubling of
    the steps). On Karras' grid (the asymptotic regime shows there; uniform-t grids keep large
    lambda-steps near sigma_min at any n), at the last positive sigma, before the jump to 0.
    """
    diffusers = pytest.importorskip("diffusers")
    from unnoise.sampling.ode import solve_rk45

    mix = small_mixture(4)

    def errors(run):
        out = []
        for n in (80, 160):
            sched = diffusers.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)
            sigmas = diffusers_sigmas(sched, n)
            x = sigmas[0] * torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=f64)
            (ref,), _ = solve_rk45(
                lambda ls, y: (y[0] - mix.denoise(y[0], torch.tensor(math.exp(ls), dtype=f64)),),
                (x,),
                math.log(sigmas[0]),
                math.log(sigmas[-2]),
                rtol=1e-11,
                atol=1e-11,
            )
            out.append((run(sched, x, sigmas, n) - ref).pow(2).mean().sqrt().item())
        return out

    ours = errors(lambda sched, x, sigmas, n: _trajectory("dpmpp_3m", mix.denoise, x, sigmas)[-2])
    theirs = errors(lambda sched, x, sigmas, n: run_diffusers(sched, mix.denoise, x, n)[-2].double())
    assert ours[0] / ours[1] > 6 and theirs[0] / theirs[1] < 5 and ours[1] < theirs[1] / 3, (ours, theirs)


def test_ddim_with_noise_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    n, mix = 10, small_mixture(2)
    sigmas = diffusers_sigmas(sched, n)
    x = sigmas[0] * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    g = torch.Generator().manual_seed(9)
    # unnoise draws one noise per step but the last; diffusers' DDIM takes it as variance_noise
    noises = [torch.randn(32, 2, generator=g, dtype=f64) for _ in range(n - 1)] + [torch.zeros(32, 2, dtype=f64)]
    sched.set_timesteps(n)
    ab = sched.alphas_cumprod.double()
    sample = x * ab[sched.timesteps[0]].sqrt()
    for i, t in enumerate(sched.timesteps):
        sigma = ((1 - ab[t]) / ab[t]).sqrt()
        x_sigma = sample / ab[t].sqrt()
        eps = (x_sigma - mix.denoise(x_sigma, sigma)) / sigma
        sample = sched.step(eps, t, sample, eta=1.0, variance_noise=noises[i]).prev_sample
    out = SAMPLERS["ddim"](mix.denoise, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, sample.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "rk45"])
def test_nfe_accounting_and_callback(name):
    D = CountingDenoiser(gaussian_denoiser(MU, S))
    seen = []
    x = 80 * torch.randn(4, 2, dtype=f64)
    out = unnoise.sample(
        D, x, sampler=name, nfe=9, sigma_max=80.0, sigma_min=0.002, callback=lambda i, s, x, x0: seen.append(i)
    )
    steps = steps_for_nfe(name, 9)
    assert D.nfe == (2 * steps - 1 if name == "heun" else steps) <= 9
    assert seen == list(range(steps)) and out.dtype == f64


def test_rk45_reports_nfe_and_respects_the_budget():
    D = CountingDenoiser(gaussian_denoiser(MU, S))
    x = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    info = {}
    out = SAMPLERS["rk45"](D, x, make_grid("log_snr", 2, 1e-3, 80.0), rtol=1e-7, atol=1e-7, info=info)
    assert info["nfe"] == D.nfe
    torch.testing.assert_close(out, gaussian_ode_solution(x, 80.0, MU, S), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="raise the NFE budget or loosen the tolerances"):
        solve_rk45(lambda t, y: y, (x,), 0.0, 1.0, rtol=1e-8, atol=1e-8, max_nfe=10)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_ancestral", "heun", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_per_sample_generators_make_samples_independent_of_the_batch(name):
    D = gaussian_denoiser(MU, S)
    x = 80 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    kw = {"s_churn": 10.0} if name == "heun" else {"eta": 1.0} if name == "ddim" else {}
    grid = make_grid("karras", 8, 0.002, 80.0)
    batch = SAMPLERS[name](D, x, grid, generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw)
    alone = SAMPLERS[name](D, x[1:2], grid, generator=[torch.Generator().manual_seed(1)], **kw)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per sample"):
        SAMPLERS[name](D, x, grid, generator=[torch.Generator()], **kw)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("schedule", ["cosine", "linear", "edm"])
@pytest.mark.parametrize("nfe", [3, 5])
def test_robust_at_low_nfe_on_every_schedule_in_float32(name, schedule, nfe):
    """cosine's sigma_max ~ 2e4 breaks diffusers' Heun and its Karras DPM-Solver++; not these."""
    from unnoise.schedules import EDMRange

    sched = EDMRange() if schedule == "edm" else unnoise.make_schedule(schedule, 1000)
    mix = small_mixture(2)
    x = sched.sigma_max * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    denoise = mix.to(torch.float32).denoise
    budget = 400 if name == "rk45" else nfe
    kw = {"rtol": 1e-3, "atol": 1e-3} if name == "rk45" else {}
    out = unnoise.sample(
        denoise, x, sampler=name, nfe=budget, sigma_max=sched.sigma_max, sigma_min=sched.sigma_min, **kw
    )
    assert torch.isfinite(out).all() and out.abs().max() < 10  # the data live within |x| < 4


def test_lms_coefficients_are_the_exact_integrals():
    integrate = pytest.importorskip("scipy.integrate")
    nodes = [3.0, 5.0, 8.5, 14.0]
    a, b = 3.0, 1.2

    def basis(j):
        return lambda tau: np.prod([(tau - nk) / (nodes[j] - nk) for k, nk in enumerate(nodes) if k != j])

    want = [integrate.quad(basis(j), a, b, epsabs=1e-14, epsrel=1e-14)[0] for j in range(4)]
    np.testing.assert_allclose(lms_coefficients(nodes, a, b), want, rtol=1e-10)
    assert sum(lms_coefficients(nodes, a, b)) == pytest.approx(b - a)  # the basis sums to 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "plms"}, "unknown sampler 'plms'; allowed: ddpm, ddim, euler"),
        ({"nfe": 0}, "nfe must be an integer >= 1"),
        ({"grid": "cubic"}, "unknown grid 'cubic'; allowed: tuned, karras, log_snr, linspace, leading, trailing"),
        ({"grid": "trailing"}, "pass schedule="),
        ({"sigma_min": 100.0}, "need 0 < sigma_min < sigma_max"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(sampler="euler", nfe=5, sigma_max=80.0, sigma_min=0.002) | kwargs
    with pytest.raises(ValueError, match=match):
        unnoise.sample(gaussian_denoiser(0, 1), torch.zeros(2, 2), **args)


@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([2.0, 1.0], "end in 0"),
        ([2.0, -1.0, 0.0], "positive"),
        ([[2.0, 0.0]], "1-D grid"),
        ([0.0], "1-D grid of at least 2"),
    ],
)
def test_bad_grids(sigmas, match):
    with pytest.raises(ValueError, match=match):
        SAMPLERS["euler"](gaussian_denoiser(0, 1), torch.zeros(2, 2), torch.tensor(sigmas))


def test_heun_sigma_form_is_edm_algorithm_2_as_in_diffusers():
    """form="sigma" is the paper's trapezoid on dx/dsigma, as diffusers' HeunDiscreteScheduler."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.HeunDiscreteScheduler()
    mix, n = small_mixture(2), 10
    visited = diffusers_sigmas(sched, n)  # diffusers visits every inner sigma twice
    x = visited[0] * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    ref = run_diffusers(sched, mix.denoise, x, n)[-1]
    out = SAMPLERS["heun"](mix.denoise, x, torch.unique_consecutive(visited), form="sigma")
    torch.testing.assert_close(out, ref.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_sigma_space_ddpm_equals_ddpm_algorithm_2_in_vp_space(variance):
    """SAMPLERS["ddpm"] on the schedule's own grid reproduces DiffusionModel.sample (Ho et al., Alg. 2)."""
    from unnoise.diffusion import eps_from_x0

    mix = small_mixture(2)
    dm = unnoise.DiffusionModel(lambda x, t: x, T=50, beta_schedule="cosine", variance=variance, data_shape=(2,))

    def eps_model(x_t, t):  # the exact eps-network of the mixture
        ab = dm.schedule.alpha_bar[t.long()]
        x = x_t / ab.sqrt()[:, None]
        sigma = ((1 - ab) / ab).sqrt()
        return eps_from_x0(x_t, mix.denoise(x, sigma), ab)

    dm.model = eps_model
    vp = dm.sample(16, generator=torch.Generator().manual_seed(0), dtype=f64)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(16, 2, generator=g, dtype=f64)  # the facade's first draw
    sigmas = torch.cat([dm.schedule.sigma(torch.arange(50, 0, -1.0)), torch.zeros(1, dtype=f64)])
    ours = SAMPLERS["ddpm"](
        mix.denoise, x_T * sigmas[0].hypot(torch.tensor(1.0)), sigmas, variance=variance, generator=g
    )
    torch.testing.assert_close(ours, vp, rtol=0, atol=1e-9)
