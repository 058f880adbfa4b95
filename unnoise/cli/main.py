"""Command line: argument parsing only; the work lives in the package's modules.

unnoise train image --data digits --model small --steps 2000 --out RUN [--resume]
unnoise sample --run RUN --sampler unipc --nfe 20 --guidance 3 --class 7 --n 64 --out FILE
unnoise eval --run RUN --bpd
unnoise demo [images|toy|text|audio]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonnegative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


_GRID_HELP = (
    "noise-level grid: tuned (default) | karras | log_snr | linspace | leading | trailing | "
    "diffwave (DiffWave's 6-step fast schedule: --sampler ddpm --nfe 6)"
)

# torchrun's own parser reads --run and --n as abbreviations of its flags (--run-path, --nnodes...),
# so under torchrun they are spelled --run-dir and --count.
_RUN_HELP = "run folder (alias --run-dir, the spelling torchrun lets through)"
# Each modality's default sampler, for `sample` and `eval`. Images: at 20 NFE on a 20-CPU-minute
# Fashion-MNIST model, FID@1000 is 28.0 with dpmpp_2m_sde against 47.3 with unipc and 49.2 with
# dpmpp_2m (benchmarks/image_quality.py --samplers-at 20): an SDE's noise corrects a short-trained
# score's errors, which an ODE carries to the end. Text, likewise: the Kneser-Ney perplexity of 100
# unconditional samples at 50 NFE from the hour-trained E2E run is 78.0 with dpmpp_2m_sde against
# 106.5 with dpmpp_2m (real sentences: 6.5; `unnoise eval --run RUN --n 100 --nfe 50 --sampler S`).
DEFAULT_SAMPLERS = {"image": "dpmpp_2m_sde", "text": "dpmpp_2m_sde", "audio": "unipc"}
_SAMPLER_DEFAULTS = "default: " + ", ".join(f"{v} for {k}" for k, v in DEFAULT_SAMPLERS.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from unnoise.sampling.samplers import SAMPLERS

    parser = _Parser(prog="unnoise", description="Diffusion models: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser("train", help="train a model; writes a run folder (config, safetensors weights, log)")
    train.add_argument(
        "modality",
        choices=["image", "text", "audio", "control"],
        help="control: the attribute classifier of the text run in --out (for sample text --control)",
    )
    train.add_argument(
        "--data",
        default=None,
        help="image: digits | fashion-mnist | a folder; text: tiny | e2e | a file; audio: spoken-digits | a folder",
    )
    train.add_argument("--image-size", type=_positive_int, default=None, help="folders: resize and crop to this")
    train.add_argument(
        "--model", default=None, help="image: tiny | small | cifar; text: tiny | small | base; audio: tiny | small"
    )
    train.add_argument("--arch", default=None, help="audio network: unet (the default) | diffwave")
    train.add_argument("--steps", type=_positive_int, default=None)
    train.add_argument("--batch-size", type=_positive_int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--loss", default=None, help="simple | hybrid | min_snr")
    train.add_argument("--prediction", default=None, help="eps | x0 | v")
    train.add_argument("--schedule", default=None, help="noise schedule, e.g. cosine | linear")
    train.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (CPU AMX/AVX-512)")
    train.add_argument("--unconditional", action="store_true", help="ignore class labels")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--save-every", type=_positive_int, default=None, help="checkpoint interval in steps")
    train.add_argument("--config", type=Path, help="a JSON or TOML file of training settings (flags win)")
    train.add_argument("--out", type=Path, required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    sample = sub.add_parser("sample", help="draw samples from a run: FILE.png + FILE.npz, or FILE.txt for text")
    sample.add_argument("modality", nargs="?", choices=["image", "text", "audio"], help="optional: must match the run")
    sample.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help=_RUN_HELP)
    sample.add_argument("--template", default=None, help='text: fill the blanks, e.g. "the ___ is near the ___ ."')
    sample.add_argument(
        "--mr", default=None, help='text: data-to-text from an E2E MR, e.g. "name[Aromi], food[Chinese]"'
    )
    sample.add_argument(
        "--control",
        action="append",
        default=None,
        metavar="FIELD=VALUE",
        help='text: steer toward an E2E attribute, e.g. --control food=Chinese (repeatable; needs "train control")',
    )
    sample.add_argument(
        "--control-scale", type=_nonnegative_float, default=3.0, help="text: classifier-guidance scale of --control"
    )
    sample.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)} ({_SAMPLER_DEFAULTS})")
    sample.add_argument("--nfe", type=_positive_int, default=20, help="denoiser evaluations")
    sample.add_argument(
        "--guidance",
        type=_nonnegative_float,
        default=1.0,
        help="classifier-free guidance scale (text --control: on the control as a partial MR)",
    )
    sample.add_argument("--class", dest="class_id", type=int, default=None, help="class id (conditional runs)")
    sample.add_argument("--eta", type=_nonnegative_float, default=None, help="stochasticity (ddim, *_ancestral, *_sde)")
    sample.add_argument("--grid", default=None, help=_GRID_HELP)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--n", "--count", dest="n", type=_positive_int, default=64, help="how many (alias --count)")
    sample.add_argument("--out", type=Path, required=True, help="FILE: writes FILE.png and FILE.npz")
    sample.add_argument("--trajectory", type=Path, default=None, help="also write x_t and predicted x0 per step")

    ev = sub.add_parser(
        "eval",
        help="evaluate a run: images --bpd / --fid N; text: perplexity, distinct-2, BLEU (--bpd: bits/token); "
        "audio: digit accuracy, Frechet distance, real-time factor",
    )
    ev.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help=_RUN_HELP)
    ev.add_argument("--bpd", action="store_true", help="held-out negative ELBO: bits/dim (images) or bits/token (text)")
    ev.add_argument(
        "--n",
        "--count",
        dest="n",
        type=_positive_int,
        default=None,
        help="--bpd: only the first N test images or sentences; text: N samples",
    )
    ev.add_argument("--fid", type=_positive_int, default=None, metavar="N", help="FID of N samples vs the test split")
    ev.add_argument("--sampler", default=None, help=f"the sampler ({_SAMPLER_DEFAULTS})")
    ev.add_argument("--nfe", type=_positive_int, default=20, help="--fid: denoiser evaluations per sample")
    ev.add_argument("--guidance", type=_nonnegative_float, default=1.0, help="--fid: classifier-free guidance")
    ev.add_argument("--grid", default=None, help=_GRID_HELP)
    ev.add_argument("--seed", type=int, default=0, help="first per-sample seed of generated samples")

    demo = sub.add_parser("demo", help="train a small model on built-in data; write pictures and figures")
    demo.add_argument(
        "kind", nargs="?", choices=["images", "toy", "text", "audio"], default="images", help="default: images (digits)"
    )
    demo.add_argument("--steps", type=_positive_int, default=None, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("unnoise-demo"), help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unnoise.training import distributed

    # Under torchrun, train/sample/eval join the process group; rank 0 prints and writes.
    shard = distributed.init() if args.command in ("train", "sample", "eval") else distributed.Shard()
    if shard.world > 1:
        distributed.stop_on_sigterm()
    try:
        {"train": _train, "sample": _sample, "eval": _eval, "demo": _demo}[args.command](args)
    except (ValueError, FileNotFoundError, PermissionError, ImportError, FloatingPointError) as e:
        if shard.main:  # every rank meets the same bad input: one line
            print(f"unnoise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (distributed.Stopped, RuntimeError) as e:  # DistError is a RuntimeError
        if not distributed.is_group_failure(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"unnoise {args.command}: error: rank {shard.rank} of {shard.world}: {reason}: another process of "
            f"the group failed (the launcher's report names it){_resume_hint(args)}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"unnoise {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.close()
    return 0


def _resume_hint(args: argparse.Namespace) -> str:
    if args.command != "train":
        return ""
    from unnoise.training.checkpoint import latest_checkpoint

    step = latest_checkpoint(args.out) if args.out.is_dir() else None
    where = f"its checkpoint {step.name}" if step is not None else "the start"
    return f"; rerun with --resume to continue from {where}"


def _say(*lines: str) -> None:
    """Print on rank 0 only (every process of a torchrun group runs the same command)."""
    from unnoise.training import distributed

    if distributed.current().main:
        print(*lines, sep="\n")


def _train(args: argparse.Namespace) -> None:
    from unnoise.training.loop import TrainConfig

    settings = _read_settings(args.config) if args.config else {}
    flags = {
        "data": args.data,
        "image_size": args.image_size,
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": args.loss,
        "prediction": args.prediction,
        "schedule": args.schedule,
        "bf16": args.bf16,
        "seed": args.seed,
        "save_every": args.save_every,
    }
    settings |= {k: v for k, v in flags.items() if v is not None}
    if args.unconditional:
        settings["conditional"] = False
    if args.arch is not None:
        if args.modality != "audio":
            raise ValueError(f"--arch chooses the audio network; {args.modality} runs have one network each")
        settings["extra"] = settings.get("extra", {}) | {"arch": args.arch}
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    if args.modality == "control":
        from unnoise.modalities.text.control import train_control

        train_control(args.out, steps=args.steps or 2000, seed=args.seed or 0)
        _say(f"trained the attribute classifier; wrote {args.out / 'control'}")
        return
    if args.modality == "audio":
        from unnoise.modalities.audio.pipeline import train_audio

        # the recipe of benchmarks/audio.py: DiffWave's process (sigma up to 1.6) with 200 steps
        audio_defaults = dict(data="spoken-digits", model="small", schedule="diffwave", T=200, ema_decay=0.995)
        train_audio(TrainConfig(**(audio_defaults | settings)), args.out, resume=args.resume)
    elif args.modality == "text":
        from unnoise.modalities.text.pipeline import train_text

        text_defaults = {"data": "tiny", "model": "small", "schedule": "sqrt", "lr": 5e-4}
        train_text(TrainConfig(**(text_defaults | settings)), args.out, resume=args.resume)
    else:
        from unnoise.modalities.image.pipeline import train_images

        train_images(TrainConfig(**settings), args.out, resume=args.resume)
    _say(f"trained; run folder: {args.out}")


def _read_settings(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _run_kind(args: argparse.Namespace) -> str:
    """The run's modality; fills in its default sampler when none was given and checks the name."""
    from unnoise.sampling.samplers import SAMPLERS
    from unnoise.training.checkpoint import load_config

    kind = load_config(args.run).get("train", {}).get("extra", {}).get("modality", "image")
    args.sampler = args.sampler or DEFAULT_SAMPLERS[kind]
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    return kind


