"""Sampling grids: which noise levels a sampler visits, from sigma_max down to sigma_min, then 0.

A grid of ``n`` steps has ``n + 1`` entries: ``n`` positive, decreasing sigmas and a final 0.
The uniform-in-t grids need the discrete schedule whose t they are uniform in; they follow
diffusers' ``timestep_spacing`` names (linspace, leading, trailing).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from unnoise.schedules import DiscreteSchedule

GridName = Literal["tuned", "karras", "log_snr", "linspace", "leading", "trailing", "diffwave"]
GRID_NAMES: tuple[str, ...] = ("tuned", "karras", "log_snr", "linspace", "leading", "trailing", "diffwave")
# The data scale the tuned grid assumes when neither the caller nor the denoiser gives one.
DEFAULT_SIGMA_DATA = 1.0

# DiffWave's fast sampling schedule (Kong et al. 2021, Sec. 4; lmnt-com/diffwave params.py):
# 6 inference betas, whose cumulative alpha_bar the reverse chain steps through.
DIFFWAVE_FAST_BETAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)

# density_grid parameters per sampler and number of steps, fitted by benchmarks/tune_grids.py.
# ``center`` is in units of the data's standard deviation sigma_data (make_grid scales it): the
# ODE bends where sigma is near the data's scales, wherever those lie. Fits marked "relative" were
# made on the random fitting family of benchmarks/mixtures.py (2-128 dimensions, data stds over
# three decades, each mixture at its own sigma_data); the others on the benchmark's fixed cases,
# whose data stds (0.61, 0.69, 1.36) are close to 1, the default sigma_data.
TUNED: dict[str, dict[int, dict[str, float]]] = {
    "euler": {
        5: dict(center=1.231, width=1.549, floor=0.03669, tail=0.5008),  # NFE 5: mean log error -1.621
        10: dict(center=1.942, width=1.543, floor=0.07725, tail=0.5962),  # NFE 10: mean log error -2.186
        20: dict(center=0.8802, width=1.446, floor=0.04403, tail=0.3436),  # NFE 20: mean log error -2.708
        50: dict(center=1.803, width=1.869, floor=0.01287, tail=0.5012),  # NFE 50: mean log error -4.025
    },
    "heun": {
        3: dict(center=1.859, width=1.622, floor=0.1617, tail=0.5014),  # NFE 5: mean log error -1.407
        5: dict(center=1.129, width=1.639, floor=0.04627, tail=0.5026),  # NFE 10: mean log error -2.136
        10: dict(center=0.9915, width=1.641, floor=0.0004128, tail=0.5005),  # NFE 20: mean log error -3.154
        25: dict(center=0.5442, width=1.804, floor=0, tail=0.1961),  # NFE 50: mean log error -5.413
    },
    "dpmpp_2m": {
        5: dict(center=1.629, width=1.966, floor=0.02377, tail=0.5008),  # NFE 5: mean log error -2.057
        10: dict(center=0.7121, width=2.391, floor=0.02002, tail=1),  # NFE 10: mean log error -2.881
        20: dict(center=0.8768, width=2.477, floor=3.215e-13, tail=1),  # NFE 20: mean log error -4.901
        50: dict(center=0.8556, width=2.266, floor=2.609e-15, tail=0.5642),  # NFE 50: mean log error -6.768
    },
    "dpmpp_3m": {
        5: dict(center=1.204, width=2.384, floor=0.001668, tail=0.9842),  # NFE 5: mean log error -2.066
        10: dict(center=1.718, width=2, floor=0.01281, tail=0.965),  # NFE 10: mean log error -3.055
        20: dict(center=0.3723, width=3.016, floor=1.758e-06, tail=0.9993),  # NFE 20: mean log error -5.341
        50: dict(center=0.5207, width=2.662, floor=1.879e-06, tail=3.572e-07),  # NFE 50: mean log error -7.277
    },
    "unipc": {  # relative: benchmarks/tune_grids.py unipc (--count 50), objective per NFE on the fitting family
        5: dict(center=0.971, width=1.624, floor=0.01101, tail=0.7744),  # NFE 5: geomean ratio 0.301, worst 6.33
        10: dict(center=0.8749, width=1.506, floor=0.03911, tail=0.9114),  # NFE 10: geomean ratio 0.291, worst 7.90
        20: dict(center=0.5837, width=1.867, floor=1.032e-06, tail=1),  # NFE 20: geomean ratio 0.197, worst 20.4
        50: dict(center=0.3374, width=2.08, floor=0.000327, tail=0.2004),  # NFE 50: mean log error -7.421
    },
    "unipc_bh1": {
        5: dict(center=1.148, width=1.578, floor=0.301, tail=0.9255),  # NFE 5: mean log error -2.181
        10: dict(center=0.223, width=2.204, floor=0.1334, tail=0.4996),  # NFE 10: mean log error -3.163
        20: dict(center=0.3622, width=2.159, floor=0.1357, tail=0.948),  # NFE 20: mean log error -5.547
        50: dict(center=0.5137, width=2.014, floor=0.08743, tail=0.5583),  # NFE 50: mean log error -7.638
    },
    "lms": {
        5: dict(center=1.0, width=1.856, floor=0.03378, tail=0.6444),  # one fit for all NFE (an earlier, shorter run)
    },
}


# UniPC-3 at 5 steps: `benchmarks/tune_grids.py unipc_3 --nfe 5`, the 7-parameter density with a mode
# bump at sigma_data sqrt(d), on the fitting family (seed 1): geomean ratio 0.393 -> 0.342, cells lost
# 16 -> 12 of 150; checked on a fresh family (seed 3): 0.437 -> 0.352, 8 -> 3, worst cell 1.57 -> 1.61.
# Above 5 steps it keeps UniPC's one-bump fits (mode_share 0): the mode-bump fits for 10 and 20 steps
# won on the fitting family but lost on the fresh one (NFE 10 worst cell 1.28 -> 3.12; NFE 20 cells
# lost 1 -> 5), so they are not used.
_MODE_5 = dict(mode_center=0.9995, mode_width=0.5369, mode_share=0.122)
TUNED["unipc_3"] = {
    5: dict(center=0.9148, width=1.558, floor=0.04, tail=0.9233) | _MODE_5,
    **{n: fit | _MODE_5 | {"mode_share": 0.0} for n, fit in TUNED["unipc"].items() if n > 5},
}

# Samplers that are another one under a second name share its fit. UniPC-3 shares UniPC's
# one-bump fit above 5 steps (it beat its own older, absolute fit on the fitting family: geomean
# ratio to diffusers' best 0.233 vs 0.268, worst cell 6.3 vs 16.9) and has a mode bump at 5.
_SAME_AS = {"ddim": "euler", "unipc_bh2": "unipc"}


_LOG_KEYS = ("center", "width", "mode_center", "mode_width")  # interpolated in log space


def tuned_parameters(sampler: str | None, n: int) -> dict[str, float]:
    """The fitted density_grid parameters for ``sampler`` at ``n`` steps.

    Between fitted step counts each parameter is interpolated linearly in log n (centers and
    widths in log space); outside them the nearest fit is used. Samplers without a fit of their
    own (the stochastic ones) use DPM-Solver++(2M)'s: measured by Frechet distance on the
    benchmark's mixtures, that beats Karras, log-SNR and linspace grids for them and is within
    noise of trailing, which needs a discrete schedule.
    """
    sampler = _SAME_AS.get(sampler or "dpmpp_2m", sampler or "dpmpp_2m")
    fits = TUNED.get(sampler, TUNED["dpmpp_2m"])
    steps = sorted(fits)
    if n <= steps[0] or n >= steps[-1]:
        return dict(fits[steps[0] if n <= steps[0] else steps[-1]])
    hi = next(k for k in steps if k >= n)
    lo = max(k for k in steps if k <= n)
    if lo == hi:
        return dict(fits[lo])
    w = (math.log(n) - math.log(lo)) / (math.log(hi) - math.log(lo))
    out = {}
    for key in fits[lo]:
        a, b = fits[lo][key], fits[hi][key]
        out[key] = math.exp((1 - w) * math.log(a) + w * math.log(b)) if key in _LOG_KEYS else (1 - w) * a + w * b
    return out


def placed(params: dict[str, float], sigma_data: float, dim: int) -> dict[str, float]:
    """Fitted density_grid parameters, whose centers are in data units, placed for one data set:
    ``center`` times sigma_data, ``mode_center`` (if any) times sigma_data sqrt(dim)."""
    out = dict(params, center=params["center"] * sigma_data)
    if "mode_center" in out:
        out["mode_center"] *= sigma_data * math.sqrt(dim)
    return out


def coordinates_per_sample(x: Tensor) -> int:
    """The data's dimension d for a batch ``x`` (samples along dim 0): what the tuned grid's
    mode bump scales with."""
    return x[0].numel() if x.ndim > 1 else 1


def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), Eq. 5: uniform in sigma^(1/rho); rho = 7 concentrates steps at low noise."""
    if n == 1:
        return _with_zero(torch.tensor([sigma_max], dtype=torch.float64))
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def log_snr_grid(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log-SNR = -2 log sigma, DPM-Solver's 'logSNR' spacing (Lu et al. 2022a)."""
    if n == 1:
        return _with_zero(torch.tensor([sigma_max], dtype=torch.float64))
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def betas_grid(betas: tuple[float, ...] | list[float]) -> Tensor:
    """The noise levels of an inference noise schedule, highest first, then 0.

    alpha_bar_s = prod_{k <= s} (1 - beta_k) and sigma_s = sqrt(1 / alpha_bar_s - 1). DDPM's
    ancestral step (fixed-small variance) over these sigmas is DiffWave's fast sampler: its
    posterior mean and variance are those of the inference chain, and the network is evaluated
    at the noise level itself (DiffWave aligns it to a fractional training step; in sigma-space
    the denoiser takes the level directly).
    """
    b = torch.tensor(betas, dtype=torch.float64)
    if b.ndim != 1 or len(b) < 1 or not ((b > 0) & (b < 1)).all():
        raise ValueError(f"inference betas must be a non-empty list of numbers in (0, 1), got {list(betas)}")
    alpha_bar = torch.cumprod(1 - b, 0)
    return _with_zero((1 / alpha_bar - 1).sqrt().flip(0))


def uniform_t_grid(
    n: int, schedule: DiscreteSchedule, spacing: Literal["linspace", "leading", "trailing"] = "linspace"
) -> Tensor:
    """Steps uniform in the schedule's t (Lu et al. 2022a's 'time uniform'), diffusers' spacings.

    With T training steps (the paper's t = 1..T; diffusers' index t - 1):
    linspace: t from T down to 1, fractional; leading: 1 + k (T // n); trailing: T - k T / n, rounded.
    """
    T = schedule.T
    if spacing == "linspace":
        t = torch.linspace(T, 1, n, dtype=torch.float64)
    elif spacing == "leading":
        t = 1 + torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n)
    elif spacing == "trailing":
        t = torch.round(T - torch.arange(n, dtype=torch.float64) * (T / n))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: linspace, leading, trailing")
    return _with_zero(schedule.sigma(t))


