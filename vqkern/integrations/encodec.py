"""Meta's ``encodec`` (0.1.x): ``EuclideanCodebook``, the codebook of every layer of its
``ResidualVectorQuantization``, served by vqkern's kernels.

The library's codebook ranks codes by ``|x|^2 - 2 x E^T + |E|^2`` (an N x K matrix),
updates its EMA from an N x K one-hot (``x.T @ one_hot``) and initializes by k-means over
an N x K x D difference tensor. Patched: the fused search, the EMA statistics from one
segment sum, k-means on the fused search; the Laplace smoothing, the dead-code draws
(the library's own ``expire_codes_``, unchanged) and the rank-0 broadcasts of the
buffers are as the library does them.
"""
from __future__ import annotations

from torch import Tensor

from . import _common, register


def _quantize(self, x: Tensor) -> Tensor:
    """x (N, D) float -> (N,) int64 nearest codes (the library's argmax of minus the distance)."""
    return _common.nearest(self, x, self.embed)


def _init_embed_(self, data: Tensor) -> None:
    """k-means initialization on this rank's rows data (N, D), then rank 0's buffers to all."""
    if self.inited:
        return
    embed, cluster_size = _common.kmeans_keep(self, data, self.codebook_size, self.kmeans_iters)
    self.embed.data.copy_(embed)
    self.embed_avg.data.copy_(embed)
    self.cluster_size.data.copy_(cluster_size)
    self.inited.data.fill_(1.0)
    _common.broadcast_buffers(self)


def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) -> (quantize (..., D) in the codebook's dtype, codes (...,) int64); in
    training, code expiry then the EMA update, in the library's order."""
    shape = x.shape
    x = self.preprocess(x)
    self.init_embed_(x)
    flat_ind = self.quantize(x)
    embed_ind = self.postprocess_emb(flat_ind, shape)
    quantize = self.dequantize(embed_ind)
    if self.training:
        self.expire_codes_(x)
        counts, sums = _common.code_stats(self, flat_ind, x, self.codebook_size)
        _common.ema_(self.cluster_size, counts, self.decay)
        _common.ema_(self.embed_avg, sums, self.decay)
        sizes = _common.laplace_sizes(self.cluster_size, self.epsilon)
        self.embed.data.copy_(self.embed_avg / sizes.unsqueeze(1))
    return quantize, embed_ind


register(
    "encodec.quantization.core_vq.EuclideanCodebook",
    methods={"forward": _forward, "quantize": _quantize, "init_embed_": _init_embed_},
)
