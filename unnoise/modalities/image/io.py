"""Image writers: a PNG grid, an NPZ of samples, a PNG of a sampling trajectory.

All take uint8 pixels ``(N, C, H, W)``, C = 1 (grey) or 3 (RGB), as ``unnoise.modalities.image.data.to_uint8``
makes them, and write atomically: a temporary file in the target's folder, then ``os.replace``, so a
reader never sees half a file and an interrupted run leaves no partial output.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

__all__ = ["save_grid", "save_npz", "save_trajectory", "trajectory_frames"]


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_images(images: Tensor, what: str = "images") -> None:
    if (
        not isinstance(images, Tensor)
        or images.dtype != torch.uint8
        or images.ndim != 4
        or images.shape[1] not in (1, 3)
    ):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a uint8 tensor (N, C, H, W) with C in (1, 3) (see to_uint8); got {got}")
    if len(images) == 0:
        raise ValueError(f"{what} is empty; need at least one image")


def _tile(images: Tensor, nrow: int, padding: int, scale: int) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` -> one ``(rows*(H*scale+p)+p, nrow*(W*scale+p)+p, C)`` array, black padding."""
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1 (an int); got {nrow}, {padding}, {scale}")
    images = images.detach().cpu()
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest-neighbour
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return grid.permute(1, 2, 0).numpy()


def _to_pil(array: np.ndarray):
    """``(H, W, 1 | 3)`` uint8 -> a Pillow image in mode L or RGB."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))


def save_grid(path: str | Path, images: Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> Path:
    """Write ``images`` uint8 ``(N, C, H, W)`` as one PNG grid, ``nrow`` images per row (default ~sqrt(N)).

    ``scale`` upsamples every pixel to a ``scale x scale`` block (nearest neighbour), so 8x8 digits
    are visible; ``padding`` black pixels separate and surround the images. Returns the path.
    """
    _check_images(images)
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(len(images)))
    picture = _to_pil(_tile(images, nrow, padding, scale))
    return _atomic_write(path, lambda f: picture.save(f, format="PNG"))


def save_npz(path: str | Path, images: Tensor, labels: Tensor | None = None) -> Path:
    """Write ``images`` uint8 ``(N, C, H, W)`` and ``labels`` ``(N,)`` to an ``.npz``.

    The file holds ``images`` uint8 ``(N, H, W, C)`` (channels last, as image tools expect) and
    ``labels`` int64 ``(N,)``, -1 for unconditional samples (the default when ``labels`` is None).
    """
    _check_images(images)
    n = len(images)
    labels = torch.full((n,), -1, dtype=torch.int64) if labels is None else torch.as_tensor(labels)
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be integer ({n},), one per image (-1 = unconditional); got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    arrays = {
        "images": images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy(),
        "labels": labels.detach().cpu().to(torch.int64).numpy(),
    }
    return _atomic_write(path, lambda f: np.savez(f, **arrays))


def _draw_labels(picture, names: Sequence[str], cell: int, padding: int):
    """A copy of ``picture`` with a text band on top: ``names[j]`` above column j (clipped to it)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Ag")
    band = bottom - top + 2 * padding + 2
    fill = 255 if picture.mode == "L" else (255, 255, 255)
    out = Image.new(picture.mode, (picture.width, picture.height + band))
    out.paste(picture, (0, band))
    for j, name in enumerate(names):
        label = Image.new(picture.mode, (cell, band))
        ImageDraw.Draw(label).text((0, padding + 1 - top), name, fill=fill, font=font)
        out.paste(label, (padding + j * (cell + padding), 0))
    return out


def save_trajectory(
    path: str | Path,
    frames: Sequence[tuple[str, Tensor]],
    padding: int = 2,
    scale: int = 1,
    labels: bool = True,
) -> Path:
    """Write a sampling trajectory as one PNG: one column per frame, one row per sample.

    ``frames`` is ``[(label, images uint8 (N, C, H, W)), ...]``, every frame the same shape (e.g. the
    denoised estimate at each sigma of a sampler's grid). With ``labels``, each frame's label is drawn
    above its column in Pillow's default font (skipped if no font loads). Returns the path.
    """
    if not frames:
        raise ValueError("frames is empty; need at least one (label, images) pair")
    for i, (_, images) in enumerate(frames):
        _check_images(images, f"frames[{i}] images")
        if images.shape != frames[0][1].shape:
            raise ValueError(
                f"every frame needs the same shape; frames[0] has {tuple(frames[0][1].shape)}, "
                f"frames[{i}] has {tuple(images.shape)}"
            )
    stacked = torch.stack([images for _, images in frames], dim=1)  # (N, F, C, H, W): row n = sample n
    picture = _to_pil(_tile(stacked.flatten(0, 1), len(frames), padding, scale))
    if labels:
        try:
            picture = _draw_labels(picture, [name for name, _ in frames], frames[0][1].shape[3] * scale, padding)
        except OSError:  # no usable default font on this system: keep the unlabelled grid
            pass
    return _atomic_write(path, lambda f: picture.save(f, format="PNG"))


def trajectory_frames(trajectory: list, rows: int = 8, columns: int = 6) -> list[tuple[str, Tensor]]:
    """x_t (labelled by its sigma) and the predicted x0 at up to ``columns`` steps of a sampler's
    ``trajectory`` [(sigma, x, x0_hat), ...], first ``rows`` samples, as uint8 frames."""
    from unnoise.modalities.image.data import to_uint8

    picks = sorted({round(i * (len(trajectory) - 1) / max(1, columns - 1)) for i in range(columns)})
    frames = []
    for i in picks:
        sigma, x, x0 = trajectory[i]
        frames.append((f"{sigma:.1g}", to_uint8((x[:rows] / max(1.0, sigma)).clamp(-1, 1))))
        frames.append(("x0", to_uint8(x0[:rows].clamp(-1, 1))))
    return frames
