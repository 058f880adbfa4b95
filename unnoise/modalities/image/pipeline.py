"""The image modality: pixels in [-1, 1] through a U-Net, samples out as uint8 grids.

Its data is :mod:`unnoise.modalities.image.data`, its network :class:`unnoise.nets.unet.UNet`
(class-conditional with a null class for classifier-free guidance), its writers
:mod:`unnoise.modalities.image.io` and its metrics (bits/dim, FID) :mod:`unnoise.modalities.image.metrics`.
Training, loading and the denoiser are the generic ones of :mod:`unnoise.modalities.run`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unnoise.denoisers import clipped
from unnoise.modalities.base import TrainingData
from unnoise.modalities.image.data import ImageDataset, load_images, to_model, to_uint8
from unnoise.modalities.run import Run
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.sampling.front import sample as run_sampler
from unnoise.sampling.front import start_sigma
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import current, map_chunks
from unnoise.training.objectives import Encoded


def dataset(cfg: TrainConfig, split: str = "train") -> ImageDataset:
    """The run's images: digits are split 80/20 by a fixed permutation; Fashion-MNIST by its files."""
    if cfg.data == "fashion-mnist":
        return load_images("fashion-mnist", split=split)
    kw = {} if cfg.data == "digits" else {"size": cfg.image_size or 32}
    data = load_images(cfg.data, **kw)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(data))
    idx = order[:cut] if split == "train" else order[cut:]
    return ImageDataset(data.images[idx], data.labels[idx], data.class_names)


def class_names(run: Run) -> list[str]:
    k = run.model.config.num_classes
    return run.extra.get("class_names") or [str(i) for i in range(k or 0)]


def null_label(run: Run) -> Tensor | None:
    k = run.model.config.num_classes
    return None if k is None else torch.tensor(k)


