"""Text-to-image writers: a PNG grid, an NPZ of images with their prompts, and a PNG of prompts beside images.

All take uint8 pixels ``(N, C, H, W)`` and write atomically (a temporary file beside the target, then
``os.replace``), as the image modality's writers do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

from unnoise.modalities.image.io import save_grid

__all__ = ["save_grid", "save_prompt_npz", "save_prompt_panel"]


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
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


def _check(images: Tensor, prompts: Sequence[str]) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or not len(images):
        raise ValueError("images must be a non-empty uint8 tensor (N, C, H, W)")
    if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"need one prompt (a str) per image: {len(images)} images, {len(prompts)} prompts")


def save_prompt_npz(path: str | Path, images: Tensor, prompts: Sequence[str]) -> Path:
    """Write ``images`` uint8 ``(N, H, W, C)`` (channels last, as :func:`unnoise.modalities.image.io.save_npz`)
    and ``prompts`` ``(N,)`` (a unicode array: the prompt of each image) to an ``.npz``."""
    _check(images, prompts)
    arrays = {
        "images": images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy(),
        "prompts": np.array(list(prompts), dtype=str),
    }
    return _atomic(Path(path), lambda f: np.savez(f, **arrays))


def save_prompt_panel(path: str | Path, images: Tensor, prompts: Sequence[str], *, scale: int = 2) -> Path:
    """A PNG with one row per distinct prompt (in first-seen order): the prompt, then its images.

    ``images`` uint8 ``(N, C, H, W)``; ``prompts[i]`` is image i's prompt. Each image is enlarged
    ``scale`` times (nearest neighbour); the text column is as wide as the longest prompt needs.
    """
    from PIL import Image, ImageDraw, ImageFont

    _check(images, prompts)
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rows.setdefault(p, []).append(i)
    big = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    c, h, w = big.shape[1:]
    font = ImageFont.load_default()
    lines = {p: _wrap(p, 44) for p in rows}
    text_w = 8 + 6 * max(len(line) for ls in lines.values() for line in ls)
    pad, per_row = 4, max(map(len, rows.values()))
    canvas = Image.new("RGB", (text_w + per_row * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, idx) in enumerate(rows.items()):
        top = pad + r * (h + pad)
        for k, line in enumerate(lines[prompt]):
            draw.text((4, top + 2 + 12 * k), line, fill="black", font=font)
        for j, i in enumerate(idx):
            pixels = big[i].permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels[..., 0] if c == 1 else pixels, "L" if c == 1 else "RGB")
            canvas.paste(tile.convert("RGB"), (text_w + j * (w + pad), top))
    return _atomic(Path(path), lambda f: canvas.save(f, format="PNG"))


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap at ``width`` characters."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines or [""]
