"""Images kept on the training device, and batches of views cut from them there.

:class:`~kdtoolkit.data.dataset.KdDataset` builds each sample's views on the CPU, which keeps a GPU
waiting for data-loader workers. An :class:`ImageBank` decodes every image once into one
zero-padded tensor on the device; a :class:`BankDataset` plans each sample's views exactly as
``KdDataset`` does (:func:`~kdtoolkit.data.view.plan_views`: the same matrices, masks and jitter
draws) and samples a whole batch with one ``grid_sample`` per view
(:func:`~kdtoolkit.data.warp.warp_stack`). Only the pixel noise differs: it is drawn on the device
from a generator seeded by (seed, epoch, batch), not per sample; without noise the batches
equal ``KdDataset``'s. :class:`BankLoader` batches it as a ``DataLoader`` would.

Data-parallel training: every process draws the same global batches and takes its part of each
(:func:`rank_slice`, :class:`RankBatches` for a ``DataLoader``); the bank draws a global batch's
noise whole, so the parts together equal the batch one process builds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from kdtoolkit.data.augment import apply_jitter, jitter_tensors
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.geometry import Box
from kdtoolkit.data.imageio import image_key, read_native, to_float
from kdtoolkit.data.mask import masks_and_boxes
from kdtoolkit.data.view import ViewConfig, normalise_views, plan_views
from kdtoolkit.data.warp import warp_stack


def rank_slice(total: int, rank: int = 0, size: int = 1) -> slice:
    """Part ``rank`` of ``size`` of ``total`` items: consecutive parts whose sizes differ by at
    most one, rank 0 first (equal parts when ``size`` divides ``total``)."""
    base, extra = divmod(total, size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


class RankBatches(Sampler[list[int]]):
    """Part ``rank`` of ``size`` (:func:`rank_slice`) of every batch of ``batches``."""

    def __init__(self, batches: BatchSampler, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for items in self.batches:
            yield items[rank_slice(len(items), self.rank, self.size)]


def bank_bytes(sizes: Sequence[tuple[int, int]], channels: int) -> int:
    """Memory an :class:`ImageBank` of images of ``sizes = [(H, W), …]`` takes (float32)."""
    if not sizes:
        return 0
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    return len(sizes) * channels * height * width * 4


class ImageBank:
    """Decoded images on ``device``: ``stack`` is N×C×Hmax×Wmax float32 in [0, 1] (grey
    repeated to ``channels``), image ``i`` in the top-left ``sizes[i] = (H, W)`` of its slot
    and zeros around it; ``row[image_key(source)]`` is an image's slot (:meth:`slot`).
    ``sources`` are paths or manifest samples (scans need the samples: their read spec)."""

    def __init__(self, sources: Sequence[Any], channels: int, device: torch.device) -> None:
        unique = list({image_key(s): s for s in sources}.items())
        self.row = {key: i for i, (key, _) in enumerate(unique)}
        arrays = [to_float(read_native(source), channels) for _, source in unique]
        self.sizes = [(a.shape[0], a.shape[1]) for a in arrays]
        height = max((h for h, _ in self.sizes), default=1)
        width = max((w for _, w in self.sizes), default=1)
        self.stack = torch.zeros((len(arrays), channels, height, width), device=device)
        for i, a in enumerate(arrays):
            pixels = torch.from_numpy(a.transpose(2, 0, 1)).expand(channels, -1, -1)
            self.stack[i, :, : a.shape[0], : a.shape[1]] = pixels.to(device)

    @property
    def device(self) -> torch.device:
        return self.stack.device

    def slot(self, source: Any) -> int:
        """The slot of a source (a path or a sample)."""
        return self.row[image_key(source)]


class BankDataset(KdDataset):
    """The views of ``samples[i] for i in indices`` built a batch at a time on the bank's
    device: the same items as :class:`~kdtoolkit.data.dataset.KdDataset` with the same arguments
    (``image``, ``mask`` and ``crop`` on the device; ``box``, ``label``, ``index`` on the
    CPU). ``images`` holds every full image, ``crops`` every expert crop file the samples
    name (None when none do)."""

    def __init__(
        self,
        images: ImageBank,
        crops: ImageBank | None,
        samples: Sequence[Any],
        indices: Sequence[int] | np.ndarray,
        cfg: ViewConfig,
        train: bool,
        seed: int,
        mask_rois: Mapping[int, tuple[Box | None, float]] | None = None,
        *,
        views: Sequence[str] = ("image", "crop"),
    ) -> None:
        super().__init__(samples, indices, cfg, train, seed, mask_rois, views=views)
        self.images, self.crops = images, crops

    def preload(self) -> None:
        """Nothing to do: the banks hold every image."""

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        """One item, on the CPU (as ``KdDataset[item]``)."""
        return {k: v[0].cpu() for k, v in self.batch([item]).items()}

    def batch(
        self, items: Sequence[int], number: int = 0, whole: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch of ``items`` (positions in ``indices``); ``number`` (the batch's place
        in the epoch) seeds its pixel noise. ``whole = (start, total)``: ``items`` are
        ``[start, start + len(items))`` of a batch of ``total`` (a rank's part), whose noise
        is drawn whole."""
        cfg, device = self.cfg, self.images.device
        indices = [int(self.indices[i]) for i in items]
        samples = [self.samples[i] for i in indices]
        use_crop_files = "crop" in self.views and self.crops is not None
        image_rows = [self.images.slot(s) for s in samples]
        image_sizes = [self.images.sizes[r] for r in image_rows]
        plans = []
        for index, sample, source in zip(indices, samples, image_sizes, strict=True):
            crop_source = None
            if use_crop_files and sample.crop is not None:
                crop_source = self.crops.sizes[self.crops.slot(sample.crop)]
            plans.append(
                plan_views(sample, source, crop_source, cfg, self.rng(index), self.roi(index))
            )
        generator = None
        if self.train and cfg.noise > 0:
            state = np.random.SeedSequence([self.seed, self.epoch, number]).generate_state(2)
            seed = int(state[0]) << 32 | int(state[1])
            generator = torch.Generator(device=device).manual_seed(seed)
        jitter = jitter_tensors([p.jitter for p in plans], device) if self.train else None
        out: dict[str, torch.Tensor] = {}
        if "image" in self.views:
            image = warp_stack(
                self.images.stack, image_rows, image_sizes, [p.image for p in plans], cfg.image_size
            )
            out["image"] = self._finish(image, jitter, generator, whole)
            out["mask"], out["box"] = masks_and_boxes(
                [p.corners for p in plans], cfg.image_size, cfg.mask, device
            )
        if "crop" in self.views:
            crop = torch.zeros((len(plans), cfg.channels, *cfg.crop_size), device=device)
            for bank, field, chosen in (
                (self.images, "image", [j for j, p in enumerate(plans) if not p.crop_from_file]),
                (self.crops, "crop", [j for j, p in enumerate(plans) if p.crop_from_file]),
            ):
                if chosen:
                    rows = [
                        bank.slot(samples[j] if field == "image" else samples[j].crop)
                        for j in chosen
                    ]
                    crop[chosen] = warp_stack(
                        bank.stack,
                        rows,
                        [bank.sizes[r] for r in rows],
                        [plans[j].crop for j in chosen],
                        cfg.crop_size,
                    )
            out["crop"] = self._finish(crop, jitter, generator, whole)
        out["label"] = torch.tensor([s.label for s in samples], dtype=torch.long)
        out["index"] = torch.tensor(indices, dtype=torch.long)
        return out

    def _finish(
        self,
        views: torch.Tensor,
        jitter: tuple[torch.Tensor, ...] | None,
        generator: torch.Generator | None,
        whole: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Jitter (training) and normalise a batch of [0, 1] views (part ``whole`` of a
        larger batch: see :meth:`batch`)."""
        if jitter is not None:
            noise = None
            if generator is not None:
                start, total = whole or (0, len(views))
                shape, device = (total, *views.shape[1:]), views.device
                noise = torch.randn(shape, generator=generator, device=device)
                noise = noise[start : start + len(views)] * self.cfg.noise
            views = apply_jitter(views, *jitter, noise)
        return normalise_views(views, self.cfg)


class BankLoader:
    """Batches of a :class:`BankDataset` like a ``DataLoader``'s: ``batch_size`` items each
    (the last one short unless ``drop_last``), in order, or with ``shuffle`` in a fresh
    permutation per epoch drawn from ``generator``; ``rank`` of ``size``: that part of each
    batch (:func:`rank_slice`)."""

    def __init__(
        self,
        dataset: BankDataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        rank: int = 0,
        size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.rank, self.size = rank, size
        sampler = (
            RandomSampler(range(len(dataset)), generator=generator)
            if shuffle
            else SequentialSampler(range(len(dataset)))
        )
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for number, items in enumerate(self.batch_sampler):
            part = rank_slice(len(items), self.rank, self.size)
            yield self.dataset.batch(items[part], number, (part.start, len(items)))
