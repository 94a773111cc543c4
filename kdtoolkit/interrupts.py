"""SIGTERM as Ctrl-C: a scheduler's stop (``kill``, SLURM) interrupts a ``kd`` command the way
Ctrl-C does, so what is finished is kept and the same one line is printed; only the exit code
differs (143 = 128 + 15, against 130)."""

from __future__ import annotations

import signal
import threading

#: The exit code after SIGTERM.
TERMINATED = 143
_terminated = False


def terminate_as_interrupt() -> None:
    """Handle SIGTERM by raising ``KeyboardInterrupt`` (main thread only; a handler someone
    else installed is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return

    def handler(signum: int, frame: object) -> None:
        global _terminated
        _terminated = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def reset() -> None:
    """Forget a SIGTERM received before (a command run again in the same process)."""
    global _terminated
    _terminated = False


def exit_code(code: int) -> int:
    """An interrupted command's exit code: 143 after SIGTERM, else ``code`` (130)."""
    return TERMINATED if code == 130 and _terminated else code
