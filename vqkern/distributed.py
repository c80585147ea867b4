"""torch.distributed helpers: keep codebook statistics identical across ranks.

Every helper here is a collective when a process group with more than one rank
is initialized: all ranks must call it, in the same order, whatever their own
data. None of them branches on local data before its collectives (a rank with
no rows still takes part), so ranks that see different numbers of rows, or none,
never hang. Outside a process group each helper is local and cheap.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 outside one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 outside a process group of more than one rank)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_(*tensors: Tensor) -> None:
    """Sum each tensor (any shape, a dtype the backend reduces) across ranks in place (no-op outside a group)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(*tensors: Tensor, src: int = 0) -> None:
    """Copy each tensor (any shape and dtype) from rank ``src`` to every rank in place (no-op outside a group)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)


def gather_sizes(n: int, device: torch.device | str) -> list[int]:
    """Every rank's row count, in rank order (``[n]`` outside a process group)."""
    if not is_distributed():
        return [int(n)]
    size = torch.tensor([int(n)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in torch.cat(sizes).tolist()]


def random_subset(n: int, m: int, device: torch.device | str) -> Tensor:
    """(M,) int64: M = ``m`` distinct positions in [0, n), drawn on rank 0, the same on every rank."""
    picked = torch.randperm(n, device=device)[:m] if rank() == 0 else torch.empty(m, dtype=torch.int64, device=device)
    broadcast_(picked)
    return picked


def sample_rows(x: Tensor, num: int, *, allow_duplicates: bool = False) -> Tensor:
    """Rows drawn uniformly from the union of every rank's ``x``, identical on every rank.

    Args:
        x: (N, D) float, this rank's rows; N may differ between ranks and may be 0.
        num: how many rows are wanted (the same on every rank).
        allow_duplicates: when the union holds fewer than ``num`` rows, draw the
            missing ones again with replacement (k-means seeding) instead of
            returning fewer rows (dead-code re-seeding).
    Returns:
        (M, D) in x's dtype with M = num, or min(num, total rows) without
        ``allow_duplicates`` (M = 0 when no rank has rows).

    Outside a process group the draw makes the same random calls as
    vector-quantize-pytorch's ``sample_vectors`` (``randperm(N)[:num]``, or
    ``randint`` with replacement when N < num), so seeded runs match it.
    Inside one, rank 0 draws global row positions and broadcasts them, and
    :func:`rows_at` assembles the rows.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    if not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")
    device = x.device
    sizes = gather_sizes(x.shape[0], device)
    total = sum(sizes)
    if total == 0 or num == 0:
        return x.new_empty((0, x.shape[1]))
    m = num if allow_duplicates else min(num, total)
    if not is_distributed():
        if total >= num:
            positions = torch.randperm(total, device=device)[:num]
        elif allow_duplicates:
            positions = torch.randint(0, total, (num,), device=device)
        else:
            positions = torch.randperm(total, device=device)
        return x[positions]
    if rank() == 0:
        if total >= m:
            positions = torch.randperm(total, device=device)[:m]
        else:
            positions = torch.cat([torch.randperm(total, device=device),
                                   torch.randint(0, total, (m - total,), device=device)])
    else:
        positions = torch.empty(m, dtype=torch.int64, device=device)
    broadcast_(positions)
    return rows_at(x, positions, sizes)


def rows_at(x: Tensor, positions: Tensor, sizes: list[int]) -> Tensor:
    """(M, D) in x's dtype: the rows at ``positions`` (M,) int64 of the union of every rank's
    ``x`` (N, D), counted in rank order; ``sizes`` is :func:`gather_sizes`'s list and
    ``positions`` the same on every rank.

    Each rank writes the rows it owns into a zero buffer and an all-reduce assembles
    them: each row is summed with zeros only, so the result is exact and bitwise
    identical everywhere; the traffic is M x D, never the union itself.
    """
    start = sum(sizes[:rank()])
    local = positions - start
    mine = (local >= 0) & (local < x.shape[0])
    out = x.new_zeros((positions.shape[0], x.shape[1]))
    out[mine] = x[local[mine]]
    all_reduce_(out)
    return out
