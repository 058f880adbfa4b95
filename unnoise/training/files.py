"""Storage for run folders: atomic files and folders, safetensors that refuse pickles, and trees as JSON + safetensors.

Every write is fsynced and renamed into place (:func:`atomic_write_text`, :func:`write_folder`),
so a crash leaves the old file or folder or the new one, never a mix.

Non-tensor trees (optimizer state, RNG, trainer state) go to JSON with tensors replaced by
``{"__tensor__": key}``, tuples by ``{"__tuple__": [...]}`` and dicts with non-string keys by
``{"__items__": [[k, v], ...]}``, so :func:`load_tree` rebuilds them exactly (types, dtypes and bits).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

_TAGS = {"__tensor__", "__tuple__", "__items__"}


# ---- files: atomic writes, fsync, safetensors that refuse pickles ------------------------------


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; folders may refuse on some systems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` and fsync it; not atomic (see :func:`atomic_write_text`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside ``path``, then rename over it: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_text(tmp, text)
    os.replace(tmp, path)
    fsync(path.parent)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing file -> FileNotFoundError, bad JSON -> ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing storage (tied weights): clone the repeats."""
    seen, flat = set(), {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        flat[key] = t.clone() if ptr and ptr in seen else t
        seen.add(ptr)
    safetensors.torch.save_file(flat, path, metadata={"format": "pt"})
    fsync(path)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors; a pickle, a torch.save archive or a damaged file -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except OSError:
        raise
    except Exception as e:  # SafetensorError and friends: one clear line, not the library's traceback
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
            raise ValueError(
                f"{path} holds a pickle/torch.save archive; unnoise loads only safetensors and never unpickles "
                "(convert it where you trust its source, with safetensors.torch.save_file)"
            ) from None
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None


# ---- trees of tensors and plain values <-> JSON + safetensors ----------------------------------


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors (stored in ``tensors`` under a dotted key), tuples and non-str-keyed dicts by tags."""
    child = (lambda k: f"{key}.{k}") if key else str
    if isinstance(obj, torch.Tensor):
        key = key if key not in tensors else f"{key}#{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not obj.keys() & _TAGS:
            return {k: _encode(v, child(k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, "", {}), _encode(v, child(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, child(i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, child(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(
        f"cannot store {key or 'value'!r} of type {type(obj).__name__} without pickle; allowed: tensors, "
        "dicts, lists, tuples, str, int, float, bool, None"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.keys() == {"__tensor__"}:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"{where} refers to tensor {obj['__tensor__']!r}, missing from its .safetensors")
        return tensors[obj["__tensor__"]]
    if obj.keys() == {"__tuple__"}:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if obj.keys() == {"__items__"}:
        return {_decode(k, {}, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_tree(folder: Path, name: str, tree: Any) -> None:
    """Write FOLDER/NAME.json and, if the tree holds tensors, FOLDER/NAME.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    write_text(folder / f"{name}.json", json.dumps(_encode(tree, "", tensors)))
    if tensors:
        save_tensors(folder / f"{name}.safetensors", tensors)


def load_tree(folder: Path, name: str) -> Any:
    """Inverse of :func:`save_tree`."""
    tree, tensors_path = read_json(folder / f"{name}.json"), folder / f"{name}.safetensors"
    tensors = read_safetensors(tensors_path) if tensors_path.exists() else {}
    return _decode(tree, tensors, folder / f"{name}.json")


# ---- folders ------------------------------------------------------------------------------------


def write_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder ``final`` atomically: ``fill`` a temporary folder beside it,
    fsync, then rename; an existing ``final`` is moved aside first and dropped after. A reader sees
    the old folder or the new one, never a mix; a crash leaves at most a ``.tmp-`` folder."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")  # mkdir, not mkdtemp: keep the umask's permissions
    aside = final.with_name(f".tmp-{final.name}-old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        fsync(tmp)
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def check_writable(folder: Path) -> None:
    """One line (ValueError) unless files can be created in ``folder`` (existing or to be made):
    its nearest existing ancestor must be a folder that accepts a new file (tried, then removed:
    permission bits say nothing to root or on a read-only mount)."""
    p = folder
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"cannot write in {folder}: {p} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=p, prefix=".unnoise-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(f"cannot write in {p}: {e.strerror or e}") from None
