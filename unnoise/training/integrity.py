"""What makes a checkpoint trustworthy: SHA-256 manifests, finite weights, well-formed saved state.

Every step folder carries ``manifest.json`` (``{"format": ..., "sha256": {file: digest}}``), written
last, inside the temporary folder that is renamed into place: a folder whose manifest verifies was
written whole by unnoise and not changed since. A bit flip, a truncated file, an edited
``state.json`` or a file added or removed fails :func:`verify` with one line naming the file, and
the caller falls back to an older intact step (:func:`unnoise.training.checkpoint.latest_checkpoint`).

The saved trainer state, RNG streams and optimizer state are also checked for their form before
they are applied (a folder written by an older unnoise has no manifest to vouch for them).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unnoise.training.files import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "unnoise-checkpoint/1"

__all__ = [
    "Damaged",
    "MANIFEST",
    "check_finite",
    "check_optimizer_state",
    "check_rng_state",
    "has_manifest",
    "sha256",
    "verify",
    "write_manifest",
]


class Damaged(ValueError):
    """A step folder that fails verification (its message names the file and what is wrong)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(folder: Path) -> Path:
    """Write FOLDER/manifest.json with the SHA-256 of every file in FOLDER (call it last)."""
    digests = {p.name: sha256(p) for p in _files(folder)}
    atomic_write_text(folder / MANIFEST, json.dumps({"format": FORMAT, "sha256": digests}, indent=1) + "\n")
    return folder / MANIFEST


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def verify(folder: Path) -> None:
    """Raise :class:`Damaged` unless FOLDER's files are exactly those its manifest lists, byte for byte."""
    path = folder / MANIFEST
    if not path.is_file():
        raise Damaged(f"{folder} has no {MANIFEST}: an incomplete or foreign step folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        digests = manifest["sha256"] if manifest.get("format") == FORMAT else None
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        digests = None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise Damaged(f"{path} is not a manifest written by unnoise ({FORMAT})")
    for name, digest in digests.items():
        file = folder / name
        if "/" in name or "\\" in name or not file.is_file():
            raise Damaged(f"{file} is missing (its step folder's manifest lists it)")
        if sha256(file) != digest:
            raise Damaged(f"{file} does not match the SHA-256 in its manifest: damaged or modified")
    extra = [p.name for p in _files(folder) if p.name not in digests]
    if extra:
        raise Damaged(f"{folder / extra[0]} is not listed in its step folder's manifest: added after the save")


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """FloatingPointError naming the first tensor of ``tensors`` that holds NaN or infinity."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{what} holds non-finite values (NaN/inf), first in {key!r}")


def check_rng_state(state: Any, where: Path, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """One line naming ``where`` unless ``state`` is a set of RNG states that the streams accept
    (each is tried on a scratch generator, so nothing is changed here)."""

    def bad(stream: str, why: object = "") -> Damaged:
        return Damaged(f"{where}: the {stream} RNG state is not valid{f' ({why})' if why else ''}")

    if not isinstance(state, dict):
        raise Damaged(f"{where} must hold an object of RNG states")
    for key in ("torch", "python", "numpy", "generators"):
        if key not in state:
            raise bad(key, "missing")
    trials = [("torch", state["torch"])]
    saved = state["generators"]
    if not isinstance(saved, dict):
        raise bad("generators", "not an object")
    for name in generators or {}:
        if name not in saved:
            raise Damaged(f"{where} has no state for generator {name!r}; it has {sorted(saved)}")
        trials.append((f"{name!r} generator", saved[name]))
    for stream, s in trials:
        if not isinstance(s, torch.Tensor) or s.dtype != torch.uint8 or s.shape != torch.get_rng_state().shape:
            raise bad(stream, "expected a uint8 tensor of the size torch uses")
        try:
            torch.Generator().set_state(s)
        except (RuntimeError, TypeError, ValueError) as e:
            raise bad(stream, str(e).splitlines()[0]) from None
    try:
        random.Random().setstate(state["python"])
    except (TypeError, ValueError, OverflowError) as e:
        raise bad("python", e) from None
    try:
        name, key, *rest = state["numpy"]
        np.random.RandomState().set_state((name, np.asarray(key, dtype=np.uint32), *rest))  # noqa: NPY002
    except (TypeError, ValueError, OverflowError) as e:
        raise bad("numpy", e) from None


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, where: Path) -> None:
    """One line naming ``where`` unless ``state`` fits ``optimizer``: the same parameter groups and,
    for every parameter, per-parameter tensors of the parameter's shape (or scalars)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or "param_groups" not in state:
        raise Damaged(f"{where} is not an optimizer state (needs 'state' and 'param_groups')")
    groups = state["param_groups"]
    ours = optimizer.param_groups
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups if isinstance(g, dict)] != [
        len(g["params"]) for g in ours
    ]:
        raise Damaged(f"{where}: its parameter groups do not fit this network's ({[len(g['params']) for g in ours]})")
    params = [p for g in ours for p in g["params"]]
    for index, entry in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise Damaged(f"{where}: state for parameter {index!r} does not fit a network of {len(params)} tensors")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise Damaged(
                    f"{where}: {name} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}"
                )
