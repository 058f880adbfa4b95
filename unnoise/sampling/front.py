"""The front door: ``unnoise.sample(denoise, x, sampler=..., nfe=..., sigma_max=..., sigma_min=...)``.

It turns an evaluation budget into a grid (the sampler's best measured one unless named), runs
the sampler from :mod:`unnoise.sampling.samplers`, and checks that the budget held.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from unnoise.sampling.grids import DEFAULT_SIGMA_DATA, coordinates_per_sample, make_grid
from unnoise.sampling.samplers import SAMPLERS, Callback, Denoiser, Generator

# Steps a sampler can afford with a budget of nfe evaluations (Heun: 2 per step, Euler last).
_STEPS_FOR_NFE: dict[str, Callable[[int], int]] = {"heun": lambda nfe: (nfe + 1) // 2}

# The grid each sampler uses when none is named: the best measured by benchmarks/samplers.py.
DEFAULT_GRIDS: dict[str, str] = {name: "tuned" for name in SAMPLERS}


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """How many grid steps ``sampler`` takes within ``nfe`` denoiser evaluations."""
    return _STEPS_FOR_NFE.get(sampler, lambda n: n)(nfe)


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (``.nfe``); forwards ``with_variance``."""

    def __init__(self, denoise: Denoiser) -> None:
        self.denoise, self.nfe = denoise, 0
        if hasattr(denoise, "with_variance"):
            self.with_variance = self._with_variance

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        return self.denoise(x, sigma)

    def _with_variance(self, x: Tensor, sigma: Tensor):
        self.nfe += 1
        return self.denoise.with_variance(x, sigma)


def data_scale(denoise: Denoiser, sigma_data: float | None = None) -> float:
    """The data's standard deviation the tuned grid is centred on: ``sigma_data`` if given, else the
    denoiser's ``.sigma_data`` (runs and EDM preconditioning carry one), else the default, 1."""
    if sigma_data is None:
        sigma_data = getattr(denoise, "sigma_data", None)
    scale = float(DEFAULT_SIGMA_DATA if sigma_data is None else sigma_data)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"sigma_data (the data's standard deviation) must be a finite number > 0, got {sigma_data}")
    return scale


def start_sigma(
    sampler: str, nfe: int, sigma_max: float, sigma_min: float, grid: str | None = None, schedule=None
) -> float:
    """The noise level the chain starts at: sigma_max, or the top of a named grid that ignores the
    range (DiffWave's ``"diffwave"`` tops out at 1.29). Scale the starting noise by it."""
    if grid is None:
        return sigma_max
    return float(make_grid(grid, steps_for_nfe(sampler, nfe), sigma_min, sigma_max, schedule=schedule)[0])


def sample(
    denoise: Denoiser,
    x: Tensor,
    *,
    sampler: str,
    nfe: int,
    sigma_max: float,
    sigma_min: float,
    grid: str | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    schedule=None,
    sigma_data: float | None = None,
    **options,
) -> Tensor:
    """Draw samples: run ``sampler`` from ``x`` at ``sigma_max`` down to 0 in at most ``nfe`` evaluations.

    ``x`` is the starting sample at sigma_max (sigma_max times standard normal noise, plus data for
    img2img). The grid has ``steps_for_nfe(sampler, nfe)`` steps from sigma_max to sigma_min, then
    0; ``grid=None`` takes the sampler's best measured grid (:data:`DEFAULT_GRIDS`). Uniform-t
    grids need ``schedule`` (or a denoiser with a ``.schedule``); the tuned grid is centred on the
    data's scale, ``sigma_data`` (default: :func:`data_scale`), and where a fit has a mode bump, on
    ``sigma_data`` times the square root of the coordinates per sample of ``x``, where modes are
    decided. ``options`` go to the sampler (e.g. ``eta``, ``s_churn``); ``rk45`` uses ``nfe`` as
    its budget (at least 2) and its own adaptive steps from sigma_max to sigma_min; pass
    ``info={}`` to read the method and the tolerance it reached
    (:func:`unnoise.sampling.classical.sample_rk45`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    schedule = schedule if schedule is not None else getattr(denoise, "schedule", None)
    scale = data_scale(denoise, sigma_data)
    if sampler == "rk45" and grid is None:  # rk45 places its own steps between sigma_max and sigma_min
        sigmas = torch.tensor([sigma_max, sigma_min, 0.0], dtype=torch.float64)
    else:
        n = steps_for_nfe(sampler, nfe) if sampler != "rk45" else 2
        sigmas = make_grid(
            grid or DEFAULT_GRIDS[sampler],
            n,
            sigma_min,
            sigma_max,
            schedule=schedule,
            sampler=sampler,
            sigma_data=scale,
            dim=coordinates_per_sample(x),
        )
    counted = CountingDenoiser(denoise)
    counted.sigma_data = scale  # rk45's fixed-step finish centres its grid on it
    if sampler == "rk45":
        options.setdefault("max_nfe", nfe)
    out = SAMPLERS[sampler](counted, x, sigmas, generator=generator, callback=callback, **options)
    if counted.nfe > nfe:  # a bug guard: the budget is part of the contract
        raise RuntimeError(f"{sampler} used {counted.nfe} evaluations, more than nfe={nfe}")
    return out