def make_grid(
    name: GridName | str,
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    schedule: DiscreteSchedule | None = None,
    rho: float = 7.0,
    sampler: str | None = None,
    sigma_data: float = DEFAULT_SIGMA_DATA,
    dim: int = 1,
) -> Tensor:
    """A grid of ``n`` steps by name; uniform-t grids use ``schedule`` (and ignore the sigma range),
    as does ``"diffwave"`` (:data:`DIFFWAVE_FAST_BETAS`, 6 steps).

    ``"tuned"`` is :func:`density_grid` with the parameters fitted for ``sampler`` and ``n``
    (:func:`tuned_parameters`), its center at ``sigma_data`` (the data's standard deviation per
    coordinate) times the fitted one and, where the fit has one, its second bump (``mode_*``) at
    ``sigma_data * sqrt(dim)`` times the fitted one (``dim``: coordinates per sample); the other
    grids do not depend on the data.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if name == "tuned":
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(
                f"sigma_data (the data's standard deviation) must be a finite number > 0, got {sigma_data}"
            )
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim (coordinates per sample) must be an integer >= 1, got {dim!r}")
        return density_grid(n, sigma_min, sigma_max, **placed(tuned_parameters(sampler, n), sigma_data, dim))
    if name == "karras":
        return karras_grid(n, sigma_min, sigma_max, rho)
    if name == "log_snr":
        return log_snr_grid(n, sigma_min, sigma_max)
    if name == "diffwave":
        if n != len(DIFFWAVE_FAST_BETAS):
            raise ValueError(f"grid 'diffwave' is DiffWave's fast schedule of exactly 6 steps (nfe 6), got {n}")
        return betas_grid(DIFFWAVE_FAST_BETAS)
    if name in ("linspace", "leading", "trailing"):
        if schedule is None:
            raise ValueError(f"grid {name!r} is uniform in a discrete schedule's t: pass schedule=...")
        if n > schedule.T:
            raise ValueError(f"grid {name!r} has at most T = {schedule.T} steps, got {n}")
        return uniform_t_grid(n, schedule, name)
    raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(GRID_NAMES)}")


def density_grid(
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    center: float,
    width: float,
    floor: float,
    tail: float,
    mode_center: float = 1.0,
    mode_width: float = 1.0,
    mode_share: float = 0.0,
    resolution: int = 4097,
) -> Tensor:
    """Steps at equal quantiles of a density over log sigma: Gaussian bumps plus a uniform floor.

    The bump (at log ``center``, std ``width`` in log sigma) puts steps where the denoiser changes
    fastest along the ODE, around the data's scales; ``floor`` is the share spread uniformly.
    A second bump (``mode_center``, ``mode_width``, a share ``mode_share`` of the bumps' mass)
    covers the noise level at which a sample's mode is decided: the posterior over which part of
    the data x came from sharpens once the noise's norm, sigma sqrt(d), falls to the distance
    between data points, ~ sigma_data sqrt(2 d); in d dimensions that is sqrt(d) above the
    per-coordinate scale (make_grid places it there). Step i sits at quantile
    1 - i / (n - 1 + tail): ``tail = 0`` ends at sigma_min, ``tail = 1`` stops one step short,
    like diffusers' trailing spacing (the final jump to 0 is cheaper there).
    """
    if n == 1:
        return _with_zero(torch.tensor([sigma_max], dtype=torch.float64))
    ell = torch.linspace(math.log(sigma_min), math.log(sigma_max), resolution, dtype=torch.float64)
    span = ell[-1] - ell[0]

    def bump(c: float, w: float) -> Tensor:
        return torch.exp(-0.5 * ((ell - math.log(c)) / w) ** 2) / (w * math.sqrt(2 * math.pi))

    bumps = (1 - mode_share) * bump(center, width)
    if mode_share > 0:
        bumps = bumps + mode_share * bump(mode_center, mode_width)
    dens = floor / span + (1 - floor) * bumps
    cdf = torch.cat([dens.new_zeros(1), ((dens[1:] + dens[:-1]) / 2 * (ell[1:] - ell[:-1])).cumsum(0)])
    cdf = cdf / cdf[-1]
    q = 1 - torch.arange(n, dtype=torch.float64) / (n - 1 + tail)
    idx = torch.searchsorted(cdf, q).clamp(1, resolution - 1)
    frac = (q - cdf[idx - 1]) / (cdf[idx] - cdf[idx - 1])
    log_sigma = ell[idx - 1] + frac * (ell[idx] - ell[idx - 1])
    return _with_zero(log_sigma.exp())
