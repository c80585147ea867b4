"""Pieces the adapters share: the fused search, EMA statistics, k-means, draws, rank-0 syncs.

Each function takes the patched layer (for the backend ``patch`` chose) and works on
vqkern's ops, so no adapter builds the N x K distance matrix, an N x K one-hot or
k-means' N x K x D differences. The random draws are those of the libraries' own
helpers (encodec's and moshi's ``sample_vectors``), in the same order, so a seeded run
draws the same rows patched or not.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import distributed
from ..functional import nearest_code
from ..kmeans import _sample as _sample_local
from ..kmeans import kmeans, segment_sum_unchecked
from . import backend_of


def nearest(layer: nn.Module, x: Tensor, codebook: Tensor, *, metric: str = "l2") -> Tensor:
    """(N,) int64: the nearest code of each row of x (N, D) in codebook (K, D), lowest index
    on ties (any float dtypes; "cosine" ranks l2-normalized rows and codes)."""
    return nearest_code(x, codebook, metric=metric, backend=backend_of(layer))[0]


def code_stats(layer: nn.Module, indices: Tensor, x: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-code counts (K,) and row sums (K, D), both float32, of x (N, D) under indices (N,)
    int64 from the search: what a one-hot's column sums and ``x.T @ one_hot`` give."""
    return segment_sum_unchecked(indices, x.detach(), num_codes, backend_of(layer))


def ema_(average: Tensor, new: Tensor, decay: float) -> None:
    """average = decay * average + (1 - decay) * new, in place, as encodec's and moshi's
    ``ema_inplace`` (the same two operations, so the same rounding)."""
    average.data.mul_(decay).add_(new, alpha=1 - decay)


def laplace_sizes(cluster_size: Tensor, eps: float) -> Tensor:
    """(K,) Laplace-smoothed cluster sizes that keep the raw sizes' total (encodec's
    ``laplace_smoothing(size, K, eps) * size.sum()``, operation for operation)."""
    total = cluster_size.sum()
    return (cluster_size + eps) / (total + cluster_size.shape[0] * eps) * total


def sample_vectors(x: Tensor, num: int, *, union: bool = False) -> Tensor:
    """(num, D): rows of x (N, D) drawn as encodec's and moshi's ``sample_vectors`` draw
    them (``randperm(N)[:num]``, or ``randint`` with replacement when N < num).

    union: inside a process group, draw from the union of every rank's rows in rank
    order, as one process holding them all would (positions drawn on rank 0 only,
    rows assembled by an all-reduce of num x D; the same rows on every rank).
    """
    if not (union and distributed.is_distributed()):
        return _sample_local(x, num)
    sizes = distributed.gather_sizes(x.shape[0], x.device)
    total = sum(sizes)
    if total == 0:
        raise ValueError("no rank has rows to draw codes from")
    if distributed.rank() == 0:
        positions = (torch.randperm(total, device=x.device)[:num] if total >= num
                     else torch.randint(0, total, (num,), device=x.device))
    else:
        positions = torch.empty(num, dtype=torch.int64, device=x.device)
    distributed.broadcast_(positions)
    return distributed.rows_at(x, positions, sizes)


def kmeans_keep(layer: nn.Module, x: Tensor, num_clusters: int, iters: int) -> tuple[Tensor, Tensor]:
    """encodec's k-means on this rank's rows x (N, D): seeds drawn by ``sample_vectors``, a
    cluster left empty keeps its centroid. Returns (centroids (K, D) float32, counts (K,)
    float32 of the last assignment)."""
    out = kmeans(x, num_clusters, iters, backend=backend_of(layer))
    return out.centroids, out.counts


def kmeans_resampling(layer: nn.Module, x: Tensor, num_clusters: int, iters: int, *,
                      union: bool) -> tuple[Tensor, Tensor]:
    """moshi's k-means: after each Lloyd step a cluster left empty takes a row drawn afresh
    (one ``sample_vectors`` draw of K rows per step, after the step, as moshi draws).

    x: (N, D) float rows of this rank; union: cluster every rank's rows as one set (the
    statistics all-reduced, the draws over the union), where moshi gathers them on rank 0.
    Returns (centroids (K, D) float32, counts (K,) float32 of the last step, at least 1).
    """
    means = sample_vectors(x, num_clusters, union=union).float()
    counts = None
    for _ in range(iters):
        step = kmeans(x, num_clusters, 1, init=means, sync=union, backend=backend_of(layer))
        resampled = sample_vectors(x, num_clusters, union=union)
        counts = step.counts
        means = torch.where((counts == 0).unsqueeze(1), resampled.float(), step.centroids)
    return means, counts.clamp(min=1)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy every floating buffer of ``module`` from rank 0 (encodec's and moshi's sync of
    a codebook after k-means and code expiry); nothing outside a process group."""
    distributed.broadcast_(*[b for b in module.buffers() if b.is_floating_point()])
