"""``unnoise train``: the run's settings (modality defaults, --config file, flags) and its training.

Diffusion runs go through :func:`unnoise.modalities.run.train`; a VAE run (the autoencoder of
text2image) and the text attribute classifier (``control``) have their own loops and settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unnoise.cli.report import say

# flags that set a training setting of the same name (unset flags leave the config's value)
SETTING_FLAGS = (
    "data", "image_size", "model", "steps", "batch_size", "lr", "objective", "loss", "prediction",
    "timestep_sampling", "schedule", "bf16", "compile", "seed", "save_every",
)  # fmt: skip


def train(args: argparse.Namespace) -> None:
    from unnoise.modalities.run import make_config
    from unnoise.modalities.run import train as train_run

    if args.modality == "control":
        from unnoise.modalities.text.attribute_classifier import train_control

        train_control(args.out, steps=args.steps or 2000, seed=args.seed or 0)
        say(f"trained the attribute classifier; wrote {args.out / 'control'}")
        return
    if args.vae is not None and args.modality != "text2image":
        raise ValueError(f"--vae names the VAE run of a text2image run; {args.modality} runs take none")
    if args.modality == "vae":
        return _train_vae(args)
    settings = _read_settings(args.config) if args.config else {}
    settings |= _flags(args, SETTING_FLAGS)
    if args.unconditional:
        settings["conditional"] = False
    if args.arch is not None:
        if args.modality != "audio":
            raise ValueError(f"--arch chooses the audio network; {args.modality} runs have one network each")
        settings["extra"] = dict(settings.get("extra") or {}) | {"arch": args.arch}
    if args.vae is not None:
        settings["extra"] = dict(settings.get("extra") or {}) | {"vae": str(args.vae)}
    cfg = make_config(args.modality, settings, where=str(args.config) if args.config else "settings")
    train_run(args.modality, cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    say(f"trained; run folder: {args.out}")


def _flags(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The flags the user set, by setting name."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _train_vae(args: argparse.Namespace) -> None:
    """``unnoise train vae``: the autoencoder of text2image latent diffusion (no diffusion settings)."""
    from unnoise.modalities.text2image.vae_run import train_vae, vae_settings

    settings = _read_settings(args.config) if args.config else {}
    # vae_settings refuses the diffusion flags in one line, so every one is passed on to it
    settings |= _flags(args, (*SETTING_FLAGS, "arch"))
    if args.unconditional:
        settings["unconditional"] = True
    run = train_vae(vae_settings(settings), args.out, resume=args.resume, overwrite=args.overwrite)
    say(f"trained; run folder: {args.out} (latent scale factor {run.scale_factor:.4f})")


def _read_settings(path: Path) -> dict:
    """The settings of a --config file (JSON, or TOML by its suffix), checked to be an object."""
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (JSON or TOML in UTF-8)") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            settings = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("extra", {}), dict):
        raise ValueError(f"{path} must hold an object of training settings (with 'extra' an object, if given)")
    return settings
