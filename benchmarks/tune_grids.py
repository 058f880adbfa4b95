"""Fit each sampler's default grid: the density_grid parameters with the smallest ODE error.

For each sampler and each NFE in (5, 10, 20, 50), the objective is the mean log RMS error,
against a high-accuracy PF-ODE solution, over the benchmark's six problems (2-D, 32-D and
32-D-far mixtures x linear and cosine schedules), on noise drawn with another seed than
benchmarks/samplers.py uses. Prints the fitted parameters, keyed by the number of grid steps,
as unnoise.sampling.grids.TUNED holds them.

Run: python benchmarks/tune_grids.py [sampler ...]   (about a minute per sampler)
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from mixtures import mixture_32d
from samplers import reference_solution

import unnoise
from unnoise.modalities.toy.data import ring_mixture
from unnoise.sampling.front import steps_for_nfe
from unnoise.sampling.grids import density_grid
from unnoise.sampling.samplers import SAMPLERS

f64 = torch.float64
NFES = (5, 10, 20, 50)


def problems(seed: int = 1):
    out = []
    for mix, n in ((ring_mixture(), 400), (mixture_32d(), 200), (mixture_32d(1.5), 200)):
        for schedule in ("linear", "cosine"):
            sched = unnoise.make_schedule(schedule, 1000)
            x = sched.sigma_max * torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=f64)
            out.append((mix, sched, x, reference_solution(mix, x, sched.sigma_max)))
    return out


def unpack(p: np.ndarray) -> dict[str, float]:
    """Unconstrained -> grid parameters: center > 0, width > 0, floor and tail in (0, 1)."""
    return {
        "center": math.exp(p[0]),
        "width": math.exp(p[1]),
        "floor": _sigmoid(p[2]),
        "tail": _sigmoid(p[3]),
    }


def _sigmoid(z: float) -> float:
    return 0.5 * (1 + math.tanh(z / 2))


def objective(name: str, nfe: int, params: dict[str, float], probs) -> float:
    total = 0.0
    for mix, sched, x, ref in probs:
        grid = density_grid(steps_for_nfe(name, nfe), sched.sigma_min, sched.sigma_max, **params)
        out = SAMPLERS[name](mix.denoise, x, grid)
        err = (out - ref).pow(2).mean().sqrt().item() if torch.isfinite(out).all() else 1e3
        total += math.log(err)
    return total / len(probs)


def fit(name: str, nfe: int, probs, warm: np.ndarray | None) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    starts = [np.array([math.log(0.5), 0.7, -2.0, 0.0]), np.array([math.log(2.0), 0.3, -1.0, 2.0])]
    best = None
    for start in ([warm] if warm is not None else []) + starts:
        res = minimize(
            lambda p: objective(name, nfe, unpack(p), probs),
            start,
            method="Nelder-Mead",
            options={"maxfev": 200, "xatol": 1e-3, "fatol": 1e-4},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x, best.fun


def main() -> None:
    names = sys.argv[1:] or ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh1", "lms"]
    probs = problems()
    for name in names:
        warm, lines = None, []
        for nfe in NFES:
            warm, value = fit(name, nfe, probs, warm)
            p = unpack(warm)
            lines.append(
                f"        {steps_for_nfe(name, nfe)}: dict(center={p['center']:.4g}, width={p['width']:.4g}, "
                f"floor={p['floor']:.4g}, tail={p['tail']:.4g}),  # NFE {nfe}: mean log error {value:.3f}"
            )
        print(f'    "{name}": {{\n' + "\n".join(lines) + "\n    },", flush=True)


if __name__ == "__main__":
    main()
