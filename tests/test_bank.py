"""Device-resident views (kdtoolkit.data.bank) against the per-sample reference (KdDataset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdtoolkit.data.bank import BankDataset, BankLoader, ImageBank, bank_bytes
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.manifest import Sample
from kdtoolkit.data.view import ViewConfig

NO_NOISE = {"noise": 0.0}


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _samples(tmp_path: Path) -> list[Sample]:
    """Mixed sizes and kinds: 8- and 16-bit grey, RGB, a sample without box, one with an
    expert crop file, one large enough that its student view is antialiased."""
    rng = np.random.default_rng(0)
    specs = [
        ((90, 140), np.uint8, (30.0, 20.0, 90.0, 50.0), 15.0, False),
        ((120, 100), np.uint16, (10.0, 40.0, 70.0, 70.0), -40.0, False),
        ((80, 80, 3), np.uint8, (20.0, 20.0, 60.0, 40.0), 0.0, False),
        ((70, 90), np.uint8, None, 0.0, False),
        ((100, 120), np.uint8, (40.0, 30.0, 100.0, 60.0), 30.0, True),
        ((300, 260), np.uint8, (60.0, 100.0, 200.0, 170.0), 60.0, False),
    ]
    samples = []
    for i, (shape, dtype, box, angle, with_crop) in enumerate(specs):
        top = np.iinfo(dtype).max
        image = _write(tmp_path / f"{i}.png", rng.integers(0, top, shape, dtype=dtype))
        crop = _write(tmp_path / f"{i}c.png", rng.integers(0, 255, (20, 44), dtype=np.uint8))
        samples.append(
            Sample(i, i + 2, image, i % 3, box, angle, crop if with_crop else None, None, None,
                   shape[1], shape[0])
        )  # fmt: skip
    return samples


def _banks(samples: list[Sample], channels: int) -> tuple[ImageBank, ImageBank]:
    device = torch.device("cpu")
    crops = [s.crop for s in samples if s.crop is not None]
    return ImageBank([s.image for s in samples], channels, device), ImageBank(
        crops, channels, device
    )


@pytest.mark.parametrize(
    ("train", "channels", "letterbox", "mask"),
    [(True, 1, True, "box"), (True, 3, False, "gaussian"), (False, 1, True, "box")],
)
def test_bank_batch_equals_per_sample_views(
    tmp_path: Path, train: bool, channels: int, letterbox: bool, mask: str
) -> None:
    samples = _samples(tmp_path)
    cfg = ViewConfig(
        image_size=(64, 80), crop_size=(16, 32), channels=channels, letterbox=letterbox,
        mask=mask, flip_p=0.5, degrees=30.0, scale=(0.8, 1.2), translate=0.1, roi_shift=(0.2, 0.1),
        roi_scale=0.1, roi_degrees=5.0, **NO_NOISE,
    )  # fmt: skip
    detected = {1: ((15.0, 35.0, 75.0, 75.0), 0.0)}
    order = [5, 0, 3, 1, 4, 2]
    images, crops = _banks(samples, channels)
    for epoch in (0, 3):
        reference = KdDataset(samples, order, cfg, train, seed=7, mask_rois=detected)
        banked = BankDataset(images, crops, samples, order, cfg, train, seed=7, mask_rois=detected)
        reference.set_epoch(epoch)
        banked.set_epoch(epoch)
        batch = banked.batch(range(len(order)))
        expected = next(iter(DataLoader(reference, batch_size=len(order))))
        assert set(batch) == set(expected)
        for key in expected:
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=1e-4, msg=key)
    assert batch["crop"].shape == (6, channels, 16, 32)


def test_noise_is_drawn_on_the_device_seeded_by_epoch_and_batch(tmp_path: Path) -> None:
    samples = _samples(tmp_path)[:3]
    plain = {"channels": 1, "mean": (0.0,), "std": (1.0,), "image_size": (48, 48)}
    quiet = ViewConfig(**plain, **NO_NOISE)
    noisy = ViewConfig(**plain, noise=0.05)
    images, crops = _banks(samples, 1)

    def batch(cfg: ViewConfig, epoch: int, number: int) -> torch.Tensor:
        dataset = BankDataset(images, crops, samples, [0, 1, 2], cfg, True, seed=1)
        dataset.set_epoch(epoch)
        return dataset.batch([0, 1, 2], number)["image"]

    clean, dirty = batch(quiet, 0, 0), batch(noisy, 0, 0)
    inside = (clean > 0.2) & (clean < 0.8)  # away from the [0, 1] clipping
    residual = (dirty - clean)[inside]
    assert abs(float(residual.mean())) < 0.005 and float(residual.std()) == pytest.approx(
        0.05, 0.05
    )
    torch.testing.assert_close(batch(noisy, 0, 0), dirty, rtol=0, atol=0)
    assert not torch.equal(batch(noisy, 0, 1), dirty)  # another batch of the epoch
    assert not torch.equal(batch(noisy, 1, 0), batch(quiet, 1, 0))


def test_bank_loader_batches_like_a_dataloader(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    cfg = ViewConfig(image_size=(32, 32), crop_size=(8, 16), **NO_NOISE)
    images, crops = _banks(samples, 3)
    dataset = BankDataset(images, crops, samples, [0, 1, 2, 3, 4], cfg, False, seed=0)
    loader = BankLoader(dataset, batch_size=2)
    assert len(loader) == 3 and [len(b["index"]) for b in loader] == [2, 2, 1]
    assert torch.cat([b["index"] for b in loader]).tolist() == [0, 1, 2, 3, 4]
    shuffled = BankLoader(
        dataset, 2, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    seen = torch.cat([b["index"] for b in shuffled]).tolist()
    assert len(shuffled) == 2 and len(seen) == 4 and len(set(seen)) == 4
    assert list(dataset.labels) == [0, 1, 2, 0, 1]
    item = dataset[3]  # one item, on the CPU, as KdDataset gives it
    torch.testing.assert_close(
        item["image"], KdDataset(samples, [0, 1, 2, 3, 4], cfg, False, 0)[3]["image"]
    )
    only_crop = BankDataset(images, crops, samples, [4], cfg, False, 0, views=("crop",))
    assert set(only_crop.batch([0])) == {"crop", "label", "index"}


def test_bank_layout_and_size(tmp_path: Path) -> None:
    samples = _samples(tmp_path)[:3]
    bank = ImageBank([s.image for s in samples] + [samples[0].image], 1, torch.device("cpu"))
    assert bank.stack.shape == (3, 1, 120, 140) and bank.sizes == [(90, 140), (120, 100), (80, 80)]
    assert bank.stack[0, :, 90:].abs().sum() == 0 and bank.stack[1, :, :, 100:].abs().sum() == 0
    assert bank_bytes(bank.sizes, 1) == bank.stack.numel() * 4
