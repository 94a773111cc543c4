"""The ``kd`` command: a thin typer layer over the library functions, one module per command
group (:mod:`.experiment`, :mod:`.data`, :mod:`.deploy`, :mod:`.tune`, :mod:`.plugins`) and
the application that joins them (:mod:`.app`)."""

from kdtoolkit.cli.app import app, main, run_app

__all__ = ["app", "main", "run_app"]
