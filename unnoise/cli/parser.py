"""The command line's grammar: ``unnoise train | sample | eval | demo`` and their flags (no work here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from unnoise.cli.checks import MAX_NFE
from unnoise.modalities.base import REGISTRY
from unnoise.sampling.samplers import SAMPLERS
from unnoise.training.config import LOSSES, OBJECTIVES, PREDICTIONS, TIMESTEP_SAMPLING

_GRID_HELP = (
    "noise-level grid: tuned (default) | karras | log_snr | linspace | leading | trailing | "
    "diffwave (DiffWave's 6-step fast schedule: --sampler ddpm --nfe 6)"
)
# torchrun's own parser reads --run and --n as abbreviations of its flags (--run-path, --nnodes...),
# so under torchrun they are spelled --run-dir and --count.
_RUN_HELP = "run folder (alias --run-dir, the spelling torchrun lets through)"
SAMPLER_HELP = f"one of: {', '.join(SAMPLERS)} (default: the run's modality's)"


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nfe(s: str) -> int:
    v = positive_int(s)
    if v > MAX_NFE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NFE:,} denoiser evaluations, got {s}")
    return v


def nonnegative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="unnoise", description="Diffusion models: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    _train(sub.add_parser("train", help="train a model; writes a run folder (config, safetensors weights, log)"))
    _sample(sub.add_parser("sample", help="draw samples from a run: FILE.png + FILE.npz, FILE.txt, WAVs"))
    _eval(
        sub.add_parser(
            "eval",
            help="evaluate a run: images --bpd / --fid N; text: perplexity, distinct-2, BLEU (--bpd: bits/token); "
            "audio: digit accuracy, Frechet distance, real-time factor; toy: NLL against the closed form",
        )
    )
    serve = sub.add_parser("serve", help="a local web page to sample a run: pip install 'unnoise[web]'")
    serve.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help="run folder")
    serve.add_argument("--port", type=positive_int, default=7860)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    demo = sub.add_parser("demo", help="train a small model on built-in data; write pictures and figures")
    kinds = ["images", *(k for k in REGISTRY if k != "image")]
    demo.add_argument("kind", nargs="?", choices=kinds, default="images", help="default: images (digits)")
    demo.add_argument("--steps", type=positive_int, default=None, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("unnoise-demo"), help="output folder")
    demo.add_argument("--overwrite", action="store_true", help="redo the demo in a folder that holds an earlier one")
    return parser


def _train(train: argparse.ArgumentParser) -> None:
    train.add_argument(
        "modality",
        choices=[*REGISTRY, "control", "vae"],
        help="control: the attribute classifier of the text run in --out (for sample text --control); "
        "vae: the autoencoder a text2image run diffuses in (--vae RUN)",
    )
    train.add_argument(
        "--data",
        default=None,
        help="image: digits | fashion-mnist | a folder; text: tiny | e2e | a file; audio: spoken-digits | a folder; "
        "toy: ring; vae, text2image: fashion-scenes | a folder of images with metadata.jsonl",
    )
    train.add_argument("--vae", type=Path, default=None, metavar="RUN", help="text2image: the VAE run to diffuse in")
    train.add_argument("--image-size", type=positive_int, default=None, help="image folders: resize and crop to this")
    train.add_argument(
        "--model", default=None, help="image: tiny | small | cifar; text: tiny | small | base; audio, toy: tiny | small"
    )
    train.add_argument("--arch", default=None, help="audio network: unet (the default) | diffwave")
    train.add_argument("--steps", type=positive_int, default=None)
    train.add_argument("--batch-size", type=positive_int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--objective", default=None, help=f"{' | '.join(OBJECTIVES)} (default ddpm)")
    train.add_argument("--loss", default=None, help=f"ddpm objective: {' | '.join(LOSSES)} (default simple)")
    train.add_argument("--prediction", default=None, help=f"ddpm objective: {' | '.join(PREDICTIONS)}")
    train.add_argument(
        "--timestep-sampling", default=None, help=f"ddpm objective: {' | '.join(TIMESTEP_SAMPLING)} (default uniform)"
    )
    train.add_argument("--schedule", default=None, help="ddpm objective: noise schedule, e.g. cosine | linear")
    train.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (CPU AMX/AVX-512)")
    train.add_argument(
        "--compile", action="store_true", default=None,
        help="torch.compile the network for training (faster steps after a one-time compile of about a minute)",
    )  # fmt: skip
    train.add_argument("--unconditional", action="store_true", help="ignore class labels / conditions")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--save-every", type=positive_int, default=None, help="checkpoint interval in steps")
    train.add_argument("--config", type=Path, help="a JSON or TOML file of training settings (flags win)")
    train.add_argument(
        "--out", type=Path, required=True, help="run folder: new or empty (or a run, with --resume / --overwrite)"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start the run in --out over, deleting its checkpoints (without it, an existing run is refused)",
    )


def _sample(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("modality", nargs="?", choices=list(REGISTRY), help="optional: must match the run")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", "--run-dir", dest="run", type=Path, help=_RUN_HELP)
    source.add_argument(
        "--diffusers",
        type=Path,
        metavar="FOLDER",
        help="a diffusers pipeline folder (DDPMPipeline.save_pretrained: model_index.json, unet/, scheduler/); "
        "safetensors only; grid 'scheduler' follows its own timestep spacing",
    )
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
        "--control-scale", type=nonnegative_float, default=None, help="text: classifier-guidance scale (default 3)"
    )
    sample.add_argument(
        "--prompt", default=None, help='text2image: e.g. "a bag in the top left and a shirt in the bottom right"'
    )
    sample.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="text2image: one prompt per line")
    sample.add_argument(
        "--negative-prompt", default=None, help="text2image: guide away from this prompt (with --guidance other than 1)"
    )
    sample.add_argument("--sampler", default=None, help=SAMPLER_HELP)
    sample.add_argument("--nfe", type=nfe, default=20, help=f"denoiser evaluations (at most {MAX_NFE:,})")
    sample.add_argument(
        "--guidance",
        type=nonnegative_float,
        default=1.0,
        help="classifier-free guidance scale (text --control: on the control as a partial MR)",
    )
    sample.add_argument(
        "--autoguide",
        type=Path,
        default=None,
        metavar="BAD_RUN",
        help="autoguidance (EDM2): guide with a weaker run of the same modality and data (smaller or trained "
        "less); combines with --guidance (both models classifier-free guided); not for text runs",
    )
    sample.add_argument(
        "--autoguidance",
        type=nonnegative_float,
        default=None,
        metavar="W",
        help="autoguidance scale: D_bad + W (D_run - D_bad) (with --autoguide; default 2; EDM2 tuned 1.7-2.9)",
    )
    sample.add_argument(
        "--ema-profile",
        type=float,
        default=None,
        metavar="SIGMA_REL",
        help="post-hoc EMA (EDM2): sample with the power EMA of this relative width (0 < SIGMA_REL < 0.2887), "
        "reconstructed from the run's snapshots (train with posthoc_ema)",
    )
    sample.add_argument("--class", dest="class_id", type=int, default=None, help="class id (conditional runs)")
    sample.add_argument("--eta", type=nonnegative_float, default=None, help="stochasticity (ddim, *_ancestral, *_sde)")
    sample.add_argument("--grid", default=None, help=_GRID_HELP)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--n", "--count", dest="n", type=positive_int, default=64, help="how many (alias --count)")
    sample.add_argument(
        "--out", type=Path, required=True, help="FILE: writes FILE.png and FILE.npz (text: FILE.txt; audio: WAVs)"
    )
    sample.add_argument("--trajectory", type=Path, default=None, help="also write x_t and predicted x0 per step")
    sample.add_argument("--overwrite", action="store_true", help="replace existing output files (refused without)")


def _eval(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help=_RUN_HELP)
    ev.add_argument("--bpd", action="store_true", help="held-out negative ELBO: bits/dim (images) or bits/token (text)")
    ev.add_argument(
        "--n",
        "--count",
        dest="n",
        type=positive_int,
        default=None,
        help="--bpd: only the first N test images or sentences; text, audio, toy: N samples",
    )
    ev.add_argument("--fid", type=positive_int, default=None, metavar="N", help="FID of N samples vs the test split")
    ev.add_argument("--sampler", default=None, help=SAMPLER_HELP)
    ev.add_argument("--nfe", type=nfe, default=20, help=f"denoiser evaluations per sample (at most {MAX_NFE:,})")
    ev.add_argument("--guidance", type=nonnegative_float, default=1.0, help="classifier-free guidance")
    ev.add_argument("--grid", default=None, help=_GRID_HELP)
    ev.add_argument("--seed", type=int, default=0, help="first per-sample seed of generated samples")
