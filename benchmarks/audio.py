"""Class-conditional spoken digits on CPU: train a waveform network for a CPU budget, then judge its clips.

Trains an audio run (``unnoise.modalities.run.train("audio", ...)``) on the synthesised spoken
digits (8 kHz, 1 s clips; 90% of 690 clips) with the waveform U-Net (``--arch unet``, the default)
or a DiffWave (``--arch diffwave``) for ``--minutes`` of the whole machine (process CPU seconds =
minutes x 60 x cores, so other load on the machine does not shorten it), then, for a few samplers, NFE and guidance
scales, draws 10 clips per digit and prints DiffWave's SC09 figures scaled down: the accuracy of
the spoken-digit classifier (``unnoise.modalities.audio.classifier``) on them, the Frechet distance between
its features of generated and held-out real clips, and the real-time factor of generation on
this machine. Reference rows: the classifier on the held-out real clips, and the distance
between two real sets (held-out vs training).

Goals (the audio issue): accuracy >= 90%; real-time factor < 1 at 20 NFE or fewer.

Run: python benchmarks/audio.py [--minutes 60] [--out bench-audio]   (needs espeak-ng)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CONFIGS = (  # sampler, nfe, guidance, grid
    ("unipc", 20, 1.0, None),
    ("unipc", 20, 2.0, None),
    ("unipc", 20, 4.0, None),
    ("unipc", 20, 8.0, None),
    ("dpmpp_2m_sde", 20, 4.0, None),
    ("unipc", 10, 4.0, None),
    ("ddpm", 6, 4.0, "diffwave"),
)
NETS = {  # settings over the "small" preset
    # 32 x 32 x 8000 at the top level, 256 channels at 125 positions (attention) at the bottom
    "unet": {},
    # receptive field 8,189 samples: the whole 1-s clip
    "diffwave": {"residual_channels": 32, "residual_layers": 22, "dilation_cycle": 11},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (of all cores)")
    parser.add_argument("--out", default="bench-audio")
    parser.add_argument("--model", default="small")
    parser.add_argument("--schedule", default="diffwave")
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--per-class", type=int, default=10, help="generated clips per digit and config")
    parser.add_argument("--arch", default="unet", choices=sorted(NETS), help="the network (default: unet)")
    parser.add_argument("--net", help="network settings over the preset (JSON); default: NETS[arch]")
    parser.add_argument("--fp32", action="store_true", help="train in float32 (default: bf16 autocast, 1.5x faster)")
    args = parser.parse_args()

    from unnoise.modalities.audio import metrics as audio_metrics
    from unnoise.modalities.audio.classifier import digit_classifier
    from unnoise.modalities.audio.pipeline import audio_dataset, evaluate_audio, load_audio_run
    from unnoise.modalities.run import make_config, train
    from unnoise.training.loop import CPUBudget

    out = Path(args.out)
    run_dir = out / "run"
    if not (run_dir / "done.json").exists():
        cfg = make_config(
            "audio",
            {
                "data": "spoken-digits",
                "model": args.model,
                "schedule": args.schedule,
                "T": args.T,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup": 200,
                "steps": 10**7,
                "save_every": 500,
                "log_every": 50,
                "ema_decay": 0.995,  # a short run: average its last few hundred steps, not the early ones
                "bf16": not args.fp32,
                "extra": {"arch": args.arch, "net": json.loads(args.net) if args.net else NETS[args.arch]},
            },
        )
        budget = CPUBudget(args.minutes)
        train("audio", cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), stop=budget)
        record = budget.used()
        record["steps"] = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])["step"]
        (run_dir / "done.json").write_text(json.dumps(record))
    record = json.loads((run_dir / "done.json").read_text())
    run = load_audio_run(run_dir)
    judge = digit_classifier(run.sample_rate, run.samples / run.sample_rate)
    test, train = audio_dataset(run.cfg, "test"), audio_dataset(run.cfg, "train")
    print(
        f"\ntrained {record['steps']} steps (batch {run.cfg.batch_size}) in {record['cpu_s']:.0f} CPU s "
        f"({record['wall_s']:.0f} s wall); {args.per_class * 10} generated clips per row"
    )
    print("| sampler | NFE | guidance | grid | digit accuracy | Frechet distance | real-time factor |")
    print("|---|---|---|---|---|---|---|")
    real_acc = audio_metrics.accuracy(judge, test.waves, test.labels)
    real_fd = audio_metrics.feature_distance(judge, test.waves, train.waves)
    print(f"| (real held-out clips) | | | | {real_acc:.1%} | {real_fd:.2f} (vs training clips) | |")
    rows = []
    for sampler, nfe, guidance, grid in CONFIGS:
        torch.manual_seed(0)
        s = evaluate_audio(
            run, n=10 * args.per_class, sampler=sampler, nfe=nfe, guidance=guidance, grid=grid, classifier=judge
        )
        print(
            f"| {sampler} | {nfe} | {guidance:g} | {grid or 'tuned'} | {s['accuracy']:.1%} | {s['fd']:.2f} | "
            f"{s['rtf']:.3f} |",
            flush=True,
        )
        rows.append(((sampler, nfe, guidance), s))
    # the goals hold together: one setting must be both accurate and faster than real time
    (sampler, nfe, guidance), s = max(rows, key=lambda r: r[1]["accuracy"])
    where = f"{sampler}, {nfe} NFE, guidance {guidance:g}; real-time factor {s['rtf']:.3f}"
    print(f"\nbest accuracy {s['accuracy']:.1%} ({where})")
    fast = [r for r in rows if r[1]["rtf"] < 1 and r[0][1] <= 20]
    if not fast:
        print("no setting is faster than real time: goals (accuracy >= 90% at real-time factor < 1) MISSED")
        return
    (sampler, nfe, guidance), s = max(fast, key=lambda r: r[1]["accuracy"])
    verdict = "met" if s["accuracy"] >= 0.9 else "MISSED"
    print(
        f"best faster than real time: {s['accuracy']:.1%} ({sampler}, {nfe} NFE, guidance {guidance:g}; real-time "
        f"factor {s['rtf']:.3f}): goals (accuracy >= 90% at real-time factor < 1, <= 20 NFE) {verdict}"
    )


if __name__ == "__main__":
    main()
