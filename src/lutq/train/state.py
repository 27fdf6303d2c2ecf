"""Capturing and restoring everything an exact resume needs besides the model: RNG states and the
distributed context. Trainer state is stored with `lutq.models.save_trainer_state`, which loads with
`torch.load(weights_only=True)`, so only tensors, numbers, strings and plain containers go in."""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lutq.core.device import resolve_device


def rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), numpy and python RNG states as weights_only-loadable data."""
    keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)[1:]
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only where devices are present)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DistContext:
    """Where this process sits: rank, world size, its device; `is_main` does logging and saving."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            # a DDP wrapper sits in reference cycles, so it can outlive its function until a later collection; freed
            # after the group is gone, its reducer can abort the process at exit ("terminate called without an
            # active exception", seen twice in 2-rank gloo tests under a loaded suite): free it while the group lives
            gc.collect()
            torch.distributed.destroy_process_group()


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU.

    Each rank uses cuda:LOCAL_RANK on GPU machines; a single process just resolves `device`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world <= 1:
        return DistContext(device=base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    created = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
        created = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=base, initialized_here=created)
