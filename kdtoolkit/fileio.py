"""The file boundary. Reads: ``read_json`` and ``reading`` turn any decoding or shape error of a
file the toolkit reads into one ``KdError`` line naming the file and the fix. Writes are atomic:
a reader sees the old file or the new one, never half of one.

Every writer makes a temporary file in the target's folder, writes and fsyncs it, then
``os.replace``-s it over the target (atomic on POSIX and Windows within one file system) and
fsyncs the folder where the platform allows. If anything fails before the replace, the temporary
file is removed and the old target is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdtoolkit.errors import KdError

_DEFAULT_MODE = 0o644
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

#: What decoding a file, or reading a value of the wrong shape out of it, can raise.
READ_ERRORS = (
    OSError,
    ValueError,  # json.JSONDecodeError, UnicodeDecodeError, int("x"), ...
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    RecursionError,
)


def why_unreadable(e: BaseException) -> str:
    """A short, one-line reason for a read error (no library advice quoted)."""
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    if isinstance(e, KeyError):
        return f"missing key {e}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return first_line(e)


#: Words of library advice that must not reach a message: torch suggests loading a refused
#: file with ``weights_only=False``, which would run whatever code the file holds.
_UNSAFE_ADVICE = ("weights_only", "Re-running", "can still be loaded", "add_safe_globals")


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``, cut at 200 characters, without terminal escapes
    and without the advice some libraries give (torch's: load with ``weights_only=False``);
    a weights-only refusal is named by what it refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    refused = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if refused:
        why = refused[0].removeprefix("WeightsUnpickler error:").split(". Please")[0].strip()
        return f"{type(e).__name__}: it holds Python objects a safe load refuses ({why[:160]})"
    lines = [line for line in lines if not any(w in line for w in _UNSAFE_ADVICE)]
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike[str], what: str, fix: str) -> Iterator[None]:
    """Within the block, any decoding or shape error (``READ_ERRORS``) while reading ``path``
    becomes ``KdError('<path>: <what> is unreadable (<why>); <fix>')``."""
    try:
        yield
    except KdError:
        raise
    except READ_ERRORS as e:
        raise KdError(f"{path}: {what} is unreadable ({why_unreadable(e)}); {fix}") from None


def read_json(path: str | os.PathLike[str], what: str, fix: str, kind: type | None = dict) -> Any:
    """The JSON document at ``path`` (UTF-8), which must be a ``kind`` (None: anything); any
    error is one ``KdError`` line naming the file, ``what`` it is and the ``fix``."""
    with reading(path, what, fix):
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if kind is not None and not isinstance(doc, kind):
            raise TypeError(f"a JSON {kind.__name__} expected, found {type(doc).__name__}")
    return doc


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


def not_writable(target: Path, e: OSError) -> KdError:
    """One line for an ``OSError`` while writing ``target``."""
    if e.errno in _FULL:
        return KdError(
            f"{target}: cannot be written ({e.strerror}); free space on that disk or choose "
            "another output folder"
        )
    why = why_unreadable(e) if not isinstance(e, FileNotFoundError) else "no such folder"
    return KdError(f"{target}: cannot be written ({why}); choose another path")


def check_parent(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` (a file the user named) when it is not a folder and its folder exists or is
    one level below an existing folder (then it is made); else one line saying so (a mistyped
    path does not grow a tree of folders)."""
    target = Path(path)
    if target.is_dir():
        raise KdError(f"{target}: is a folder; give the {what} a file name")
    if not target.parent.is_dir():
        if not target.parent.parent.is_dir() or target.parent.exists():
            raise KdError(f"{target.parent}: no such folder for the {what}; create it first")
        try:
            target.parent.mkdir()
        except OSError as e:
            raise not_writable(target, e) from None
    return target


def temporary_prefix(target: Path) -> str:
    """How the temporary files of ``target`` written by this process begin: ``.<name>.`` then
    the writer (:func:`writer_tag`) and a dot."""
    return f".{target.name}.{writer_tag()}."


def writer_tag(pid: int | None = None) -> str:
    """``<host>-<pid namespace>-<pid>``: a writer that this host can tell alive or gone (two
    containers sharing a host name and a folder have different pid namespaces)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}-{namespace}-{os.getpid() if pid is None else pid}"


#: Folders already cleared of dead writers' temporary files by this process.
CLEARED: set[Path] = set()


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files in ``folder`` left by processes of this host and pid
    namespace that are gone (killed while writing); those of live processes, other hosts or
    other namespaces stay. Once per folder per process; not on Windows, where probing a
    process id would end it."""
    if folder in CLEARED or sys.platform == "win32":
        return
    CLEARED.add(folder)
    mine = writer_tag(0)[:-1]  # host and namespace, then the pid
    with contextlib.suppress(OSError):
        for leftover in folder.glob(f".*.{glob.escape(mine)}*.tmp*"):
            pid = leftover.name.split(mine, 1)[1].split(".", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                leftover.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine; on Windows, where ``os.kill`` would end
    the process, every process is taken to be alive."""
    if sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def private_cache_dir() -> Path:
    """kdtoolkit's per-user temporary folder, where libraries' caches go (never the home)."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"kdtoolkit-{user}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``.

    For libraries that insist on writing to a file name themselves::

        with atomic_path(run_dir / "model.safetensors") as tmp:
            save_file(tensors, tmp)

    The temporary file keeps the suffix of ``path`` (some writers pick a format from it).
    On an exception the temporary file is deleted and ``path`` is unchanged. ``parents``:
    missing parent folders are made. Any ``OSError`` (no space, no permission, a folder in the
    way) is one ``KdError`` line naming ``path``.
    """
    target = Path(path)
    try:
        if parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        remove_stale_temporaries(target.parent)
        fd, tmp_name = tempfile.mkstemp(
            prefix=temporary_prefix(target),
            suffix=f".tmp{target.suffix}",
            dir=target.parent,
        )
    except OSError as e:
        raise not_writable(target, e) from None
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
        if isinstance(e, OSError):
            raise not_writable(target, e) from None
        raise
    _fsync_dir(target.parent)


def keep_caches_private() -> None:
    """Point the caches libraries would write into the home folder (matplotlib's font cache)
    at a per-user temporary folder, unless the user chose one."""
    os.environ.setdefault("MPLCONFIGDIR", str(private_cache_dir() / "matplotlib"))


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
