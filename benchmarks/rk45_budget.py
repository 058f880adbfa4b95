"""rk45 under an NFE budget: calls used, method, tolerance and RMS error against the exact ODE.

On the benchmark's fixed mixtures (2-D ring, 32-D, 32-D far) under the linear and cosine DDPM
schedules (T = 1000), 200 samples each; the exact solution is the PF-ODE from sigma_max to
sigma_min at rtol = atol = 1e-10, then D(x, sigma_min), the end point a budgeted run aims at.

Run: python benchmarks/rk45_budget.py   (about 30 s)
"""

from __future__ import annotations

import warnings

import torch
from mixtures import mixture_32d

import unnoise
from unnoise.modalities.toy.data import ring_mixture
from unnoise.sampling.front import CountingDenoiser

f64 = torch.float64


def main() -> None:
    print("| mixture | schedule | NFE budget | calls used | method | rtol | RMS error vs exact ODE |")
    print("|---|---|---|---|---|---|---|")
    for label, mix in (("2d", ring_mixture()), ("32d", mixture_32d()), ("32d-far", mixture_32d(1.5))):
        for schedule in ("linear", "cosine"):
            sched = unnoise.make_schedule(schedule, 1000)
            x = sched.sigma_max * torch.randn(200, mix.dim, generator=torch.Generator().manual_seed(0), dtype=f64)
            grid = torch.tensor([sched.sigma_max, sched.sigma_min, 0.0], dtype=f64)
            exact = unnoise.SAMPLERS["rk45"](mix.denoise, x, grid, rtol=1e-10, atol=1e-10)
            for nfe in (5, 10, 20, 50, 150, 400):
                D, info = CountingDenoiser(mix.denoise), {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = unnoise.sample(
                        D, x, sampler="rk45", nfe=nfe, sigma_max=sched.sigma_max, sigma_min=sched.sigma_min, info=info
                    )
                rtol = f"{info['rtol']:.1e}" if info["method"] != "unipc" else "-"
                err = (out - exact).pow(2).mean().sqrt().item()
                print(f"| {label} | {schedule} | {nfe} | {D.nfe} | {info['method']} | {rtol} | {err:.2e} |")


if __name__ == "__main__":
    main()
