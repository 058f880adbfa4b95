"""Which levers move FID per CPU-minute: a screen of training recipes and sampling-time levers.

Training levers (each a change to ``image_quality.py``'s unnoise recipe, trained for the same
``--minutes`` of CPU, two at a time, one thread each): v-prediction, min-SNR weighting (gamma 5),
the EDM objective and preconditioning, and larger learning rates. Sampling-time levers, on the
baseline's trained run (no retraining): classifier-free guidance, post-hoc EMA profiles (EDM2;
the baseline saves power-function EMA snapshots), and autoguidance by the same run's checkpoint
at a quarter of its steps (the "bad version of itself", Karras et al. 2024).

Every row is FID@``--n`` against the whole Fashion-MNIST test split (class-balanced samples,
unipc at ``--nfe``, seed 0), with the steps and images/s its training reached. The screen's
budget is a quarter of the benchmark's (it exists to rank levers, not to report the goal);
``image_quality.py --recipe`` then trains the chosen recipe at the full budget beside diffusers.

Run: python benchmarks/image_levers.py [--minutes 5] [--n 1000] [--nfe 20] [--out bench-levers]
     (about 100 minutes wall at the defaults on 2 cores; reuses finished variants in OUT)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from image_quality import earlier_self, fid_of, reference_stats, train_unnoise  # noqa: E402

TRAINING = {
    "baseline": {},  # with BASELINE_EXTRA: its saves cost steps (a 80-image preview at each), hence:
    "baseline, no snapshots": {},
    "v-prediction": {"prediction": "v"},
    "min-SNR (gamma 5)": {"loss": "min_snr"},
    "EDM objective": {"objective": "edm", "schedule": None},
    "lr 2e-3": {"lr": 2e-3},
    "lr 4e-3": {"lr": 4e-3},
}
# the baseline keeps post-hoc EMA snapshots and every checkpoint (for autoguidance's earlier self)
# for the sampling-time levers
BASELINE_EXTRA = {"posthoc_ema": [0.05, 0.1], "posthoc_snapshot_every": 50, "save_every": 50, "keep": 10**6}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def train_one(out: Path, name: str, minutes: float) -> None:
    torch.set_num_threads(1)
    overrides = TRAINING[name] | (BASELINE_EXTRA if name == "baseline" else {})
    record = train_unnoise(out / slug(name), minutes, 0, overrides=overrides, samplers=())
    (out / slug(name) / "record.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per variant (of all cores)")
    parser.add_argument("--n", type=int, default=1000, help="images per FID")
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--out", default="bench-levers")
    parser.add_argument("--only", choices=["training", "sampling"], help="score only these levers' rows")
    parser.add_argument("--one", choices=list(TRAINING), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        train_one(out, args.one, args.minutes)
        return
    todo = [name for name in TRAINING if not (out / slug(name) / "record.json").exists()]
    for pair in (todo[i : i + 2] for i in range(0, len(todo), 2)):
        jobs = []
        for name in pair:
            log = open(out / f"{slug(name)}.log", "w")
            cmd = [sys.executable, __file__, "--one", name, "--minutes", str(args.minutes), "--out", str(out)]
            jobs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        for name, job in zip(pair, jobs, strict=True):
            if job.wait():
                raise SystemExit(f"{name} failed: see {out}/{slug(name)}.log")

    from unnoise.metrics import InceptionFeatures
    from unnoise.modalities.run import load_run

    features = InceptionFeatures()
    ref = reference_stats(features)
    score = lambda run, **kw: fid_of(run, features, ref, n=args.n, sampler="unipc", nfe=args.nfe, **kw)  # noqa: E731
    print(f"\nFID@{args.n} (unipc, {args.nfe} NFE), {args.minutes:g} min of CPU per recipe, Fashion-MNIST test split")
    print("| lever | steps (batch 64) | images/s | FID |")
    print("|---|---|---|---|")
    for name in TRAINING if args.only != "sampling" else ():
        record = json.loads((out / slug(name) / "record.json").read_text())
        speed = 64 * record["steps"] / record["cpu_s"]
        fid = score(load_run(out / slug(name), expect="image"))
        print(f"| {name} | {record['steps']} | {speed:.0f} | {fid:.1f} |", flush=True)
    if args.only == "training":
        return
    base_dir = out / "baseline"
    steps = json.loads((base_dir / "record.json").read_text())["steps"]
    base = load_run(base_dir, expect="image")
    for w in (1.5, 2.0):
        print(f"| baseline + guidance {w:g} | {steps} | | {score(base, guidance=w):.1f} |", flush=True)
    for sigma_rel in (0.05, 0.1, 0.15):
        run = load_run(base_dir, expect="image", ema_profile=sigma_rel)
        print(f"| baseline, post-hoc EMA sigma_rel {sigma_rel:g} | {steps} | | {score(run):.1f} |", flush=True)
    bad_step = earlier_self(base_dir, out / "baseline-quarter")
    bad = load_run(out / "baseline-quarter", expect="image")
    for w in (1.5, 2.0):
        fid = score(base.autoguided(bad, w))
        print(f"| baseline, autoguided by its step {bad_step} (w {w:g}) | {steps} | | {fid:.1f} |", flush=True)


if __name__ == "__main__":
    main()
