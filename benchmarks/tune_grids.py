"""Fit each sampler's default grid: the density_grid parameters with the smallest ODE error.

For each sampler and each NFE in (5, 10, 20, 50), the objective is the mean log RMS error,
against a high-accuracy PF-ODE solution, over the fitting family: ``--count`` random mixtures
drawn by benchmarks/mixtures.py with FIT_SEED (never the validation seed of
benchmarks/samplers.py, and not the benchmark's fixed cases), each under the linear and cosine
DDPM schedules (T = 1000) and the EDM range, 64 samples each. ``--fixed`` fits on the
benchmark's six fixed problems instead (how the current TUNED table was fitted). Prints the
fitted parameters, keyed by the number of grid steps, as unnoise.sampling.grids.TUNED holds them.

Run: python benchmarks/tune_grids.py [--count 30] [--fixed] [sampler ...]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from mixtures import FIT_SEED, family, mixture_32d
from samplers import reference_solution

import unnoise
from unnoise.modalities.toy.data import ring_mixture
from unnoise.sampling.front import steps_for_nfe
from unnoise.sampling.grids import density_grid
from unnoise.sampling.samplers import SAMPLERS
from unnoise.schedules import EDMRange

f64 = torch.float64
NFES = (5, 10, 20, 50)


def problems(fixed: bool = False, count: int = 30, seed: int = 1):
    if fixed:
        cases = [(ring_mixture(), 400), (mixture_32d(), 200), (mixture_32d(1.5), 200)]
        schedules = [unnoise.make_schedule(s, 1000) for s in ("linear", "cosine")]
    else:
        cases = [(mix, 64) for _, mix in family(FIT_SEED, count)]
        schedules = [unnoise.make_schedule(s, 1000) for s in ("linear", "cosine")] + [EDMRange()]
    out = []
    for mix, n in cases:
        for sched in schedules:
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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samplers", nargs="*", default=["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh1"])
    parser.add_argument("--count", type=int, default=30, help="mixtures of the fitting family")
    parser.add_argument("--fixed", action="store_true", help="fit on the benchmark's fixed cases instead")
    args = parser.parse_args()
    names, probs = args.samplers, problems(args.fixed, args.count)
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
