"""Checks the CLI makes before any work: output paths, existing results, and what fits in memory.

Every path argument is checked before a model is loaded or a step is taken: an output under a
file, in a folder that refuses writes, or replacing an existing result (without ``--overwrite``)
is one line and exit status 2, and nothing already on disk is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from unnoise.training.files import check_writable
from unnoise.training.runfolder import clear_run, is_run

MAX_NFE = 10_000  # ten times DDPM's 1,000 steps: far past any sampler's use, far below an absurd allocation
BYTES_PER_VALUE = 4 * 8  # float32, times the working copies a sampler holds (x, D(x), noise, history, output)


def check_outputs(paths: Sequence[Path], overwrite: bool, flag: str = "--out") -> None:
    """One line unless every path can be written and none replaces an existing result unasked."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; it names a file (or a file prefix) to write")
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it (or choose another {flag})")
        check_writable(path.parent)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable on Linux), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_sample_memory(n: int, shape: Sequence[int]) -> None:
    """One line if ``n`` samples of ``shape`` cannot fit in this machine's memory (checked before allocating)."""
    need = n * math.prod(shape) * BYTES_PER_VALUE
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(
            f"--n {n} samples of shape {tuple(shape)} need about {need / 2**30:.1f} GiB; {have / 2**30:.1f} GiB "
            "is available: draw fewer per command (different --seed values give different samples)"
        )


def prepare_demo_folder(out: Path, overwrite: bool) -> None:
    """A demo writes into ``out``: new or empty, or an earlier demo's folder with ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a demo writes into a folder")
    check_writable(out)
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ValueError(
            f"{out} is not empty (it holds {', '.join(sorted(entries)[:3])}); pass --overwrite to redo the demo"
        )
    if not is_run(out / "run"):
        raise ValueError(f"{out} holds no earlier demo (no run folder {out / 'run'}); choose a new or empty folder")
    clear_run(out / "run")
