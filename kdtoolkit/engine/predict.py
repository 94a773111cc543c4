"""Serving a student: stage full images with no crop and no detector."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.engine.device import resolve_device
from kdtoolkit.errors import KdError
from kdtoolkit.models.checkpoint import load_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Image files among ``paths``; folders are searched (not recursively), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise KdError(f"{p}: no such image or folder")
    if not out:
        raise KdError(f"no images found in {', '.join(map(str, paths))}")
    return out


def predict(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    cam_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Class and probabilities for every image; optional Grad-CAM overlays in ``cam_dir``.

    Each result: ``{"image", "class", "index", "probabilities": {class: p}}``.
    """
    from kdtoolkit.data.view import ViewConfig, load_image, student_view

    model, meta = load_model(checkpoint, resolve_device(device))
    if meta.get("view") != "image":
        raise KdError(
            f"{checkpoint}: a {meta.get('role')} checkpoint that takes crops; "
            f"kd predict serves students (full images), e.g. fold_0/student/model.safetensors"
        )
    dev = next(model.parameters()).device
    cfg = ViewConfig(
        image_size=tuple(meta["input_size"]),
        crop_size=tuple(meta["input_size"]),
        channels=meta["channels"],
        letterbox=meta["letterbox"],
        mean=meta["normalisation"]["mean"],
        std=meta["normalisation"]["std"],
    )
    classes = meta["classes"]
    files = image_paths(paths)
    results: list[dict[str, Any]] = []
    cam_names: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [load_image(f, cfg.channels) for f in chunk]
        x = torch.stack([student_view(im, cfg) for im in images]).to(dev)
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), 1).cpu().numpy()
        for f, p in zip(chunk, probs, strict=False):
            k = int(np.argmax(p))
            results.append(
                {
                    "image": str(f),
                    "class": classes[k],
                    "index": k,
                    "probabilities": {c: float(v) for c, v in zip(classes, p, strict=False)},
                }
            )
        if cam_dir is not None:
            _write_cams(Path(cam_dir), model, x, chunk, cam_names)
    return results


def _cam_name(path: Path, used: set[str]) -> str:
    """``<stem>_cam.png``, or with the parent folder's name (and a number) when taken."""
    name = f"{path.stem}_cam.png"
    k = 1
    while name in used:
        name = f"{path.parent.name}_{path.stem}{'' if k == 1 else f'_{k}'}_cam.png"
        k += 1
    used.add(name)
    return name


def _write_cams(
    cam_dir: Path, model: torch.nn.Module, x: torch.Tensor, files: list[Path], used: set[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import cm
    from PIL import Image

    from kdtoolkit.models.gradcam import cam_for_images

    cam_dir.mkdir(parents=True, exist_ok=True)
    cams = cam_for_images(model, x).cpu().numpy()
    for f, image, cam in zip(files, x.cpu().numpy(), cams, strict=False):
        grey = image.mean(0)
        grey = (grey - grey.min()) / max(1e-6, float(np.ptp(grey)))
        heat = cm.jet(cam)[..., :3]
        overlay = 0.55 * np.repeat(grey[..., None], 3, axis=2) + 0.45 * heat
        Image.fromarray((overlay * 255).clip(0, 255).astype(np.uint8)).save(
            cam_dir / _cam_name(f, used)
        )
