"""2-D toy generation: points from a run trained on a Gaussian mixture, and the run's data split.

The data is :func:`unnoise.modalities.toy.data.ring_mixture` (8 Gaussians on a circle), whose
density is known in closed form, so the metrics can compare a run against the truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unnoise.modalities.run import Run
from unnoise.modalities.toy.data import GaussianMixture, ring_mixture
from unnoise.sampling.front import sample as run_sampler
from unnoise.training.config import TrainConfig

DATASETS = ("ring",)
SPLIT_SIZES = {"train": 20_000, "test": 2_000}


def mixture(cfg: TrainConfig) -> GaussianMixture:
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown toy data {cfg.data!r}; allowed: {', '.join(DATASETS)}")
    return ring_mixture()


def points(cfg: TrainConfig, split: str = "train") -> Tensor:
    """A fixed draw of the mixture: 20,000 training points (seed 0) or 2,000 test points (seed 1), float32."""
    seed = {"train": 0, "test": 1}[split]
    x, _ = mixture(cfg).sample(SPLIT_SIZES[split], torch.Generator().manual_seed(seed))
    return x.float()


@torch.no_grad()
def sample_points(
    run: Run, *, n: int = 1000, sampler: str = "dpmpp_2m", nfe: int = 20, seed: int = 0, **options
) -> Tensor:
    """``n`` points (n, 2), per-sample seeds ``seed + i``; ``options`` (eta, grid) go to the sampler."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    x = torch.stack([torch.randn(2, generator=g) for g in generators]) * run.sigma_max
    D = run.denoiser(None, None)
    return run_sampler(
        D, x, sampler=sampler, nfe=nfe, sigma_max=run.sigma_max, sigma_min=run.sigma_min, generator=generators,
        schedule=run.schedule, **options,
    )  # fmt: skip
