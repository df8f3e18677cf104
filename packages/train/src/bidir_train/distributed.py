"""The process group of a run and the few collectives the trainer needs besides FSDP's own.

One process per device: torchrun's group (env:// from RANK, WORLD_SIZE, MASTER_ADDR...), or a one-process group when
started plainly, so the same code runs alone and on many ranks. `agreed` is how bad input stops a run: an error seen
on one rank is raised on every rank, so none is left waiting in a collective.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from bidir_core.errors import BidirError, one_line


def init_distributed() -> tuple[bool, torch.device]:
    """Join torchrun's process group, or make a one-process group when started plainly. NCCL on GPU, gloo on CPU.
    Returns (whether this call created the group, device)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return False, device
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True, device


def agreed(fn, *args, run: bool = True, **kwargs):
    """fn(...) on the ranks where `run` (None elsewhere); a BidirError on any rank is raised on every rank, so a
    bad input seen by one rank stops all of them instead of leaving the others waiting in a collective."""
    out, error = None, None
    if run:
        try:
            out = fn(*args, **kwargs)
        except BidirError as e:
            error = e
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else one_line(error))
    if error is not None:
        raise error
    bad = next((m for m in messages if m is not None), None)
    if bad is not None:
        raise BidirError(bad)
    return out


def from_rank0(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def sum_over_ranks(value: float, device: torch.device) -> float:
    """The sum of `value` over ranks, computed as the trainer always has: the mean times the world size."""
    return mean_over_ranks(value, device) * dist.get_world_size()
