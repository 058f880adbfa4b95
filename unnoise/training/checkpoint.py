"""The run folder: config, weights, EMA, optimizer and RNG state, in safetensors + JSON; never pickle.

Layout (every file written inside a temp folder, fsynced, then the folder renamed into place)::

    RUN/config.json                              the run's config (rewritten atomically)
    RUN/checkpoints/latest                       names the newest complete step folder
    RUN/checkpoints/step_00001000/
        model.safetensors  ema.safetensors       module state dicts (EMA optional)
        optimizer.json + optimizer.safetensors   optimizer.state_dict(): tensors apart, the rest JSON
        rng.json + rng.safetensors               torch (CPU, CUDA), numpy, python and named generators
        state.json (+ state.safetensors)         {"step": ..., whatever the trainer passes}
        NAME.safetensors                         further modules (the power EMAs of post-hoc EMA)
        snapshot.json                            only in snapshots: such a step folder is never pruned
        manifest.json                            SHA-256 of each file above, written last

A crash (even kill -9) at any point leaves the previous checkpoint intact and loadable; resuming
restores every RNG stream, so a resumed run ends bit-identical. ``latest`` is a hint: loading
takes the newest step folder whose manifest verifies (:mod:`unnoise.training.integrity`), saying
which damaged ones it passed over; non-finite weights are never written and never loaded.

Non-tensor trees (optimizer state, RNG, trainer state) are stored by :mod:`unnoise.training.files`
(JSON with the tensors in a .safetensors beside it), which also does the atomic writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from unnoise.training import integrity
from unnoise.training.files import (
    atomic_write_text,
    load_tree,
    read_json,
    read_safetensors,
    save_tensors,
    save_tree,
    write_folder,
    write_text,
)

_STEP = re.compile(r"step_(\d+)")
SNAPSHOT = "snapshot.json"  # marks a step folder that keep never prunes (:mod:`unnoise.training.posthoc_ema`)


# ---- RNG ----------------------------------------------------------------------------------------


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG stream a training step may draw from: torch (CPU, CUDA), numpy, python, named generators."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002 (the legacy global stream is what code draws from)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_name, np_key.tolist(), np_pos, np_has_gauss, np_gauss],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of ``rng_state``; every generator passed must have a saved state."""
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {name!r}; it has {sorted(state['generators'])}")
        g.set_state(state["generators"][name])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_name, np_key, *rest = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_key, dtype=np.uint32), *rest))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---- modules --------------------------------------------------------------------------------------


def _check_keys(path: Path, weights: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(s)}"
        for k, s in expected.items()
        if k in weights and weights[k].shape != s
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit the {type(module).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches (file vs model) {shapes[:5]}"
        )
    try:
        integrity.check_finite(weights, str(path))
    except FloatingPointError as e:
        raise ValueError(f"{e}: the run diverged; retrain it (e.g. with a lower --lr)") from None


def load_model_weights(
    path: str | os.PathLike, model: nn.Module, *, which: Literal["model", "ema"] = "model"
) -> nn.Module:
    """Load weights for sampling from a .safetensors file, a step folder or a run folder (its latest step)."""
    path = Path(path)
    if path.is_dir():
        path = _step_folder(path) / f"{which}.safetensors"
    elif path.is_file() and integrity.has_manifest(path.parent):
        integrity.verify(path.parent)
    weights = read_safetensors(path)
    _check_keys(path, weights, model)
    model.load_state_dict(weights)
    return model


# ---- the run folder -------------------------------------------------------------------------------


def _require_run(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run} (expected config.json and checkpoints/ inside)")
    return run


def save_config(run_dir: str | os.PathLike, config: Mapping[str, Any] | Any) -> Path:
    """Write RUN/config.json atomically; ``config`` is a JSON-able dict or a dataclass of such fields."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    try:
        text = json.dumps(config, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"config must be JSON-able (str, number, bool, None, list, dict): {e}") from None
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.json", text)
    return run / "config.json"


def load_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read RUN/config.json."""
    return read_json(_require_run(run_dir) / "config.json")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest step folder whose manifest verifies; None if the run has no step folder.

    Damaged newer folders are passed over with a warning naming the first problem; if none is
    intact, a :class:`unnoise.training.integrity.Damaged` error names it. A run written before
    manifests existed (none of its steps has one) gets the folder ``latest`` names, else the highest.
    """
    root = _require_run(run_dir) / "checkpoints"
    steps = _step_folders(root)
    if not steps:
        return None
    if _legacy(root):
        named = (root / "latest").read_text(encoding="utf-8").strip() if (root / "latest").is_file() else ""
        return root / named if _STEP.fullmatch(named) and (root / named).is_dir() else steps[-1]
    skipped: list[str] = []
    for step in reversed(steps):
        try:
            integrity.verify(step)
        except integrity.Damaged as e:
            skipped.append(str(e))
            continue
        if skipped:
            more = f" (and {len(skipped) - 1} more damaged)" if len(skipped) > 1 else ""
            warnings.warn(f"{skipped[0]}{more}; using the newest intact checkpoint, {step.name}", stacklevel=2)
        return step
    raise integrity.Damaged(f"no intact checkpoint in {root}: {skipped[0]}")


def _legacy(root: Path) -> bool:
    """A run written before manifests: none of its step folders has one."""
    return not any(integrity.has_manifest(p) for p in _step_folders(root))


def _step_folders(root: Path) -> list[Path]:
    """Complete step folders (a temp folder only gets a step_ name once complete), oldest first."""
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _step_folder(path: Path) -> Path:
    """The step folder ``path`` is (verified, unless its run predates manifests) or its run's newest intact one."""
    if _STEP.fullmatch(path.name) and ((path / "state.json").is_file() or integrity.has_manifest(path)):
        if integrity.has_manifest(path) or not _legacy(path.parent):
            integrity.verify(path)
        return path
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'}")
    return step


