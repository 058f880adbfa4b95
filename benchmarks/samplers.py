"""unnoise's samplers against diffusers' schedulers, on exact denoisers, in one run.

Gaussian mixtures have Gaussian-mixture noisy marginals, so the optimal denoiser is known in
closed form. For a 2-D and a 32-D mixture (anisotropic components, unequal weights), under the
DDPM linear and the cosine schedules (T = 1000), every method starts from the same noise at the
schedule's sigma_max and spends at most NFE denoiser calls. Printed per configuration:

- ODE error: RMS over all coordinates of (sample - high-accuracy PF-ODE solution from the same
  noise), and the median over samples of the per-sample RMS;
- Frechet distance (means and covariances) against the true mixture, and mode-weight error (total
  variation between the shares of samples each component explains best, in the samples and in
  exact draws); the "exact ODE" row shows the floor these have for this many samples;
- per-step overhead with a zero-cost model, unnoise vs diffusers.

Per-sample error statistics: RMS, median, p90 and max of the per-sample RMS error, and the
mode-flip rate (share of samples whose most responsible component differs from that of the
exact ODE solution from the same noise). After the fixed cases, the validation family:
:mod:`sampler_validation` (random mixtures drawn as benchmarks/mixtures.py documents, with a
seed that grid fitting never uses; linear, cosine and EDM ranges; NFE 5, 10, 20).

Run: python benchmarks/samplers.py            (fixed cases ~10 min, then 50 validation mixtures)
     python benchmarks/samplers.py --quick    (2-D only, NFE 5 and 10; 6 validation mixtures)
     python benchmarks/samplers.py --validation-only [--validation 50] [--samples 64] [--family-seed 2]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from functools import partial

import torch
from mixtures import mixture_32d

import unnoise
from unnoise.metrics import frechet_distance
from unnoise.modalities.toy.data import GaussianMixture, ring_mixture
from unnoise.sampling.front import DEFAULT_GRIDS
from unnoise.sampling.interop import run_scheduler
from unnoise.sampling.samplers import SAMPLERS

f64 = torch.float64
OURS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh1", "unipc_3", "lms"]
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # unnoise name -> diffusers name


def diffusers_configs(schedule: str) -> dict[str, tuple[str, dict]]:
    b = {"beta_schedule": SCHEDULES[schedule]}
    return {
        "ddim": ("DDIMScheduler", b | {"clip_sample": False, "set_alpha_to_one": True}),
        "ddim_trailing": ("DDIMScheduler", b | {"clip_sample": False, "timestep_spacing": "trailing"}),
        "dpm++2m": ("DPMSolverMultistepScheduler", b),
        "dpm++2m_karras": ("DPMSolverMultistepScheduler", b | {"use_karras_sigmas": True}),
        "unipc": ("UniPCMultistepScheduler", b),
        "deis": ("DEISMultistepScheduler", b),
        "euler": ("EulerDiscreteScheduler", b),
        "heun": ("HeunDiscreteScheduler", b),
        "lms": ("LMSDiscreteScheduler", b),
    }


def reference_solution(mix: GaussianMixture, x: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """PF-ODE from sigma_max to 1e-6 by adaptive RK45 at rtol = atol = 1e-9, then D (error ~1e-12)."""
    grid = torch.tensor([sigma_max, 1e-6, 0.0], dtype=f64)
    return SAMPLERS["rk45"](mix.denoise, x, grid, rtol=1e-9, atol=1e-9)


def metrics(mix: GaussianMixture, out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    if not torch.isfinite(out).all():
        return dict.fromkeys(("rms", "median", "p90", "max", "flip", "fd", "modes"), math.inf)
    from sampler_validation import per_sample

    mean, cov = out.mean(0), torch.cov(out.T).reshape(mix.dim, mix.dim)
    true_mean, true_cov = mix.weights @ mix.means, mix.covariance()
    fd = frechet_distance(mean.numpy(), cov.numpy(), true_mean.numpy(), true_cov.numpy())
    return per_sample(mix, out, ref) | {
        "fd": fd,
        "modes": 0.5 * (_shares(mix, out) - _true_shares(mix)).abs().sum().item(),
    }


def _shares(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Share of samples that each component explains best (argmax responsibility)."""
    logp, _, _ = mix._components(x, 0.0)
    return torch.bincount(logp.argmax(-1), minlength=len(mix.weights)).double() / len(x)


