"""Image metrics of a run: held-out negative ELBO in bits/dim and FID against the test split."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unnoise.elbo import elbo_terms
from unnoise.modalities.image.data import to_model
from unnoise.modalities.image.pipeline import dataset, sample_images_sharded
from unnoise.modalities.run import Run
from unnoise.training.distributed import map_chunks


def require_ddpm(run: Run, what: str) -> None:
    """The discrete-time bound exists for DDPM-objective runs only: one line otherwise."""
    if run.cfg.objective != "ddpm":
        raise ValueError(
            f"{what} is the discrete-time (DDPM) bound; this run trained with objective {run.cfg.objective!r}"
        )


@torch.no_grad()
def eval_bpd(run: Run, *, n: int | None = None, batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """Test-split negative ELBO in bits/dim (discretized decoder on 8-bit pixels): (mean, stderr).

    Conditional runs are scored with their labels: bits/dim of p(x | y). T model calls per batch.
    Batches are dealt to the processes of a torchrun group; batch k draws its noise from seed + k
    * batch_size, so the figure is the same for any number of processes.
    """
    require_ddpm(run, "--bpd")
    data = dataset(run.cfg, "test")
    x0, y = to_model(data.images)[:n], data.labels[:n]
    conditional = run.model.config.num_classes is not None

    def score(indices: range) -> Tensor:
        xb, yb = x0[indices.start : indices.stop], y[indices.start : indices.stop]

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            return run.model(x_t, t, yb if conditional else None)

        g = torch.Generator().manual_seed(seed + indices.start)
        kw = dict(prediction=run.cfg.prediction, variance=run.cfg.variance, clip_x0=True, generator=g)
        return elbo_terms(model, xb, run.schedule, **kw).bpd

    bpd = map_chunks(score, len(x0), batch_size).double()
    return bpd.mean().item(), (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else float("nan")


def eval_fid(run: Run, *, n: int = 1000, batch_size: int = 250, **sampling) -> float:
    """FID of ``n`` samples (class-balanced for conditional runs) against the whole test split.

    Sampling and the Inception features are sharded over the processes of a torchrun group. The
    test split's fit is computed once and cached (:func:`unnoise.metrics.cached_reference_fit`).
    """
    from unnoise.metrics import InceptionFeatures, cached_reference_fit, frechet_distance, gaussian_fit

    features = InceptionFeatures()  # fails early, with the install hint, if the extra is missing
    images, _ = sample_images_sharded(run, n=n, batch_size=batch_size, **sampling)
    reference = dataset(run.cfg, "test").images

    def fit(x: Tensor):
        rows = map_chunks(lambda r: torch.from_numpy(features(x[r.start : r.stop])), len(x), batch_size)
        return gaussian_fit(rows.numpy())

    return frechet_distance(*fit(images), *cached_reference_fit(reference, fit))


def evaluate_images(
    run: Run, *, bpd: bool = False, fid: int | None = None, n: int | None = None, **sampling
) -> list[str]:
    """`unnoise eval` on an image run: ``bpd`` (held-out bits/dim of the first ``n`` test images)
    and/or ``fid`` (FID of that many samples drawn with ``sampling``: sampler, nfe, guidance, grid, seed)."""
    if not (bpd or fid):
        raise ValueError("say what to evaluate; allowed: --bpd, --fid N")
    if bpd:
        require_ddpm(run, "--bpd")  # before any sampling for --fid
    lines = []
    if bpd:
        mean, se = eval_bpd(run, n=n)
        lines.append(f"test negative ELBO: {mean:.4f} +- {se:.4f} bits/dim")
    if fid:
        score = eval_fid(run, n=fid, **sampling)
        lines.append(f"FID@{fid} vs the test split ({sampling['sampler']}, {sampling['nfe']} NFE): {score:.2f}")
    return lines
