"""The attention term alone moves attention: trained on images whose only structure is the ROI
marker, it falls below the value of an all-zero CAM, leaves no dead CAMs and points at the ROI."""

import torch
from torch import nn

from kdtoolkit.builtin.losses import AttentionMSELoss, mask_at
from kdtoolkit.models.gradcam import cam_for_images
from kdtoolkit.plugins.loss import LossContext
from kdtoolkit.report.metrics import attention_metrics, pointing_ceiling

SIZE = 32


class TwoConv(nn.Module):
    """Two stride-2 convolutions (an 8×8 map at 32 px) and a GAP → linear head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3)))


def marker_images(n: int, generator: torch.Generator):
    """Noise with one bright 8×4 bar (the ROI) at a random place; random labels."""
    images = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    masks = torch.zeros(n, 1, SIZE, SIZE)
    boxes = []
    for i in range(n):
        x0, y0 = (int(v) for v in torch.randint(0, SIZE - 8, (2,), generator=generator))
        images[i, :, y0 : y0 + 4, x0 : x0 + 8] += 2.0
        masks[i, :, y0 : y0 + 4, x0 : x0 + 8] = 1.0
        boxes.append((x0, y0, x0 + 8, y0 + 4))
    labels = torch.randint(0, 3, (n,), generator=generator)
    return images, masks, labels, boxes


def fit(term: AttentionMSELoss, data, epochs: int = 40) -> TwoConv:
    """Train a ``TwoConv`` with ``term`` alone (Adam, batches of 32)."""
    torch.manual_seed(0)
    model = TwoConv()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, masks, labels, _ = data
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(images), 32):
            j = order[i : i + 32]
            loss = value(model, term, images[j], masks[j], labels[j])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def value(model, term, images, masks, labels) -> torch.Tensor:
    features = model.forward_features(images)
    logits = model.forward_head(features)
    return term(LossContext(model, images, features, logits, labels, None, masks))


def test_attention_term_alone_fits_the_roi_without_dead_cams():
    generator = torch.Generator().manual_seed(0)
    train = marker_images(128, generator)
    images, masks, labels, boxes = marker_images(64, generator)
    term = AttentionMSELoss()  # the defaults
    model = fit(term, train)

    grid = model.forward_features(images).shape[-2:]
    held_out = float(value(model, term, images, masks, labels).detach())
    all_zero = float(mask_at(masks, grid, "max").pow(2).mean())  # Â = 0 everywhere
    assert held_out < 0.5 * all_zero
    cams = cam_for_images(model, images, labels).numpy()
    scores = attention_metrics(list(cams), boxes, image_shape=(SIZE, SIZE))
    ceiling = pointing_ceiling(boxes, tuple(grid), (SIZE, SIZE))
    assert ceiling > 0.5  # a grid fine enough for the test to mean something
    assert scores["dead_cam"] <= 0.05
    assert scores["pointing_game"] >= 0.8 * ceiling
