"""Images end to end: train a U-Net on an image dataset, load a run, sample and evaluate it.

The modality is a dataset (unnoise.modalities.image.data), a network (unnoise.nets.unet) and an
encode/decode pair (uint8 pixels <-> [-1, 1]); the trainer and the samplers stay generic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from unnoise.denoisers import clipped, labelled
from unnoise.guidance import conditioned
from unnoise.losses import elbo_terms
from unnoise.modalities.image.data import ImageDataset, load_images, to_model, to_uint8
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.sampling.front import sample as run_sampler
from unnoise.sampling.front import start_sigma
from unnoise.schedules import DiscreteSchedule, make_schedule
from unnoise.training.checkpoint import latest_checkpoint, load_config, load_model_weights
from unnoise.training.distributed import map_chunks
from unnoise.training.loop import TrainConfig, diffusion_objective, train


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


def build_net(cfg: TrainConfig, data: ImageDataset) -> UNet:
    num_classes = len(data.class_names) if cfg.conditional and data.class_names else None
    config = UNetConfig.preset(cfg.model, data.images.shape[-1], data.images.shape[1], num_classes)
    config = dataclasses.replace(config, learned_variance=cfg.loss == "hybrid", **cfg.extra.get("unet", {}))
    return UNet(config)


def train_images(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> UNet:
    """Train on ``cfg.data``; returns the EMA network. Sample grids go to RUN/samples/.

    ``stop(step)`` may end training early (see :func:`unnoise.training.loop.train`).
    """
    torch.manual_seed(cfg.seed)
    data = dataset(cfg, "train")
    cfg.extra["class_names"] = list(data.class_names)
    net = build_net(cfg, data)  # contiguous: channels-last makes GroupNorm 10-40x slower on CPU (torch 2.13)
    null = net.config.num_classes

    def on_sample(ema: UNet, step: int) -> None:
        run = ImageRun(ema, make_schedule(cfg.schedule, cfg.T), cfg, data.class_names)
        images, _ = sample_images(run, n=min(64, 8 * max(1, len(data.class_names))), nfe=20, seed=0)
        from unnoise.modalities.image.io import save_grid

        save_grid(Path(run_dir) / "samples" / f"step_{step:08d}.png", images, scale=_scale(images))

    return train(
        cfg,
        run_dir,
        net,
        to_model(data.images),
        data.labels,
        loss_fn=diffusion_objective(cfg, null),
        resume=resume,
        on_sample=on_sample,
        progress=progress,
        stop=stop,
    )


@dataclass
class ImageRun:
    net: UNet  # EMA weights
    schedule: DiscreteSchedule
    cfg: TrainConfig
    class_names: list[str]

    @property
    def conditional(self) -> bool:
        return self.net.config.num_classes is not None


def load_run(run_dir: str | Path, which: str = "ema") -> ImageRun:
    """The network of a run folder with its EMA (or raw) weights, ready to sample."""
    config = load_config(run_dir)
    if "net" not in config or "train" not in config:
        raise ValueError(f"{Path(run_dir) / 'config.json'} is not an image run (no 'net' and 'train' sections)")
    cfg = TrainConfig(**config["train"])
    net = UNet(UNetConfig(**config["net"]))
    step = latest_checkpoint(run_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train first (unnoise train image ...)")
    load_model_weights(step, net, which=which)
    names = cfg.extra.get("class_names") or [str(i) for i in range(net.config.num_classes or 0)]
    return ImageRun(net.eval(), make_schedule(cfg.schedule, cfg.T), cfg, names)


def denoiser(run: ImageRun, labels: Tensor | None, guidance: float = 1.0):
    """D(x, sigma) of the run; with labels and guidance != 1, classifier-free guided."""
    null = run.net.config.num_classes
    conditional = labelled(run.net, run.schedule, prediction=run.cfg.prediction)
    if labels is None:
        return lambda x, sigma: conditional(x, sigma, None if null is None else torch.full((x.shape[0],), null))
    if null is None:
        raise ValueError("this model is unconditional: it takes no class (train with --conditional)")
    return conditioned(conditional, labels, torch.tensor(null), guidance)


@torch.no_grad()
def sample_images(
    run: ImageRun,
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
    if guidance != 1.0 and not run.conditional:
        raise ValueError("this model is unconditional: guidance needs a class-conditional run (leave it at 1)")
    indices = range(n) if indices is None else indices
    labels = labels[indices.start : indices.stop]
    c = run.net.config
    generators = [torch.Generator().manual_seed(seed + i) for i in indices]
    s_max, s_min = run.schedule.sigma_max, run.schedule.sigma_min
    top = start_sigma(sampler, nfe, s_max, s_min, options.get("grid"), run.schedule)
    x = torch.stack([torch.randn(c.in_channels, c.image_size, c.image_size, generator=g) for g in generators]) * top
    callback = None if trajectory is None else (lambda i, s, x, x0: trajectory.append((float(s), x, x0)))
    D = clipped(denoiser(run, labels if labels[0] >= 0 else None, guidance))
    out = run_sampler(
        D,
        x,
        sampler=sampler,
        nfe=nfe,
        sigma_max=s_max,
        sigma_min=s_min,
        generator=generators,
        callback=callback,
        schedule=run.schedule,
        **options,
    )
    return to_uint8(out.clamp(-1, 1)), labels


def sample_images_sharded(
    run: ImageRun, *, n: int = 64, batch_size: int = 64, trajectory: list | None = None, **sampling
) -> tuple[Tensor, Tensor]:
    """:func:`sample_images` in batches of ``batch_size`` dealt to the processes of a torchrun
    group; every process returns all ``n``, identical for any number of processes (and to one
    process's). ``trajectory`` records the first batch, on the process that draws it."""

    def draw(indices: range) -> Tensor:
        keep = trajectory if indices.start == 0 else None
        return sample_images(run, n=n, indices=indices, trajectory=keep, **sampling)[0]

    images = map_chunks(draw, n, batch_size)
    return images, _labels(run, n, sampling.get("class_id"))


def _labels(run: ImageRun, n: int, class_id: int | None) -> Tensor:
    k = run.net.config.num_classes
    if class_id is not None:
        if k is None:
            raise ValueError("this model is unconditional: --class needs a class-conditional run")
        if not 0 <= class_id < k:
            raise ValueError(f"unknown class {class_id}; allowed: 0..{k - 1} ({', '.join(run.class_names)})")
        return torch.full((n,), class_id)
    if k is None:
        return torch.full((n,), -1)
    return torch.arange(n) // max(1, math.ceil(n / k)) % k


@torch.no_grad()
def eval_bpd(run: ImageRun, *, n: int | None = None, batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """Test-split negative ELBO in bits/dim (discretized decoder on 8-bit pixels): (mean, stderr).

    Conditional runs are scored with their labels: bits/dim of p(x | y). T model calls per batch.
    Batches are dealt to the processes of a torchrun group; batch k draws its noise from seed + k
    * batch_size, so the figure is the same for any number of processes.
    """
    data = dataset(run.cfg, "test")
    x0, y = to_model(data.images)[:n], data.labels[:n]
    conditional = run.net.config.num_classes is not None

    def score(indices: range) -> Tensor:
        xb, yb = x0[indices.start : indices.stop], y[indices.start : indices.stop]

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            return run.net(x_t, t, yb if conditional else None)

        g = torch.Generator().manual_seed(seed + indices.start)
        kw = dict(prediction=run.cfg.prediction, variance=run.cfg.variance, clip_x0=True, generator=g)
        return elbo_terms(model, xb, run.schedule, **kw).bpd

    bpd = map_chunks(score, len(x0), batch_size).double()
    return bpd.mean().item(), (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else float("nan")


def eval_fid(run: ImageRun, *, n: int = 1000, batch_size: int = 250, **sampling) -> float:
    """FID of ``n`` samples (class-balanced for conditional runs) against the whole test split.

    Sampling and the Inception features are sharded over the processes of a torchrun group.
    """
    from unnoise.metrics import InceptionFeatures, frechet_distance, gaussian_fit

    features = InceptionFeatures()  # fails early, with the install hint, if the extra is missing
    images, _ = sample_images_sharded(run, n=n, batch_size=batch_size, **sampling)
    reference = dataset(run.cfg, "test").images

    def fit(x: Tensor):
        rows = map_chunks(lambda r: torch.from_numpy(features(x[r.start : r.stop])), len(x), batch_size)
        return gaussian_fit(rows.numpy())

    return frechet_distance(*fit(images), *fit(reference))


def _scale(images: Tensor) -> int:
    return max(1, 64 // images.shape[-1])
