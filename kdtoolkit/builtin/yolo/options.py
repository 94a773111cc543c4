"""What the ``yolo`` and ``yolo_obb`` ROI providers' options mean to ultralytics: the model YAML
(packaged or local, a detection or an oriented-box model), local starting weights and the device
name.

ultralytics' packaged model YAMLs are found without importing ultralytics.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from kdtoolkit.errors import KdError, suggestion
from kdtoolkit.fileio import first_line

#: Head modules of the packaged model YAMLs that plain ``YOLO`` trains as detectors.
DETECT_HEADS = {"Detect", "v10Detect"}
#: Head modules of the oriented-box (OBB task) model YAMLs.
OBB_HEADS = {"OBB", "OBB26"}


def ultralytics_device(device: str) -> str:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``) in ultralytics' form
    (``cpu``, ``0``, ``1``, ``mps``)."""
    device = str(device).strip().lower()
    if device == "cuda":
        return "0"
    if device.startswith("cuda:"):
        return device.removeprefix("cuda:")
    return device


def models_dir() -> Path | None:
    """ultralytics' packaged ``cfg/models`` folder, found without importing ultralytics."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "cfg" / "models"


def _unscaled(name: str) -> str:
    """ultralytics' scale rule: ``yolo11n.yaml`` is ``yolo11.yaml`` at scale ``n``."""
    return re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # an ultralytics dependency

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KdError(f"yolo model {str(path)!r}: unreadable YAML ({exc})") from None
    return data if isinstance(data, dict) else {}


def _head(data: dict[str, Any]) -> str | None:
    try:
        return str(data["head"][-1][2])
    except (KeyError, IndexError, TypeError):
        return None


def packaged_detect_models(heads: set[str] = DETECT_HEADS) -> list[str]:
    """Names of ultralytics' packaged model YAMLs with one of ``heads`` (detection by default),
    with their scales (``yolo11n.yaml`` … ``yolo11x.yaml``, ``yolov8s-p2.yaml``, ...)."""
    folder = models_dir()
    names = []
    for path in sorted(folder.rglob("*.yaml")) if folder else []:
        data = _read_yaml(path)
        if _head(data) not in heads:
            continue
        names.append(path.name)
        if _unscaled(path.stem) == path.stem:  # a scalable YAML: yolo11 → yolo11n, ...
            for scale in data.get("scales") or {}:
                names.append(re.sub(r"^(\D*\d+)", rf"\g<1>{scale}", path.name, count=1))
    return names


def resolve_model_yaml(
    model: str, heads: set[str] = DETECT_HEADS, example: str = "yolo11n.yaml"
) -> str:
    """Check ``model`` (a packaged model YAML name or a local ``.yaml`` path whose head is one
    of ``heads``) and return what ``ultralytics.YOLO`` should be given; raises a one-line
    :class:`KdError` (``example``: the model YAML it suggests)."""
    kind = "an oriented-box (OBB)" if heads == OBB_HEADS else "a detection"
    if Path(model).suffix.lower() not in (".yaml", ".yml"):
        raise KdError(
            f"yolo model {model!r}: expected a model YAML such as {example!r} "
            "(start from a .pt file with weights=...)"
        )
    path = Path(model).expanduser()
    if path.is_file() or len(path.parts) > 1:  # a local file
        unscaled = path.with_name(_unscaled(path.name))
        found = path if path.is_file() else unscaled if unscaled.is_file() else None
        if found is None:
            raise KdError(f"yolo model {model!r}: no such file")
        head = _head(_read_yaml(found))
        if head not in heads:
            raise KdError(f"yolo model {model!r}: not {kind} model (its head is {head})")
        return str(path.resolve())
    folder = models_dir()
    packaged = {p.name: p for p in folder.rglob("*.yaml")} if folder else {}
    found = packaged.get(model) or packaged.get(_unscaled(model))
    if found is None:
        raise KdError(
            f"yolo model {model!r}: no such ultralytics model YAML"
            f"{suggestion(model, packaged_detect_models(heads))} (or give a path to a .yaml file)"
        )
    head = _head(_read_yaml(found))
    if head not in heads:
        raise KdError(
            f"yolo model {model!r}: not {kind} model (its head is {head}); use e.g. {example!r}"
        )
    return model


def resolve_weights(weights: str | None) -> str | None:
    """Check that ``weights`` is an existing local ``.pt`` file; its absolute path."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.suffix.lower() != ".pt":
        raise KdError(f"yolo weights {weights!r}: expected a local .pt file")
    if not path.is_file():
        raise KdError(f"yolo weights {weights!r}: no such file (nothing is downloaded)")
    check_safe_weights(path)
    return str(path.resolve())


def check_safe_weights(path: Path) -> None:
    """Refuse a ``.pt`` that ultralytics cannot load without unpickling arbitrary code: it is
    loaded with ``weights_only=True`` against ultralytics' allow-list of model classes."""
    import tempfile

    from kdtoolkit.builtin.yolo.session import ultralytics_session

    with (
        tempfile.TemporaryDirectory(prefix="kd-yolo-") as folder,
        ultralytics_session(Path(folder)),
    ):
        from ultralytics.nn.tasks import torch_safe_load

        try:
            torch_safe_load(str(path), safe_only=True)
        except Exception as e:
            raise KdError(
                f"yolo weights {str(path)!r}: not loadable as plain weights ({first_line(e)}); "
                "use an ultralytics checkpoint of model classes only (docs/roi.md)"
            ) from None
