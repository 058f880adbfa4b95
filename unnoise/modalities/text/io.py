"""Text writers: generated sentences as a text file (one a line) or JSON lines."""

from __future__ import annotations

import json
from pathlib import Path


def save_sentences(path: str | Path, lines: list[str]) -> Path:
    """One sentence a line (.txt) or one JSON object a line (.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": s}) + "\n" for s in lines), encoding="utf-8")
    else:
        path.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    return path
