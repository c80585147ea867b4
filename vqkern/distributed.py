"""torch.distributed helpers: keep codebook statistics identical across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum each tensor across ranks in place (no-op outside a process group)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    """Copy each tensor from rank ``src`` to every rank in place (no-op outside a group)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)
