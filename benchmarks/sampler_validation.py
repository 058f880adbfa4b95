"""The validation family of benchmarks/samplers.py: unnoise's default against diffusers' best.

For each mixture of the random validation family (benchmarks/mixtures.py, VALIDATION_SEED;
never used by benchmarks/tune_grids.py) and each schedule (diffusers' linear and cosine DDPM
betas with T = 1000, and the EDM range 0.002..80), every method starts from the same noise and
spends at most NFE (5, 10, 20) denoiser calls of the exact mixture denoiser; unnoise is told the
data's standard deviation (sigma_data, as a trained run records it), diffusers needs none. Per-sample error:
RMS over coordinates of (sample - exact PF-ODE solution from the same noise). Per cell
(mixture x schedule x NFE) and side: RMS, median, p90 and max of it, and the mode-flip rate
(share of samples whose most responsible component differs from the exact solution's). The
diffusers side is its best scheduler in that cell by RMS (DDIM, Euler, DPM++ 2M with and
without Karras sigmas, UniPC, DEIS, Heun, LMS on DDPM betas; EDM Euler and EDM DPM++ 2M on the
EDM range).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch
from mixtures import FIT_SEED, VALIDATION_SEED, family
from samplers import diffusers_configs, reference_solution, run_theirs, their_start

import unnoise
from unnoise.sampling.interop import run_scheduler
from unnoise.schedules import EDMRange

f64 = torch.float64
SCHEDULES = ("linear", "cosine", "edm")
# unnoise's default ODE sampler here (the README's example), on its default grid: chosen on the
# fitting family (seed 1), where it beat UniPC-2 (geomean ratio 0.233 vs 0.258, worst cell 6.3 vs 20.4).
DEFAULT = "unipc_3"
# unnoise variants also measured: (label, sampler, grid); the first is the default.
VARIANTS = [
    (DEFAULT, DEFAULT, None),
    ("unipc", "unipc", None),
    ("dpmpp_3m", "dpmpp_3m", None),
    ("unipc/log_snr", "unipc", "log_snr"),
]


def data_std(mix) -> float:
    """The data's standard deviation per coordinate, sqrt(mean diagonal of the covariance): what a
    trained run records as sigma_data, and what unnoise's tuned grid is centred on."""
    return math.sqrt(mix.covariance().diagonal().mean().item())


def per_sample(mix, out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """RMS / median / p90 / max of the per-sample RMS error, and the mode-flip rate."""
    if not torch.isfinite(out).all():
        return dict.fromkeys(("rms", "median", "p90", "max", "flip"), math.inf)
    e = (out - ref).pow(2).mean(1).sqrt()
    comp = mix._components(out, 0.0)[0].argmax(-1)
    comp_ref = mix._components(ref, 0.0)[0].argmax(-1)
    return {
        "rms": e.pow(2).mean().sqrt().item(),
        "median": e.median().item(),
        "p90": e.quantile(0.9).item(),
        "max": e.max().item(),
        "flip": (comp != comp_ref).double().mean().item(),
    }


def _edm_theirs(mix, x: torch.Tensor, nfe: int, cls: str):
    """diffusers' EDM schedulers (sigma_data = 1, so run_scheduler's c_in undo is exact) on D."""
    import diffusers

    sched = getattr(diffusers, cls)(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0)

    def as_eps(x, sigma):  # the F they precondition: D = c_skip x + c_out F, returned as x - sigma F
        c_skip, c_out = 1 / (sigma**2 + 1), sigma / (sigma**2 + 1).sqrt()
        return x - sigma * (mix.denoise(x, sigma) - c_skip * x) / c_out

    return run_scheduler(sched, as_eps, x, nfe)[-1].double()


def cell(mix, schedule: str, nfes: list[int], n: int, seed: int) -> list[dict]:
    """Rows {side, method, nfe, rms, median, p90, max, flip} for one mixture and schedule."""
    sched = EDMRange() if schedule == "edm" else unnoise.make_schedule(schedule, 1000)
    noise = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=f64)
    refs: dict[float, torch.Tensor] = {}

    def ref(start: float) -> torch.Tensor:
        if start not in refs:
            refs[start] = reference_solution(mix, start * noise, start)
        return refs[start]

    rows = []
    for label, name, grid in VARIANTS:
        for nfe in nfes:
            out = unnoise.sample(
                mix.denoise, sched.sigma_max * noise, sampler=name, nfe=nfe, grid=grid,
                sigma_max=sched.sigma_max, sigma_min=sched.sigma_min, schedule=None if schedule == "edm" else sched,
                sigma_data=data_std(mix),
            )  # fmt: skip
            rows.append({"side": "unnoise", "method": label, "nfe": nfe} | per_sample(mix, out, ref(sched.sigma_max)))
    theirs = (
        {"edm_euler": "EDMEulerScheduler", "edm_dpm++2m": "EDMDPMSolverMultistepScheduler"}
        if schedule == "edm"
        else diffusers_configs(schedule)
    )
    for name, spec in theirs.items():
        for nfe in nfes:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if schedule == "edm":
                        start, out = sched.sigma_max, _edm_theirs(mix, sched.sigma_max * noise, nfe, spec)
                    else:
                        start = their_start(*spec, sched)
                        out = run_theirs(*spec, mix, start * noise, nfe)
                rows.append({"side": "diffusers", "method": name, "nfe": nfe} | per_sample(mix, out, ref(start)))
            except Exception:  # noqa: BLE001, S112 - a failing scheduler is no candidate for "best"
                continue
    return rows


