"""Image generation from a run: per-sample seeds, class labels, guidance, sharded over torchrun.

Also the run's data split (:func:`dataset`). Samples leave as uint8 pixels (N, C, H, W).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unnoise.denoisers import clipped
from unnoise.modalities.image.data import ImageDataset, load_images, to_uint8
from unnoise.modalities.run import Run
from unnoise.sampling.front import sample as run_sampler
from unnoise.sampling.front import start_sigma
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import map_chunks


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


def grid_scale(images: Tensor) -> int:
    """How many times to enlarge each image in a grid so that it shows at about 64 pixels."""
    return max(1, 64 // images.shape[-1])
