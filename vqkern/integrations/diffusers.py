"""diffusers' ``VectorQuantizer`` (the quantizer of ``VQModel``: aMUSEd, Kandinsky's MoVQ,
latent-diffusion VQ autoencoders) on vqkern's fused search.

The original ranks codes with ``torch.cdist`` (an N x K matrix) and ``remap_to_used``
compares every index with every used code (N x len(used)); here neither is built. The
forward keeps ``legacy`` (which loss term ``beta`` weighs), ``remap``/``unknown_index`` and
``sane_index_shape``; the output, the loss and the indices are the original's.
"""
from __future__ import annotations

from . import backend_of, register, source_mismatch
from ._vqgan import forward_legacy_beta, remap_to_used

# diffusers 0.42.1's models/autoencoders/vae.py VectorQuantizer.
_SOURCES = frozenset({"222ea67f4d52014d18f76b6f42baa23b3a4ccb62004514a2e1b2eaa081c1b9f4"})


def _forward(self, z):
    """z (B, vq_embed_dim, H, W) float -> (z_q like z, loss scalar, (None, None, indices))
    (see :func:`vqkern.integrations._vqgan.forward_legacy_beta`)."""
    return forward_legacy_beta(self, z, self.vq_embed_dim, "(B, vq_embed_dim, H, W)", backend_of(self))


def _check(layer):
    return source_mismatch(type(layer), _SOURCES, "diffusers 0.42.1")


register("diffusers.models.autoencoders.vae.VectorQuantizer",
         methods={"forward": _forward, "remap_to_used": remap_to_used}, check=_check)
