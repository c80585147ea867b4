"""Descript's ``descript-audio-codec`` (DAC 1.0): ``dac.nn.quantize.VectorQuantize``, each layer
of its ``ResidualVectorQuantize``, served by vqkern's kernels.

DAC's codes are factorized (weight-normed 1x1 convolutions to and from a small
codebook dimension) and searched l2-normalized: the library ranks ``F.normalize(z_e)``
against ``F.normalize(codebook)`` by ``|e|^2 - 2 e C^T + |c|^2``, an N x K matrix. Patched:
``decode_latents`` (which ``forward`` and ``ResidualVectorQuantize.from_latents`` call)
searches with vqkern's cosine metric, the same ranking without the matrix. The
projections, the losses, the straight-through estimator and quantizer dropout stay
the library's own code, so their gradients are the library's.
"""
from __future__ import annotations

from torch import Tensor

from . import _common, register


def latent_rows(latents: Tensor) -> Tensor:
    """(B, D, T) -> (B * T, D): the rows ``rearrange(latents, "b d t -> (b t) d")`` gives."""
    return latents.transpose(1, 2).reshape(-1, latents.shape[1])


def _decode_latents(self, latents: Tensor) -> tuple[Tensor, Tensor]:
    """latents (B, D, T) -> (z_q (B, D, T), the unnormalized codes; indices (B, T) int64)."""
    indices = _common.nearest(self, latent_rows(latents), self.codebook.weight, metric="cosine")
    indices = indices.reshape(latents.shape[0], -1)
    return self.decode_code(indices), indices


register("dac.nn.quantize.VectorQuantize", methods={"decode_latents": _decode_latents})
