"""Prompt following: does a generated scene show what its prompt names, cell by cell (issue 17, item 6)?

A 56x56 fashion-scene is four 28x28 cells. A :class:`CellClassifier` (a small CNN trained on
Fashion-MNIST items plus blank cells) labels each cell with a class id 0..9 or ``EMPTY``; a scene is
right when every cell agrees with the :class:`Scene` its prompt names (:func:`.captions.parse_prompt`):
each named object in its cell, every other cell empty. :func:`prompt_following` reports that
accuracy over all scenes and by number of objects (1, 2, 3-4), beside the per-cell accuracy and
where scenes fail: the layout (which cells hold an object) or the binding (which object is where). The
same score on real scenes laid out per the same prompts (test-split items) is the ceiling a
generator is measured against, so the classifier's own errors stay visible.

:func:`cell_classifier` trains it once on Fashion-MNIST's train split and caches it (as the audio
modality caches its digit classifier) in ``~/.cache/unnoise/cell-classifier``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.modalities.image.data import ImageDataset, to_model
from unnoise.modalities.text2image.captions import CELLS, Scene
from unnoise.modalities.text2image.data import CELL_SIZE, SCENE_SIZE, scene_labels

__all__ = [
    "EMPTY",
    "CellClassifier",
    "PromptFollowing",
    "cell_classifier",
    "predict_cells",
    "prompt_following",
    "split_cells",
]

EMPTY = 10  # the classifier's label for a blank cell; predict_cells reports it as -1, as scene_labels does
GROUPS: dict[str, tuple[int, ...]] = {"1": (1,), "2": (2,), "3-4": (3, 4)}


def split_cells(images: Tensor) -> Tensor:
    """``(N, C, 56, 56)`` -> ``(N, 4, C, 28, 28)``: the four cells in reading order (:data:`.captions.CELLS`)."""
    if images.ndim != 4 or tuple(images.shape[2:]) != (SCENE_SIZE, SCENE_SIZE):
        raise ValueError(f"scenes must be (N, C, {SCENE_SIZE}, {SCENE_SIZE}); got {tuple(images.shape)}")
    n, c = images.shape[:2]
    cells = images.reshape(n, c, 2, CELL_SIZE, 2, CELL_SIZE).permute(0, 2, 4, 1, 3, 5)  # (N, row, col, C, h, w)
    return cells.reshape(n, len(CELLS), c, CELL_SIZE, CELL_SIZE)  # row-major: CELLS' reading order


class CellClassifier(nn.Module):
    """28x28 cell in [-1, 1] ``(B, 1, 28, 28)`` -> logits ``(B, 11)``: Fashion-MNIST classes 0..9 and ``EMPTY``.

    conv3x3(32) -> pool -> conv3x3(64) -> pool -> conv3x3(128) -> global average -> linear, each conv
    followed by GroupNorm and SiLU.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            layers += [nn.MaxPool2d(2)] if i < len(channels) - 1 else []
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, EMPTY + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @classmethod
    def train_on(
        cls,
        items: ImageDataset,
        *,
        steps: int = 3000,
        batch_size: int = 64,
        lr: float = 2e-3,
        seed: int = 0,
        channels: tuple[int, ...] = (32, 64, 128),
    ) -> CellClassifier:
        """Fit to 28x28 ``items`` (labels 0..9) and blank cells (one batch in 11), all with faint Gaussian
        noise (std up to 0.1 in [-1, 1]) so that a generator's near-blank cells still read as empty.

        Measured with the defaults on Fashion-MNIST train (152 CPU-seconds, one thread): on 1,000 real
        test-split scenes, cell accuracy 0.924 and whole-scene accuracy 0.870 / 0.774 / 0.643 for 1 / 2 /
        3-4 objects (600 steps: 0.863 and 0.795 / 0.580 / 0.423).
        """
        if tuple(items.images.shape[1:]) != (1, CELL_SIZE, CELL_SIZE) or (items.labels < 0).any():
            raise ValueError(f"the classifier trains on labelled (N, 1, {CELL_SIZE}, {CELL_SIZE}) items")
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's global stream untouched
            torch.manual_seed(seed)
            model = cls(channels)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for _ in range(steps):
            pick = torch.randint(len(items), (batch_size,), generator=g)
            x, y = to_model(items.images[pick]), items.labels[pick].clone()
            blank = torch.rand(batch_size, generator=g) < 1 / (EMPTY + 1)
            x[blank], y[blank] = -1.0, EMPTY
            x = x + 0.1 * torch.rand(batch_size, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return model.eval()


@torch.no_grad()
def predict_cells(classifier: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """uint8 scenes ``(N, 1, 56, 56)`` -> ``(N, 4)`` long: each cell's class id, -1 where it reads as empty."""
    if images.dtype != torch.uint8:
        raise ValueError(f"predict_cells scores uint8 pixels; got {images.dtype}")
    cells = split_cells(images).flatten(0, 1)  # (4N, 1, 28, 28)
    labels = torch.cat([classifier(to_model(b)).argmax(-1) for b in cells.split(batch_size)])
    return torch.where(labels == EMPTY, -1, labels).reshape(-1, 4)


@dataclass
class PromptFollowing:
    """Scene accuracy (every cell right) overall and per object-count group, and per-cell accuracy."""

    accuracy: float
    cell_accuracy: float
    by_objects: dict[str, float] = field(default_factory=dict)  # "1", "2", "3-4" -> accuracy
    counts: dict[str, int] = field(default_factory=dict)  # scenes per group
    # where it fails: the layout (which cells hold an object) against the binding (which object is where)
    layout: float = float("nan")  # scenes whose occupied cells are exactly the named ones
    class_where_occupied: float = float("nan")  # named cells holding an object: the named class
    misplaced: float = float("nan")  # of those with another class: the named class is in another cell

    def lines(self, name: str = "") -> list[str]:
        """Printable lines, e.g. ``prompt following (generated): 0.912 (1: 0.95 of 40, 2: ...)``."""
        groups = ", ".join(f"{g} objects: {a:.3f} of {self.counts[g]}" for g, a in self.by_objects.items())
        label = f" ({name})" if name else ""
        return [
            f"prompt following{label}: {self.accuracy:.3f} ({groups})",
            f"cell accuracy{label}: {self.cell_accuracy:.3f}",
            f"layout right{label}: {self.layout:.3f}; named class where the named cell holds an object: "
            f"{self.class_where_occupied:.3f}; other classes there that belong in another cell: {self.misplaced:.3f}",
        ]


def prompt_following(predicted: Tensor, scenes: Sequence[Scene]) -> PromptFollowing:
    """Score predicted cells ``(N, 4)`` (class id or -1) against the scenes the prompts name.

    A scene counts as right when all four cells match; groups with no scene are left out.
    """
    target = scene_labels(scenes)
    if predicted.shape != target.shape:
        raise ValueError(f"predicted cells must be (N, 4) for {len(scenes)} scenes; got {tuple(predicted.shape)}")
    cell_right = predicted.to(target.dtype) == target  # (N, 4)
    right = cell_right.all(dim=1)
    objects = (target >= 0).sum(dim=1)
    by, counts = {}, {}
    for name, ks in GROUPS.items():
        member = torch.isin(objects, torch.tensor(ks))
        if member.any():
            by[name], counts[name] = right[member].float().mean().item(), int(member.sum())
    named, occupied = target >= 0, predicted >= 0
    both = named & occupied
    swapped = both & ~cell_right  # an object where the prompt names one, but of another class
    elsewhere = (target[:, :, None] == predicted[:, None, :]).any(dim=2)  # the named class shows in some cell
    return PromptFollowing(
        right.float().mean().item(), cell_right.float().mean().item(), by, counts,
        layout=(named == occupied).all(dim=1).float().mean().item(),
        class_where_occupied=_share(both & cell_right, both),
        misplaced=_share(swapped & elsewhere, swapped),
    )  # fmt: skip


def _share(part: Tensor, whole: Tensor) -> float:
    """``part.sum() / whole.sum()``, NaN where ``whole`` is empty."""
    n = int(whole.sum())
    return int(part.sum()) / n if n else float("nan")


# The recipe cell_classifier trains with (CellClassifier.train_on's measured defaults); part of the
# cache's meta, so changing it retrains.
RECIPE: dict = {"steps": 3000, "batch_size": 64, "lr": 2e-3, "seed": 0, "channels": [32, 64, 128]}


def default_cache() -> Path:
    return Path.home() / ".cache" / "unnoise"


def cell_classifier(cache: str | os.PathLike | None = None) -> CellClassifier:
    """The cell classifier of the prompt-following metric, in eval mode: trained once on Fashion-MNIST's
    train split with :data:`RECIPE` (about 150 CPU-seconds), then loaded from ``cache`` (default
    ``~/.cache/unnoise``) / ``cell-classifier`` (weights.safetensors and meta.json with the recipe);
    retrained if the recipe differs or the files are damaged."""
    from unnoise.modalities.image.data import load_fashion_mnist
    from unnoise.training.checkpoint import load_module, read_module_meta, save_module

    folder = (Path(cache) if cache is not None else default_cache()) / "cell-classifier"
    expected = json.loads(json.dumps({"train": RECIPE, "data": "fashion-mnist train"}))
    try:
        found = read_module_meta(folder)
    except (OSError, ValueError):
        found = None
    channels = tuple(RECIPE["channels"])
    if isinstance(found, dict) and all(found.get(k) == v for k, v in expected.items()):
        try:
            return load_module(folder, CellClassifier(channels)).eval()
        except (OSError, ValueError) as err:
            warnings.warn(f"retraining the cell classifier: cannot use {folder}: {err}", stacklevel=2)
    start = time.perf_counter()
    recipe = {k: v for k, v in RECIPE.items() if k != "channels"}
    model = CellClassifier.train_on(load_fashion_mnist("train"), channels=channels, **recipe)
    save_module(folder, model, {**expected, "train_seconds": time.perf_counter() - start})
    return model
