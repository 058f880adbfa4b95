"""One training per run folder: a lock file naming its holder (pid, host, start time).

Two trainings writing the same run would interleave their logs and checkpoints. ``RUN/.lock`` is
created with O_EXCL (atomic on local and NFSv3+ file systems); a second training finds it and
stops with one line naming the holder. A lock left by a process that died without removing it
(kill -9, a power cut) is stale: when its pid is no longer alive on this host, it is taken over
with a warning. A lock from another host is never taken over (its pid means nothing here).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import warnings
from pathlib import Path
from types import TracebackType

__all__ = ["RunLock", "RunInUse"]


class RunInUse(ValueError):
    """Another training holds the run folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OverflowError:
        return False
    return True


class RunLock:
    """``with RunLock(run): ...`` holds ``run/.lock`` for the duration (reentrant neither across
    processes nor within one: a second holder is an error)."""

    NAME = ".lock"

    def __init__(self, run: Path) -> None:
        self.path = Path(run) / self.NAME
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat("T", "seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise RunInUse(f"{self.path.parent} is locked by another training ({self.path} could not be taken over)")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if time.time() - self.path.stat().st_mtime < 10:  # being written by its creator right now
                raise RunInUse(
                    f"{self.path.parent} is in use by another training (its lock is being written)"
                ) from None
            pid, host = -1, socket.gethostname()  # unreadable and old: stale
        if host != socket.gethostname() or (pid > 0 and _alive(pid)):
            since = holder.get("started", "?") if isinstance(holder, dict) else "?"
            raise RunInUse(
                f"{self.path.parent} is in use by another training (pid {pid} on {host}, since {since}); "
                f"wait for it to end, or delete {self.path} if that process is gone"
            )
        warnings.warn(
            f"taking over the stale lock of pid {pid} (no longer running) on {self.path.parent}", stacklevel=3
        )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            if holder.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
