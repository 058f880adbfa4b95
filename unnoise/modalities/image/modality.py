"""The image modality: pixels in [-1, 1] through a U-Net, samples out as uint8 grids.

Data: :mod:`.data` (digits, Fashion-MNIST, folders); network: :class:`unnoise.nets.unet.UNet`
(class-conditional with a null class for classifier-free guidance); sampling: :mod:`.pipeline`;
writers: :mod:`.io`; metrics (bits/dim, FID): :mod:`.metrics`; demo: :mod:`.demo`. Training,
loading and the run's denoiser are the generic ones of :mod:`unnoise.modalities.run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unnoise.modalities.base import TrainingData, output_stem
from unnoise.modalities.image.data import to_model
from unnoise.modalities.image.demo import run_image_demo
from unnoise.modalities.image.io import save_grid, save_npz, save_trajectory, trajectory_frames
from unnoise.modalities.image.metrics import evaluate_images
from unnoise.modalities.image.pipeline import dataset, grid_scale, sample_images, sample_images_sharded
from unnoise.modalities.run import Run
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.schema import from_dict
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import current
from unnoise.training.objectives import Encoded


class ImageModality:
    """Images: see the module docstring."""

    name = "image"
    defaults: dict[str, Any] = {"data": "digits", "model": "small"}
    ddpm_defaults: dict[str, Any] = {}  # TrainConfig's own: cosine, T = 1000, eps
    default_sampler = "dpmpp_2m_sde"  # chosen by benchmarks/image_quality.py --samplers-at 20 (README)
    sample_options = ("class_id", "guidance", "eta", "grid", "trajectory")
    eval_options = ("bpd", "fid", "n", "guidance", "grid")
    sharded = True  # sample/eval dealt to the processes of a torchrun group
    run_type = Run

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
        return UNet(from_dict(UNetConfig, config["net"], "config.json 'net'"))

    def network(self, model: UNet):
        return model

    def encode(self, model: UNet, x: Tensor) -> Encoded:
        return Encoded(x, model)

    def preview(self, run_dir: Path, cfg: TrainConfig, model: UNet, step: int) -> None:
        run = Run(self, cfg, model)
        k = model.config.num_classes or 0
        images, _ = sample_images(run, n=min(64, 8 * max(1, k)), nfe=20, seed=0)
        save_grid(run_dir / "samples" / f"step_{step:08d}.png", images, scale=grid_scale(images))

    def sample(self, run: Run, *, trajectory: Path | None = None, **options) -> dict[str, Any]:
        steps: list | None = [] if trajectory is not None else None
        images, labels = sample_images_sharded(run, trajectory=steps, **options)
        return {"images": images, "labels": labels, "trajectory": steps}

    def sample_shape(self, run: Run) -> tuple[int, ...]:
        c = run.model.config
        return (c.in_channels, c.image_size, c.image_size)

    def outputs(self, out: Path) -> list[Path]:
        stem = output_stem(out, (".png", ".npz"))
        return [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")]

    def write(self, run: Run, samples: dict[str, Any], out: Path, **options) -> list[Path]:
        if not current().main:
            return []
        images, labels = samples["images"], samples["labels"]
        out = output_stem(out, (".png", ".npz"))
        k = run.model.config.num_classes
        nrow = min(len(images), k) if k and options.get("class_id") is None else None
        scale = grid_scale(images)
        written = [save_grid(out.with_name(out.name + ".png"), images, nrow=nrow, scale=scale)]
        written.append(save_npz(out.with_name(out.name + ".npz"), images, labels))
        if samples["trajectory"] is not None:
            frames = trajectory_frames(samples["trajectory"])
            written.append(save_trajectory(options["trajectory"], frames, scale=scale))
        return written

    def evaluate(self, run: Run, **options) -> list[str]:
        return evaluate_images(run, **options)

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        return run_image_demo(out, steps=steps, seed=seed)


MODALITY = ImageModality()
