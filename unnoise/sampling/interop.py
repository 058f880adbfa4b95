"""Run diffusers' schedulers on unnoise denoisers, to compare samplers on one model and grid.

diffusers' schedulers step an eps-prediction model in VP or sigma-space coordinates; here the
model is built from any sigma-space denoiser D(x, sigma), exact at each step's own noise level,
so differences come from the schedulers alone. Optional dependency: ``pip install diffusers``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unnoise.sampling.core import Denoiser


def set_timesteps_float64(scheduler, n: int) -> None:
    """``scheduler.set_timesteps(n)``, then its arithmetic in float64 on the same float32 values.

    diffusers keeps sigmas and alphas_cumprod in float32; at the cosine schedule's sigma_max ~ 2e4
    that alone moves results by ~1e-3, which would hide what a comparison is about.
    """
    scheduler.set_timesteps(n)
    for name in ("sigmas", "alphas_cumprod"):
        if isinstance(getattr(scheduler, name, None), Tensor):
            setattr(scheduler, name, getattr(scheduler, name).double())


def scheduler_sigmas(scheduler, n: int) -> Tensor:
    """The sigma-space noise levels a diffusers scheduler visits for n steps, final 0 included.

    One entry per model call (Heun visits inner levels twice), then 0.
    """
    set_timesteps_float64(scheduler, n)
    steps = len(scheduler.timesteps)
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, Tensor) and len(sigmas) == steps + 1:
        return sigmas.double()
    ab = scheduler.alphas_cumprod.double()
    t = scheduler.timesteps
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("fractional timesteps without scheduler.sigmas: noise levels unknown")
    t = t.long()
    return torch.cat([((1 - ab[t]) / ab[t]).sqrt(), torch.zeros(1, dtype=torch.float64)])


def run_scheduler(scheduler, denoise: Denoiser, x: Tensor, n: int, *, noises=None) -> list[Tensor]:
    """Sample with a diffusers scheduler from ``x`` (sigma-space, at its first noise level).

    Returns the trajectory in sigma-space: the sample before each model call, then the result.
    ``noises[i]`` is passed as ``variance_noise`` to stochastic steps (DDIM with eta > 0).
    """
    sigmas = scheduler_sigmas(scheduler, n)
    vp = float(scheduler.init_noise_sigma) == 1.0  # VP samples (x * alpha) or sigma-space ones
    sample = x / math.sqrt(sigmas[0] ** 2 + 1) if vp else x.clone()
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(sigmas[i])
        to_sigma_space = math.sqrt(sigma**2 + 1)
        trajectory.append(sample * to_sigma_space if vp else sample)
        x_sigma = scheduler.scale_model_input(sample, t) * to_sigma_space  # undo c_in
        eps = (x_sigma - denoise(x_sigma, torch.tensor(sigma, dtype=x.dtype))) / sigma
        kw = {} if noises is None else {"variance_noise": noises[i]}
        sample = scheduler.step(eps, t, sample, **kw).prev_sample
    return trajectory + [sample]
