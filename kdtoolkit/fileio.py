"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer makes a temporary file in the target's folder, writes and fsyncs it, then
``os.replace``-s it over the target (atomic on POSIX and Windows within one file system) and
fsyncs the folder where the platform allows. If anything fails before the replace, the temporary
file is removed and the old target is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdtoolkit.errors import KdError

_DEFAULT_MODE = 0o644
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _fsync_dir(folder: Path) -> None:
    """Best effort: make the rename itself durable (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return _DEFAULT_MODE


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``.

    For libraries that insist on writing to a file name themselves::

        with atomic_path(run_dir / "model.safetensors") as tmp:
            save_file(tensors, tmp)

    The temporary file keeps the suffix of ``path`` (some writers pick a format from it).
    On an exception the temporary file is deleted and ``path`` is unchanged.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _target_mode(target))
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in _FULL:
            raise KdError(
                f"{target}: cannot be written ({e.strerror}); free space on that disk or choose "
                "another output folder"
            ) from None
        raise
    _fsync_dir(target.parent)


def keep_caches_private() -> None:
    """Point the caches libraries would write into the home folder (matplotlib's font cache)
    at a per-user temporary folder, unless the user chose one."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    folder = Path(tempfile.gettempdir()) / f"kdtoolkit-{user}"
    os.environ.setdefault("MPLCONFIGDIR", str(folder / "matplotlib"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating parent folders); return the path."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (newlines written as given); return the path."""
    return atomic_write_bytes(path, text.encode(encoding))
