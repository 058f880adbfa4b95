"""VAE runs: ``unnoise train vae`` trains the autoencoder of latent diffusion; text2image runs read it back.

A VAE run is a run folder like any other (config.json, log.jsonl, checkpoints with model and EMA
weights, all written by the generic loop :func:`unnoise.training.loop.train`, atomic and resumable).
Its config records ``extra.modality = "vae"``, the architecture (``extra.vae``) and, once trained,
``extra.latent_scale_factor``: LDM's ``1 / std`` of the EMA model's posterior means over training
images (sec. 4.3.2 of Rombach et al. 2022; :func:`unnoise.nets.vae.latent_scale_factor`).
The objective is the negative ELBO of :func:`unnoise.nets.vae.vae_loss`, logged per pixel (nats).
A VAE run is not a diffusion: it does not sample; ``unnoise eval`` reports its reconstruction PSNR
and negative ELBO on held-out images (:func:`evaluate_vae`).

Data (``--data``): ``fashion-scenes`` (``extra.scenes`` training scenes, default 20,000) or a
folder of images with ``metadata.jsonl`` (resized to ``--image-size``, default 56, grey unless
``extra.channels`` is 3).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.modalities.image.data import to_model, to_uint8
from unnoise.modalities.text2image.data import SCENE_SIZE, CaptionedImages, fashion_scenes, load_captioned_folder
from unnoise.nets.vae import AutoencoderKL, VAEConfig, latent_scale_factor, vae_loss
from unnoise.schema import from_dict
from unnoise.training import loop, runfolder
from unnoise.training.checkpoint import latest_checkpoint, load_config, load_model_weights, save_config
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import Draws

__all__ = ["VAE_DEFAULTS", "VAERun", "captioned_data", "evaluate_vae", "load_vae_run", "train_vae", "vae_settings"]

# The recipe measured in VAEConfig.preset("small")'s docstring (batch 32, Adam 2e-3), for longer.
VAE_DEFAULTS: dict[str, Any] = {
    "data": "fashion-scenes",
    "model": "small",
    "steps": 2000,
    "batch_size": 32,
    "lr": 2e-3,
    "warmup": 50,
    "ema_decay": 0.995,
    "grad_clip": 1e4,  # clip only blow-ups: the probe that chose the recipe clipped nothing
}
# the settings a VAE run honours; any other (an objective, a schedule, --bf16 ...) is refused in one line
_SETTINGS = {
    "data", "image_size", "model", "steps", "batch_size", "lr", "warmup", "lr_decay", "weight_decay",
    "grad_clip", "ema_decay", "seed", "log_every", "save_every", "keep", "compile", "extra",
}  # fmt: skip
SCENES = 20_000  # fashion-scenes drawn for training (extra.scenes)
FIT_IMAGES = 4096  # training images the latent scale factor is estimated on


def captioned_data(data: str, split: str, *, n: int, size: int | None, channels: int = 1, seed: int = 0):
    """``fashion-scenes`` (``n`` scenes of ``split``) or a captioned folder (all of it, ``size`` pixels)."""
    if data == "fashion-scenes":
        if size not in (None, SCENE_SIZE):
            raise ValueError(f"fashion-scenes are {SCENE_SIZE}x{SCENE_SIZE}; --image-size resizes image folders")
        if channels != 1:
            raise ValueError(f"fashion-scenes are grey (1 channel); channels {channels} applies to image folders")
        return fashion_scenes(n, split, seed=seed)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: allowed: fashion-scenes, or a folder of images with metadata.jsonl")
    return load_captioned_folder(data, size=size or SCENE_SIZE, mode="L" if channels == 1 else "RGB")


def vae_settings(settings: Mapping[str, Any]) -> TrainConfig:
    """The VAE run's settings: :data:`VAE_DEFAULTS` with ``settings`` on top; one line for one it cannot honour."""
    refused = sorted(k for k in settings if k not in _SETTINGS)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"vae runs train the -ELBO of an autoencoder; {flags} does not apply to them")
    settings = dict(settings)
    extra = {"modality": "vae", "scenes": SCENES, "channels": 1} | dict(settings.pop("extra", {}) or {})
    cfg = TrainConfig.from_dict(VAE_DEFAULTS | settings | {"extra": extra})
    if cfg.model not in ("tiny", "small"):
        raise ValueError(f"unknown VAE model {cfg.model!r}; allowed: tiny, small")
    if not isinstance(extra["scenes"], int) or extra["scenes"] < 1:
        raise ValueError(f"extra.scenes must be a positive number of training scenes, got {extra['scenes']!r}")
    return cfg


class _NegativeELBO:
    """The training loop's objective: the -ELBO per pixel of a uint8 batch (nats), KL weighted by 1."""

    def __call__(self, model: nn.Module, x: Tensor, cond: Tensor, draws: Draws) -> Tensor:
        x = to_model(x)
        return vae_loss(model, x, generator=draws.generator).loss / x[0].numel()


