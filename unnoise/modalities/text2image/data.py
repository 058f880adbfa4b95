"""Captioned image data: the ``fashion-scenes`` generator and folders of images with ``metadata.jsonl``.

``fashion-scenes`` (issue 17): 56x56 uint8 canvases laid out as a 2x2 grid of 28x28 cells, each cell
empty or holding one Fashion-MNIST item (the train split for training, the test split for evaluation),
1 to 4 objects per scene, with a caption that names every object and its cell in one of the
paraphrase templates of :mod:`.captions`. A scene's classes are drawn first (number of objects
uniform in 1..4, cells uniform without replacement, classes uniform), then one item of each class,
so a prompt's scene can be laid out from real items in the same way (:func:`render_scene`), which
the prompt-following metric needs for its real-scene reference.

Everything is a function of ``seed``: the same seed, split and count give the same scenes, pixels
and captions, on any machine (NumPy's PCG64 stream).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from unnoise.modalities.image.data import ImageDataset, load_fashion_mnist
from unnoise.modalities.text2image.captions import CELLS, TEMPLATES, Scene, caption

__all__ = [
    "CELL_SIZE",
    "SCENE_SIZE",
    "CaptionedImages",
    "draw_scene",
    "fashion_scenes",
    "load_captioned_folder",
    "real_scenes",
    "render_scene",
    "scene_labels",
]

CELL_SIZE = 28
SCENE_SIZE = 2 * CELL_SIZE  # 56


@dataclass(frozen=True)
class CaptionedImages:
    """Images with one caption each.

    Attributes:
        images: uint8 ``(N, C, H, W)``.
        captions: N strings.
        scenes: for fashion-scenes, the :class:`Scene` each image shows (None for a folder).
    """

    images: Tensor
    captions: list[str]
    scenes: list[Scene] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.captions) != len(self.images) or (self.scenes is not None and len(self.scenes) != len(self)):
            raise ValueError(f"{len(self.images)} images need as many captions (and scenes); got {len(self.captions)}")

    def __len__(self) -> int:
        return len(self.images)


def scene_labels(scenes: Sequence[Scene]) -> Tensor:
    """Scenes as a long tensor ``(N, 4)``: the class id in each cell (reading order), -1 where empty."""
    return torch.tensor([[-1 if c is None else c for c in s.cells] for s in scenes], dtype=torch.long)


def draw_scene(rng: np.random.Generator, objects: tuple[int, int] = (1, 4), num_classes: int = 10) -> Scene:
    """A random scene: K ~ U{objects[0]..objects[1]} objects in K distinct cells, classes uniform."""
    lo, hi = objects
    if not 1 <= lo <= hi <= len(CELLS):
        raise ValueError(f"objects must be (lo, hi) with 1 <= lo <= hi <= {len(CELLS)}; got {objects}")
    k = int(rng.integers(lo, hi + 1))
    cells: list[int | None] = [None] * len(CELLS)
    for cell in rng.choice(len(CELLS), size=k, replace=False):
        cells[int(cell)] = int(rng.integers(num_classes))
    return Scene(tuple(cells))


def render_scene(
    scene: Scene, pool: ImageDataset, rng: np.random.Generator, by_class: list[np.ndarray] | None = None
) -> Tensor:
    """The canvas of ``scene``: uint8 ``(C, 56, 56)``, each named cell holding a random ``pool`` item of its class.

    ``pool`` holds 28x28 items (Fashion-MNIST); ``by_class[c]`` (the indices of class c in ``pool``)
    may be passed to save recomputing it per scene.
    """
    if tuple(pool.images.shape[2:]) != (CELL_SIZE, CELL_SIZE):
        raise ValueError(f"scene items must be {CELL_SIZE}x{CELL_SIZE}; got {tuple(pool.images.shape[2:])}")
    by_class = _by_class(pool) if by_class is None else by_class
    canvas = torch.zeros(pool.images.shape[1], SCENE_SIZE, SCENE_SIZE, dtype=torch.uint8)
    for cell, c in scene.objects:
        if not len(by_class[c]):
            raise ValueError(f"the item pool has no item of class {c} for the scene {scene}")
        item = pool.images[int(by_class[c][rng.integers(len(by_class[c]))])]
        row, col = CELLS[cell]
        canvas[:, row * CELL_SIZE : (row + 1) * CELL_SIZE, col * CELL_SIZE : (col + 1) * CELL_SIZE] = item
    return canvas


def _by_class(pool: ImageDataset) -> list[np.ndarray]:
    labels = pool.labels.numpy()
    return [np.flatnonzero(labels == c) for c in range(max(len(pool.class_names), 1))]


def fashion_scenes(
    n: int,
    split: Literal["train", "test"] = "train",
    *,
    seed: int = 0,
    objects: tuple[int, int] = (1, 4),
    templates: Sequence[str] = TEMPLATES,
    pool: ImageDataset | None = None,
) -> CaptionedImages:
    """``n`` fashion-scenes: images uint8 ``(n, 1, 56, 56)``, captions, scenes; deterministic in ``seed``.

    Items come from Fashion-MNIST's ``split`` (or from ``pool``, any labelled 28x28 data set); each
    caption uses a template drawn uniformly from ``templates`` and names the objects in random order.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of scenes; got {n!r}")
    bad = [t for t in templates if t not in TEMPLATES]
    if bad or not templates:
        raise ValueError(f"unknown caption templates {bad}; allowed: {', '.join(TEMPLATES)}")
    pool = load_fashion_mnist(split) if pool is None else pool
    by_class = _by_class(pool)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, captions, scenes = [], [], []
    for _ in range(n):
        scene = draw_scene(rng, objects, num_classes=len(by_class))
        images.append(render_scene(scene, pool, rng, by_class))
        template = templates[int(rng.integers(len(templates)))]
        captions.append(caption(scene, template, order=[int(i) for i in rng.permutation(len(scene))]))
        scenes.append(scene)
    return CaptionedImages(torch.stack(images), captions, scenes)