_TRUTH: dict[int, torch.Tensor] = {}


def _true_shares(mix: GaussianMixture) -> torch.Tensor:
    """The same statistic on 200k exact samples (overlapping components make it differ from the weights)."""
    key = id(mix)
    if key not in _TRUTH:
        _TRUTH[key] = _shares(mix, mix.sample(200_000, torch.Generator().manual_seed(99))[0])
    return _TRUTH[key]


def run_ours(name: str, mix, x, nfe: int, sched) -> torch.Tensor:
    from sampler_validation import data_std

    return unnoise.sample(
        mix.denoise, x, sampler=name, nfe=nfe, sigma_max=sched.sigma_max, sigma_min=sched.sigma_min, schedule=sched,
        sigma_data=data_std(mix),
    )  # fmt: skip


def run_theirs(cls: str, kw: dict, mix, x, nfe: int) -> torch.Tensor:
    import diffusers

    scheduler = getattr(diffusers, cls)(**kw)
    steps = (nfe + 1) // 2 if cls == "HeunDiscreteScheduler" else nfe
    return run_scheduler(scheduler, mix.denoise, x, steps)[-1].double()


def their_start(cls: str, kw: dict, sched) -> float:
    """diffusers' first noise level for this scheduler (leading spacing starts below sigma_max)."""
    import diffusers

    from unnoise.sampling.interop import scheduler_sigmas

    return float(scheduler_sigmas(getattr(diffusers, cls)(**kw), 10)[0])


def evaluate(label: str, mix: GaussianMixture, n: int, schedule: str, nfes: list[int]) -> list[dict]:
    sched = unnoise.make_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, mix.dim, generator=g, dtype=f64)
    rows = []
    refs: dict[float, torch.Tensor] = {}

    def ref_for(sigma_start: float) -> torch.Tensor:
        if sigma_start not in refs:
            refs[sigma_start] = reference_solution(mix, sigma_start * noise, sigma_start)
        return refs[sigma_start]

    exact = metrics(mix, ref_for(sched.sigma_max), ref_for(sched.sigma_max))
    for nfe in nfes:  # the floor of FD and mode error for this many samples
        rows.append({"side": "reference", "method": "exact ODE", "nfe": nfe} | exact)
    for name in OURS:
        for nfe in nfes:
            x = sched.sigma_max * noise
            out = run_ours(name, mix, x, nfe, sched)
            rows.append({"side": "unnoise", "method": name, "nfe": nfe} | metrics(mix, out, ref_for(sched.sigma_max)))
    for name, (cls, kw) in diffusers_configs(schedule).items():
        try:
            start = their_start(cls, kw, sched)
        except Exception as e:  # noqa: BLE001 - a failing scheduler is a result, not a crash
            start, failure = None, f"{type(e).__name__}"
        for nfe in nfes:
            if start is None:
                rows.append({"side": "diffusers", "method": name, "nfe": nfe, "failure": failure})
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = run_theirs(cls, kw, mix, start * noise, nfe)
                rows.append({"side": "diffusers", "method": name, "nfe": nfe} | metrics(mix, out, ref_for(start)))
            except Exception as e:  # noqa: BLE001
                rows.append({"side": "diffusers", "method": name, "nfe": nfe, "failure": type(e).__name__})
    for r in rows:
        r["config"] = f"{label}/{schedule}"
    return rows


