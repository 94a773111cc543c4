"""Writing a phantom data set: PNG images and crops, ``manifest.csv``, the parameters file, the
cache that reuses a phantom generated before, worker processes and the folder lock."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from kd_sos.phantom.difficulty import STAGES, Difficulty, stage_order
from kd_sos.phantom.draw import crop
from kd_sos.phantom.render import GENERATOR_VERSION, render
from kdtoolkit.errors import KdError

MANIFEST_COLUMNS = ("image", "label", "x0", "y0", "x1", "y1", "angle", "group")
PARAMS_FILE = "phantom.json"


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator that draws image ``index`` of the phantom of ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _make_one(job: tuple) -> dict:
    out_dir, index, stage, seed, size, crops, difficulty = job
    sample = render(sample_rng(seed, index), stage, size, difficulty)
    name = f"sos_{index:05d}.png"
    _write_bytes(out_dir / "images" / name, _png_bytes(sample.image))
    x0, y0, x1, y1 = sample.box
    row = {
        "image": f"images/{name}",
        "label": STAGES[stage],
        "x0": f"{x0:.3f}",
        "y0": f"{y0:.3f}",
        "x1": f"{x1:.3f}",
        "y1": f"{y1:.3f}",
        "angle": f"{sample.angle:.3f}",
        "group": f"p{index:05d}",
    }
    if crops:
        w = max(round(x1 - x0), 2)
        patch = crop(sample.image, sample.box, sample.angle, w, max(w // 2, 1))
        _write_bytes(out_dir / "crops" / name, _png_bytes(patch))
        row["crop"] = f"crops/{name}"
    return row


def _jobs(out_dir: Path, n: int, seed: int, size: int, crops: bool, d: Difficulty) -> Iterator:
    for i, stage in enumerate(stage_order(n, seed)):
        yield (out_dir, i, int(stage), seed, size, crops, d)


def write_phantom(
    out_dir: Path,
    n: int = 723,
    seed: int = 0,
    size: int = 256,
    crops: bool = False,
    difficulty: Difficulty | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` phantom slices (``images/*.png``) and ``manifest.csv`` into ``out_dir``;
    return the manifest path.

    The same arguments give the same bytes. ``crops`` also writes the expert crops
    (``crops/*.png``, a ``crop`` column). ``workers``: processes (default: the CPUs, at most 8;
    1 draws in this process). ``progress(done, total)`` is called after every image. The
    manifest is written last and atomically, so a manifest on disk always names complete images.
    """
    d = _checked(n, size, difficulty)
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if crops:
        (out_dir / "crops").mkdir(exist_ok=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 32 else 1
    rows: list[dict] = []
    jobs = _jobs(out_dir, n, seed, size, crops, d)
    if workers <= 1:
        results = map(_make_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=_mp_context())
        results = pool.map(_make_one, jobs, chunksize=8)
    try:
        for i, row in enumerate(results, 1):
            rows.append(row)
            if progress is not None:
                progress(i, n)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    columns = [*MANIFEST_COLUMNS, "crop"] if crops else list(MANIFEST_COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(manifest, buf.getvalue().encode())
    return manifest


def _checked(n: int, size: int, difficulty: Difficulty | None, seed: int = 0) -> Difficulty:
    """The difficulty to draw with; ``KdError`` for arguments the generator cannot draw."""
    d = difficulty or Difficulty()
    d.check()
    if not 0 <= seed < 2**32:
        raise KdError(f"phantom: seed must be in [0, 2**32), got {seed}")
    if n < 1:
        raise KdError(f"phantom: n must be >= 1, got {n}")
    if not 64 <= size <= 4096:
        raise KdError(f"phantom: size must be in [64, 4096], got {size}")
    return d


def _mp_context():
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (POSIX ``flock``; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / ".phantom.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def phantom_params(
    n: int, seed: int, size: int, crops: bool, difficulty: Difficulty | None = None
) -> dict:
    """Everything that determines a generated phantom (stored beside its manifest)."""
    return {
        "generator": "kd_sos.phantom",
        "version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "size": size,
        "crops": crops,
        "difficulty": asdict(difficulty or Difficulty()),
    }


def ensure_phantom(
    cache_dir: Path,
    n: int = 723,
    seed: int = 0,
    size: int = 256,
    crops: bool = False,
    difficulty: Difficulty | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    replace: bool = True,
) -> Path:
    """The manifest of the phantom with these parameters in ``cache_dir``: reused when it was
    generated before (``phantom.json`` matches and the manifest exists), else (re)generated
    (``replace`` False: a phantom of other settings there is an error instead).

    Refuses to overwrite a ``manifest.csv`` that the generator did not write.
    """
    _checked(n, size, difficulty, seed)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise KdError(f"{cache_dir}: is a file; give a folder for the phantom")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdError(
            f"{cache_dir}: cannot be made ({e.strerror}); choose another folder"
        ) from None
    params = phantom_params(n, seed, size, crops, difficulty)
    manifest, params_file = cache_dir / "manifest.csv", cache_dir / PARAMS_FILE
    with _locked(cache_dir):
        if manifest.exists():
            if not params_file.exists():
                raise KdError(
                    f"{manifest} exists and was not written by the phantom generator; "
                    f"choose an empty folder"
                )
            with contextlib.suppress(ValueError, OSError):
                if json.loads(params_file.read_text()) == params:
                    return manifest
            if not replace:
                raise KdError(
                    f"{cache_dir}: holds a phantom made with other settings ({params_file}); "
                    "pass --force to replace it, or choose another folder"
                )
        manifest.unlink(missing_ok=True)
        params_file.unlink(missing_ok=True)
        for sub in ("images", "crops"):  # only files this generator names
            for old in (cache_dir / sub).glob("sos_*.png"):
                old.unlink()
        _write_bytes(params_file, (json.dumps(params, indent=2) + "\n").encode())
        return write_phantom(cache_dir, n, seed, size, crops, difficulty, workers, progress)
