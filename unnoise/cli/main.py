"""The command line's dispatch: parse, build the run's settings, hand the work to the modality.

Every command is written once over :class:`unnoise.modalities.base.Modality`: ``train`` makes the
config (modality defaults, --config file, flags) and runs :func:`unnoise.modalities.run.train`;
``sample`` and ``eval`` load the run, check the options against what its modality takes, and call
its ``sample``/``write`` or ``evaluate``; ``demo`` calls its demo. Bad input is one line, exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

from unnoise.cli.checks import check_outputs, check_sample_memory, prepare_demo_folder
from unnoise.cli.parser import build_parser
from unnoise.cli.report import kept, one_line, out_of_memory, resume_hint, say, smaller
from unnoise.cli.train import train
from unnoise.training import distributed
from unnoise.training.signals import Interrupted

# option name -> the flag that sets it, for messages
FLAGS = {"class_id": "--class", "control_scale": "--control-scale", "n": "--n"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.command)
        return _run(args)


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if distributed.current().main:
            print(f"unnoise {command}: warning: {message}", file=sys.stderr)

    return show


def _run(args: argparse.Namespace) -> int:
    # Under torchrun, train/sample/eval join the process group; rank 0 prints and writes.
    shard = distributed.init() if args.command in ("train", "sample", "eval") else distributed.Shard()
    if shard.world > 1:
        distributed.stop_on_sigterm()
    try:
        {"train": train, "sample": _sample, "eval": _eval, "demo": _demo, "serve": _serve}[args.command](args)
    except Interrupted as e:  # SIGTERM / SIGINT during training: checkpointed, then stopped
        if shard.main:
            print(f"unnoise train: {e}{resume_hint(args)}", file=sys.stderr)
        return e.exit_status
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        if shard.main:  # every rank meets the same bad input: one line
            print(f"unnoise {args.command}: error: {one_line(e)}{kept(args, e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"unnoise {args.command}: error: out of memory{smaller(args)}", file=sys.stderr)
        return 2
    except (distributed.Stopped, RuntimeError) as e:  # DistError is a RuntimeError
        if out_of_memory(e):
            print(f"unnoise {args.command}: error: out of memory ({one_line(e)}){smaller(args)}", file=sys.stderr)
            return 2
        if not distributed.is_group_failure(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"unnoise {args.command}: error: rank {shard.rank} of {shard.world}: {reason}: another process of "
            f"the group failed (the launcher's report names it){resume_hint(args)}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"unnoise {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.close()
    return 0


def _load(args: argparse.Namespace, expect: str | None = None):
    """The run of ``--run`` and its sampler (the modality's default unless named), checked; under
    ``sample``, its post-hoc EMA profile (--ema-profile) and autoguidance (--autoguide) applied."""
    from unnoise.modalities.run import load_run
    from unnoise.sampling.samplers import SAMPLERS

    ema_profile, autoguide = getattr(args, "ema_profile", None), getattr(args, "autoguide", None)
    if getattr(args, "autoguidance", None) is not None and autoguide is None:
        raise ValueError("--autoguidance scales --autoguide; give --autoguide BAD_RUN too")
    run = load_run(args.run, expect=expect, ema_profile=ema_profile)
    if autoguide is not None:
        if not autoguide.is_dir():
            raise FileNotFoundError(f"--autoguide {autoguide}: no run folder there")
        scale = 2.0 if args.autoguidance is None else args.autoguidance
        run = run.autoguided(load_run(autoguide), scale)
    args.sampler = args.sampler or run.modality.default_sampler
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    return run


def _options(args: argparse.Namespace, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The options the user set (those not at their default)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) != defaults.get(k)}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _check_options(run, given: dict[str, Any], accepted: tuple[str, ...], command: str) -> None:
    """One line naming the options the run's modality does not take for ``command``, and those it does."""
    refused = [k for k in given if k not in accepted]
    if refused:
        takes = ", ".join(_flag(k) for k in accepted) or "no options"
        raise ValueError(f"{run.name} runs take {takes} ({command}); not {', '.join(_flag(k) for k in refused)}")


def _check_eta(sampler: str, eta: float | None) -> None:
    from unnoise.sampling.samplers import SAMPLERS

    if eta is None:
        return
    with_eta = [name for name, fn in SAMPLERS.items() if "eta" in inspect.signature(fn).parameters]
    if sampler not in with_eta:
        raise ValueError(f"--eta applies to {', '.join(with_eta)}; not to {sampler}")


def _sample(args: argparse.Namespace) -> None:
    if args.diffusers is not None:
        return _sample_diffusers(args)
    run = _load(args, expect=args.modality)
    names = ("template", "mr", "control", "control_scale", "guidance", "class_id", "eta", "grid", "trajectory")
    names += ("prompt", "prompts", "negative_prompt")
    given = _options(args, names, {"guidance": 1.0})
    _check_options(run, given, run.modality.sample_options, "sample")
    if "control_scale" in given and not args.control:
        raise ValueError("--control-scale scales --control; give --control FIELD=VALUE too")
    _check_eta(args.sampler, args.eta)
    outputs = run.modality.outputs(args.out)
    check_outputs(outputs, args.overwrite)
    if args.trajectory is not None:
        if args.trajectory in outputs:
            raise ValueError(f"--trajectory {args.trajectory} is one of the sample files --out writes; name another")
        check_outputs([args.trajectory], args.overwrite, flag="--trajectory")
    check_sample_memory(args.n, run.modality.sample_shape(run))
    if not run.modality.sharded and not distributed.current().main:
        return  # not sharded: rank 0 draws and writes
    options = given | {"n": args.n, "sampler": args.sampler, "nfe": args.nfe, "seed": args.seed}
    samples = run.modality.sample(run, **options)
    if run.guide is not None and run.guide_uses == 0:  # a bug guard: never a silently ignored flag
        raise RuntimeError(f"{run.name} sampling did not use the run's denoiser, so --autoguide was not applied")
    if run.weights != "ema":
        say(f"weights: {run.weights}")
    written = run.modality.write(run, samples, args.out, **given)
    if written:
        say(
            f"wrote {', '.join(str(p) for p in written[:3])}"
            + (f" and {len(written) - 3} more" if len(written) > 3 else "")
        )
    if isinstance(samples, list):  # sentences: show a few
        say(*("   " + s for s in samples[:5]))


def _sample_diffusers(args: argparse.Namespace) -> None:
    """``sample --diffusers FOLDER``: a diffusers UNet2DModel pipeline, sampled by any unnoise sampler."""
    from unnoise.modalities.base import output_stem
    from unnoise.sampling.diffusers_folder import (
        load_diffusers_folder,
        sample_diffusers_folder,
        write_diffusers_samples,
    )
    from unnoise.sampling.samplers import SAMPLERS

    if args.modality not in (None, "image"):
        raise ValueError(f"--diffusers reads image pipelines (UNet2DModel), not {args.modality}")
    names = ("template", "mr", "control", "control_scale", "trajectory", "autoguide", "autoguidance", "ema_profile")
    given = _options(args, (*names, "prompt", "prompts", "negative_prompt"), {})
    if given:
        raise ValueError(f"--diffusers takes --class, --guidance, --eta, --grid; not {', '.join(map(_flag, given))}")
    args.sampler = args.sampler or "dpmpp_2m"
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    _check_eta(args.sampler, args.eta)
    stem = output_stem(args.out, (".png", ".npz"))
    check_outputs([stem.with_name(stem.name + s) for s in (".png", ".npz")], args.overwrite)
    model = load_diffusers_folder(args.diffusers)
    check_sample_memory(args.n, model.shape)
    eta = {} if args.eta is None else {"eta": args.eta}
    images, labels = sample_diffusers_folder(
        model, sampler=args.sampler, nfe=args.nfe, n=args.n, seed=args.seed, class_id=args.class_id,
        guidance=args.guidance, grid=args.grid, **eta,
    )  # fmt: skip
    written = write_diffusers_samples(stem, images, labels)
    say(f"wrote {', '.join(str(p) for p in written)}")


def _serve(args: argparse.Namespace) -> None:
    import socket

    from unnoise.web.app import serve

    try:  # a taken port is one line here, not the server's log after the page is built
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        where = f"{args.host}:{args.port}"
        raise ValueError(f"cannot serve on {where}: {e.strerror or e} (choose another --port)") from None
    serve(args.run, host=args.host, port=args.port)


def _eval(args: argparse.Namespace) -> None:
    if _is_vae_run(args.run):
        return _eval_vae(args)
    run = _load(args)
    given = _options(args, ("bpd", "fid", "n", "guidance", "grid"), {"bpd": False, "guidance": 1.0})
    _check_options(run, given, run.modality.eval_options, "eval")
    if not run.modality.sharded and not distributed.current().main:
        return  # not sharded: rank 0 generates and scores
    lines = run.modality.evaluate(run, **given, sampler=args.sampler, nfe=args.nfe, seed=args.seed)
    say(*lines)


def _is_vae_run(run: Path) -> bool:
    from unnoise.modalities.base import modality_of
    from unnoise.training.files import read_json

    try:
        return (run / "config.json").is_file() and modality_of(read_json(run / "config.json")) == "vae"
    except (OSError, ValueError):
        return False  # load_run says what is wrong with the folder


def _eval_vae(args: argparse.Namespace) -> None:
    """``unnoise eval`` on a VAE run: reconstruction PSNR and -ELBO; sampling options are refused."""
    from unnoise.modalities.text2image.vae_run import evaluate_vae

    names = ("bpd", "fid", "guidance", "grid", "sampler", "nfe")
    given = _options(args, names, {"bpd": False, "guidance": 1.0, "nfe": 20})
    if given:
        raise ValueError(f"vae runs take --n (eval); not {', '.join(_flag(k) for k in given)}")
    if distributed.current().main:
        say(*evaluate_vae(args.run, n=args.n))


def _demo(args: argparse.Namespace) -> None:
    from unnoise.modalities.base import get_modality

    prepare_demo_folder(args.out, args.overwrite)
    get_modality("image" if args.kind == "images" else args.kind).demo(args.out, steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
