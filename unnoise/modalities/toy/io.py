"""Toy writers: 2-D points as a scatter plot (PNG) beside the data, and as an NPZ (``points``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor


def save_points(path: str | Path, points: Tensor, reference: Tensor | None = None) -> Path:
    """A scatter plot of ``points`` (N, 2), beside ``reference`` points (the data) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = [("samples", points)] + ([("data", reference)] if reference is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels, strict=True):
        pts = pts.detach().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3)
        ax.set(xlim=(-1.8, 1.8), ylim=(-1.8, 1.8), aspect="equal", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_points_npz(path: str | Path, points: Tensor) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, points=points.detach().cpu().numpy())
    return path