def best(rows: list[dict], side: str, nfe: int, method: str | None = None) -> dict:
    sel = [r for r in rows if r["side"] == side and r["nfe"] == nfe and (method is None or r["method"] == method)]
    return min(sel, key=lambda r: r["rms"])


def run(count: int, n: int, nfes: list[int], seed: int | None = None) -> None:
    """The validation table over ``count`` mixtures of the family drawn with ``seed`` (default
    VALIDATION_SEED; FIT_SEED is the one the grids were fitted on, so it is refused)."""
    seed = VALIDATION_SEED if seed is None else seed
    if seed == FIT_SEED:
        raise SystemExit(f"seed {FIT_SEED} is the fitting family's (benchmarks/tune_grids.py): validate on another")
    start_time = time.perf_counter()
    cells = []  # (label, schedule, nfe, rows)
    for i, (label, mix) in enumerate(family(seed, count)):
        for schedule in SCHEDULES:
            rows = cell(mix, schedule, nfes, n, seed=10_000 + i)
            cells += [(label, schedule, k, rows) for k in nfes]
    print(f"\n### Validation family: {count} mixtures (seed {seed}) x {SCHEDULES} x NFE {nfes}, {n} samples")
    print("ratio = unnoise / diffusers' best (by RMS) in each cell; per-sample errors pooled as medians over cells")
    print("| unnoise | NFE | geomean RMS ratio | worst cell | median-error ratio | cells > 1 | flip ours / theirs |")
    print("|---|---|---|---|---|---|---|")
    for label, _, _ in VARIANTS:
        for k in [*nfes, None]:
            sel = [c for c in cells if k is None or c[2] == k]
            rat, med, flips = [], [], ([], [])
            for mlabel, schedule, nfe, rows in sel:
                ours, theirs = best(rows, "unnoise", nfe, label), best(rows, "diffusers", nfe)
                rat.append((ours["rms"] / theirs["rms"], f"{mlabel}/{schedule}/{nfe} vs {theirs['method']}"))
                med.append(math.log(ours["median"] / theirs["median"]))
                flips[0].append(ours["flip"])
                flips[1].append(theirs["flip"])
            geo = math.exp(statistics.fmean(math.log(r) for r, _ in rat))
            worst = max(rat)
            med_ratio, above = math.exp(statistics.fmean(med)), sum(r > 1 for r, _ in rat)
            print(
                f"| {label} | {k or 'all'} | {geo:.3f} | {worst[0]:.2f} ({worst[1]}) | {med_ratio:.3f} "
                f"| {above}/{len(rat)} | {statistics.fmean(flips[0]):.4f} / {statistics.fmean(flips[1]):.4f} |"
            )
    print("\n### Tail metrics, medians over cells (unnoise default vs diffusers' best per cell)")
    print("| NFE | side | RMS | median | p90 | max | flip rate (mean) |")
    print("|---|---|---|---|---|---|---|")
    for k in nfes:
        for side in ("unnoise", "diffusers"):
            rs = [best(rows, side, k, DEFAULT if side == "unnoise" else None) for _, _, nfe, rows in cells if nfe == k]
            m = {key: statistics.median(r[key] for r in rs) for key in ("rms", "median", "p90", "max")}
            print(
                f"| {k} | {side} | {m['rms']:.2e} | {m['median']:.2e} | {m['p90']:.2e} | {m['max']:.2e} "
                f"| {statistics.fmean(r['flip'] for r in rs):.4f} |"
            )
    print(f"\nvalidation took {time.perf_counter() - start_time:.0f} s")
