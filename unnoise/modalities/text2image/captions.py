"""Scenes of the fashion-scenes data set, their captions in several paraphrases, and the parser back.

A :class:`Scene` is a 2x2 grid of cells in reading order (top left, top right, bottom left, bottom
right), each empty (``None``) or holding one Fashion-MNIST class id 0..9. A scene holds 1 to 4
objects. :func:`caption` renders it in one of :data:`TEMPLATES`; :func:`parse_prompt` inverts every
template (and tolerates case, extra spaces, a final period, "a"/"an" mix-ups and hyphens), so that
the prompt-following metric can score a generated image against the scene its prompt names.

    natural  "a sneaker in the top left and a bag in the bottom right"
    list     "top-left: sneaker; bottom-right: bag"
    upper    "an ankle boot at the upper right"
    corner   "a picture with a sneaker in the top left corner and a bag in the bottom right corner"
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CELLS",
    "CLASS_NAMES",
    "TEMPLATES",
    "Scene",
    "Template",
    "caption",
    "parse_prompt",
]

# Fashion-MNIST's classes (Xiao et al. 2017) as nouns in a caption, by class id
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# the cells in reading order: index 0..3 -> (row, column) of the 2x2 grid
CELLS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
_ROW_WORDS = {"natural": ("top", "bottom"), "list": ("top", "bottom"), "upper": ("upper", "lower")}
_ROW_WORDS["corner"] = _ROW_WORDS["natural"]
_COLUMN_WORDS = ("left", "right")

Template = Literal["natural", "list", "upper", "corner"]
TEMPLATES: tuple[str, ...] = ("natural", "list", "upper", "corner")


@dataclass(frozen=True)
class Scene:
    """What a 56x56 canvas shows: ``cells[i]`` is the class id (0..9) in cell i of :data:`CELLS`, or None.

    >>> Scene((7, None, None, 8)).objects
    ((0, 7), (3, 8))
    """

    cells: tuple[int | None, ...]

    def __post_init__(self) -> None:
        cells = tuple(self.cells)
        object.__setattr__(self, "cells", cells)
        if len(cells) != len(CELLS):
            raise ValueError(f"a scene has {len(CELLS)} cells (2x2, reading order); got {len(cells)}")
        bad = [c for c in cells if c is not None and (type(c) is not int or not 0 <= c < len(CLASS_NAMES))]
        if bad:
            raise ValueError(f"scene cells must be None or class ids 0..{len(CLASS_NAMES) - 1}; got {bad}")
        if all(c is None for c in cells):
            raise ValueError("a scene holds 1 to 4 objects; got an empty one")

    @property
    def objects(self) -> tuple[tuple[int, int], ...]:
        """``(cell, class id)`` of every object, in reading order."""
        return tuple((i, c) for i, c in enumerate(self.cells) if c is not None)

    def __len__(self) -> int:
        return len(self.objects)


def _article(noun: str) -> str:
    return "an" if noun[0].lower() in "aeiou" else "a"


def _place(cell: int, template: str) -> str:
    row, col = CELLS[cell]
    joiner = "-" if template == "list" else " "
    return f"{_ROW_WORDS[template][row]}{joiner}{_COLUMN_WORDS[col]}"


def _join(clauses: list[str]) -> str:
    """["x"] -> "x"; ["x", "y"] -> "x and y"; ["x", "y", "z"] -> "x, y and z"."""
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def caption(scene: Scene, template: Template = "natural", order: Sequence[int] | None = None) -> str:
    """The caption of ``scene`` in ``template``; ``order`` permutes its objects (default: reading order).

    ``order`` indexes ``scene.objects``: with two objects, ``order=(1, 0)`` names the second one first.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown caption template {template!r}; allowed: {', '.join(TEMPLATES)}")
    objects = scene.objects
    if order is not None:
        if sorted(order) != list(range(len(objects))):
            raise ValueError(f"order must be a permutation of 0..{len(objects) - 1}; got {list(order)}")
        objects = tuple(objects[i] for i in order)
    if template == "list":
        return "; ".join(f"{_place(cell, template)}: {CLASS_NAMES[c]}" for cell, c in objects)
    preposition = "at the" if template == "upper" else "in the"
    suffix = " corner" if template == "corner" else ""
    clauses = [
        f"{_article(CLASS_NAMES[c])} {CLASS_NAMES[c]} {preposition} {_place(cell, template)}{suffix}"
        for cell, c in objects
    ]
    return ("a picture with " if template == "corner" else "") + _join(clauses)


# --- parsing: any template back to its scene -------------------------------------------------------------

# longest names first, so "t-shirt/top" is never read as "shirt"
_NAMES = sorted(((n.lower(), i) for i, n in enumerate(CLASS_NAMES)), key=lambda p: -len(p[0]))
_NAME = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n, _ in _NAMES)
_PLACE = r"(?P<row>top|upper|bottom|lower)[\s-]*(?P<col>left|right)"
_CLAUSE = re.compile(rf"(?:an?\s+)?(?P<name>{_NAME})\s+(?:in|at)\s+(?:the\s+)?{_PLACE}(?:\s+corner)?")
_ITEM = re.compile(rf"{_PLACE}\s*:\s*(?:an?\s+)?(?P<name>{_NAME})")
_ROW = {"top": 0, "upper": 0, "bottom": 1, "lower": 1}
_ALLOWED = (
    'e.g. "a bag in the top left and a shirt in the bottom right", "top-left: bag; bottom-right: shirt", '
    '"an ankle boot at the upper right"'
)


def _class_id(name: str) -> int:
    name = re.sub(r"\s+", " ", name)
    return next(i for n, i in _NAMES if n == name)


def parse_prompt(text: str) -> Scene:
    """The scene a prompt names: the inverse of :func:`caption` for every template and object order.

    Case, runs of spaces, a final period, "a"/"an", a hyphen or space between row and column, and
    "," or ";" between the "cell: object" items are free; a fragment that names no object in a cell,
    or two objects in one cell, is refused with a ValueError of one line that quotes it.
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string; got {type(text).__name__}")
    norm = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()
    if not norm:
        raise ValueError(f"empty prompt: name 1 to 4 objects and their cells, {_ALLOWED}")
    if ":" in norm:
        parts, pattern = [p.strip() for p in re.split(r"[;,]", norm)], _ITEM
    else:
        norm = re.sub(r"^(?:a\s+)?(?:picture|image|photo)\s+(?:with|of)\s+", "", norm)
        parts, pattern = [p.strip() for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", norm)], _CLAUSE
    cells: list[int | None] = [None] * len(CELLS)
    for part in filter(None, parts):  # a trailing ";" or "," leaves an empty part
        match = pattern.fullmatch(part)
        if match is None:
            raise ValueError(f"cannot read {part!r} in the prompt {text!r}: name an object and its cell, {_ALLOWED}")
        cell = CELLS.index((_ROW[match["row"]], _COLUMN_WORDS.index(match["col"])))
        if cells[cell] is not None:
            raise ValueError(f"the prompt {text!r} names two objects in the {_place(cell, 'natural')} cell")
        cells[cell] = _class_id(match["name"])
    return Scene(tuple(cells))