def save_module(folder: str | os.PathLike, module: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write FOLDER/weights.safetensors and FOLDER/meta.json (config, metrics, provenance: JSON
    values) atomically, replacing any earlier FOLDER. For small auxiliary networks (classifiers)
    that live beside a run or in a cache; :func:`load_module` reads them back."""
    text = json.dumps(dict(meta), indent=2, ensure_ascii=False) + "\n"

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "weights.safetensors", module.state_dict())
        write_text(tmp / "meta.json", text)

    return write_folder(Path(folder), fill)


def read_module_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """FOLDER/meta.json written by :func:`save_module` (FileNotFoundError if there is none)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no saved module in {folder} (missing {path.name})")
    return read_json(path)


def load_module(folder: str | os.PathLike, module: nn.Module) -> nn.Module:
    """Load FOLDER/weights.safetensors into ``module`` (names and shapes checked; never unpickles)."""
    return load_model_weights(Path(folder) / "weights.safetensors", module)


def _newest_name(root: Path) -> str:
    steps = _step_folders(root)
    return steps[-1].name if steps else "none (no checkpoint yet)"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    keep: int | None = 3,
    modules: Mapping[str, nn.Module] | None = None,
    snapshot: Mapping[str, Any] | None = None,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNNNN atomically, point ``latest`` at it, keep the last ``keep`` (None: all).

    ``state`` holds what else resuming needs (data-order position, epoch, scheduler and loss-scaler
    state, metrics): tensors and JSON values. ``modules`` are further modules saved as
    NAME.safetensors (:func:`load_checkpoint` takes the same names). ``snapshot`` (JSON values)
    makes the step a snapshot: it is written as snapshot.json, and ``keep`` never prunes a step
    folder holding one (post-hoc EMA needs every snapshot of the run). Returns the step folder.
    """
    if step < 0 or (keep is not None and keep < 1):
        raise ValueError(f"need step >= 0 and keep >= 1 (or None), got step={step}, keep={keep}")
    for what, module in (("model", model), ("EMA model", ema), *(modules or {}).items()):
        if module is not None:
            try:
                integrity.check_finite(module.state_dict(), f"the {what} at step {step}")
            except FloatingPointError as e:
                newest = _newest_name(Path(run_dir) / "checkpoints")
                raise FloatingPointError(f"{e}: not checkpointed; the newest checkpoint stays {newest}") from None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:08d}"

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        if ema is not None:
            save_tensors(tmp / "ema.safetensors", ema.state_dict())
        for module_name, module in (modules or {}).items():
            save_tensors(tmp / f"{module_name}.safetensors", module.state_dict())
        if snapshot is not None:
            write_text(tmp / SNAPSHOT, json.dumps(dict(snapshot), indent=1) + "\n")
        if optimizer is not None:
            save_tree(tmp, "optimizer", optimizer.state_dict())
        save_tree(tmp, "rng", rng_state(generators))
        save_tree(tmp, "state", {**(state or {}), "step": step})
        integrity.write_manifest(tmp)  # last: a folder with a valid manifest was written whole

    final = write_folder(root / name, fill)  # re-saving a step (a resumed run passing it again) replaces it
    atomic_write_text(root / "latest", name + "\n")
    if keep is not None:  # older steps only: folders from an abandoned later trajectory are left alone
        older = [p for p in _step_folders(root) if int(p.name[5:]) < step and not (p / SNAPSHOT).is_file()]
        for p in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(p)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Resume from a step folder or a run folder (its latest step): restore model, EMA, optimizer, the
    further ``modules`` saved by :func:`save_checkpoint` and all RNG streams (global ones included),
    and return the trainer state (with ``"step"``).

    Every file is verified against the folder's manifest, read and checked before anything is modified.
    """
    folder = _step_folder(_require_run(path))
    weights = {"model": (model, read_safetensors(folder / "model.safetensors"))}
    if ema is not None:
        weights["ema"] = (ema, read_safetensors(folder / "ema.safetensors"))
    for module_name, module in (modules or {}).items():
        if not (folder / f"{module_name}.safetensors").is_file():
            raise ValueError(f"{folder} has no {module_name}.safetensors: it was saved without that module")
        weights[module_name] = (module, read_safetensors(folder / f"{module_name}.safetensors"))
    for name, (module, tensors) in weights.items():
        _check_keys(folder / f"{name}.safetensors", tensors, module)
    opt_state = load_tree(folder, "optimizer") if optimizer is not None else None
    if optimizer is not None:
        integrity.check_optimizer_state(opt_state, optimizer, folder / "optimizer.json")
    rng, state = load_tree(folder, "rng"), load_tree(folder, "state")
    integrity.check_rng_state(rng, folder / "rng.json", generators)
    if not isinstance(state, dict) or state.get("step") != int(folder.name[5:]) or isinstance(state["step"], bool):
        raise integrity.Damaged(f"{folder / 'state.json'} must hold an object with step {int(folder.name[5:])}")
    for module, tensors in weights.values():
        module.load_state_dict(tensors)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    set_rng_state(rng, generators)
    return state