def _sample(args: argparse.Namespace) -> None:
    from unnoise.training import distributed

    kind = _run_kind(args)
    if args.modality is not None and args.modality != kind:
        raise ValueError(f"{args.run} is a {kind} run, not {args.modality}")
    if kind != "image" and not distributed.current().main:
        return  # text and audio sampling is not sharded: rank 0 draws and writes
    if kind == "text":
        _sample_text(args)
    elif kind == "audio":
        _sample_audio(args)
    else:
        _sample_image(args)


def _sample_audio(args: argparse.Namespace) -> None:
    from unnoise.modalities.audio.io import save_spectrogram_grid, save_wav
    from unnoise.modalities.audio.pipeline import load_audio_run, sample_audio

    if args.template is not None or args.mr is not None or args.control or args.trajectory or args.eta is not None:
        raise ValueError("audio runs take --class, --guidance, --n, --sampler, --nfe, --grid, --seed")
    run = load_audio_run(args.run)
    waves, labels = sample_audio(
        run,
        n=args.n,
        sampler=args.sampler,
        nfe=args.nfe,
        guidance=args.guidance,
        class_id=args.class_id,
        seed=args.seed,
        grid=args.grid,
    )
    out = args.out.with_suffix("") if args.out.suffix in (".png", ".wav") else args.out
    for i, (wave, label) in enumerate(zip(waves, labels.tolist(), strict=True)):
        save_wav(out.with_name(f"{out.name}_{i:03d}_class{label}.wav"), wave, run.sample_rate)
    png = save_spectrogram_grid(out.with_name(out.name + ".png"), waves, run.sample_rate)
    print(f"wrote {len(waves)} WAV files {out.name}_*.wav and {png}")