def print_config_table(rows: list[dict], nfes: list[int]) -> None:
    config = rows[0]["config"]
    print(f"\n### {config}: RMS ODE error (per-sample median, p90, max; mode-flip rate) | FD | mode-weight TV")
    print("| side | method | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for side in ("reference", "unnoise", "diffusers"):
        methods = dict.fromkeys(r["method"] for r in rows if r["side"] == side)
        for m in methods:
            cells = []
            for k in nfes:
                r = next(r for r in rows if r["side"] == side and r["method"] == m and r["nfe"] == k)
                if "failure" in r:
                    cells.append(f"fails: {r['failure']}")
                else:
                    tail = f"{r['median']:.1e}, {r['p90']:.1e}, {r['max']:.1e}; {r['flip']:.3f}"
                    cells.append(f"{r['rms']:.2e} ({tail}) / {r['fd']:.1e} / {r['modes']:.3f}")
            grid = f" [{DEFAULT_GRIDS[m]}]" if side == "unnoise" else ""
            print(f"| {side} | {m}{grid} | " + " | ".join(cells) + " |")


def summary(all_rows: list[dict], nfes: list[int]) -> bool:
    print("\n### Best of each side (RMS ODE error); goal at NFE 5, 10, 20: ratio <= 0.5")
    print("| config | NFE | unnoise best | diffusers best | ratio | goal |")
    print("|---|---|---|---|---|---|")
    ok = True
    for config in dict.fromkeys(r["config"] for r in all_rows):
        for k in nfes:
            sel = [r for r in all_rows if r["config"] == config and r["nfe"] == k and "failure" not in r]
            ours = min((r for r in sel if r["side"] == "unnoise"), key=lambda r: r["rms"])
            theirs = min((r for r in sel if r["side"] == "diffusers"), key=lambda r: r["rms"])
            ratio = ours["rms"] / theirs["rms"]
            goal = "" if k > 20 else ("met" if ratio <= 0.5 else "MISSED")
            ok &= goal != "MISSED"
            print(
                f"| {config} | {k} | {ours['method']} {ours['rms']:.2e} | {theirs['method']} {theirs['rms']:.2e} "
                f"| {ratio:.2f} | {goal} |"
            )
    return ok


def overhead(shapes: list[tuple[int, ...]], steps: int = 50, repeats: int = 5) -> None:
    """Seconds per step beyond the model, with a zero-cost model (D(x) = x, eps = 0)."""
    import diffusers

    print(f"\n### Per-step overhead with a zero-cost model (microseconds per step, best of {repeats})")
    print("| shape | method | unnoise | diffusers | ratio |")
    print("|---|---|---|---|---|")
    pairs = {
        "euler": ("euler", "EulerDiscreteScheduler"),
        "dpm++2m": ("dpmpp_2m", "DPMSolverMultistepScheduler"),
        "unipc": ("unipc", "UniPCMultistepScheduler"),
        "ddim": ("ddim", "DDIMScheduler"),
    }
    grid = unnoise.sampling.grids.make_grid("karras", steps, 0.01, 80.0)
    for shape in shapes:
        x = torch.randn(shape)
        for label, (ours, cls) in pairs.items():
            t_ours = _best_time(partial(SAMPLERS[ours], lambda x, s: x, x, grid), repeats) / steps
            t_theirs = _best_time(partial(_run_zero_model, getattr(diffusers, cls)(), x, steps), repeats) / steps
            print(f"| {shape} | {label} | {t_ours * 1e6:.0f} | {t_theirs * 1e6:.0f} | {t_ours / t_theirs:.2f} |")


def _run_zero_model(scheduler, x: torch.Tensor, steps: int) -> None:
    scheduler.set_timesteps(steps)
    sample = x
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.zeros_like(sample), t, scheduler.scale_model_input(sample, t)).prev_sample


def _best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-D mixture only, NFE 5 and 10; 6 validation mixtures")
    parser.add_argument("--validation", type=int, default=None, help="mixtures of the validation family (50)")
    parser.add_argument("--samples", type=int, default=64, help="samples per validation mixture (64)")
    parser.add_argument("--validation-only", action="store_true", help="skip the fixed cases and the overhead")
    parser.add_argument(
        "--family-seed", type=int, default=None, help="draw the validation family with this seed (default 2; 1 fits)"
    )
    args = parser.parse_args()
    count = args.validation if args.validation is not None else 6 if args.quick else 50
    if args.validation_only:
        from sampler_validation import run

        return run(count, args.samples, [5, 10, 20], args.family_seed)
    nfes = [5, 10] if args.quick else [5, 10, 20, 50]
    problems = [("2d", ring_mixture(), 2000)]
    if not args.quick:
        problems += [("32d", mixture_32d(), 1000), ("32d-far", mixture_32d(1.5), 1000)]
    all_rows = []
    for label, mix, n in problems:
        for schedule in SCHEDULES:
            rows = evaluate(label, mix, n, schedule, nfes)
            print_config_table(rows, nfes)
            all_rows += rows
    met = summary(all_rows, nfes)
    overhead([(64, 2), (16, 3, 32, 32)] if args.quick else [(64, 2), (256, 32), (16, 3, 64, 64)])
    print(f"\ngoal (unnoise's best <= 0.5 x diffusers' best at NFE 5, 10, 20 everywhere): {'met' if met else 'MISSED'}")
    if count:
        from sampler_validation import run

        run(count, args.samples, [5, 10, 20], args.family_seed)


if __name__ == "__main__":
    main()
