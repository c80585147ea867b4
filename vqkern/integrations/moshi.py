"""Kyutai's ``moshi`` (0.2.x): ``EuclideanCodebook``, the codebook of every layer of its
``ResidualVectorQuantizer`` and ``SplitResidualVectorQuantizer`` (Mimi's quantizer),
served by vqkern's kernels.

The library ranks codes with ``torch.cdist`` (an N x K matrix, in ``_quantize``, which
``encode`` and ``forward`` both call) and initializes them by 50 k-means steps that
build the N x K matrix again, on rank 0 after gathering every rank's rows. Patched:
the fused search, and k-means on the fused search and segment sum, where every rank
takes part in each step with its own rows (statistics all-reduced, seeds and
re-seeds drawn on rank 0 from the union, as moshi draws them), then rank 0's buffers
are broadcast as moshi does. The EMA (a scatter-add, O(N x D)), the code expiry and
the residual layers' averaging across ranks stay the library's own code.
"""
from __future__ import annotations

from torch import Tensor

from .. import distributed
from . import _common, register

# moshi's _init_embedding runs _run_kmeans(data, codebook_size) with its default
# num_iters, 50 (moshi 0.2.13).
KMEANS_ITERS = 50


def _quantize(self, x: Tensor) -> Tensor:
    """x (N, D) float -> (N,) int64: the nearest centroid of each row."""
    return _common.nearest(self, x, self.embedding)


def _init_embedding(self, data: Tensor) -> None:
    """k-means initialization from data (N, D) of every rank, then rank 0's buffers to all."""
    if self.initialized:
        return
    embedding, cluster_usage = _common.kmeans_resampling(
        self, data, self.codebook_size, KMEANS_ITERS, union=distributed.is_distributed())
    self.embedding_sum.data.copy_(embedding * cluster_usage[:, None])
    self.cluster_usage.data.copy_(cluster_usage)
    self._initialized.data.fill_(1)
    _common.broadcast_buffers(self)


register(
    "moshi.quantization.core_vq.EuclideanCodebook",
    methods={"_quantize": _quantize, "_init_embedding": _init_embedding},
)
