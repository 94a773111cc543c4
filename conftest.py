"""Test workers (pytest-xdist, ``-n auto`` in pyproject.toml) share the machine's cores: one
torch thread each, for the tests and for the ``kd`` processes they start."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
