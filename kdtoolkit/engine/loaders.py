"""Batches of a run's samples: per-sample loading (``DataLoader`` workers) or images held on
the device (``data.loader``), with decoded images shared by every loader of the run."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from kdtoolkit.config.recipe import DataConfig
from kdtoolkit.data.bank import BankDataset, BankLoader, ImageBank, RankBatches, bank_bytes
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.imageio import image_key, read_native
from kdtoolkit.data.manifest import Sample
from kdtoolkit.data.view import ViewConfig
from kdtoolkit.engine.distributed import World, world
from kdtoolkit.errors import KdError

#: ``data.loader = "auto"`` holds the images on the GPU when they take under this share of its
#: free memory.
BANK_SHARE = 0.5

#: Batches of views: per-sample (``DataLoader`` of a ``KdDataset``) or device-resident.
Loader = DataLoader | BankLoader


def source_path(source: object) -> Path:
    """The file of an image source (a sample or a path)."""
    return Path(getattr(source, "image", source))  # type: ignore[arg-type]


class Loaders:
    """Makes the loaders of a run's stages."""

    def __init__(
        self,
        samples: Sequence[Sample],
        cfg: ViewConfig,
        device: torch.device,
        data: DataConfig,
        log: Callable[[str], None],
    ) -> None:
        self.samples = samples
        self.cfg = cfg
        self.device = device
        self.data = data
        self.log = log
        self.image_cache: dict = {}
        self.content: list[str] = []  # each sample's decoded-pixel digest (``decode_all``)
        self.pixels = hashlib.blake2b(digest_size=16)  # every decoded image and crop, in order

    def decode_all(self, where: Path, on_image: Callable[[], None] = lambda: None) -> None:
        """Decode every image (and crop file) once, before any training: a broken file fails
        here, naming its manifest row. Per-sample loading keeps the decoded images (its
        loaders reuse them); each sample's pixel digest goes to ``content`` (duplicates)."""
        keep = self.data.loader == "workers" or (
            self.data.loader == "auto" and self.device.type != "cuda"
        )
        self.content = []
        self.pixels = hashlib.blake2b(digest_size=16)
        for s in self.samples:
            digest = ""
            for source in (s, s.crop) if s.crop is not None else (s,):
                key = image_key(source)
                try:
                    arr = self.image_cache.get(key)
                    arr = read_native(source) if arr is None else arr
                except Exception as e:
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise KdError(
                        f"{where} row {s.row}: {source_path(source)} cannot be decoded "
                        f"({reason}); fix or remove the file"
                    ) from None
                if keep:
                    self.image_cache[key] = arr
                pixels = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
                self.pixels.update(f"{pixels}{arr.shape}{arr.dtype}".encode())
                if not digest:
                    digest = f"{pixels}{arr.shape}{arr.dtype}"
            self.content.append(digest)
            on_image()

    def __call__(
        self,
        indices: np.ndarray,
        train: bool,
        batch_size: int,
        seed: int,
        mask_rois: dict[int, tuple] | None = None,
        views: tuple[str, ...] = ("image", "crop"),
        samples: Sequence[Sample] | None = None,
        jitter: bool = False,
    ) -> Loader:
        """Batches of ``views`` ("image" with its mask and box, and/or "crop") of ``indices``;
        training batches are shuffled and augmented, deterministic given ``seed``.
        ``jitter``: training crops are cut at boxes moved by the crop-box jitter (the two-stage
        classifier's); otherwise exactly at the ROIs (the teacher's, a student's teacher's).
        ``samples``: the run's samples with other ROIs (same images; default: the run's).
        Launched as several processes, each takes its part of every training batch (the
        same global batches as one process); evaluation batches are whole."""
        generator = torch.Generator().manual_seed(seed)
        drop_last = train and len(indices) > batch_size
        cfg = self.cfg
        if not jitter:  # exact crops: no crop-box variates are drawn
            cfg = dataclasses.replace(cfg, roi_shift=(0.0, 0.0), roi_scale=0.0, roi_degrees=0.0)
        args = (samples or self.samples, indices, cfg, train, seed, mask_rois)
        w = world() if train else World()
        if self.banks is not None:
            dataset = BankDataset(*self.banks, *args, views=views)
            return BankLoader(dataset, batch_size, train, drop_last, generator, w.rank, w.size)
        dataset = KdDataset(*args, views=views, cache=self.image_cache)
        workers = self.workers()
        if workers:
            dataset.preload()  # decode once here; forked workers share it
        items = range(len(dataset))
        sampler = RandomSampler(items, generator=generator) if train else SequentialSampler(items)
        batches = BatchSampler(sampler, batch_size, drop_last)
        return DataLoader(
            dataset,
            batch_sampler=RankBatches(batches, w.rank, w.size),
            generator=generator,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )

    @functools.cached_property
    def banks(self) -> tuple[ImageBank, ImageBank | None] | None:
        """Every image (and expert crop file) decoded once onto the device, when
        ``data.loader`` is ``device`` (or ``auto`` on CUDA with room to spare); None:
        per-sample loading."""
        choice = self.data.loader
        if choice == "workers" or (choice == "auto" and self.device.type != "cuda"):
            return None
        channels = self.cfg.channels
        need = bank_bytes([(s.height, s.width) for s in self.samples], channels)
        if choice == "auto":
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > free * BANK_SHARE:
                self.log(
                    f"data: the images need {need / 2**30:.1f} GiB, more than "
                    f"{BANK_SHARE:.0%} of the free GPU memory; views are built per sample "
                    "on the CPU (data.loader)"
                )
                return None
        started = time.perf_counter()
        images = ImageBank(self.samples, channels, self.device)
        crop_files = [s.crop for s in self.samples if s.crop is not None]
        crops = ImageBank(crop_files, channels, self.device) if crop_files else None
        self.log(
            f"data: {len(images.sizes)} images ({images.stack.numel() * 4 / 2**20:.0f} MiB) "
            f"held on {self.device} in {time.perf_counter() - started:.1f}s; views are built "
            "there a batch at a time"
        )
        return images, crops

    def workers(self) -> int:
        """Data-loader processes of per-sample loading: ``data.workers``, or (-1) none on
        CPU, up to 16 on CUDA."""
        if self.data.workers >= 0:
            return self.data.workers
        return min(16, os.cpu_count() or 1) if self.device.type == "cuda" else 0