def _sample_text(args: argparse.Namespace) -> None:
    from unnoise.modalities.text.pipeline import load_text_run, sample_text, save_sentences

    if args.class_id is not None or args.trajectory or args.eta is not None or args.grid is not None:
        raise ValueError(
            "text runs take --template, --mr, --guidance, --n, --sampler, --nfe, --seed; not --class/--eta/--grid"
        )
    run = load_text_run(args.run)
    if args.control:
        lines = _sample_controlled(args, run)
    else:
        lines = sample_text(
            run,
            n=args.n,
            sampler=args.sampler,
            nfe=args.nfe,
            template=args.template,
            mr=args.mr,
            guidance=args.guidance,
            seed=args.seed,
        )
    out = args.out if args.out.suffix in (".txt", ".jsonl") else args.out.with_name(args.out.name + ".txt")
    print(f"wrote {save_sentences(out, lines)}")
    for line in lines[:5]:
        print("  ", line)


def _sample_controlled(args: argparse.Namespace, run) -> list[str]:
    from unnoise.modalities.text.control import sample_controlled

    if args.template is not None or args.mr is not None:
        raise ValueError("--control steers unconditional generation; it does not combine with --template or --mr")
    control = {}
    for item in args.control:
        field, sep, value = item.partition("=")
        if not sep or not field.strip() or not value.strip():
            raise ValueError(f"--control takes FIELD=VALUE (e.g. food=Chinese), got {item!r}")
        control[field.strip()] = value.strip()
    options = dict(n=args.n, sampler=args.sampler, nfe=args.nfe, scale=args.control_scale, seed=args.seed)
    # --guidance adds classifier-free guidance on the control as a partial meaning representation
    return sample_controlled(run, control, guidance=args.guidance if args.guidance != 1.0 else None, **options)


