"""Several processes (torchrun) on one job: which rank this is, and the one setup step only rank 0 runs.

Rank r computes shards k with k % world_size == r. Rank 0 prepares the output folder while the others wait (a gloo
barrier, the only message between processes: shards go through the filesystem)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

from bidir_core.errors import BidirError

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) for a single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(world: int) -> Iterator[None]:
    """A gloo process group for the setup steps of a job of `world` ranks (none for one process): one for several
    on_rank_zero calls, since a second group made after the first is destroyed can fail to connect."""
    import torch.distributed as dist

    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def on_rank_zero(rank: int, world: int, prepare: Callable[[], T]) -> T:
    """Run prepare() on rank 0 only, the other ranks waiting for it; every rank gets its result (or its error)."""
    if world == 1:
        return prepare()
    import torch.distributed as dist

    # gloo (CPU) is enough: only this small setup message crosses processes; shards go through the filesystem.
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    result: list = [None]
    if rank == 0:
        try:
            result = [("ok", prepare())]
        except BidirError as e:
            result = [("error", str(e))]
    dist.broadcast_object_list(result, src=0)
    if own:
        dist.destroy_process_group()
    status, value = result[0]
    if status == "error":
        raise BidirError(value)
    return value
