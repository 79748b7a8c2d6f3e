"""Multi-process runs on PyTorch's own engine.

`torchrun --nproc_per_node N -m latentwire run ...` (or `accelerate launch
--num_processes N -m latentwire run ...`, which sets the same environment)
starts N copies of the same command. This module turns that environment
into a process group and gives the stages five small verbs: which process
am I, wrap the adapter in DistributedDataParallel, average these numbers,
gather these answers, wait for everybody.

Why DDP wraps only the adapter: the LLM is frozen (no gradients, no
optimizer state), so every process simply holds its own replica (on GPUs:
its own device); the adapter is the only thing whose gradients must agree.
Why every process draws the same global batch and keeps a 1/N slice of it:
the mean of N equal-sized slice means is the global mean, so N processes
take the same optimizer steps as one process on the same batch, and the
adapter weights match the single-process run up to float rounding (tested).

Without the launcher's environment (WORLD_SIZE unset or 1) every verb is a
no-op and nothing here touches torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from ..errors import LatentWireError


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints, predictions and reports."""
        return self.rank == 0


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LatentWireError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer "
                              "(it is set by torchrun / accelerate launch)") from None


def init() -> Dist:
    """Join the process group the launcher described; a plain `latentwire
    run` returns the single-process Dist. On GPUs the group is
    "cpu:gloo,cuda:nccl": DDP's gradients travel over NCCL, while the small
    CPU tensors of our own collectives (loss terms, stop flags, gathered
    answers) go over gloo -- an NCCL-only group rejects CPU tensors."""
    if launched_world_size() <= 1:
        return Dist()
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend_for(torch.cuda.is_available()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return current()


def backend_for(cuda: bool) -> str:
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's value of a picklable object, on every rank (a decision made
    once, e.g. which cached answers to use, so that ranks cannot diverge)."""
    if not d.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def current() -> Dist:
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", tdist.get_rank())))


def shutdown(wait: bool = True) -> None:
    """Leave together: ranks other than 0 finish early (rank 0 still scores
    and writes), and a rank tearing down its group while a peer is still
    connected can abort the peer (seen with gloo), so on a normal exit all
    wait first. After an error (wait=False) a rank leaves at once; the
    launcher then stops the others."""
    if tdist.is_available() and tdist.is_initialized():
        try:
            if wait:
                tdist.barrier()
        finally:
            tdist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        tdist.barrier()


def wrap(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DistributedDataParallel around the adapter (identity when alone).

    broadcast_buffers=False: the adapters' buffers (the embedding table, the
    PCA basis) are identical constants on every rank, and the table is large
    enough that re-broadcasting it every step would dominate a step.
    """
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    dev = next(module.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def mean_terms(terms: dict[str, torch.Tensor], d: Dist) -> dict[str, float]:
    """Loss terms averaged over ranks, as floats (for logging and the NaN
    check: a NaN on any rank becomes a NaN on every rank, so all stop)."""
    # each moved to the CPU first: terms may live on different devices (a term computed on the CPU beside
    # GPU ones), and the reduction runs over gloo, which takes CPU tensors
    vals = torch.stack([v.detach().float().reshape(()).cpu() for v in terms.values()])
    if d.enabled:
        tdist.all_reduce(vals, op=tdist.ReduceOp.SUM)
        vals /= d.world
    return dict(zip(terms, vals.tolist()))


def any_flag(flag: bool, d: Dist) -> bool:
    """True on every rank when it is true on any (so a signal received by one
    process stops all of them at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def slice_for_rank(n: int, d: Dist, flag: str) -> slice:
    """This rank's contiguous 1/N of a global batch of n items; n must split
    evenly, or the ranks' means would not average to the global mean."""
    if n % d.world:
        raise LatentWireError(f"{flag} {n} does not split evenly over {d.world} processes; "
                              f"use a multiple of {d.world}")
    k = n // d.world
    return slice(d.rank * k, (d.rank + 1) * k)


def gather_filled(items: Sequence[Any], d: Dist) -> list[Any]:
    """Merge per-rank lists in which each rank filled its own positions and
    left None elsewhere; every rank gets the full list."""
    if not d.enabled:
        return list(items)
    parts: list[Any] = [None] * d.world
    tdist.all_gather_object(parts, list(items))
    merged = list(items)
    for part in parts:
        for i, v in enumerate(part):
            if v is not None:
                merged[i] = v
    missing = [i for i, v in enumerate(merged) if v is None]
    if missing:
        raise RuntimeError(f"sharded evaluation: {len(missing)} item(s) produced by no rank (first: {missing[0]})")
    return merged