@torch.no_grad()
def sample_images(
    run: Run,
    *,
    n: int = 64,
    sampler: str = "dpmpp_2m_sde",
    nfe: int = 20,
    guidance: float = 1.0,
    class_id: int | None = None,
    seed: int = 0,
    trajectory: list | None = None,
    indices: range | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """``n`` images (uint8, N x C x H x W) and their labels (-1 unconditional).

    Conditional runs without ``class_id`` cycle through the classes (row i of an 8-wide grid...).
    Per-sample seeds (seed + i) make image i independent of n. ``indices`` draws only those of
    the n images (one batch; :func:`sample_images_sharded` deals batches to processes).
    ``trajectory`` collects (sigma, x, x0_hat) per step when given.
    """
    labels = _labels(run, n, class_id)
    indices = range(n) if indices is None else indices
    labels = labels[indices.start : indices.stop]
    c = run.model.config
    generators = [torch.Generator().manual_seed(seed + i) for i in indices]
    s_max, s_min = run.sigma_max, run.sigma_min
    top = start_sigma(sampler, nfe, s_max, s_min, options.get("grid"), run.schedule)
    x = torch.stack([torch.randn(c.in_channels, c.image_size, c.image_size, generator=g) for g in generators]) * top
    callback = None if trajectory is None else (lambda i, s, x, x0: trajectory.append((float(s), x, x0)))
    D = clipped(run.denoiser(labels if labels[0] >= 0 else None, null_label(run), guidance))
    out = run_sampler(
        D, x, sampler=sampler, nfe=nfe, sigma_max=s_max, sigma_min=s_min, generator=generators,
        callback=callback, schedule=run.schedule, **options,
    )  # fmt: skip
    return to_uint8(out.clamp(-1, 1)), labels


def sample_images_sharded(
    run: Run, *, n: int = 64, batch_size: int = 64, trajectory: list | None = None, **sampling
) -> tuple[Tensor, Tensor]:
    """:func:`sample_images` in batches of ``batch_size`` dealt to the processes of a torchrun
    group; every process returns all ``n``, identical for any number of processes (and to one
    process's). ``trajectory`` records the first batch, on the process that draws it."""

    def draw(indices: range) -> Tensor:
        keep = trajectory if indices.start == 0 else None
        return sample_images(run, n=n, indices=indices, trajectory=keep, **sampling)[0]

    images = map_chunks(draw, n, batch_size)
    return images, _labels(run, n, sampling.get("class_id"))


def _labels(run: Run, n: int, class_id: int | None) -> Tensor:
    k = run.model.config.num_classes
    if class_id is not None:
        if k is None:
            raise ValueError("this model is unconditional: --class needs a class-conditional run")
        if not 0 <= class_id < k:
            raise ValueError(f"unknown class {class_id}; allowed: 0..{k - 1} ({', '.join(class_names(run))})")
        return torch.full((n,), class_id)
    if k is None:
        return torch.full((n,), -1)
    return torch.arange(n) // max(1, math.ceil(n / k)) % k


def _scale(images: Tensor) -> int:
    return max(1, 64 // images.shape[-1])


class ImageModality:
    """Images: see the module docstring."""

    name = "image"
    defaults: dict[str, Any] = {"data": "digits", "model": "small"}
    ddpm_defaults: dict[str, Any] = {}  # TrainConfig's own: cosine, T = 1000, eps
    default_sampler = "dpmpp_2m_sde"  # FID@1000 28.0 vs unipc 47.3 at 20 NFE (benchmarks/image_quality.py)
    sample_options = frozenset({"class_id", "guidance", "eta", "grid", "trajectory"})
    eval_options = frozenset({"bpd", "fid", "n", "guidance", "grid"})

    def check(self, cfg: TrainConfig) -> None:
        if cfg.image_size is not None and cfg.data in ("digits", "fashion-mnist"):
            raise ValueError(f"--image-size resizes image folders; {cfg.data} has its own size")

    def training_data(self, cfg: TrainConfig) -> TrainingData:
        data = dataset(cfg, "train")
        cfg.extra["class_names"] = list(data.class_names)
        conditional = cfg.conditional and bool(data.class_names)
        null = torch.tensor(len(data.class_names)) if conditional else None
        return TrainingData(to_model(data.images), data.labels if conditional else None, null)

    def build(self, cfg: TrainConfig, data: TrainingData) -> UNet:
        channels, size = data.x.shape[1], data.x.shape[-1]
        num_classes = int(data.null) if data.null is not None else None
        config = UNetConfig.preset(cfg.model, size, channels, num_classes)
        config = dataclasses.replace(config, learned_variance=cfg.learned_variance, **cfg.extra.get("unet", {}))
        return UNet(config)  # contiguous: channels-last makes GroupNorm 10-40x slower on CPU (torch 2.13)

    def load(self, config: dict[str, Any], cfg: TrainConfig) -> UNet:
        if "net" not in config:
            raise ValueError("an image run's config.json needs a 'net' section (the U-Net's settings)")
        return UNet(UNetConfig(**config["net"]))

    def network(self, model: UNet):
        return model

    def encode(self, model: UNet, x: Tensor) -> Encoded:
        return Encoded(x, model)

    def preview(self, run_dir: Path, cfg: TrainConfig, model: UNet, step: int) -> None:
        from unnoise.modalities.image.io import save_grid

        run = Run(self, cfg, model)
        k = model.config.num_classes or 0
        images, _ = sample_images(run, n=min(64, 8 * max(1, k)), nfe=20, seed=0)
        save_grid(run_dir / "samples" / f"step_{step:08d}.png", images, scale=_scale(images))

    def sample(self, run: Run, *, trajectory: Path | None = None, **options) -> dict[str, Any]:
        steps: list | None = [] if trajectory is not None else None
        images, labels = sample_images_sharded(run, trajectory=steps, **options)
        return {"images": images, "labels": labels, "trajectory": steps}

    def write(self, run: Run, samples: dict[str, Any], out: Path, **options) -> list[Path]:
        from unnoise.modalities.image.io import save_grid, save_npz, save_trajectory, trajectory_frames

        if not current().main:
            return []
        images, labels = samples["images"], samples["labels"]
        out = out.with_suffix("") if out.suffix in (".png", ".npz") else out
        k = run.model.config.num_classes
        nrow = min(len(images), k) if k and options.get("class_id") is None else None
        scale = _scale(images)
        written = [save_grid(out.with_name(out.name + ".png"), images, nrow=nrow, scale=scale)]
        written.append(save_npz(out.with_name(out.name + ".npz"), images, labels))
        if samples["trajectory"] is not None:
            frames = trajectory_frames(samples["trajectory"])
            written.append(save_trajectory(options["trajectory"], frames, scale=scale))
        return written

    def evaluate(self, run: Run, **options) -> list[str]:
        from unnoise.modalities.image.metrics import evaluate_images

        return evaluate_images(run, **options)

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        from unnoise.modalities.image.demo import run_image_demo

        return run_image_demo(out, steps=steps, seed=seed)


MODALITY = ImageModality()
