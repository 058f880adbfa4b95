"""Fit each sampler's default grid: the density_grid parameters with the smallest ODE error.

For each sampler and each NFE in (5, 10, 20, 50), the objective is taken over the fitting
family: ``--count`` random mixtures drawn by benchmarks/mixtures.py with FIT_SEED (never the
validation seed of benchmarks/sampler_validation.py, and not the benchmark's fixed cases), each
under the linear and cosine DDPM schedules (T = 1000) and the EDM range, 64 samples each, the
grid's center in units of each mixture's data std (sigma_data = sqrt(mean diagonal of its
covariance), what a trained run records). At NFE 5, 10, 20 it is the mean log ratio of unnoise's
RMS error to diffusers' best scheduler's in the same cell, plus the mean of its positive part and
of that squared (penalties on every cell where diffusers wins, the worst most, since the goal is to
lose in none); at NFE 50, where diffusers is not run, the mean log RMS error. Errors are against a
high-accuracy PF-ODE solution. The density has seven parameters: density_grid's bump at the data's
scale, its floor and tail, and the mode bump at sigma_data sqrt(d) (``--no-mode``: the first four).
``--fixed`` fits on the benchmark's six fixed problems at sigma_data 1 instead (mean log error;
how the table's older fits were made). Prints the fitted parameters, keyed by the number of grid
steps, as unnoise.sampling.grids.TUNED holds them.

Run: python benchmarks/tune_grids.py [--count 50] [--fixed] [--no-mode] [--nfe 5 ...] [sampler ...]
(for the family on one thread: about 6 min to prepare, then 3 to 11 min per NFE from 5 to 20 with
7 parameters; independent --nfe runs can share the machine's cores)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from mixtures import FIT_SEED, family, mixture_32d
from samplers import reference_solution

import unnoise
from unnoise.modalities.toy.data import ring_mixture
from unnoise.sampling.front import steps_for_nfe
from unnoise.sampling.grids import density_grid, placed
from unnoise.sampling.samplers import SAMPLERS
from unnoise.schedules import EDMRange

f64 = torch.float64
NFES = (5, 10, 20, 50)
COMPARED = (5, 10, 20)  # NFEs at which the objective is the ratio to diffusers' best


def problems(fixed: bool = False, count: int = 50) -> list[dict]:
    """Cells {mix, sched, x, ref, sigma_data, theirs: {nfe: diffusers' best RMS}} to fit on."""
    if fixed:
        cases = [(ring_mixture(), 400, 0), (mixture_32d(), 200, 0), (mixture_32d(1.5), 200, 0)]
        schedules = {s: unnoise.make_schedule(s, 1000) for s in ("linear", "cosine")}
    else:
        cases = [(mix, 64, 10_000 + i) for i, (_, mix) in enumerate(family(FIT_SEED, count))]
        schedules = {s: unnoise.make_schedule(s, 1000) for s in ("linear", "cosine")} | {"edm": EDMRange()}
    out = []
    for i, (mix, n, seed) in enumerate(cases):
        theirs = {} if fixed else diffusers_best(mix, n, seed)
        for name, sched in schedules.items():
            noise = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=f64)
            x = sched.sigma_max * noise
            sigma_data = 1.0 if fixed else math.sqrt(mix.covariance().diagonal().mean().item())
            cell = {"mix": mix, "sched": sched, "x": x, "sigma_data": sigma_data}
            out.append(cell | {"ref": reference_solution(mix, x, sched.sigma_max), "theirs": theirs.get(name, {})})
        print(f"fitting problem {i + 1}/{len(cases)} ready", flush=True)
    return out


def diffusers_best(mix, n: int, seed: int) -> dict[str, dict[int, float]]:
    """Per schedule and NFE in COMPARED: the RMS error of diffusers' best scheduler (as validated)."""
    import sampler_validation

    sampler_validation.VARIANTS = []  # the diffusers side only
    best = {}
    for schedule in sampler_validation.SCHEDULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = sampler_validation.cell(mix, schedule, list(COMPARED), n, seed)
        best[schedule] = {k: sampler_validation.best(rows, "diffusers", k)["rms"] for k in COMPARED}
    return best


def unpack(p: np.ndarray) -> dict[str, float]:
    """Unconstrained -> grid parameters: centers and widths > 0, shares and tail in (0, 1).

    Four numbers fit density_grid's one bump; seven add the mode bump (mode_center in units of
    sigma_data sqrt(d), mode_width, mode_share)."""
    out = {"center": math.exp(p[0]), "width": math.exp(p[1]), "floor": _sigmoid(p[2]), "tail": _sigmoid(p[3])}
    if len(p) == 7:
        out |= {"mode_center": math.exp(p[4]), "mode_width": math.exp(p[5]), "mode_share": _sigmoid(p[6])}
    return out


def _sigmoid(z: float) -> float:
    return 0.5 * (1 + math.tanh(z / 2))


def log_ratios(name: str, nfe: int, params: dict[str, float], probs: list[dict]) -> np.ndarray:
    """Per cell: log of unnoise's RMS error over diffusers' best (or over 1 where not compared)."""
    out = []
    for p in probs:
        here = placed(params, p["sigma_data"], p["mix"].dim)  # as make_grid places a fit
        grid = density_grid(steps_for_nfe(name, nfe), p["sched"].sigma_min, p["sched"].sigma_max, **here)
        x = SAMPLERS[name](p["mix"].denoise, p["x"], grid)
        err = (x - p["ref"]).pow(2).mean().sqrt().item() if torch.isfinite(x).all() else 1e3
        out.append(math.log(err / p["theirs"].get(nfe, 1.0)))
    return np.array(out)


def objective(name: str, nfe: int, params: dict[str, float], probs: list[dict]) -> float:
    """Mean log ratio, plus the mean of its positive part and of that squared: every cell lost to
    diffusers costs extra, and the worst cells most (the goal is to lose in none)."""
    r = log_ratios(name, nfe, params, probs)
    if nfe not in COMPARED or not probs[0]["theirs"]:
        return float(r.mean())
    lost = np.maximum(r, 0)
    return float(r.mean() + lost.mean() + (lost**2).mean())


def fit(name: str, nfe: int, probs: list[dict], mode: bool) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    starts = [np.array([0.0, 0.7, -2.0, 0.0]), np.array([-1.0, 0.3, -3.0, 2.0])]
    if mode:  # the same, plus a mode bump at sigma_data sqrt(d) with a small share
        starts = [np.concatenate([s, [0.0, -0.5, -2.0]]) for s in starts]
    best = None
    for start in starts:
        res = minimize(
            lambda p: objective(name, nfe, unpack(p), probs),
            start,
            method="Nelder-Mead",
            options={"maxfev": 90 * len(start) // 4, "xatol": 1e-3, "fatol": 1e-4},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x, best.fun


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samplers", nargs="*", default=["unipc", "dpmpp_2m", "euler"])
    parser.add_argument("--count", type=int, default=50, help="mixtures of the fitting family")
    parser.add_argument("--fixed", action="store_true", help="fit on the benchmark's fixed cases instead")
    parser.add_argument("--no-mode", action="store_true", help="one bump only (no mode bump at sigma_data sqrt(d))")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="the budgets to fit (independently)")
    args = parser.parse_args()
    names, probs = args.samplers, problems(args.fixed, args.count)
    for name in names:
        lines = []
        for nfe in args.nfe:
            best, value = fit(name, nfe, probs, mode=not args.no_mode)
            p = unpack(best)
            r = log_ratios(name, nfe, p, probs)
            note = (
                f"geomean ratio {math.exp(r.mean()):.3f}, worst {math.exp(r.max()):.2f}, lost {(r > 0).sum()}/{len(r)}"
                if nfe in COMPARED and not args.fixed
                else ""
            )
            values = ", ".join(f"{k}={v:.4g}" for k, v in p.items())
            steps = steps_for_nfe(name, nfe)
            lines.append(f"        {steps}: dict({values}),  # NFE {nfe}: objective {value:.3f} {note}")
        print(f'    "{name}": {{  # relative\n' + "\n".join(lines) + "\n    },", flush=True)


if __name__ == "__main__":
    main()
