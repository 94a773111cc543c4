"""One run at a time per run folder: ``run.lock`` held (``flock``) while a run writes there.

The lock file names its holder (process id, host, start time, command). The operating system
drops the lock when its process ends, however it ends, so a lock left by a killed run is
recovered by the next one (which says so); a second run while the first is alive is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import pid_alive

try:
    import fcntl
except ImportError:  # Windows: the holder's process id is checked instead
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "run.lock"


#: What a lock file of kd holds: ``process <pid> on <host>, since <time>: <command>``.
LOCK_TEXT = re.compile(r"process \d+ on [^\n]*, since [^\n]*")


class RunLock:
    """``with RunLock(folder) as lock:``; ``lock.recovered``: a line about a stale lock taken
    over (None when there was none)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.recovered: str | None = None

    def holder(self) -> str:
        """Who holds (or held) the lock, from its file."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _refuse(self, holder: str) -> KdError:
        return KdError(
            f"{self.folder}: run folder in use by {holder or 'another kd process'} "
            f"(lock {self.path}); wait for it to finish or choose another output folder"
        )

    def _open_locked(self) -> int:
        """A descriptor of the lock file, locked by this process (retrying when the file
        was replaced between open and lock)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._refuse(self.holder()) from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            os.close(fd)

    def __enter__(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
        except OSError as e:
            raise KdError(
                f"{self.folder}: cannot be used as a run folder ({e.strerror or e}); choose "
                "another output folder"
            ) from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous and not LOCK_TEXT.match(previous):
            os.close(fd)
            raise KdError(
                f"{self.path}: is damaged (not a lock kd wrote); if no kd process uses "
                f"{self.folder}, delete it and run again"
            )
        if previous:
            fields = previous.split()
            pid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else -1
            previous = previous.splitlines()[0][:300]  # a damaged lock file: its first line
            same_host = f"on {socket.gethostname()}," in previous
            if fcntl is None and same_host and pid != os.getpid() and pid_alive(pid):
                os.close(fd)
                raise self._refuse(previous)
            self.recovered = f"{self.path}: recovered the stale lock of {previous} (it ended)"
        command = " ".join(["kd", *sys.argv[1:]])[:300]
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        text = f"process {os.getpid()} on {socket.gethostname()}, since {started}: {command}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
