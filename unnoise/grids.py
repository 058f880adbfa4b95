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

GridName = Literal["karras", "log_snr", "linspace", "leading", "trailing"]
GRID_NAMES: tuple[str, ...] = ("karras", "log_snr", "linspace", "leading", "trailing")


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
) -> Tensor:
    """A grid of ``n`` steps by name; uniform-t grids use ``schedule`` (and ignore the sigma range)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if name == "karras":
        return karras_grid(n, sigma_min, sigma_max, rho)
    if name == "log_snr":
        return log_snr_grid(n, sigma_min, sigma_max)
    if name in ("linspace", "leading", "trailing"):
        if schedule is None:
            raise ValueError(f"grid {name!r} is uniform in a discrete schedule's t: pass schedule=...")
        if n > schedule.T:
            raise ValueError(f"grid {name!r} has at most T = {schedule.T} steps, got {n}")
        return uniform_t_grid(n, schedule, name)
    raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(GRID_NAMES)}")