def train_vae(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> VAERun:
    """Train a VAE on ``cfg.data`` into ``run_dir``; records the latent scale factor; returns the run.
    ``stop(step)`` ends training early (e.g. :class:`unnoise.training.loop.CPUBudget`), as in ``train``."""
    run_dir = Path(run_dir)
    runfolder.check_out(run_dir, resume=resume, overwrite=overwrite)  # before loading any data
    torch.manual_seed(cfg.seed)
    channels = int(cfg.extra.get("channels", 1))
    data = captioned_data(cfg.data, "train", n=cfg.extra["scenes"], size=cfg.image_size, channels=channels)
    size = data.images.shape[-1]
    if cfg.extra.get("vae") is None:
        cfg.extra["vae"] = asdict(VAEConfig.preset(cfg.model, image_size=size, in_channels=data.images.shape[1]))
    vae = AutoencoderKL(from_dict(VAEConfig, cfg.extra["vae"], "extra.vae"))
    labels = torch.zeros(len(data), dtype=torch.long)
    objective = _NegativeELBO()
    ema = loop.train(
        cfg, run_dir, vae, data.images, labels, loss_fn=objective, resume=resume, overwrite=overwrite,
        progress=progress, stop=stop,
    )  # fmt: skip
    scale = latent_scale_factor(ema.eval(), to_model(data.images[:FIT_IMAGES]))
    config = load_config(run_dir)
    config["train"]["extra"]["latent_scale_factor"] = scale
    save_config(run_dir, config)
    return load_vae_run(run_dir)


@dataclass
class VAERun:
    """A trained VAE run: the EMA autoencoder, its latent scale factor, the weights' SHA-256 and settings."""

    vae: AutoencoderKL
    scale_factor: float
    sha256: str
    cfg: TrainConfig
    path: Path


def load_vae_run(run_dir: str | Path) -> VAERun:
    """The VAE of a run of ``unnoise train vae`` (EMA weights), or one line saying what the folder lacks."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--vae {run_dir}: no run there (train one: unnoise train vae --out {run_dir})")
    config = load_config(run_dir)
    train = config.get("train") if isinstance(config, dict) else None
    extra = train.get("extra", {}) if isinstance(train, dict) else {}
    if not isinstance(extra, dict) or extra.get("modality") != "vae":
        kind = extra.get("modality", "image") if isinstance(extra, dict) else "unknown"
        raise ValueError(f"--vae {run_dir} is a {kind} run, not a VAE run (unnoise train vae)")
    if "latent_scale_factor" not in extra:
        raise ValueError(f"{run_dir} has no latent scale factor yet: its training did not finish (rerun with --resume)")
    cfg = TrainConfig.from_dict(train, where=str(run_dir / "config.json"))
    vae = AutoencoderKL(from_dict(VAEConfig, extra["vae"], "config.json 'extra.vae'"))
    step = latest_checkpoint(run_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train it first (unnoise train vae --out {run_dir})")
    load_model_weights(step, vae, which="ema")
    sha = hashlib.sha256((step / "ema.safetensors").read_bytes()).hexdigest()
    return VAERun(vae.eval().requires_grad_(False), float(extra["latent_scale_factor"]), sha, cfg, run_dir)


@torch.no_grad()
def reconstruction_scores(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """PSNR (dB) of the posterior mean's reconstruction rounded to uint8 against ``images`` (uint8), over
    all pixels, and the mean -ELBO per pixel (nats, one posterior draw per image, seeded)."""
    sq, nelbo, g = 0.0, 0.0, torch.Generator().manual_seed(0)
    for batch in images.split(batch_size):
        x = to_model(batch)
        mean, _ = vae.encode(x)
        sq += (to_uint8(vae.decode(mean).clamp(-1, 1)).double() - batch.double()).square().sum().item()
        nelbo += vae_loss(vae, x, generator=g).nelbo.item() * len(batch) / x[0].numel()
    mse = sq / images.numel()
    psnr = 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")
    return {"psnr": psnr, "nelbo_per_pixel": nelbo / len(images)}


def evaluate_vae(run_dir: str | Path, *, n: int | None = None) -> list[str]:
    """`unnoise eval` on a VAE run: reconstruction PSNR and -ELBO on ``n`` held-out scenes (default 1,000;
    a folder: its images)."""
    run = load_vae_run(run_dir)
    cfg = run.cfg
    if cfg.data == "fashion-scenes":
        data: CaptionedImages = fashion_scenes(n or 1000, "test", seed=0)
        where = f"{len(data)} test-split fashion-scenes"
    else:
        data = captioned_data(cfg.data, "train", n=0, size=cfg.image_size, channels=int(cfg.extra.get("channels", 1)))
        where = f"the {len(data)} images of {cfg.data} (a folder has no held-out split)"
    scores = reconstruction_scores(run.vae, data.images[:n] if n else data.images)
    return [
        f"reconstruction PSNR: {scores['psnr']:.2f} dB ({where})",
        f"negative ELBO: {scores['nelbo_per_pixel']:.4f} nats per pixel (pixels in [-1, 1])",
        f"latent scale factor: {run.scale_factor:.4f}; latents {tuple(run.vae.config.latent_shape)}",
    ]
