"""Starting a run folder safely: never replace a run unless asked (``overwrite``), resume only a run.

:func:`check_out` is asked by the CLI before any work and again by the training loop under the
run's lock (:mod:`unnoise.training.lock`), so two trainings cannot both decide the folder is new.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from unnoise.training.files import check_writable

# What a training writes into its run folder (all of it is removed by overwrite=True).
RUN_ENTRIES = ("config.json", "log.jsonl", "checkpoints", "samples", "control")

__all__ = ["RUN_ENTRIES", "check_out", "clear_run", "is_run"]


def is_run(run: Path) -> bool:
    return run.is_dir() and ((run / "config.json").is_file() or (run / "checkpoints").is_dir())


def _newest(run: Path) -> str:
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*") if p.is_dir())
    return f"newest checkpoint {steps[-1]}" if steps else "no checkpoint yet"


def check_out(run: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """One line unless ``run`` may be trained into: a new or empty folder, a run with ``resume``
    (continue it) or with ``overwrite`` (start it over); never a file or another program's folder."""
    run = Path(run)
    if resume and overwrite:
        raise ValueError("--resume continues the run and --overwrite starts it over: give one of them")
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run} is a file; a run folder must be a new folder (or a run, with --resume)")
    check_writable(run)
    if resume:
        if not is_run(run) or not any((run / "checkpoints").glob("step_*")):
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {run}")
        return
    if is_run(run):
        if not overwrite:
            raise ValueError(
                f"{run} holds a run already ({_newest(run)}): --resume continues it, --overwrite replaces it"
            )
        return
    others = sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) if run.is_dir() else []
    if others:
        raise ValueError(
            f"{run} is a folder of other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), "
            "not an unnoise run; choose a new or empty folder"
        )


def clear_run(run: Path) -> None:
    """Remove what an earlier training wrote into ``run`` (for ``overwrite``)."""
    for name in RUN_ENTRIES:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
