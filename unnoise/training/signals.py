"""SIGTERM and SIGINT during training: finish the step, checkpoint, then stop; a second signal stops at once.

Job schedulers (and torchrun, when it stops its workers) send SIGTERM; Ctrl-C sends SIGINT. Either
one, the first time, only asks the loop to stop after the current step, which it checkpoints like
the last; the loop then raises :class:`Interrupted`, which the CLI turns into a one-line resume hint
and the exit status 128 + signal (143 / 130). A second signal raises :class:`Interrupted` at once
(the previous checkpoint stays the newest: saves are atomic).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

__all__ = ["Interrupted", "StopSignals"]


class Interrupted(Exception):
    """Training stopped by a signal; ``checkpoint`` names the step folder written for it (None: none)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint} at step {step}" if checkpoint else "stopped at once, without a new checkpoint"
        super().__init__(f"stopped by {name}; {saved}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """``with StopSignals() as stop: ... if stop.requested: ...``: SIGTERM/SIGINT set ``requested``
    (the signal number) the first time and raise :class:`Interrupted` the second. Outside the main
    thread signals cannot be caught; there it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise Interrupted(signum)
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
