"""taming-transformers' ``VectorQuantizer`` and ``VectorQuantizer2`` (the VQGAN lineage;
PyPI ``taming-transformers-rom1504``) on vqkern's fused search.

Both originals rank codes through the expansion ``|z|^2 + |e|^2 - 2 z.e`` (an N x K
matrix); ``VectorQuantizer`` also builds an N x K one-hot, for its code lookup (a matmul),
its perplexity and its third output, and ``get_codebook_entry`` builds another. Here the
lookup is a gather and the perplexity comes from a code histogram (the same values); the
one-hot ``min_encodings`` it returns is a sparse COO tensor of the same shape, dtype and
values (``.to_dense()`` is the original's), so no N x K is stored.
"""
from __future__ import annotations

import torch

from . import backend_of, register, source_mismatch
from ._vqgan import channels_last, forward_legacy_beta, quantize_rows, remap_to_used

_V1 = frozenset({"8ce3c308c5acae674057d4fb7630932c7a5a6237d8db618bd77e4f00882a3d42"})
_V2 = frozenset({"ed9fe16809f60b58a31830228c530ab282d4305a87d93f27ab48abec29a3c828"})
_WRITTEN_FOR = "taming-transformers-rom1504 0.0.6"


def _forward_v1(self, z):
    """z (B, e_dim, H, W) float -> (z_q like z, loss, (perplexity, min_encodings, indices)):
    perplexity a scalar, min_encodings a sparse (B*H*W, n_e) one-hot in z's dtype, indices
    int64 (B*H*W, 1). The loss weighs the codebook term by beta (the class's documented bug)."""
    z = channels_last(z, 4, self.e_dim, name="z", layout="(B, e_dim, H, W)")
    z_q, loss, indices = quantize_rows(z, self.embedding.weight, commitment_weight=1.0,
                                       codebook_weight=self.beta, backend=backend_of(self))
    n = indices.shape[0]
    # mean(one-hot, dim=0) sums exact 0/1 values in fp32 (for n < 2^24) and divides by n:
    # the histogram over n gives the same bits.
    wide = torch.float64 if z.dtype == torch.float64 else torch.float32
    e_mean = (torch.bincount(indices, minlength=self.n_e).to(wide) / n).to(z.dtype)
    perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
    rows = torch.arange(n, device=indices.device)
    # Valid and coalesced by construction (one entry per row, rows in order): no invariant check.
    min_encodings = torch.sparse_coo_tensor(torch.stack([rows, indices]), torch.ones(n, dtype=z.dtype, device=z.device),
                                            (n, self.n_e), is_coalesced=True, check_invariants=False)
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, min_encodings, indices.unsqueeze(1))


def _codebook_entry_v1(self, indices, shape):
    """indices int64 (N,) -> codes (N, e_dim) float32 (the one-hot matmul's values), viewed as
    ``shape`` (B, H, W, e_dim) and returned as (B, e_dim, H, W) when ``shape`` is given."""
    if indices.dim() != 1:
        raise ValueError(f"indices must have shape (N,), got {tuple(indices.shape)}")
    z_q = self.embedding.weight[indices].float()
    if shape is not None:
        z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
    return z_q


def _forward_v2(self, z, temp=None, rescale_logits=False, return_logits=False):
    """z (B, e_dim, H, W) float -> (z_q like z, loss, (None, None, indices)) (see
    :func:`vqkern.integrations._vqgan.forward_legacy_beta`); the other arguments exist for
    the interface of taming's Gumbel quantizer and must keep their defaults, as in the original."""
    assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
    assert rescale_logits is False, "Only for interface compatible with Gumbel"
    assert return_logits is False, "Only for interface compatible with Gumbel"
    return forward_legacy_beta(self, z, self.e_dim, "(B, e_dim, H, W)", backend_of(self))


register("taming.modules.vqvae.quantize.VectorQuantizer",
         methods={"forward": _forward_v1, "get_codebook_entry": _codebook_entry_v1},
         check=lambda layer: source_mismatch(type(layer), _V1, _WRITTEN_FOR))
register("taming.modules.vqvae.quantize.VectorQuantizer2",
         methods={"forward": _forward_v2, "remap_to_used": remap_to_used},
         check=lambda layer: source_mismatch(type(layer), _V2, _WRITTEN_FOR))
