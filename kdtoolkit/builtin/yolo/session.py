"""ultralytics kept offline, quiet and inside the run folder: ``ultralytics_session``.

Inside a session: no update checks, analytics, font or AMP-check downloads, pip installs or
hub calls; settings and downloads stay in the session folder; ultralytics' log lines go to a
callback (warnings) instead of the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from kdtoolkit.plugins.isolation import torch_state

#: Settings switched off for the duration of a session.
_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_OFF += ("vscode_msg", "openvino_msg")


class _Forward(logging.Filter):
    """On ultralytics' logger: warnings and errors go to ``log``, nothing to the terminal."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if self.log is not None and record.levelno >= logging.WARNING:
            message = record.getMessage().strip()
            if message:
                self.log(f"yolo: {message.splitlines()[0]}")
        return False


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (a value) or unset (None) environment variables for the block, then restore."""

    def apply(items: dict[str, str | None]) -> None:
        for k, v in items.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def _patch(stack: contextlib.ExitStack, obj: Any, name: str, value: Any) -> None:
    """``obj.name = value`` until ``stack`` closes (skipped when ``obj`` has no ``name``)."""
    if not hasattr(obj, name):
        return
    stack.callback(setattr, obj, name, getattr(obj, name))
    setattr(obj, name, value)


@contextlib.contextmanager
def ultralytics_session(
    folder: Path, log: Callable[[str], None] | None = None
) -> Iterator[ModuleType]:
    """Import ultralytics and keep it offline, quiet and inside ``folder`` for the block.

    - First import: ``YOLO_CONFIG_DIR=folder/config`` (so its ``settings.json`` is created
      there, not in the home folder), ``YOLO_OFFLINE`` (no DNS probe), ``YOLO_AUTOINSTALL=0``.
    - For the block: its settings file is ``folder/config/Ultralytics/settings.json`` with
      ``datasets_dir``/``weights_dir``/``runs_dir`` inside ``folder`` and ``sync`` and every
      integration off; ``ONLINE`` and auto-install are off (no update check, analytics, pip);
      the font check (an ``Arial.ttf`` download) is a no-op; ``ULTRALYTICS_API_KEY`` is hidden
      (no Platform streaming); requirement checks are skipped; its logger is silenced, with
      warnings passed to ``log``.
    - torch's process-wide settings (``kdtoolkit.plugins.isolation.torch_state``: threads,
      deterministic algorithms, cuDNN and TF32 flags, default dtype, random states and the
      environment variables ultralytics sets for them) are restored when the block ends, so a
      detector's training leaves the stages after it as they would be without it.

    Everything is restored afterwards, except the import-time directory, which stays the
    first session's ``folder/config/Ultralytics``. Yields the ``ultralytics`` module.
    """
    folder = Path(folder).resolve()
    config = folder / "config"
    config.mkdir(parents=True, exist_ok=True)
    ul_logger = logging.getLogger("ultralytics")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_state())  # entered first: restored last
        stack.enter_context(
            _environ(
                YOLO_CONFIG_DIR=str(config),
                YOLO_OFFLINE="1",
                YOLO_AUTOINSTALL="0",
                ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS="1",
                ULTRALYTICS_API_KEY=None,
                # under torchrun only rank 0 trains the detector, as one process: ultralytics
                # reads these when imported and would join the run's process group
                WORLD_SIZE=None,
                RANK=None,
                LOCAL_RANK=None,
            )
        )
        forward = _Forward(log)
        ul_logger.addFilter(forward)  # also silences the import's "Creating settings" lines
        stack.callback(ul_logger.removeFilter, forward)
        from PIL import Image

        pil_open = Image.open
        import ultralytics
        import ultralytics.data.utils
        import ultralytics.utils
        import ultralytics.utils.checks
        import ultralytics.utils.events
        import ultralytics.utils.plotting

        # ultralytics replaces PIL.Image.open process-wide (a HEIF fallback that tries to
        # import pi_heif on any unreadable file); keep PIL as the rest of kdtoolkit expects.
        Image.open = pil_open

        stack.callback(ul_logger.setLevel, ul_logger.level)
        ul_logger.setLevel(logging.WARNING)  # above INFO also turns progress bars off
        utils, checks = ultralytics.utils, ultralytics.utils.checks

        settings = utils.SETTINGS
        saved = dict(settings)
        for attr in ("file", "file_path"):
            _patch(stack, settings, attr, config / "Ultralytics" / "settings.json")
        stack.callback(lambda: (dict.clear(settings), dict.update(settings, saved)))
        dirs = {
            name: folder / name.removesuffix("_dir")
            for name in ("datasets_dir", "weights_dir", "runs_dir")
        }
        wanted: dict[str, Any] = {k: str(v) for k, v in dirs.items()}
        wanted |= {k: False for k in _OFF} | {"api_key": ""}
        settings.update({k: v for k, v in wanted.items() if k in settings.defaults})
        for module in (utils, ultralytics.data.utils):
            for name, path in dirs.items():
                _patch(stack, module, name.upper(), path)
        for module in (utils, checks, ultralytics.utils.events):
            _patch(stack, module, "ONLINE", False)
        for module in (utils, checks):
            _patch(stack, module, "AUTOINSTALL", False)
        _patch(stack, ultralytics.utils.events.events, "enabled", False)
        import ultralytics.nn.tasks

        # every .pt is loaded with weights_only=True against ultralytics' allow-list of model
        # classes (its safe-load switch): a weights file cannot run code
        _patch(stack, ultralytics.nn.tasks, "SAFE_LOAD", True)
        for module in (checks, ultralytics.data.utils, ultralytics.utils.plotting):
            _patch(stack, module, "check_font", lambda *args, **kwargs: None)
        yield ultralytics