def real_scenes(
    scenes: Sequence[Scene],
    split: Literal["train", "test"] = "test",
    *,
    seed: int = 0,
    pool: ImageDataset | None = None,
) -> Tensor:
    """Real canvases uint8 ``(N, 1, 56, 56)`` laid out per ``scenes`` (e.g. parsed prompts) from ``split``'s
    items (or ``pool``'s): the reference that generated scenes are scored beside."""
    if not len(scenes):
        raise ValueError("real_scenes needs at least one scene")
    pool = load_fashion_mnist(split) if pool is None else pool
    by_class, rng = _by_class(pool), np.random.default_rng([seed, 2])
    return torch.stack([render_scene(scene, pool, rng, by_class) for scene in scenes])


# --- any folder of images with captions in metadata.jsonl ------------------------------------------------


def _read_metadata(file: Path) -> list[tuple[int, str, str]]:
    """``(line number, file_name, text)`` of each non-blank line of a metadata.jsonl."""
    try:
        lines = file.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text: {err}") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} line {number}: not valid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("file_name", "text")):
            raise ValueError(
                f'{file} line {number}: need an object with string "file_name" and "text"; got {line[:80]!r}'
            )
        rows.append((number, row["file_name"], row["text"]))
    if not rows:
        raise ValueError(f"{file} lists no images (one JSON object per line, with file_name and text)")
    return rows


def load_captioned_folder(path: str | Path, *, size: int, mode: Literal["L", "RGB"] = "RGB") -> CaptionedImages:
    """A folder of images captioned in ``metadata.jsonl`` (Hugging Face's ImageFolder form) -> ``(N, C, size, size)``.

    Each line of ``metadata.jsonl`` is ``{"file_name": "a/b.png", "text": "a caption"}``, the file
    relative to the folder; each image is resized (shorter side -> ``size``) and center-cropped.
    A missing or corrupt image, or a bad line, is a ValueError naming the file and the line number.
    """
    from PIL import Image

    from unnoise.modalities.image.data import _load_image  # the image modality's resize-and-crop

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: a captioned folder needs one JSON line per image")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (output is size x size pixels); got {size!r}")
    if mode not in ("L", "RGB"):
        raise ValueError(f"unknown mode {mode!r}; allowed: 'L' (grey, 1 channel), 'RGB' (3 channels)")
    images, captions = [], []
    for number, name, text in _read_metadata(meta):
        file = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not file.is_file():
            raise ValueError(f"{meta} line {number}: file_name {name!r} is not a file inside {root}")
        try:
            pixels = _load_image(file, size, mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{meta} line {number}: cannot read image {file}: {reason}") from err
        images.append(torch.from_numpy(pixels.copy()).reshape(size, size, -1).permute(2, 0, 1))
        captions.append(text)
    return CaptionedImages(torch.stack(images), captions)
