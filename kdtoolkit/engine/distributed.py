"""Data-parallel training across processes launched by ``torchrun``: who this process is, the
process group, work done by rank 0 alone with the others waiting, each rank's part of a global
batch, and the DistributedDataParallel wrapper of a stage.

One process (no ``WORLD_SIZE`` in the environment, or 1) is the world of size 1: every helper
then does nothing, so the engine calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kdtoolkit.data.bank import rank_slice
from kdtoolkit.errors import KdError

T = TypeVar("T")

#: How long a rank waits for the others (rank 0 alone runs the ROI provider and evaluations).
WAIT_HOURS = 24


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of a launch."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files."""
        return self.rank == 0


def world() -> World:
    """The launch this process belongs to, from ``torchrun``'s environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``); size 1 when not launched by it."""
    env = os.environ
    try:
        w = World(
            int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
        )
    except ValueError:
        raise KdError("WORLD_SIZE, RANK, LOCAL_RANK: integers expected (set by torchrun)") from None
    return w if w.size > 1 else World()  # a stray RANK alone does not make a launch


def launched() -> bool:
    """Whether this process is one of several (``torchrun --nproc-per-node N``, N > 1)."""
    return world().size > 1


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return world().main


def active() -> bool:
    """Whether a process group is initialised (``start``)."""
    return dist.is_available() and dist.is_initialized()


def start(device: torch.device) -> torch.device:
    """Join the launch's process group (NCCL on CUDA, gloo on CPU) when launched; return the
    device of this rank: ``cuda:LOCAL_RANK`` on CUDA, else ``device``."""
    w = world()
    if w.size == 1:
        return device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise KdError(
                f"--nproc: process {w.local_rank} has no GPU of its own "
                f"({torch.cuda.device_count()} visible); start at most one process per GPU"
            )
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        # long waits: the others wait while rank 0 alone trains a detector or evaluates
        kwargs["timeout"] = datetime.timedelta(hours=WAIT_HOURS)
        dist.init_process_group(backend, rank=w.rank, world_size=w.size, **kwargs)
    return device


def stop() -> None:
    """Leave the process group (when ``start`` joined one)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks: what rank 0 writes in it (a file
    it makes or repairs) is there when the others read it."""
    main = is_main()
    if not main:
        barrier()
    yield
    if main:
        barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over every rank (float64)."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def part(total: int, w: World | None = None) -> slice:
    """This rank's slice of ``total`` items (``kdtoolkit.data.bank.rank_slice``)."""
    w = w or world()
    return rank_slice(total, w.rank, w.size)


def check_launch(nproc: int, executor: str, device: torch.device) -> None:
    """Before ``nproc`` processes are started: one line when they could not run (folds as jobs,
    or more processes than GPUs)."""
    if executor != "inline":
        raise KdError(
            "launch.executor: several processes per run (torchrun, --nproc) train each stage "
            "together; folds as jobs need one process: use --executor inline"
        )
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise KdError(
            f"--nproc {nproc}: {torch.cuda.device_count()} GPU(s) visible; start at most one "
            "process per GPU"
        )


def check_batch_size(batch_size: int, key: str, size: int | None = None) -> None:
    """A one-line error when the global ``batch_size`` (recipe key ``key``) does not split
    evenly over ``size`` processes (default: this launch's)."""
    size = size or world().size
    if batch_size % size:
        raise KdError(
            f"{key}: batch_size {batch_size} is not divisible by the {size} processes "
            f"(each takes batch_size / {size} of every batch); choose a multiple of {size}"
        )


class FeaturesAndLogits(nn.Module):
    """``model``'s features and logits in one forward (what DistributedDataParallel wraps, so
    its gradient hooks see both); ``extra`` (the loss terms' parameters) are held so their
    gradients are averaged too."""

    def __init__(self, model: nn.Module, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features, self.model.forward_head(features)


def data_parallel(model: nn.Module, extra: nn.Module, device: torch.device) -> nn.Module:
    """``FeaturesAndLogits(model, extra)``, wrapped in DistributedDataParallel when launched
    (batch norms become synchronised on CUDA, so each is taken over the global batch as in one
    process; gloo has no synchronised batch norm: on CPU each rank normalises its own part)."""
    net = FeaturesAndLogits(model, extra if next(extra.parameters(), None) is not None else None)
    if not active():
        return net
    if device.type == "cuda":  # in place: the stage's model holds the synchronised norms
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cpu":  # a size-1 dimension's stride: no copy, nothing to fix
        warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    # static graph: the same parameters get gradients every step, some outside the forward
    # (the loss terms', the head's second-order Grad-CAM path): found in the first step
    return nn.parallel.DistributedDataParallel(
        net, device_ids=ids, static_graph=True, gradient_as_bucket_view=True
    )


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The ``torchrun`` arguments that start ``nproc`` processes of ``kd ARGS`` here."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "kdtoolkit.cli", *args]


def launch(nproc: int, args: Sequence[str]) -> None:
    """Run ``kd ARGS`` as ``nproc`` processes (``torchrun --standalone``) and wait; each
    process prints its own errors; a process ended otherwise (a signal) gets one line here."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(torchrun_command(nproc, args)))
    except (KeyboardInterrupt, SignalException):
        sys.exit(130)  # each process said what is kept
    except ChildFailedError as e:
        rank, first = e.get_first_failure()  # the others were stopped after it
        code = first.exitcode
        if code in (1, 2, 130):  # the process printed its one line
            sys.exit(code)
        raise KdError(
            f"process {rank} of {nproc} ended with exit code {code} (a signal when negative); "
            "rerun the same command to resume"
        ) from None
