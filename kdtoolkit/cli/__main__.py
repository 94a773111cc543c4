"""``python -m kdtoolkit.cli``: the ``kd`` command."""

from kdtoolkit.cli.app import main

main()
