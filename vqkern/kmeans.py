"""k-means on vqkern's kernels: fused nearest-code assignment, segment-sum update.

Memory stays O(N*D + C*D) whatever N and C are: the assignment never builds the
N x C distance matrix and the update never builds a one-hot.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library, backends, distributed
from .functional import nearest_code

METRICS = ("l2", "cosine")


class KMeansOutput(NamedTuple):
    """centroids: (C, D) float32; counts: (C,) float32, the rows assigned to each
    centroid by the last assignment step (summed over ranks when ``sync``)."""
    centroids: Tensor
    counts: Tensor


def kmeans(x: Tensor, num_clusters: int, iters: int, *, metric: str = "l2", init: Tensor | None = None,
           sync: bool = False, backend: str = "auto") -> KMeansOutput:
    """Lloyd's k-means.

    Args:
        x: (N, D) float rows to cluster (computed in float32).
        num_clusters: C >= 1.
        iters: number of assign/update steps (>= 1).
        metric: "l2" (squared Euclidean) or "cosine" (spherical k-means: rows and
            centroids are l2-normalized, centroids are re-normalized after each update).
        init: optional (C, D) initial centroids; by default C rows of x drawn at
            random (with replacement only when N < C), with the same random calls
            as vector-quantize-pytorch's k-means initialization.
        sync: inside a torch.distributed process group, treat every rank's ``x``
            as one data set: the seeds are drawn from the union and the per-cluster
            counts and sums are all-reduced, so every rank returns the same
            centroids. Every rank must then call this, with any N (even 0).
        backend: vqkern backend for the search and the segment sum.
    Returns:
        KMeansOutput(centroids (C, D) float32, counts (C,) float32). A cluster that
        receives no row keeps its previous centroid, as in vector-quantize-pytorch.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"x must be a floating (N, D) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    cosine = metric == "cosine"
    x = x.float()
    if cosine:
        x = F.normalize(x, dim=-1, eps=1e-6)

    if init is None:
        if sync:
            means = distributed.sample_rows(x, num_clusters, allow_duplicates=True)
        elif x.shape[0] == 0:
            raise ValueError("x has no rows: k-means needs at least one row to seed its centroids")
        else:
            means = _sample(x, num_clusters)
        if means.shape[0] == 0:
            raise ValueError("no rank has any row: k-means needs at least one row to seed its centroids")
    else:
        if init.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"init must have shape (num_clusters, D) = {(num_clusters, x.shape[1])}, "
                             f"got {tuple(init.shape)}")
        means = init.detach().float().clone()
        if cosine:
            means = F.normalize(means, dim=-1, eps=1e-6)

    for _ in range(iters):
        if x.shape[0] > 0:
            indices, _ = nearest_code(x, means, metric="l2", backend=backend)
        else:
            indices = torch.empty(0, dtype=torch.int64, device=x.device)
        counts, sums = segment_sum_unchecked(indices, x, num_clusters, backend)
        if sync:
            distributed.all_reduce_(counts, sums)
        new_means = sums / counts.clamp(min=1).unsqueeze(1)
        if cosine:
            new_means = F.normalize(new_means, dim=-1, eps=1e-6)
        means = torch.where((counts == 0).unsqueeze(1), means, new_means)
    return KMeansOutput(means, counts)


def segment_sum_unchecked(indices: Tensor, values: Tensor, num_codes: int, backend: str):
    """``vqkern.segment_sum`` for indices that come from the search, hence valid.

    The public function checks the index range with two host reads per call (a
    GPU stream sync each EMA step, and a graph break under torch.compile); the
    search's own output needs no such check, so this goes straight to the op.
    Returns (counts (K,) float32, sums (K, D) float32).
    """
    name = backends.resolve(backend, values.device, values.dtype, values.dtype, "l2")
    return _library.segment_sum(indices, values.contiguous(), num_codes, name,
                                torch.are_deterministic_algorithms_enabled())


def _sample(x: Tensor, num: int) -> Tensor:
    n = x.shape[0]
    if n >= num:
        return x[torch.randperm(n, device=x.device)[:num]]
    return x[torch.randint(0, n, (num,), device=x.device)]
