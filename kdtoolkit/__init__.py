"""kdtoolkit: knowledge distillation from ROI-crop teachers to full-image students."""

from kdtoolkit.hookspec import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
