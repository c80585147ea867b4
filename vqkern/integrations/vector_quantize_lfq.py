"""vector-quantize-pytorch's ``LFQ`` (lookup-free quantization) with vqkern's streamed entropy,
and with it every ``ResidualLFQ`` and ``GroupedResidualLFQ`` built from it.

The library forms its entropy aux loss from an (N, 2^d) softmax over every code (17 GB of
fp32 at 2^18 codes and 16,384 rows). ``vqkern.LFQ`` computes the same terms with
``vqkern.lfq_entropy`` in O(N d + 2^d) memory; its forward is a function of the layer
(``vqkern.compat.lfq.lfq_forward``) that reads only attributes the library's LFQ has under
the same names and meanings, so a patched layer runs that very code on its own submodules,
buffers and options. Where the two classes differ, the function reads what both agree on:
the library keeps a (2^d, d) ``codebook`` buffer fixed at construction, which the entropy
op never needs (it forms the codes from ``codebook_scale`` and ``spherical``, as the
library's buffer was formed), and its ``maybe_l2norm`` is an attribute set at
construction, which the function calls as it finds it. ResidualLFQ's and
GroupedResidualLFQ's own code (quantize dropout, scales, groups) runs unchanged and calls
the patched layers.
"""
from __future__ import annotations

import sys

import torch

from .. import distributed
from ..compat.lfq import lfq_forward
from ..lfq_entropy import MAX_BITS
from . import backend_of, register, source_mismatch

_MODULE = "vector_quantize_pytorch.lookup_free_quantization"
# The whole module of vector-quantize-pytorch 1.32.0: LFQ's forward runs through its
# module-level helpers (entropy, log, maybe_distributed_mean).
_SOURCES = frozenset({"9fb68bdcb3763ac580c2a0f931640a70a14a0fed65e0b29a8800ee015b4452eb"})


def _forward(self, x, inv_temperature=100.0, return_loss_breakdown=False, mask=None):
    """The library's ``LFQ.forward`` (same arguments and outputs) with vqkern's streamed entropy:
    x (B, N, dim) or (B, dim, ...) float -> ``Return(quantized like x, indices int64, aux loss
    scalar)`` and, with ``return_loss_breakdown``, ``LossBreakdown``."""
    return lfq_forward(self, x, inv_temperature, return_loss_breakdown, mask, backend=backend_of(self),
                       exact_masked_batch_entropy=False)


def _check(layer):
    reason = source_mismatch(sys.modules[type(layer).__module__], _SOURCES, "vector-quantize-pytorch 1.32.0")
    if reason is not None:
        return reason
    if not 1 <= layer.codebook_dim <= MAX_BITS:
        return (f"codebook_size={layer.codebook_size}: vqkern's entropy op serves 2^1 to 2^{MAX_BITS} codes "
                f"per codebook")
    return None


def _caveat(layer):
    notes = []
    dtype = layer.codebook.dtype
    if not layer.force_quantization_f32 and dtype != torch.float32:
        notes.append(f"force_quantization_f32=False on a {dtype} layer: the entropy terms are computed in fp32 "
                     f"and rounded to the input's dtype (the library computes them in the input's dtype)")
    if distributed.is_distributed():
        notes.append("inside a process group, the batch entropy is that of the mean over ranks of their average "
                     "code distributions (the library's maybe_distributed_mean discards its all-reduce's result "
                     "and divides this rank's average by the world size); a (batch, seq) mask raises there")
    return "; ".join(notes) or None


register(f"{_MODULE}.LFQ", methods={"forward": _forward}, check=_check, caveat=_caveat)
