"""Diffusion-LM on E2E within a CPU budget: fluency, diversity, data-to-text BLEU and food control.

Trains a text run (``unnoise.modalities.run.train("text", ...)``) on E2E (dev + test CSVs from
../shared/data/e2e, split by meaning representation; conditional on the MR with the null MR
dropped in 10% of the time, so one model serves unconditional, data-to-text and controlled
generation) for ``--minutes`` of the whole machine (process CPU seconds = minutes x 60 x cores,
all processes together), then the attribute classifier (``unnoise train control``), and prints
the figures below.

Training runs as ``--processes`` torchrun processes (DDP over gloo, default one per core, one
thread each): this small transformer barely gains from a second thread in one process, so two
processes take about twice the sentences per CPU second, and the small batch (32) four times the
optimizer steps of one two-thread process at batch 64 (6,132 steps an hour before; the model is
far from converged, and steps are what it lacks). Then it prints:

- held-out bits/token (negative ELBO), unconditional and given the meaning representation;
- perplexity (Kneser-Ney trigram fitted on the training split) of generated against held-out
  real sentences, and their distinct-2 (goals: ratio <= 1.5; distinct-2 within 20%);
- data-to-text BLEU on held-out MRs (classifier-free guidance 2);
- control success for every food value (mentioned, and a bag-of-n-grams judge trained on real
  sentences agrees), unguided and guided (goal: >= 85% for food type; Diffusion-LM: 81.2%).

Run: python benchmarks/text.py [--minutes 60] [--out bench-text] [--processes 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (of all cores)")
    parser.add_argument("--out", default="bench-text")
    parser.add_argument("--model", default="small")
    parser.add_argument("--control-steps", type=int, default=3000, help="attribute-classifier training steps")
    parser.add_argument("--scale", type=float, default=10.0, help="control guidance scale")
    parser.add_argument("--grad-steps", type=int, default=3, help="classifier-gradient steps per denoiser call")
    parser.add_argument(
        "--control-guidance",
        type=float,
        default=3.0,
        help="also condition on the control as a partial MR, classifier-free guided with this scale (0: off)",
    )
    parser.add_argument("--only-control", action="store_true", help="skip bits/token, fluency and BLEU")
    parser.add_argument(
        "--net",
        default='{"width": 128, "depth": 8, "dropout": 0.0}',
        help="transformer settings over the preset (JSON); the default trades width for 6x the steps of 'small'",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split between the processes)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (after 200 warm-up steps)")
    parser.add_argument("--lr-decay", default="constant", help="constant | cosine (to 0 at --steps)")
    parser.add_argument("--steps", type=int, default=10**7, help="at most this many steps (the budget ends first)")
    parser.add_argument("--fp32", action="store_true", help="train in float32 (default: bf16 autocast)")
    parser.add_argument("--n", type=int, default=50, help="samples per food value and for fluency (x4)")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="train with this many torchrun processes (DDP), the cores split between them; 1: one process",
    )
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from unnoise.modalities.text.attribute_classifier import train_control
    from unnoise.modalities.text.pipeline import load_text_run

    out = Path(args.out)
    run_dir = out / "run"
    if args.train_only:
        return train(args, run_dir)
    if not (run_dir / "done.json").exists():
        if args.processes > 1:  # the same script, training only, under torchrun
            env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
            subprocess.run([*cmd, str(args.processes), __file__, "--train-only", *sys.argv[1:]], env=env, check=True)
        else:
            train(args, run_dir)
    record = json.loads((run_dir / "done.json").read_text())
    if not (run_dir / "control").is_dir():
        train_control(run_dir, steps=args.control_steps)
    run = load_text_run(run_dir)
    how = f"{record.get('processes', 1)} process(es) of {record.get('threads', '?')} thread(s)"
    print(f"\ntrained {record['steps']} steps in {record['cpu_s']:.0f} CPU s ({record['wall_s']:.0f} s wall, {how})")
    if not args.only_control:
        fluency_and_bleu(run, args.n)
    control_table(run, run_dir, args)


def train(args: argparse.Namespace, run_dir: Path) -> None:
    """Train for the budget: in this process, or in each of torchrun's (which share the budget)."""
    from unnoise.modalities.run import make_config
    from unnoise.modalities.run import train as train_modality
    from unnoise.training import distributed
    from unnoise.training.loop import CPUBudget

    shard = distributed.init()
    # the text modality's defaults (Diffusion-LM: sqrt schedule, x0 prediction) under these settings
    cfg = make_config(
        "text",
        {
            "data": "e2e",
            "model": args.model,
            "schedule": "sqrt",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lr_decay": args.lr_decay,
            "warmup": 200,
            "save_every": 1000,
            "log_every": 50,
            "ema_decay": 0.999,
            "bf16": not args.fp32,
            "extra": {"embed_dim": 16, "seq_len": 48, "net": json.loads(args.net)},
        },
    )
    budget = CPUBudget(args.minutes)  # each process's share
    resume = (run_dir / "checkpoints").is_dir()
    train_modality("text", cfg, run_dir, resume=resume, stop=budget, progress=shard.main)
    record = budget.used()
    record["cpu_s"] = distributed.mean(record["cpu_s"]) * shard.world  # all processes together
    record |= {"processes": shard.world, "threads": torch.get_num_threads()}
    if shard.main:
        record["steps"] = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])["step"]
        (run_dir / "done.json").write_text(json.dumps(record))
    distributed.close()