def _sample_image(args: argparse.Namespace) -> None:
    from unnoise.modalities.image.io import save_grid, save_npz, save_trajectory
    from unnoise.modalities.image.pipeline import load_run, sample_images_sharded
    from unnoise.training import distributed

    if args.template is not None or args.mr is not None or args.control:
        raise ValueError("--template, --mr and --control apply to text runs")
    options = {}
    if args.eta is not None:
        with_eta = ("ddim", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")
        if args.sampler not in with_eta:
            raise ValueError(f"--eta applies to {', '.join(with_eta)}; not to {args.sampler}")
        options["eta"] = args.eta
    if args.grid is not None:
        options["grid"] = args.grid
    run = load_run(args.run)
    trajectory = [] if args.trajectory else None
    images, labels = sample_images_sharded(
        run,
        n=args.n,
        sampler=args.sampler,
        nfe=args.nfe,
        guidance=args.guidance,
        class_id=args.class_id,
        seed=args.seed,
        trajectory=trajectory,
        **options,
    )
    if not distributed.current().main:
        return
    out = args.out.with_suffix("") if args.out.suffix in (".png", ".npz") else args.out
    k = run.net.config.num_classes
    nrow = min(args.n, k) if k and args.class_id is None else None
    scale = max(1, 64 // images.shape[-1])
    png = save_grid(out.with_name(out.name + ".png"), images, nrow=nrow, scale=scale)
    npz = save_npz(out.with_name(out.name + ".npz"), images, labels)
    print(f"wrote {png} and {npz}")
    if trajectory is not None:
        print(f"wrote {save_trajectory(args.trajectory, _frames(trajectory), scale=scale)}")


def _frames(trajectory: list, rows: int = 8, columns: int = 6) -> list:
    """x_t (labelled by its sigma) and the predicted x0 at up to ``columns`` steps, first ``rows`` samples."""
    from unnoise.modalities.image.data import to_uint8

    picks = sorted({round(i * (len(trajectory) - 1) / max(1, columns - 1)) for i in range(columns)})
    frames = []
    for i in picks:
        sigma, x, x0 = trajectory[i]
        frames.append((f"{sigma:.1g}", to_uint8((x[:rows] / max(1.0, sigma)).clamp(-1, 1))))
        frames.append(("x0", to_uint8(x0[:rows].clamp(-1, 1))))
    return frames


def _eval(args: argparse.Namespace) -> None:
    kind = _run_kind(args)
    {"audio": _eval_audio, "text": _eval_text}.get(kind, _eval_image)(args)


def _eval_image(args: argparse.Namespace) -> None:
    from unnoise.modalities.image.pipeline import eval_bpd, eval_fid, load_run

    if not (args.bpd or args.fid):
        raise ValueError("say what to evaluate; allowed: --bpd, --fid N")
    run = load_run(args.run)
    if args.bpd:
        bpd, se = eval_bpd(run, n=args.n)
        _say(f"test negative ELBO: {bpd:.4f} +- {se:.4f} bits/dim")
    if args.fid:
        sampling = dict(sampler=args.sampler, nfe=args.nfe, guidance=args.guidance, seed=args.seed)
        score = eval_fid(run, n=args.fid, **sampling, **({"grid": args.grid} if args.grid else {}))
        _say(f"FID@{args.fid} vs the test split ({args.sampler}, {args.nfe} NFE): {score:.2f}")


def _eval_text(args: argparse.Namespace) -> None:
    from unnoise.modalities.text.pipeline import bits_per_token, evaluate_text, load_text_run
    from unnoise.training import distributed

    if args.fid or args.grid:
        raise ValueError("--fid and --grid do not apply to text runs; --bpd gives held-out bits/token")
    if not distributed.current().main:
        return  # not sharded: rank 0 generates and scores
    n, run = args.n or 200, load_text_run(args.run)
    if args.bpd:
        bits, se = bits_per_token(run, n=n, seed=args.seed)
        print(f"held-out negative ELBO on {n} sentences: {bits:.3f} +- {se:.3f} bits/token")
        if run.cfg.extra.get("mr_vocab"):
            bits, se = bits_per_token(run, n=n, seed=args.seed, conditional=True)
            print(f"  given each sentence's meaning representation: {bits:.3f} +- {se:.3f} bits/token")
        return
    s = evaluate_text(run, n=n, sampler=args.sampler, nfe=args.nfe, guidance=args.guidance, seed=args.seed)
    print(f"{n} generated sentences ({args.sampler}, {args.nfe} NFE) against the held-out real ones:")
    ppl = f"{s['ppl_generated']:.1f} vs {s['ppl_held_out']:.1f} (ratio {s['ppl_ratio']:.2f})"
    print(f"  Kneser-Ney trigram perplexity: {ppl}")
    print(
        f"  distinct-2: {s['distinct2_generated']:.3f} vs {s['distinct2_held_out']:.3f} "
        f"(ratio {s['distinct2_ratio']:.2f})"
    )
    if "bleu" in s:
        print(f"  data-to-text BLEU on {s['bleu_mrs']:.0f} held-out MRs (guidance {args.guidance:g}): {s['bleu']:.4f}")


def _eval_audio(args: argparse.Namespace) -> None:
    from unnoise.modalities.audio.pipeline import evaluate_audio, load_audio_run
    from unnoise.training import distributed

    if args.bpd or args.fid:
        raise ValueError("--bpd and --fid apply to image runs; audio runs are scored by the digit classifier")
    if not distributed.current().main:
        return  # not sharded: rank 0 generates and scores
    run = load_audio_run(args.run)
    n = args.n or 100
    sampling = dict(sampler=args.sampler, nfe=args.nfe, guidance=args.guidance, grid=args.grid, seed=args.seed)
    scores = evaluate_audio(run, n=n, **sampling)
    how = f"{n} clips, {args.sampler}, {args.nfe} NFE, guidance {args.guidance:g}" + (
        f", grid {args.grid}" if args.grid else ""
    )
    if "accuracy" in scores:
        print(f"digit accuracy of class-conditional samples: {scores['accuracy']:.1%} ({how})")
    print(f"Frechet distance to held-out real clips (classifier features): {scores['fd']:.2f}")
    print(f"real-time factor of generation: {scores['rtf']:.3f} (below 1: faster than real time)")


def _demo(args: argparse.Namespace) -> None:
    if args.kind == "text":
        from unnoise.modalities.text.demo import run_text_demo

        run_text_demo(args.out, steps=args.steps, seed=args.seed)
        return
    if args.kind == "audio":
        from unnoise.modalities.audio.demo import run_audio_demo

        run_audio_demo(args.out, steps=args.steps, seed=args.seed)
        return
    if args.kind == "images":
        from unnoise.modalities.image.demo import run_image_demo

        run_image_demo(args.out, steps=args.steps, seed=args.seed)
        return
    from unnoise.modalities.toy.demo import DemoConfig, run_demo

    kw = {} if args.steps is None else {"steps": args.steps}
    run_demo(DemoConfig(seed=args.seed, out=args.out, **kw))


if __name__ == "__main__":
    sys.exit(main())
