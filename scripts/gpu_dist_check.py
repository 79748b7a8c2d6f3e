"""One-GPU check of the collectives LatentWire runs under torchrun on GPUs.

A one-GPU machine cannot host two NCCL ranks (NCCL refuses two ranks on one
device), so this joins a one-rank group with the backend `latentwire.util.dist`
picks on GPUs ("cpu:gloo,cuda:nccl") and drives the real code paths with
the collectives switched on: `mean_terms` / `any_flag` / `broadcast` /
`gather_filled` (CPU tensors -> gloo) and a DDP-wrapped module's backward
step on the GPU (gradients -> NCCL). For contrast it shows that an NCCL-only
group rejects the CPU tensor that `mean_terms` reduces (the failure the
mixed backend exists to avoid). Prints one line per check; exit 1 on failure.

  python scripts/gpu_dist_check.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as tdist

from latentwire.util import dist


class _On(dist.Dist):
    """A one-rank Dist whose collectives run (Dist.enabled is world > 1)."""

    @property
    def enabled(self) -> bool:
        return True


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_dist_check: no CUDA device")
        return 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = dist.backend_for(True)
    tdist.init_process_group(backend=backend, world_size=1, rank=0)
    torch.cuda.set_device(0)
    d, ok = _On(0, 1, 0), True

    def check(name, fn):
        nonlocal ok
        try:
            print(f"ok   {name}: {fn()}")
        except Exception as e:  # report every check, then fail
            ok = False
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    check(f"group backend {backend!r}", lambda: tdist.get_backend())
    check("mean_terms (CPU tensors)", lambda: dist.mean_terms({"a": torch.tensor(2.0, device="cuda"),
                                                               "b": torch.tensor(4.0)}, d))
    check("any_flag", lambda: dist.any_flag(True, d))
    check("broadcast", lambda: dist.broadcast({"use_cache": True}, d))
    check("gather_filled", lambda: dist.gather_filled(["x", "y"], d))

    def ddp_step():
        m = dist.wrap(torch.nn.Linear(8, 8).cuda(), d)
        x = torch.randn(4, 8, device="cuda")
        m(x).square().mean().backward()
        g = next(m.parameters()).grad
        return f"{type(m).__name__} on {g.device}, grad norm {g.norm().item():.3f}"

    check("DDP backward on the GPU (NCCL)", ddp_step)

    def nccl_only_cpu():
        g = tdist.new_group(ranks=[0], backend="nccl")
        try:
            tdist.all_reduce(torch.tensor([1.0]), group=g)
            return "accepted a CPU tensor"
        except Exception as e:
            return f"rejected a CPU tensor as expected ({type(e).__name__})"

    check("contrast: NCCL-only group", nccl_only_cpu)
    tdist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