def fluency_and_bleu(run, n: int) -> None:
    from unnoise.modalities.text.metrics import bits_per_token, evaluate_text

    for conditional in (False, True):
        bits, se = bits_per_token(run, n=400, conditional=conditional)
        given = "given the MR" if conditional else "unconditional"
        print(f"held-out negative ELBO ({given}, 400 sentences, 100 strata over t): {bits:.3f} +- {se:.3f} bits/token")
    s = evaluate_text(run, n=4 * n, guidance=2.0)
    print("| figure | generated | held-out real | ratio | goal |")
    print("|---|---|---|---|---|")
    print(f"| KN perplexity | {s['ppl_generated']:.1f} | {s['ppl_held_out']:.1f} | {s['ppl_ratio']:.2f} | <= 1.5 |")
    d2 = (s["distinct2_generated"], s["distinct2_held_out"], s["distinct2_ratio"])
    print(f"| distinct-2 | {d2[0]:.3f} | {d2[1]:.3f} | {d2[2]:.2f} | 0.8 to 1.2 |")
    if "bleu" in s:
        print(f"\ndata-to-text BLEU on {s['bleu_mrs']:.0f} held-out MRs (guidance 2): {s['bleu']:.4f}")


def control_table(run, run_dir: Path, args: argparse.Namespace) -> None:
    from unnoise.modalities.text.attribute_classifier import load_classifier
    from unnoise.modalities.text.control import sample_controlled
    from unnoise.modalities.text.control_metrics import control_success, train_judge

    classifier, judge = load_classifier(run_dir), train_judge(run)
    print(f"\njudge held-out accuracy: {judge.accuracy}")
    how = f"scale {args.scale:g}, {args.grad_steps} gradient step(s)"
    cfg_scale = args.control_guidance or None  # 0: the classifier alone, on the unconditional model
    if cfg_scale is not None:
        how += f", classifier-free guidance {cfg_scale:g} on the partial MR"
    print(f"| food | unguided | guided ({how}) |")
    print("|---|---|---|")
    guided_all, examples = [], []
    for value in classifier.config.fields["food"]:
        rows = []
        for scale in (0.0, args.scale):
            guide = dict(scale=scale, steps=args.grad_steps, guidance=cfg_scale if scale else None)
            text = sample_controlled(
                run, {"food": value}, n=args.n, sampler="ddpm", nfe=100, classifier=classifier, **guide
            )
            rows.append(control_success(text, "food", value, judge))
        guided_all.append(rows[1])
        examples.append(f"{value}: {text[0]}")
        print(f"| {value} | {rows[0]:.0%} | {rows[1]:.0%} |", flush=True)
    print("\nthe first guided sentence of each value:", *examples, sep="\n  ")
    mean = sum(guided_all) / len(guided_all)
    print(f"\nfood control success, mean over values: {mean:.1%} (goal >= 85%): {'met' if mean >= 0.85 else 'MISSED'}")


if __name__ == "__main__":
    main()
