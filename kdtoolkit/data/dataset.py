"""The per-sample dataset of views for teacher, student and baselines (CPU, DataLoader)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdtoolkit.data.augment import jitter_view
from kdtoolkit.data.geometry import Box
from kdtoolkit.data.imageio import image_key, read_native, to_float, to_tensor
from kdtoolkit.data.mask import masks_and_boxes
from kdtoolkit.data.view import ViewConfig, normalise_views, plan_views
from kdtoolkit.data.warp import warp_tensor


class KdDataset(Dataset):
    """Samples as tensors for teacher, student and baselines.

    ``samples`` is the whole manifest; the dataset serves ``samples[i] for i in indices``.
    Each item is a dict:

    - ``image`` C×H×W: the full image, letterboxed/resized to ``cfg.image_size``, normalised;
    - ``crop`` C×h×w: the teacher view of the same sample, cut with
      :func:`~kdtoolkit.data.affine.roi_matrix` from the same augmented full-resolution image
      with the transformed expert ROI (a similarity augmentation thus only shows in the crop
      as a mirror; the crop-box jitter ``cfg.roi_*``, when on, then moves that ROI), or the
      expert ``crop`` file stretched to ``cfg.crop_size`` with only the flip and intensity
      jitter (no crop-box jitter: the file has nothing around the ROI);
    - ``mask`` 1×H×W: ROI mask in student-input pixels from ``mask_rois[sample.index]``
      (``(box, angle)`` in full-image pixels, e.g. a detector's) when given, else the expert
      ROI, transformed like the image;
    - ``box`` (4,): axis-aligned box around that transformed ROI, student-input pixels,
      clipped to the input;
    - ``label``, ``index`` (long): class and manifest index.

    A sample without an ROI (no box, none in ``mask_rois``) gets an all-ones mask and the
    whole input as its box; without a box or crop file its teacher crop is the whole image
    stretched to ``crop_size``.
    ``train=True`` applies the random geometric and intensity augmentation of ``cfg``,
    deterministic given ``seed``, the epoch (:meth:`set_epoch`; call it before creating the
    DataLoader iterator, and do not use persistent workers) and the sample's index; evaluation
    mode applies none. ``views`` limits the work: ``"image"`` (image, mask, box) and/or
    ``"crop"``. Decoded images are cached in memory (native dtype; share ``cache`` between
    datasets of a run, keyed by :func:`~kdtoolkit.data.imageio.image_key`; :meth:`preload`
    fills it before forking DataLoader workers). Scans are read as each sample's ``read`` says.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        indices: Sequence[int] | np.ndarray,
        cfg: ViewConfig,
        train: bool,
        seed: int,
        mask_rois: Mapping[int, tuple[Box | None, float]] | None = None,
        *,
        views: Sequence[str] = ("image", "crop"),
        cache: dict[Hashable, np.ndarray] | None = None,
    ) -> None:
        unknown = set(views) - {"image", "crop"}
        if unknown or not views:
            raise ValueError(f"views must be 'image' and/or 'crop', got {tuple(views)}")
        self.samples = samples
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.cfg = cfg
        self.train = bool(train)
        self.seed = int(seed)
        self.mask_rois = mask_rois
        self.views = tuple(views)
        self.cache: dict[Hashable, np.ndarray] = {} if cache is None else cache
        self.epoch = 0

    @property
    def labels(self) -> np.ndarray:
        """Class index of each item, in item order."""
        return np.array([self.samples[i].label for i in self.indices], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch``."""
        self.epoch = int(epoch)

    def preload(self) -> None:
        """Decode every image (and crop file) this dataset uses into the cache."""
        for i in self.indices:
            sample = self.samples[i]
            self._native(sample)
            if sample.crop is not None and "crop" in self.views:
                self._native(sample.crop)

    def _native(self, source: Any) -> np.ndarray:
        key = image_key(source)
        arr = self.cache.get(key)
        if arr is None:
            arr = self.cache[key] = read_native(source)
        return arr

    def __len__(self) -> int:
        return len(self.indices)

    def roi(self, index: int) -> tuple[Box | None, float]:
        """The mask ROI of sample ``index``: from ``mask_rois`` when given, else expert."""
        if self.mask_rois is not None and index in self.mask_rois:
            return self.mask_rois[index]
        sample = self.samples[index]
        return sample.box, sample.angle

    def rng(self, index: int) -> np.random.Generator | None:
        """The augmentation generator of sample ``index`` this epoch (None in evaluation)."""
        return np.random.default_rng([self.seed, self.epoch, index]) if self.train else None

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[item])
        sample = self.samples[index]
        cfg = self.cfg
        src = to_tensor(to_float(self._native(sample), cfg.channels))
        crop_src = None
        if sample.crop is not None and "crop" in self.views:
            crop_src = to_tensor(to_float(self._native(sample.crop), cfg.channels))
        plan = plan_views(
            sample,
            (src.shape[-2], src.shape[-1]),
            None if crop_src is None else (crop_src.shape[-2], crop_src.shape[-1]),
            cfg,
            self.rng(index),
            self.roi(index),
        )
        out: dict[str, torch.Tensor] = {}
        if "image" in self.views:
            image = warp_tensor(src, plan.image, cfg.image_size)
            if plan.jitter is not None:
                image = jitter_view(image, plan.jitter, plan.rng)
            out["image"] = normalise_views(image, cfg)
            mask, box = masks_and_boxes([plan.corners], cfg.image_size, cfg.mask, src.device)
            out["mask"], out["box"] = mask[0], box[0]
        if "crop" in self.views:
            crop = warp_tensor(src if crop_src is None else crop_src, plan.crop, cfg.crop_size)
            if plan.jitter is not None:
                crop = jitter_view(crop, plan.jitter, plan.rng)
            out["crop"] = normalise_views(crop, cfg)
        out["label"] = torch.tensor(sample.label, dtype=torch.long)
        out["index"] = torch.tensor(index, dtype=torch.long)
        return out
