"""How the command line speaks: rank-0 printing, and any error as one line with what survived.

Every process of a torchrun group runs the same command, so only rank 0 prints; an error names
what is wrong in one line and, under ``train``, where a rerun with ``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import warnings

from unnoise.training import distributed


def resume_hint(args: argparse.Namespace) -> str:
    if args.command != "train" or args.modality == "control":
        return ""
    from unnoise.training.checkpoint import latest_checkpoint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = latest_checkpoint(args.out) if args.out.is_dir() else None
    except (ValueError, OSError):
        step = None
    where = f"its checkpoint {step.name}" if step is not None else "the start"
    return f"; rerun with --resume to continue from {where}"


def one_line(e: BaseException) -> str:
    """An error as one line: OS errors as 'what: file', anything else its first line."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, (FileNotFoundError, PermissionError)):
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def kept(args: argparse.Namespace, e: BaseException) -> str:
    """For a resource error mid-training: what survived (saves are atomic)."""
    if args.command != "train" or not isinstance(e, OSError) or isinstance(e, (FileNotFoundError, PermissionError)):
        return ""
    return resume_hint(args)


def out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return "can't allocate memory" in text or "out of memory" in text or "not enough memory" in text


def smaller(args: argparse.Namespace) -> str:
    flags = {"train": "a smaller --batch-size", "demo": "a smaller model"}.get(args.command, "a smaller --n or --nfe")
    return f"; try {flags}{resume_hint(args)}"


def say(*lines: str) -> None:
    """Print on rank 0 only (every process of a torchrun group runs the same command)."""
    if distributed.current().main:
        print(*lines, sep="\n")
